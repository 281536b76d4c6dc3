"""How a phantom case is imaged: acquisition (grid, contrast, stored orientation) and rendering.

The second step of the generator behind :mod:`m4oe.phantom` (whose docstring describes frames, units
and the steps of a case): images the anatomy that :mod:`m4oe.phantom_anatomy` draws. Nothing here
writes files. Arrays are (z, y, x) on the acquisition's grid before its stored orientation is
applied; the anatomy frame is LPS in millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m4oe.phantom_anatomy import PHANTOM_LABELS, _Anatomy

# scipy (interpolate, ndimage) is imported inside the two functions that use it: ``m4oe.cli``
# imports the phantom module to build its parser, and scipy took 0.7 s of every command's start.


SEQUENCES = ("ct", "t1", "t2")
"""What :func:`m4oe.phantom.generate_case` can image: ``"ct"`` (HU), ``"t1"`` and ``"t2"`` (MR)."""

MAX_IN_PLANE = 256
MAX_SLICES = 64
MIN_SIZE = 16
SCAN_LENGTH_MM = (120.0, 200.0)
SLICE_THICKNESS_MM = (2.0, 5.0)
IN_PLANE_SPACING_MM = {"ct": (0.7, 1.6), "t1": (1.2, 2.0), "t2": (1.2, 2.0)}
# Stored orientation (SimpleITK's code: the direction each voxel axis x, y, z points to) and odds:
# identity, RAS-stored as CT NIfTI usually is (direction diag(-1, -1, 1)), or x and y swapped.
ORIENTATIONS = {"LPS": 0.40, "RAS": 0.45, "PLS": 0.08, "ARS": 0.07}

# Intensity of each tissue class: a uniform draw in (low, high) per case. CT in HU (unenhanced;
# the contrast phase overrides some), T1 and T2 in arbitrary units before the case's gain: for MR
# the orderings between tissues are meant to be realistic, not the values.
# T2 follows fast spin echo at 1.5 T: fluid brightest, then fat (T2 about 165 ms, and J-coupling
# keeps it bright), then spleen and kidney (about 80-90 ms), then liver and pancreas (about
# 45 ms), then muscle; fat above the renal medulla is what outlines the kidney.
#                      CT HU          T1            T2           texture
TISSUE_TABLE: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float], float]] = {
    "air": ((-1000, -1000), (0, 0), (0, 0), 0.0),
    "fat": ((-120, -80), (850, 950), (760, 860), 0.05),
    "muscle": ((40, 60), (280, 340), (120, 170), 0.06),
    "bowel": ((15, 45), (250, 350), (350, 500), 0.25),
    "bowel_gas": ((-1000, -950), (0, 10), (0, 10), 0.0),
    "liver": ((50, 70), (500, 580), (250, 320), 0.05),
    "spleen": ((40, 55), (330, 400), (480, 560), 0.05),
    "kidney_cortex": ((28, 40), (380, 440), (500, 580), 0.05),
    "kidney_medulla": ((25, 35), (280, 330), (600, 700), 0.06),
    "aorta": ((35, 50), (20, 60), (20, 60), 0.0),
    "inferior_vena_cava": ((35, 50), (20, 60), (20, 60), 0.0),
    "bone_cortex": ((700, 1000), (20, 60), (20, 50), 0.0),
    "bone_marrow": ((250, 400), (550, 700), (350, 450), 0.15),
    "disc": ((70, 100), (250, 320), (550, 700), 0.05),
    "csf": ((0, 15), (80, 140), (900, 1000), 0.0),
    "stomach_wall": ((35, 50), (300, 360), (250, 320), 0.0),
    "stomach_fluid": ((10, 30), (60, 120), (880, 1000), 0.1),
    "stomach_gas": ((-1000, -950), (0, 10), (0, 10), 0.0),
    "pancreas": ((35, 50), (540, 620), (300, 380), 0.1),
}
"""Per tissue class: (CT HU, T1, T2) ranges and the relative amplitude of its smooth texture."""
TISSUES = tuple(TISSUE_TABLE)
_T = {name: index for index, name in enumerate(TISSUES)}

CONTRASTS: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "ct": {
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
    },
    "t1": {"flow_void": {}, "bright_blood": {"aorta": (600, 750), "inferior_vena_cava": (550, 700)}},
    "t2": {"flow_void": {}},
}
"""Per sequence, the contrast states a case draws from (CT phase, MR blood signal) and what each overrides."""
CONTRAST_ODDS = {"ct": (0.35, 0.2, 0.45), "t1": (0.6, 0.4), "t2": (1.0,)}
PARTIAL_VOLUME_SIGMA = (0.5, 0.7, 0.7)  # Gaussian blur in voxels, (z, y, x)
CT_NOISE_HU = (8.0, 20.0)
MR_NOISE = (0.015, 0.04)  # Rician sigma as a fraction of 500 (about liver/spleen level) before gain
MR_GAIN = (0.6, 1.6)
MR_BIAS = (0.15, 0.3)  # half the log-range of the bias field's linear part (about +-15..30 %)

# The box (anatomy frame, mm, x y z) over which the random fields' control grids are laid: fixed,
# so that a seed's anatomy does not depend on the acquisition's field of view.
_FIELD_BOX = ((-260.0, 260.0), (-220.0, 220.0), (-170.0, 210.0))
SEQUENCE_STREAM = {"ct": 1, "t1": 2, "t2": 3}
"""Random-number stream of a case's acquisition and rendering, per sequence (used with the case's seed)."""

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


def draw_acquisition(
    anatomy: _Anatomy, sequence: str, rng: np.random.Generator, max_size: int
) -> _Acquisition:
    u = rng.uniform
    back = anatomy.back_y
    width, depth = 2 * anatomy.body_lateral, anatomy.body_anterior + back
    margin = u(30, 80)
    if sequence == "ct":
        fov_x = fov_y = max(width, depth) + margin
    else:
        fov_x = width + margin
        fov_y = max(fov_x * u(0.75, 0.9), depth + margin / 2)
    contrast = str(rng.choice(list(CONTRASTS[sequence]), p=CONTRAST_ODDS[sequence]))
    spacing_xy = u(*IN_PLANE_SPACING_MM[sequence])
    length, thickness = u(*SCAN_LENGTH_MM), u(*SLICE_THICKNESS_MM)
    in_plane_cap, slice_cap = min(MAX_IN_PLANE, max_size), min(MAX_SLICES, max_size)
    nx = min(int(np.ceil(fov_x / spacing_xy)), in_plane_cap)
    ny = min(int(np.ceil(fov_y / spacing_xy)), in_plane_cap)
    spacing_xy = max(spacing_xy, fov_x / nx, fov_y / ny)
    nz = min(round(length / thickness), slice_cap)
    thickness = length / nz
    # Where the scan lies in the anatomy frame: always across the renal hila and pancreas.
    centre = (u(-0.25, 0.25) * margin, (back - anatomy.body_anterior) / 2 + u(-0.2, 0.2) * margin, u(-10, 30))
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
    from scipy.interpolate import BSpline

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


def _ellipse(x, y, lateral: float, front: float, back: float, flat_y: float) -> np.ndarray:
    """Mask (same shape as x, y) of an ellipse, semi-axes ``lateral``, ``front`` (y < 0) and ``back``
    (y > 0) in mm, cut flat at y = ``flat_y``.
    """
    b = np.where(y < 0, np.float32(front), np.float32(back))
    return ((x / lateral) ** 2 + (y / b) ** 2 <= 1.0) & (y <= flat_y)


def _paint_torso(c: _Canvas, a: _Anatomy) -> np.ndarray:
    """Body, fat, wall muscle, bowel and mesenteric fat, ribs, back muscles; returns the cavity mask."""
    inset = np.array([0.0, a.fat_lateral, a.fat_anterior, a.fat_posterior])
    outline = np.array([a.back_y, a.body_lateral, a.body_anterior, a.body_posterior])
    body = _ellipse(c.x, c.y, *(outline[1:]), outline[0])
    wall = _ellipse(c.x, c.y, *(outline[1:] - inset[1:]), outline[0] - a.fat_posterior)
    shrink = inset[1:] + a.muscle
    cavity = _ellipse(c.x, c.y, *(outline[1:] - shrink), outline[0] - a.fat_posterior - a.muscle)
    c.tissue[body] = _T["fat"]
    c.tissue[wall] = _T["muscle"]

    # Bowel loops fill the peritoneal cavity; towards the retroperitoneum (behind the front of the
    # vertebral bodies) they thin out into fat over about 60 mm. Gas sits in the loops' centres.
    front_of_spine = a.vertebra_y - a.vertebra_radii[1]
    score = c.bowel_field - 3.0 * np.clip((c.y - front_of_spine + 30) / 60, 0, 1)
    bowel = cavity & (score > a.bowel_threshold)
    c.tissue[cavity] = _T["fat"]
    c.tissue[bowel] = _T["bowel"]
    c.tissue[bowel & (score > a.bowel_threshold + a.gas_threshold) & (c.texture > 0.0)] = _T["bowel_gas"]

    # Ribs: oblique bands in the wall of the upper abdomen, descending towards the front.
    lowest, period, thickness, phase = a.ribs
    index = np.flatnonzero(wall & ~cavity & (c.z > lowest - 30))
    x, y, z = c.x.ravel()[index], c.y.ravel()[index], c.z.ravel()[index]
    angle = np.abs(np.arctan2(x, y))  # 0 at the back, pi at the front
    level = z + 25.0 * angle
    rib = (np.mod(level - phase, period) < thickness) & (angle > 0.35) & (angle < 2.6) & (level > lowest + 40)
    c.tissue.ravel()[index[rib]] = _T["bone_cortex"]

    # Paraspinal muscles beside the spinous processes; psoas beside the vertebral bodies, thicker inferiorly.
    vb_rx = a.vertebra_radii[0]
    for side in (-1.0, 1.0):
        x0 = side * (12 + 1.1 * vb_rx)
        box = c.box((x0 - 40, a.canal_y - 30, -1e4), (x0 + 40, a.back_y, 1e4))
        if box is not None:
            x, y, _ = c.coords(box)
            mask = ((x - x0) / 26) ** 2 + ((y - a.canal_y - 8) / 24) ** 2 <= 1
            c.paint(box, mask & wall[box], "muscle")
        x0 = side * (vb_rx + 12)
        box = c.box((x0 - 30, a.vertebra_y - 30, -1e4), (x0 + 30, a.vertebra_y + 30, 1e4))
        if box is not None:
            x, y, z = c.coords(box)
            radius = np.clip(12 - 0.08 * z, 4, 22)
            mask = (x - x0) ** 2 + ((y - a.vertebra_y) / 0.9) ** 2 <= radius**2
            c.paint(box, mask & cavity[box], "muscle")
    return cavity


def _union_box(c: _Canvas, shapes) -> tuple[slice, slice, slice] | None:
    low = np.min([shape.bounds()[0] for shape in shapes], axis=0)
    high = np.max([shape.bounds()[1] for shape in shapes], axis=0)
    return c.box(low, high)


def _paint_organs(c: _Canvas, a: _Anatomy, cavity: np.ndarray) -> None:
    """Organs from lowest to highest priority, each overwriting what was painted before it."""
    # Liver: right and left lobe, the inferior surface cut by a plane rising towards the left.
    box = _union_box(c, a.liver_lobes)
    if box is not None:
        x, y, z = c.coords(box)
        organ = np.zeros(x.shape, bool)
        for lobe in a.liver_lobes:
            u, v, w = lobe.local(x, y, z)
            organ |= u * u + v * v + w * w <= 1
        cut_x, cut_z, slope = a.liver_cut
        c.paint(box, organ & (z > cut_z + slope * (x - cut_x)) & cavity[box], "liver", "liver")

    # Stomach: body (left, upper) and antrum (anterior, across the midline); wall, fluid, and gas
    # above an air-fluid level (the patient lies supine: gas rises anteriorly, to smaller y).
    box = _union_box(c, a.stomach_parts)
    if box is not None:
        x, y, z = c.coords(box)
        organ = np.zeros(x.shape, bool)
        content = np.zeros(x.shape, bool)
        for part in a.stomach_parts:
            u, v, w = part.local(x, y, z)
            r2 = u * u + v * v + w * w
            organ |= r2 <= 1
            content |= r2 <= (1 - a.stomach_wall / min(part.radii)) ** 2
        organ &= cavity[box]
        front = min(part.bounds()[0][1] for part in a.stomach_parts)
        back = max(part.bounds()[1][1] for part in a.stomach_parts)
        gas = c.axes[1][box[1]][None, :, None] < front + a.stomach_gas * (back - front)
        c.paint(box, organ, "stomach_wall", "stomach")
        c.paint(box, organ & content, "stomach_fluid", "stomach")
        c.paint(box, organ & content & gas, "stomach_gas", "stomach")

    # Spleen: a crescent, its concave visceral surface facing medially.
    box = c.box(*a.spleen.bounds())
    if box is not None:
        u, v, w = a.spleen.local(*c.coords(box))
        organ = (u * u + v * v + w * w <= 1) & ((u + 1.15) ** 2 + v * v + w * w > 0.6**2)
        c.paint(box, organ & cavity[box], "spleen", "spleen")

    # Pancreas: a tube along x from the head (patient right) to the tail (left, higher, posterior),
    # in a sleeve of retroperitoneal fat that parts it from the liver, stomach and bowel loops it
    # would otherwise touch (in the portal venous phase they all lie near 100 HU).
    (x_head, x_tail), (r_head, r_tail) = a.pancreas_x, a.pancreas_radii
    z_tail = a.pancreas_z + a.pancreas_rise * (x_tail - x_head)
    grow = a.pancreas_fat
    low = (x_head - r_head - grow, a.pancreas_y - r_head - grow, a.pancreas_z - r_head - grow)
    high = (x_tail + r_head + grow, a.pancreas_y + a.pancreas_tail_dy + r_head + grow, z_tail + r_head + grow)
    box = c.box(low, high)
    if box is not None:
        x, y, z = c.coords(box)
        t = (x - x_head) / (x_tail - x_head)  # 0 at the head, 1 at the tail
        end = np.clip((np.abs(2 * t - 1) - 0.8) / 0.2, 0, 1)  # rounded ends over the last tenth
        radius = (r_head + (r_tail - r_head) * np.clip(t, 0, 1)) * np.sqrt(1 - end**2)
        dy = y - a.pancreas_y - a.pancreas_tail_dy * np.clip(t, 0, 1) ** 2
        dz = (z - a.pancreas_z - a.pancreas_rise * (x - x_head)) / a.pancreas_flatness
        r2 = dy**2 + dz**2
        sleeve = (np.abs(2 * t - 1) <= 1 + 2 * grow / (x_tail - x_head)) & (r2 <= (radius + grow) ** 2)
        c.paint(box, sleeve & cavity[box], "fat")
        organ = (np.abs(2 * t - 1) <= 1) & (r2 <= radius**2)
        c.paint(box, organ & cavity[box], "pancreas", "pancreas")

    # Kidneys: cortex and medulla, bean-shaped by a medial notch filled with sinus fat, wrapped in
    # about 4 mm of perirenal fat that keeps liver and spleen off them.
    for kidney, key, lateral in zip(a.kidneys, ("kidney_right", "kidney_left"), (-1.0, 1.0), strict=True):
        low, high = kidney.bounds()
        box = c.box(low - 4, high + 4)
        if box is None:
            continue
        u, v, w = kidney.local(*c.coords(box))
        r2 = u * u + v * v + w * w
        hilum = (u + 0.9 * lateral) ** 2 + (v + 0.2) ** 2 + (w / 1.5) ** 2 <= 0.5**2
        c.paint(box, (r2 <= (1 + 4 / min(kidney.radii)) ** 2) & cavity[box], "fat")
        organ = (r2 <= 1) & cavity[box]
        c.paint(box, organ & ~hilum, "kidney_cortex", key)
        c.paint(box, organ & ~hilum & (r2 <= 0.72), "kidney_medulla", key)
        c.paint(box, organ & hilum, "fat")

    # Inferior vena cava (flattened; moving forward into the liver superiorly), then aorta.
    x0, y0, rx, ry = a.ivc
    box = c.box((x0 - rx - 30, y0 - ry - 40, -1e4), (x0 + rx + 30, y0 + ry + 10, 1e4))
    if box is not None:
        x, y, z = c.coords(box)
        dy = y - y0 + 0.25 * np.maximum(z - 40, 0)
        organ = ((x - x0 - a.ivc_slope * z) / rx) ** 2 + (dy / ry) ** 2 <= 1
        c.paint(box, organ & cavity[box], "inferior_vena_cava", "inferior_vena_cava")
    x0, y0, r = a.aorta
    box = c.box((x0 - r - 30, y0 - r - 30, -1e4), (x0 + r + 30, y0 + r + 30, 1e4))
    if box is not None:
        x, y, z = c.coords(box)
        organ = (x - x0 - a.aorta_slope[0] * z) ** 2 + (y - y0 - a.aorta_slope[1] * z) ** 2 <= r * r
        c.paint(box, organ & cavity[box], "aorta", "aorta")

    # Vertebrae: bodies (cortex, marrow) separated by discs, and around the canal an arch with
    # spinous and transverse processes. Discs and the canal are not part of the label.
    (rx, ry), canal, tip, period = a.vertebra_radii, a.canal_y, a.spinous_tip_y, a.vertebra_period
    box = c.box((-2 * rx, a.vertebra_y - ry - 5, -1e4), (2 * rx, tip + 5, 1e4))
    if box is not None:
        x, y, z = c.coords(box)
        level = np.mod(z - a.vertebra_phase, period)
        r2 = (x / rx) ** 2 + ((y - a.vertebra_y) / ry) ** 2
        body, gap = r2 <= 1, level < a.disc
        shell = (level < a.disc + 1.5) | (level > period - 1.5) | (r2 > (1 - 2.5 / rx) ** 2)
        canal_r2 = x * x + (y - canal) ** 2
        arch = (canal_r2 <= 14**2) | ((np.abs(x) <= 4) & (y >= canal) & (y <= tip))
        arch |= (np.abs(y - canal + 2) <= 4.5) & (np.abs(x) <= 1.8 * rx)
        c.paint(box, arch & ~body & ~gap, "bone_cortex", "vertebrae")
        c.paint(box, body & ~gap, "bone_marrow", "vertebrae")
        c.paint(box, body & ~gap & shell, "bone_cortex", "vertebrae")
        c.paint(box, body & gap, "disc")
        c.paint(box, canal_r2 <= 8**2, "csf")


def _intensity_table(sequence: str, contrast: str, rng: np.random.Generator) -> np.ndarray:
    """Intensity per tissue class (HU for CT, arbitrary units for MR), drawn from the sequence's table."""
    column = SEQUENCES.index(sequence)
    ranges = {name: row[column] for name, row in TISSUE_TABLE.items()} | CONTRASTS[sequence][contrast]
    return np.array([rng.uniform(*ranges[name]) for name in TISSUES], np.float32)


def render(anatomy: _Anatomy, acq: _Acquisition, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Intensity (float32) and label (uint8) arrays, (Z, Y, X) on the acquisition's LPS-aligned grid."""
    from scipy.ndimage import gaussian_filter

    canvas = _Canvas(anatomy, acq)
    cavity = _paint_torso(canvas, anatomy)
    _paint_organs(canvas, anatomy, cavity)

    values = _intensity_table(acq.sequence, acq.contrast, rng)
    texture = np.array([row[3] for row in TISSUE_TABLE.values()], np.float32)
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
