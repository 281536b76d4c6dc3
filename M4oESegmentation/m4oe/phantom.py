"""Synthetic abdominal phantoms: CT, T1 and T2 MR volumes with nine organ labels, for training and demos.

No trained model or public data set can be fetched where this project is built, so smoke training,
demos and tests run on these phantoms. They are not anatomy-faithful; they get right what a
segmentation pipeline can get wrong: which side is the patient's left, tissue contrasts in the
usual order per modality, partial volume, noise, an MR bias field, and varied acquisitions (voxel
spacing, field of view, slice count, and stored orientation: identity, RAS-stored as most CT NIfTI
files are, or with x and y swapped).

Frames and units. Organs are defined in an anatomy frame in millimetres, axes as LPS (x towards the
patient's left, y towards posterior, z towards superior), origin at the centre of the torso's
cross-section near the level of the renal hila. A case places that frame in the scanner with a
random shift; image and label map share one geometry exactly. CT intensities are HU, MR intensities
arbitrary non-negative units (about 0..1500, random gain per case).

How a case is built: (1) anatomy parameters drawn from ``seed`` (sizes, positions, rotations per
organ, fat and muscle thickness, a smooth random deformation); (2) an acquisition drawn from
``(seed, sequence)``; (3) on the acquisition's grid, every voxel's anatomy-frame position is
displaced by the deformation (cubic B-spline on a 50 mm control grid) and organs are evaluated as
implicit shapes there, painted in priority order so that they never overlap; (4) each tissue class
gets an intensity from the sequence's table, a smooth texture, a Gaussian blur (partial volume)
and noise (Gaussian for CT; for MR a bias field and Rician noise).

Same ``seed``, different sequences: the same anatomy, imaged with different acquisitions and lying
at a different place in the scanner. :func:`write_dataset` derives each case's seed from
``(seed, sequence, index)``, so CT, T1 and T2 data sets written with one seed hold different
anatomies (better for training a mixture of experts that must not pair cases across modalities).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.interpolate import BSpline
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from m4oe import __version__
from m4oe.errors import CancelledError, InputError, OutputError
from m4oe.io import write_atomic, write_image
from m4oe.labels import Label
from m4oe.terminology import standard_label

SEQUENCES = ("ct", "t1", "t2")
"""What :func:`generate_case` can image: ``"ct"`` (HU), ``"t1"`` and ``"t2"`` (MR)."""

CHANNEL_NAMES = {"ct": "CT", "t1": "T1", "t2": "T2"}
"""nnU-Net channel name per sequence: ``"CT"`` selects its CT normalisation, the others z-score."""

PHANTOM_LABELS: dict[str, int] = {
    "liver": 1,
    "spleen": 2,
    "kidney_right": 3,
    "kidney_left": 4,
    "aorta": 5,
    "inferior_vena_cava": 6,
    "vertebrae": 7,
    "stomach": 8,
    "pancreas": 9,
}
"""Label value of each organ (keys of ``m4oe.terminology.TERMS``). Everything else is 0."""

GENERATOR_VERSION = "1"
"""Bumped whenever the same seed starts to give a different case."""

MAX_IN_PLANE = 256
MAX_SLICES = 64
MIN_SIZE = 16
SCAN_LENGTH_MM = (120.0, 200.0)
SLICE_THICKNESS_MM = (2.0, 5.0)
IN_PLANE_SPACING_MM = {"ct": (0.7, 1.6), "t1": (1.2, 2.0), "t2": (1.2, 2.0)}
# Stored orientation (SimpleITK's code: the direction each voxel axis x, y, z points to) and odds:
# identity, RAS-stored as CT NIfTI usually is (direction diag(-1, -1, 1)), or x and y swapped.
ORIENTATIONS = {"LPS": 0.40, "RAS": 0.45, "PLS": 0.08, "ARS": 0.07}

TISSUES = (
    "air",
    "fat",
    "muscle",
    "bowel",
    "bowel_gas",
    "liver",
    "spleen",
    "kidney_cortex",
    "kidney_medulla",
    "aorta",
    "inferior_vena_cava",
    "bone_cortex",
    "bone_marrow",
    "disc",
    "csf",
    "stomach_wall",
    "stomach_fluid",
    "stomach_gas",
    "pancreas",
)
"""Tissue classes the intensity tables give values to (several per organ, some unlabelled)."""
_T = {name: index for index, name in enumerate(TISSUES)}

# Intensity of each tissue: a uniform draw in (low, high) per case. CT in HU, unenhanced, with
# overrides per contrast phase; MR in arbitrary units before a random gain.
CT_HU: dict[str, tuple[float, float]] = {
    "air": (-1000, -1000),
    "fat": (-120, -80),
    "muscle": (40, 60),
    "bowel": (15, 45),
    "bowel_gas": (-1000, -950),
    "liver": (50, 70),
    "spleen": (40, 55),
    "kidney_cortex": (28, 40),
    "kidney_medulla": (25, 35),
    "aorta": (35, 50),
    "inferior_vena_cava": (35, 50),
    "bone_cortex": (700, 1000),
    "bone_marrow": (250, 400),
    "disc": (70, 100),
    "csf": (0, 15),
    "stomach_wall": (35, 50),
    "stomach_fluid": (10, 30),
    "stomach_gas": (-1000, -950),
    "pancreas": (35, 50),
}
CT_PHASES: dict[str, dict[str, tuple[float, float]]] = {
    "native": {},
    "arterial": {
        "aorta": (250, 350),
        "inferior_vena_cava": (70, 110),
        "liver": (65, 85),
        "spleen": (90, 130),
        "kidney_cortex": (160, 220),
        "kidney_medulla": (60, 100),
        "pancreas": (100, 140),
        "stomach_wall": (70, 100),
    },
    "portal_venous": {
        "aorta": (170, 220),
        "inferior_vena_cava": (130, 170),
        "liver": (100, 130),
        "spleen": (110, 130),
        "kidney_cortex": (150, 190),
        "kidney_medulla": (130, 170),
        "pancreas": (90, 120),
        "stomach_wall": (70, 100),
    },
}
T1_SIGNAL: dict[str, tuple[float, float]] = {
    "air": (0, 0),
    "fat": (850, 950),
    "muscle": (280, 340),
    "bowel": (250, 350),
    "bowel_gas": (0, 10),
    "liver": (500, 580),
    "spleen": (330, 400),
    "kidney_cortex": (380, 440),
    "kidney_medulla": (280, 330),
    "aorta": (20, 60),
    "inferior_vena_cava": (20, 60),
    "bone_cortex": (20, 60),
    "bone_marrow": (550, 700),
    "disc": (250, 320),
    "csf": (80, 140),
    "stomach_wall": (300, 360),
    "stomach_fluid": (60, 120),
    "stomach_gas": (0, 10),
    "pancreas": (540, 620),
}
T1_BLOOD: dict[str, dict[str, tuple[float, float]]] = {
    "flow_void": {},
    "bright_blood": {"aorta": (600, 750), "inferior_vena_cava": (550, 700)},
}
T2_SIGNAL: dict[str, tuple[float, float]] = {
    "air": (0, 0),
    "fat": (600, 700),
    "muscle": (120, 170),
    "bowel": (350, 500),
    "bowel_gas": (0, 10),
    "liver": (250, 320),
    "spleen": (480, 560),
    "kidney_cortex": (500, 580),
    "kidney_medulla": (600, 700),
    "aorta": (20, 60),
    "inferior_vena_cava": (20, 60),
    "bone_cortex": (20, 50),
    "bone_marrow": (350, 450),
    "disc": (550, 700),
    "csf": (900, 1000),
    "stomach_wall": (250, 320),
    "stomach_fluid": (880, 1000),
    "stomach_gas": (0, 10),
    "pancreas": (300, 380),
}
# Smooth texture, as a fraction of the tissue's intensity (gas, air and blood are homogeneous).
TEXTURE = {
    "fat": 0.05,
    "muscle": 0.06,
    "bowel": 0.25,
    "liver": 0.05,
    "spleen": 0.05,
    "kidney_cortex": 0.05,
    "kidney_medulla": 0.06,
    "bone_marrow": 0.15,
    "disc": 0.05,
    "stomach_fluid": 0.1,
    "pancreas": 0.1,
}
PARTIAL_VOLUME_SIGMA = (0.5, 0.7, 0.7)  # Gaussian blur in voxels, (z, y, x)
CT_NOISE_HU = (8.0, 20.0)
MR_NOISE = (0.015, 0.04)  # Rician sigma as a fraction of 500 (about liver/spleen level) before gain
MR_GAIN = (0.6, 1.6)
MR_BIAS = (0.15, 0.3)  # half the log-range of the bias field's linear part (about +-15..30 %)

# The box (anatomy frame, mm, x y z) over which the random fields' control grids are laid: fixed,
# so that a seed's anatomy does not depend on the acquisition's field of view.
_FIELD_BOX = ((-260.0, 260.0), (-220.0, 220.0), (-170.0, 210.0))
_ANATOMY_STREAM = 0
_SEQUENCE_STREAM = {"ct": 1, "t1": 2, "t2": 3}
_FILE_ENDING = ".nii.gz"


def phantom_labels() -> list[Label]:
    """The phantom's labels with standard terminology, in label-value order (1 liver .. 9 pancreas)."""
    return [standard_label(key, value) for key, value in PHANTOM_LABELS.items()]


# ---------------------------------------------------------------------------------------------
# Anatomy


@dataclass(frozen=True)
class _Ellipsoid:
    """An ellipsoid in the anatomy frame: centre (x, y, z) mm, semi-axes mm, rotation (columns = local axes)."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((np.array(self.rotation) * np.array(self.radii)) ** 2).sum(axis=1))
        return np.array(self.centre) - half, np.array(self.centre) + half

    def local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        """Normalised local coordinates (u, v, w) of points (x, y, z): inside when u² + v² + w² <= 1."""
        dx, dy, dz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        r = self.rotation
        return tuple((r[0][i] * dx + r[1][i] * dy + r[2][i] * dz) / self.radii[i] for i in range(3))


def _ellipsoid(centre, radii, degrees_xyz=(0.0, 0.0, 0.0)) -> _Ellipsoid:
    matrix = Rotation.from_euler("xyz", degrees_xyz, degrees=True).as_matrix()
    return _Ellipsoid(
        tuple(float(c) for c in centre),
        tuple(float(r) for r in radii),
        tuple(tuple(float(v) for v in row) for row in matrix),
    )


@dataclass(frozen=True)
class _Anatomy:
    """One patient's anatomy, mm in the anatomy frame (see the module docstring)."""

    body: tuple[float, float, float, float]  # semi-axes: lateral, anterior, posterior; flat back y
    fat: tuple[float, float, float]  # subcutaneous fat thickness: lateral, anterior, posterior
    muscle: float  # abdominal wall thickness
    spine: tuple[float, ...]  # body centre y, body radii x y, canal y, spinous tip y, period, disc, phase
    aorta: tuple[float, ...]  # x, y, radius, dx/dz, dy/dz
    ivc: tuple[float, ...]  # x, y, radius x, radius y, dx/dz
    kidneys: tuple[_Ellipsoid, _Ellipsoid]  # right, left
    spleen: _Ellipsoid
    liver: tuple[_Ellipsoid, _Ellipsoid, float, float, float]  # right lobe, left lobe, cut x, cut z, slope
    stomach: tuple[
        tuple[_Ellipsoid, _Ellipsoid], float, float
    ]  # body, antrum; wall mm; gas fraction of depth
    pancreas: tuple[float, ...]  # x head, x tail, y body, z head, radius head, tail, dy tail, dz/dx, rz/ry
    ribs: tuple[float, float, float, float]  # lowest z, period, thickness, phase
    bowel: tuple[float, float]  # threshold of the bowel field, extra threshold for gas
    deformation_mm: float
    field_seed: int


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    u = rng.uniform
    s = u(0.88, 1.12)  # overall size
    lateral, anterior = 160 * s * u(0.93, 1.07), 120 * s * u(0.93, 1.07)
    posterior = anterior * u(0.85, 0.95)
    back = 0.92 * posterior
    fat_scale = u(0.4, 1.6)
    fat = (18 * fat_scale, 22 * fat_scale, 12 * fat_scale)
    muscle = u(7, 13)
    cavity_x = lateral - fat[0] - muscle
    cavity_ant = anterior - fat[1] - muscle

    tip = back - fat[2] - u(6, 12)
    canal = tip - u(34, 40)
    vb_rx, vb_ry = 22 * s * u(0.9, 1.1), 17 * s * u(0.9, 1.1)
    vb_y = canal - 9 - vb_ry
    period = u(30, 36)
    spine = (vb_y, vb_rx, vb_ry, canal, tip, period, u(7, 10), u(0, period))

    r_ao = 11 * np.sqrt(s) * u(0.85, 1.15)
    aorta = (u(10, 22) * s, vb_y - vb_ry - r_ao - u(1, 4), r_ao, u(-0.05, 0.05), u(-0.05, 0.05))
    ivc = (-u(18, 28) * s, vb_y - vb_ry - u(5, 10), u(11, 15) * s, u(7, 11) * s, u(-0.05, 0.05))

    kidneys = []
    for side, z_range in ((-1, (-40, -20)), (1, (-25, -5))):
        centre = (side * u(68, 82) * s, vb_y + u(-5, 8), u(*z_range))
        radii = np.array((u(22, 28), u(19, 24), u(48, 58))) * s
        kidneys.append(_ellipsoid(centre, radii, (u(-5, 5), -side * u(8, 18), -side * u(25, 40))))

    spleen_centre = (u(0.6, 0.7) * cavity_x, u(0.3, 0.5) * (posterior - fat[2] - muscle), u(25, 50))
    spleen = _ellipsoid(
        spleen_centre, np.array((u(18, 26), u(45, 60), u(40, 55))) * s, (u(-8, 8), u(-8, 8), u(40, 65))
    )

    right_lobe = _ellipsoid(
        (-u(0.35, 0.45) * cavity_x, u(-0.1, 0.1) * cavity_ant, u(30, 50)),
        np.array((u(65, 80), u(70, 85), u(80, 95))) * s,
        (u(-5, 5), u(-8, 8), u(-10, 10)),
    )
    left_lobe = _ellipsoid(
        (u(0, 25) * s, -u(0.4, 0.55) * cavity_ant, u(45, 70)),
        np.array((u(50, 70), u(25, 35), u(35, 45))) * s,
        (u(-5, 5), u(-5, 5), u(-15, 5)),
    )
    cut_x = right_lobe.centre[0] - right_lobe.radii[0]
    cut_z = right_lobe.centre[2] - right_lobe.radii[2] * u(0.75, 0.95)
    liver = (right_lobe, left_lobe, cut_x, cut_z, u(0.15, 0.3))

    stomach_body = _ellipsoid(
        (u(0.3, 0.45) * cavity_x, -u(0.35, 0.5) * cavity_ant, u(45, 65)),
        np.array((u(32, 42), u(26, 34), u(45, 60))) * s,
        (u(-8, 8), u(-20, -5), u(20, 40)),
    )
    antrum = _ellipsoid(
        (u(0.0, 0.15) * cavity_x, -u(0.45, 0.6) * cavity_ant, u(15, 35)),
        np.array((u(40, 55), u(15, 22), u(15, 22))) * s,
        (u(-5, 5), u(-25, -10), u(-10, 10)),
    )

    y_body = aorta[1] - r_ao - u(12, 20)
    pancreas = (
        -u(30, 45) * s,
        u(75, 95) * s,
        y_body,
        u(-10, 10),
        u(13, 18) * s,
        u(7, 10) * s,
        u(25, 45),
        u(0.05, 0.2),
        u(0.7, 0.9),
    )
    return _Anatomy(
        body=(lateral, anterior, posterior, back),
        fat=fat,
        muscle=muscle,
        spine=spine,
        aorta=aorta,
        ivc=ivc,
        kidneys=(kidneys[0], kidneys[1]),
        spleen=spleen,
        liver=liver,
        stomach=((stomach_body, antrum), u(3, 5), u(0.05, 0.35)),
        pancreas=pancreas,
        ribs=(u(10, 40), u(22, 30), u(8, 11), u(0, 30)),
        bowel=(u(-0.7, 0.1), u(1.2, 1.8)),
        deformation_mm=u(3, 6),
        field_seed=int(rng.integers(2**63)),
    )


# ---------------------------------------------------------------------------------------------
# Acquisition


@dataclass(frozen=True)
class _Acquisition:
    """Grid and contrast of one case. Grid axes (x, y, z) are LPS-aligned before reorientation."""

    sequence: str
    spacing: tuple[float, float, float]  # mm
    size: tuple[int, int, int]  # voxels
    origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)
    shift: tuple[float, float, float]  # LPS position of the anatomy frame's origin
    orientation: str  # stored orientation code, see ORIENTATIONS
    contrast: str  # CT phase, or MR blood signal


def _draw_acquisition(
    anatomy: _Anatomy, sequence: str, rng: np.random.Generator, max_size: int
) -> _Acquisition:
    u = rng.uniform
    lateral, anterior, _, back = anatomy.body
    width, depth = 2 * lateral, anterior + back
    margin = u(30, 80)
    if sequence == "ct":
        fov_x = fov_y = max(width, depth) + margin
        contrast = str(rng.choice(list(CT_PHASES), p=[0.35, 0.2, 0.45]))
    else:
        fov_x = width + margin
        fov_y = max(fov_x * u(0.75, 0.9), depth + margin / 2)
        contrast = str(rng.choice(list(T1_BLOOD))) if sequence == "t1" else "flow_void"
    spacing_xy = u(*IN_PLANE_SPACING_MM[sequence])
    length, thickness = u(*SCAN_LENGTH_MM), u(*SLICE_THICKNESS_MM)
    in_plane_cap, slice_cap = min(MAX_IN_PLANE, max_size), min(MAX_SLICES, max_size)
    nx = min(int(np.ceil(fov_x / spacing_xy)), in_plane_cap)
    ny = min(int(np.ceil(fov_y / spacing_xy)), in_plane_cap)
    spacing_xy = max(spacing_xy, fov_x / nx, fov_y / ny)
    nz = min(round(length / thickness), slice_cap)
    thickness = length / nz
    # Where the scan lies in the anatomy frame: always across the renal hila and pancreas.
    centre = (u(-0.25, 0.25) * margin, (back - anterior) / 2 + u(-0.2, 0.2) * margin, u(-10, 30))
    shift = (u(-30, 30), u(-40, 40), u(-600, 200))
    spacing = (spacing_xy, spacing_xy, thickness)
    size = (nx, ny, nz)
    origin = tuple(shift[i] + centre[i] - (size[i] - 1) * spacing[i] / 2 for i in range(3))
    orientation = str(rng.choice(list(ORIENTATIONS), p=list(ORIENTATIONS.values())))
    return _Acquisition(sequence, spacing, size, origin, shift, orientation, contrast)


# ---------------------------------------------------------------------------------------------
# Rendering


def _bspline_basis(coords: np.ndarray, low: float, high: float, step: float) -> np.ndarray:
    """Cubic B-spline basis (n points, m functions) on knots every ``step`` mm across [low, high]."""
    intervals = int(np.ceil((high - low) / step))
    knots = low + step * np.arange(-3, intervals + 4)
    points = np.clip(coords, low, low + step * intervals)
    return BSpline.design_matrix(points, knots, 3).toarray().astype(np.float32)


class _SmoothNoise:
    """Unit-variance smooth random fields on a grid, from random cubic B-spline control values.

    The field's 3D basis is the product of 1D bases, so a field on a (Z, Y, X) grid costs a few
    matrix products; dividing by the per-voxel standard deviation (also a product of 1D factors)
    makes the variance exactly 1 everywhere.
    """

    def __init__(self, axes_xyz: tuple[np.ndarray, np.ndarray, np.ndarray], step_mm: float):
        self.basis = [_bspline_basis(a, *_FIELD_BOX[i], step_mm) for i, a in enumerate(axes_xyz)]
        sd = [np.sqrt((b**2).sum(axis=1)) for b in self.basis]
        self.scale = 1.0 / (sd[2][:, None, None] * sd[1][None, :, None] * sd[0][None, None, :])

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        bx, by, bz = self.basis
        control = rng.standard_normal((bz.shape[1], by.shape[1], bx.shape[1]), dtype=np.float32)
        field = np.einsum("abc,za,yb,xc->zyx", control, bz, by, bx, optimize=True)
        return np.ascontiguousarray(field * self.scale, dtype=np.float32)


class _Canvas:
    """Tissue and label arrays (Z, Y, X) of one case, and the deformed anatomy coordinates of every voxel."""

    def __init__(self, anatomy: _Anatomy, acq: _Acquisition):
        nx, ny, nz = acq.size
        # Undeformed anatomy-frame coordinates (mm) of the voxel centres along each axis.
        self.axes = tuple(
            (acq.origin[i] - acq.shift[i] + acq.spacing[i] * np.arange(n)).astype(np.float32)
            for i, n in enumerate((nx, ny, nz))
        )
        self.spacing = acq.spacing
        fields = np.random.default_rng(anatomy.field_seed)
        coarse = _SmoothNoise(self.axes, 50.0)
        displacement = [anatomy.deformation_mm * coarse(fields) for _ in range(3)]
        self.max_shift = float(max(np.abs(d).max() for d in displacement))
        ax, ay, az = self.axes
        self.x = ax[None, None, :] + displacement[0]
        self.y = ay[None, :, None] + displacement[1]
        self.z = az[:, None, None] + displacement[2]
        fine = _SmoothNoise(self.axes, 15.0)
        self.bowel_field = fine(fields)
        self.texture = fine(fields)
        self.tissue = np.zeros((nz, ny, nx), np.uint8)
        self.labels = np.zeros((nz, ny, nx), np.uint8)

    def box(self, low, high) -> tuple[slice, slice, slice] | None:
        """Index slices (z, y, x) of the voxels whose deformed position may lie in [low, high] (x y z mm)."""
        slices = []
        for i in (2, 1, 0):
            first = (low[i] - self.max_shift - self.axes[i][0]) / self.spacing[i]
            last = (high[i] + self.max_shift - self.axes[i][0]) / self.spacing[i]
            start, stop = max(int(np.floor(first)), 0), min(int(np.ceil(last)) + 1, self.axes[i].size)
            if stop <= start:
                return None
            slices.append(slice(start, stop))
        return tuple(slices)

    def coords(self, box):
        return self.x[box], self.y[box], self.z[box]

    def paint(self, box, mask: np.ndarray, tissue: str, label: str | None = None) -> None:
        self.tissue[box][mask] = _T[tissue]
        self.labels[box][mask] = PHANTOM_LABELS[label] if label else 0


def _ellipse(x, y, a: float, b_front: float, b_back: float, back: float) -> np.ndarray:
    """Inside an ellipse with anterior / posterior semi-axes ``b_front`` / ``b_back``, cut flat at y = ``back``."""
    b = np.where(y < 0, np.float32(b_front), np.float32(b_back))
    return ((x / a) ** 2 + (y / b) ** 2 <= 1.0) & (y <= back)


def _paint_torso(c: _Canvas, a: _Anatomy) -> np.ndarray:
    """Body, fat, wall muscle, ribs, back muscles and the bowel/mesenteric fat; returns the cavity mask."""
    lateral, anterior, posterior, back = a.body
    f_lat, f_ant, f_post = a.fat
    m = a.muscle
    body = _ellipse(c.x, c.y, lateral, anterior, posterior, back)
    wall = _ellipse(c.x, c.y, lateral - f_lat, anterior - f_ant, posterior - f_post, back - f_post)
    cavity = _ellipse(
        c.x, c.y, lateral - f_lat - m, anterior - f_ant - m, posterior - f_post - m, back - f_post - m
    )
    c.tissue[body] = _T["fat"]
    c.tissue[wall] = _T["muscle"]

    # Bowel loops fill the peritoneal cavity; the retroperitoneum (behind the vertebral bodies' front) is fat.
    vb_y = a.spine[0]
    retro = np.where(c.axes[1] > vb_y - a.spine[2] - 10, np.float32(3.0), np.float32(0.0))
    score = c.bowel_field - retro[None, :, None]
    threshold, gas = a.bowel
    inside = cavity & (score > threshold)
    c.tissue[cavity] = _T["fat"]
    c.tissue[inside] = _T["bowel"]
    c.tissue[inside & (score > threshold + gas) & (c.texture > 0.0)] = _T["bowel_gas"]

    # Ribs: oblique bands in the wall of the upper abdomen, descending towards the front.
    lowest, period, thickness, phase = a.ribs
    ring = wall & ~cavity & (c.z > lowest - 30)
    index = np.flatnonzero(ring)
    x, y, z = c.x.ravel()[index], c.y.ravel()[index], c.z.ravel()[index]
    angle = np.abs(np.arctan2(x, y))  # 0 at the back, pi at the front
    level = z + 25.0 * angle
    rib = (np.mod(level - phase, period) < thickness) & (angle > 0.35) & (angle < 2.6) & (level > lowest + 40)
    c.tissue.ravel()[index[rib]] = _T["bone_cortex"]

    # Paraspinal muscles and psoas (psoas thicker inferiorly).
    vb_y, vb_rx, vb_ry, canal, tip = a.spine[:5]
    for side in (-1.0, 1.0):
        x0 = side * (12 + 1.1 * vb_rx)
        box = c.box((x0 - 40, canal - 30, -1e4), (x0 + 40, back, 1e4))
        if box is not None:
            x, y, _ = c.coords(box)
            mask = (((x - x0) / 26) ** 2 + ((y - canal - 8) / 24) ** 2 <= 1) & wall[box]
            c.paint(box, mask, "muscle")
        xp = side * (vb_rx + 12)
        box = c.box((xp - 30, vb_y - 30, -1e4), (xp + 30, vb_y + 30, 1e4))
        if box is not None:
            x, y, z = c.coords(box)
            radius = np.clip(12 - 0.08 * z, 4, 22)
            c.paint(box, ((x - xp) ** 2 + ((y - vb_y) / 0.9) ** 2 <= radius**2) & cavity[box], "muscle")
    return cavity


def _paint_organs(c: _Canvas, a: _Anatomy, cavity: np.ndarray) -> None:
    """Organs from lowest to highest priority, each overwriting what was painted before it."""
    # Liver: right lobe and left lobe, the inferior surface cut by a plane rising to the left.
    right_lobe, left_lobe, cut_x, cut_z, slope = a.liver
    low = np.minimum(right_lobe.bounds()[0], left_lobe.bounds()[0])
    high = np.maximum(right_lobe.bounds()[1], left_lobe.bounds()[1])
    box = c.box(low, high)
    if box is not None:
        x, y, z = c.coords(box)
        inside = np.zeros(x.shape, bool)
        for lobe in (right_lobe, left_lobe):
            u, v, w = lobe.local(x, y, z)
            inside |= u * u + v * v + w * w <= 1
        inside &= z > cut_z + slope * (x - cut_x)
        c.paint(box, inside & cavity[box], "liver", "liver")

    # Stomach: body (left, upper) and antrum (anterior, across the midline); wall, fluid, and gas
    # above an air-fluid level (the patient lies supine: gas rises anteriorly, to smaller y).
    parts, wall_mm, gas_fraction = a.stomach
    low = np.minimum(*(p.bounds()[0] for p in parts))
    high = np.maximum(*(p.bounds()[1] for p in parts))
    box = c.box(low, high)
    if box is not None:
        x, y, z = c.coords(box)
        organ = np.zeros(x.shape, bool)
        content = np.zeros(x.shape, bool)
        for part in parts:
            u, v, w = part.local(x, y, z)
            r2 = u * u + v * v + w * w
            organ |= r2 <= 1
            content |= r2 <= (1 - wall_mm / min(part.radii)) ** 2
        organ &= cavity[box]
        gas = c.axes[1][box[1]][None, :, None] < low[1] + gas_fraction * (high[1] - low[1])
        c.paint(box, organ, "stomach_wall", "stomach")
        c.paint(box, organ & content, "stomach_fluid", "stomach")
        c.paint(box, organ & content & gas, "stomach_gas", "stomach")

    # Spleen: a crescent, its concave visceral surface facing medially.
    box = c.box(*a.spleen.bounds())
    if box is not None:
        x, y, z = c.coords(box)
        u, v, w = a.spleen.local(x, y, z)
        organ = (u * u + v * v + w * w <= 1) & ((u + 1.15) ** 2 + v * v + w * w > 0.6**2)
        c.paint(box, organ & cavity[box], "spleen", "spleen")

    # Pancreas: a tube along x from the head (patient right) to the tail (left, higher, posterior).
    x_head, x_tail, y_body, z_head, r_head, r_tail, dy_tail, rise, flat = a.pancreas
    z_tail = z_head + rise * (x_tail - x_head)
    box = c.box(
        (x_head - r_head, y_body - r_head, z_head - r_head),
        (x_tail + r_head, y_body + dy_tail + r_head, z_tail + r_head),
    )
    if box is not None:
        x, y, z = c.coords(box)
        t = (x - x_head) / (x_tail - x_head)  # 0 at the head, 1 at the tail
        end = np.clip((np.abs(2 * t - 1) - 0.8) / 0.2, 0, 1)  # rounded ends over the last tenth
        radius = (r_head + (r_tail - r_head) * t) * np.sqrt(1 - end**2)
        centre_y = y_body + dy_tail * np.clip(t, 0, 1) ** 2
        centre_z = z_head + rise * (x - x_head)
        organ = (np.abs(2 * t - 1) <= 1) & ((y - centre_y) ** 2 + ((z - centre_z) / flat) ** 2 <= radius**2)
        c.paint(box, organ & cavity[box], "pancreas", "pancreas")

    # Kidneys: cortex and medulla, bean-shaped by a medial notch filled with sinus fat.
    for kidney, key in zip(a.kidneys, ("kidney_right", "kidney_left"), strict=True):
        box = c.box(*kidney.bounds())
        if box is None:
            continue
        lateral = -1.0 if key == "kidney_right" else 1.0
        x, y, z = c.coords(box)
        u, v, w = kidney.local(x, y, z)
        r2 = u * u + v * v + w * w
        hilum = (u + 0.9 * lateral) ** 2 + (v + 0.2) ** 2 + (w / 1.5) ** 2 <= 0.5**2
        inside = (r2 <= 1) & cavity[box]
        c.paint(box, inside & ~hilum, "kidney_cortex", key)
        c.paint(box, inside & ~hilum & (r2 <= 0.72), "kidney_medulla", key)
        c.paint(box, inside & hilum, "fat")

    # Inferior vena cava (flattened, moving forward into the liver superiorly) and aorta.
    x0, y0, rx, ry, dxdz = a.ivc
    box = c.box((x0 - rx - 30, y0 - ry - 40, -1e4), (x0 + rx + 30, y0 + ry + 10, 1e4))
    if box is not None:
        x, y, z = c.coords(box)
        yc = y0 - 0.25 * np.maximum(z - 40, 0)
        organ = ((x - x0 - dxdz * z) / rx) ** 2 + ((y - yc) / ry) ** 2 <= 1
        c.paint(box, organ & cavity[box], "inferior_vena_cava", "inferior_vena_cava")
    x0, y0, r, dxdz, dydz = a.aorta
    box = c.box((x0 - r - 30, y0 - r - 30, -1e4), (x0 + r + 30, y0 + r + 30, 1e4))
    if box is not None:
        x, y, z = c.coords(box)
        organ = (x - x0 - dxdz * z) ** 2 + (y - y0 - dydz * z) ** 2 <= r * r
        c.paint(box, organ & cavity[box], "aorta", "aorta")

    # Vertebrae: bodies (cortex, marrow) separated by discs, around the canal an arch with spinous
    # and transverse processes. Discs and the canal are not part of the label.
    vb_y, vb_rx, vb_ry, canal, tip, period, disc, phase = a.spine
    box = c.box((-50, vb_y - vb_ry - 5, -1e4), (50, tip + 5, 1e4))
    if box is not None:
        x, y, z = c.coords(box)
        level = np.mod(z - phase, period)
        r2 = (x / vb_rx) ** 2 + ((y - vb_y) / vb_ry) ** 2
        body = r2 <= 1
        gap = level < disc
        endplate = (level < disc + 1.5) | (level > period - 1.5) | (r2 > (1 - 2.5 / vb_rx) ** 2)
        c2 = x * x + (y - canal) ** 2
        arch = (c2 <= 14**2) | ((np.abs(x) <= 4) & (y >= canal) & (y <= tip))
        arch |= (np.abs(y - canal + 2) <= 4.5) & (np.abs(x) <= 1.8 * vb_rx)
        arch &= ~body & ~gap
        c.paint(box, arch, "bone_cortex", "vertebrae")
        c.paint(box, body & ~gap, "bone_marrow", "vertebrae")
        c.paint(box, body & ~gap & endplate, "bone_cortex", "vertebrae")
        c.paint(box, body & gap, "disc")
        c.paint(box, c2 <= 8**2, "csf")


def _intensity_table(sequence: str, contrast: str, rng: np.random.Generator) -> np.ndarray:
    """Intensity per tissue class (HU for CT, arbitrary units for MR), drawn from the sequence's table."""
    if sequence == "ct":
        table = {**CT_HU, **CT_PHASES[contrast]}
    elif sequence == "t1":
        table = {**T1_SIGNAL, **T1_BLOOD[contrast]}
    else:
        table = dict(T2_SIGNAL)
    return np.array([rng.uniform(*table[name]) for name in TISSUES], np.float32)


def _render(anatomy: _Anatomy, acq: _Acquisition, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Intensity (float32) and label (uint8) arrays, (Z, Y, X) on the acquisition's LPS-aligned grid."""
    canvas = _Canvas(anatomy, acq)
    cavity = _paint_torso(canvas, anatomy)
    _paint_organs(canvas, anatomy, cavity)

    values = _intensity_table(acq.sequence, acq.contrast, rng)
    texture = np.array([TEXTURE.get(name, 0.0) for name in TISSUES], np.float32)
    tissue = canvas.tissue
    image = values[tissue] * (1.0 + texture[tissue] * canvas.texture)
    image = gaussian_filter(image, PARTIAL_VOLUME_SIGMA, mode="nearest")
    if acq.sequence == "ct":
        image += np.float32(rng.uniform(*CT_NOISE_HU)) * rng.standard_normal(image.shape, np.float32)
        np.clip(image, -1024.0, 3071.0, out=image)
    else:
        image *= _bias_field(canvas.axes, rng)
        sigma = np.float32(rng.uniform(*MR_NOISE) * 500.0)
        real = image + sigma * rng.standard_normal(image.shape, np.float32)
        imaginary = sigma * rng.standard_normal(image.shape, np.float32)
        image = np.hypot(real, imaginary) * np.float32(rng.uniform(*MR_GAIN))
    return image.astype(np.float32, copy=False), canvas.labels


def _bias_field(axes_xyz, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field (Z, Y, X): exp of a second-order polynomial, about +-15..30 %.

    A linear ramp in a random direction (``MR_BIAS`` is half its log-range across the field of
    view) plus an in-plane quadratic term (centre brighter or darker than the edges, as coil
    profiles are), in coordinates normalised to [-1, 1] over the field of view.
    """
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    ramp, bowl = rng.uniform(*MR_BIAS), rng.uniform(-0.15, 0.15)
    n = [((a - a.mean()) / max(float(np.ptp(a)) / 2, 1e-6)).astype(np.float32) for a in axes_xyz]
    log_x = ramp * float(direction[0]) * n[0] + bowl * n[0] ** 2
    log_y = ramp * float(direction[1]) * n[1] + bowl * n[1] ** 2
    log_z = ramp * float(direction[2]) * n[2]
    return np.exp(log_z[:, None, None] + log_y[None, :, None] + log_x[None, None, :])


# ---------------------------------------------------------------------------------------------
# Public API


def _check_sequence(modality: str) -> str:
    name = modality.strip().lower() if isinstance(modality, str) else None
    if name not in SEQUENCES:
        raise InputError(f"phantom modality {modality!r} is not one of {', '.join(SEQUENCES)}")
    return name


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _make_case(modality: str, seed: int, max_size: int | None) -> tuple[sitk.Image, sitk.Image, dict]:
    sequence = _check_sequence(modality)
    seed = _check_int(seed, "phantom seed", 0)
    cap = MAX_IN_PLANE if max_size is None else _check_int(max_size, "phantom max_size", MIN_SIZE)
    anatomy = _draw_anatomy(np.random.default_rng((seed, _ANATOMY_STREAM)))
    rng = np.random.default_rng((seed, _SEQUENCE_STREAM[sequence]))
    acq = _draw_acquisition(anatomy, sequence, rng, cap)
    intensities, labels = _render(anatomy, acq, rng)
    images = []
    for array in (intensities, labels):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(acq.spacing)
        image.SetOrigin(acq.origin)
        images.append(sitk.DICOMOrient(image, acq.orientation))
    info = {
        "seed": seed,
        "sequence": sequence,
        "contrast": acq.contrast,
        "orientation": acq.orientation,
        "size": list(images[0].GetSize()),
        "spacing_mm": [round(s, 4) for s in images[0].GetSpacing()],
    }
    return images[0], images[1], info


def generate_case(modality: str, seed: int, *, max_size: int | None = None) -> tuple[sitk.Image, sitk.Image]:
    """One synthetic abdominal volume and its label map.

    Args:
        modality: ``"ct"`` (HU), ``"t1"`` or ``"t2"`` (MR, arbitrary non-negative units); any case.
        seed: integer >= 0. The same seed gives the same anatomy for every modality (see the
            module docstring) and the same arrays every time.
        max_size: at most this many voxels along any axis (>= 16; default 256 in-plane and 64
            slices); the field of view and the anatomy are unchanged, the spacing grows.

    Returns:
        ``(image, labels)``: 3D SimpleITK images of one geometry (size, spacing in mm, origin and
        direction in LPS). ``image`` is float32; ``labels`` uint8 with :data:`PHANTOM_LABELS`
        values, 0 elsewhere (air, fat, muscle, bowel, ribs, discs, canal). The stored orientation
        is one of :data:`ORIENTATIONS`: direction identity, diag(-1, -1, 1), or x and y swapped.
        In-plane spacing 0.7-1.8 mm (CT) or 1.2-2.0 mm (MR), 2-5 mm slices over 120-200 mm.

    Raises:
        InputError: ``modality`` is not ct, t1 or t2; ``seed`` or ``max_size`` is not an integer in range.
    """
    image, labels, _ = _make_case(modality, seed, max_size)
    return image, labels


def case_seed(seed: int, modality: str, index: int) -> int:
    """The :func:`generate_case` seed of case ``index`` of a data set written with ``seed``."""
    stream = (_check_int(seed, "phantom seed", 0), _SEQUENCE_STREAM[_check_sequence(modality)], index)
    return int(np.random.SeedSequence(stream).generate_state(1, np.uint64)[0] >> np.uint64(1))


def write_dataset(
    out_dir: str | Path,
    modality: str,
    cases: int,
    seed: int,
    *,
    dataset_name: str | None = None,
    max_size: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Path:
    """Write ``cases`` phantom cases as an nnU-Net v2 raw data set; returns ``out_dir``.

    Layout: ``imagesTr/{name}_{i:03d}_0000.nii.gz`` (CT as int16 HU, MR as uint16, as scanners
    store them), ``labelsTr/{name}_{i:03d}.nii.gz`` (uint8, same geometry as its image), and
    ``dataset.json`` with nnU-Net's ``channel_names`` (``CT``, ``T1`` or ``T2``), ``labels``,
    ``numTraining`` and ``file_ending``, plus ``modality`` (ct/mr), ``sequence``, ``generator``,
    ``seed`` and ``phantom_cases`` (per case: files, seed for :func:`generate_case`, contrast,
    orientation, size, spacing). ``name`` defaults to ``phantom{sequence}``. Case ``i`` uses
    :func:`case_seed` ``(seed, modality, i)``. ``dataset.json`` is written last, so a folder
    holding one holds a complete data set.

    ``progress(done, total)`` is called after each case; ``cancel()`` returning True stops
    before the next case with :class:`CancelledError`.

    Raises:
        InputError: a bad modality, count, seed, size or name.
        OutputError: ``out_dir`` already holds a ``dataset.json`` or any of the case files and
            ``overwrite`` is False; it holds image files of another data set; or it cannot be written.
    """
    sequence = _check_sequence(modality)
    cases = _check_int(cases, "number of phantom cases", 1)
    seed = _check_int(seed, "phantom seed", 0)
    if max_size is not None:
        _check_int(max_size, "phantom max_size", MIN_SIZE)
    name = f"phantom{sequence}" if dataset_name is None else dataset_name
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise InputError(f"dataset name {name!r} must be letters, digits, '_' or '-'")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError("is not a folder", out)
    manifest = out / "dataset.json"
    if manifest.exists() and not overwrite:
        raise OutputError("holds a data set already (dataset.json); pass --overwrite to replace it", out)
    images, labels = out / "imagesTr", out / "labelsTr"
    image_paths = [images / f"{name}_{i:03d}_0000{_FILE_ENDING}" for i in range(cases)]
    label_paths = [labels / f"{name}_{i:03d}{_FILE_ENDING}" for i in range(cases)]
    ours = re.compile(rf"{re.escape(name)}_\d{{3,}}(_0000)?{re.escape(_FILE_ENDING)}")
    stale = []
    for folder in (images, labels):
        for path in sorted(folder.glob(f"*{_FILE_ENDING}")) if folder.is_dir() else []:
            if not ours.fullmatch(path.name):
                raise OutputError(
                    f"holds {path.name}, not a file of data set {name!r}; use another folder", folder
                )
            if not overwrite:
                raise OutputError("exists; pass --overwrite to replace it", path)
            if path not in image_paths and path not in label_paths:
                stale.append(path)
    try:
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        manifest.unlink(missing_ok=True)
        for path in stale:
            path.unlink()
    except OSError as error:
        raise OutputError(f"cannot be written ({error.strerror or error})", out) from None

    records = []
    for i in range(cases):
        if cancel is not None and cancel():
            raise CancelledError(f"cancelled after {i} of {cases} phantom cases", out)
        image, label_map, info = _make_case(sequence, case_seed(seed, sequence, i), max_size)
        stored = sitk.Cast(sitk.Round(image), sitk.sitkInt16 if sequence == "ct" else sitk.sitkUInt16)
        write_image(stored, image_paths[i], overwrite=overwrite)
        write_image(label_map, label_paths[i], overwrite=overwrite)
        records.append(
            {"image": f"imagesTr/{image_paths[i].name}", "label": f"labelsTr/{label_paths[i].name}", **info}
        )
        if progress is not None:
            progress(i + 1, cases)

    dataset = {
        "channel_names": {"0": CHANNEL_NAMES[sequence]},
        "labels": {"background": 0, **PHANTOM_LABELS},
        "numTraining": cases,
        "file_ending": _FILE_ENDING,
        "name": name,
        "description": f"synthetic abdominal {CHANNEL_NAMES[sequence]} phantoms (m4oe.phantom), not patient data",
        "licence": "CC0-1.0",
        "modality": "ct" if sequence == "ct" else "mr",
        "sequence": sequence,
        "generator": f"m4oe phantom {GENERATOR_VERSION} (m4oe {__version__})",
        "seed": seed,
        "phantom_cases": records,
    }
    write_atomic(manifest, lambda tmp: tmp.write_text(json.dumps(dataset, indent=1) + "\n"), overwrite=True)
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def add_phantom_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``m4oe phantom OUT_DIR --modality ct|t1|t2 --cases N --seed S [--max-size N] [--overwrite]``."""
    parser = subparsers.add_parser(
        "phantom", help="write synthetic abdominal CT/T1/T2 cases as an nnU-Net v2 raw data set"
    )
    parser.add_argument("out_dir", help="data set folder (imagesTr/, labelsTr/, dataset.json)")
    parser.add_argument("--modality", default="ct", metavar="{ct,t1,t2}", help="default: ct")
    parser.add_argument("--cases", type=int, default=10, help="number of cases (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default: 0)")
    parser.add_argument(
        "--max-size", type=int, default=None, help="at most this many voxels along any axis (default: 256/64)"
    )
    parser.add_argument("--name", default=None, help="case name prefix (default: phantom<modality>)")
    parser.add_argument("--overwrite", action="store_true", help="replace a data set already there")
    return parser


def run_phantom(args) -> int:
    """Run the ``phantom`` command from parsed arguments; returns the exit code (0)."""
    bar = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if bar:
            sys.stderr.write(f"\rphantom {args.modality}: {done}/{total} cases")
            sys.stderr.write("\n" if done == total else "")
            sys.stderr.flush()

    out = write_dataset(
        args.out_dir,
        args.modality,
        args.cases,
        args.seed,
        dataset_name=args.name,
        max_size=args.max_size,
        overwrite=args.overwrite,
        progress=progress,
    )
    print(f"wrote {args.cases} {args.modality} phantom cases to {out} (dataset.json, imagesTr, labelsTr)")
    return 0
