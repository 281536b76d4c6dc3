"""How a phantom case's anatomy is drawn: the organs and the body around them, from a seed.

The first step of the generator behind :mod:`m4oe.phantom` (whose docstring describes frames, units
and the steps of a case); :mod:`m4oe.phantom_imaging` images what is drawn here. Nothing here writes
files or touches a grid: the anatomy is a set of parameters in the anatomy frame, LPS in
millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# scipy (spatial) is imported inside the function that uses it: ``m4oe.cli`` imports the phantom
# module to build its parser, and scipy took 0.7 s of every command's start.

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

ANATOMY_STREAM = 0
"""Random-number stream of a case's anatomy: ``draw_anatomy(default_rng((seed, ANATOMY_STREAM)))``."""

# ---------------------------------------------------------------------------------------------
# Anatomy


@dataclass(frozen=True)
class _Ellipsoid:
    """An ellipsoid in the anatomy frame: centre (x, y, z), semi-axes (mm), rotation (columns: local axes)."""

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
    from scipy.spatial.transform import Rotation

    matrix = Rotation.from_euler("xyz", degrees_xyz, degrees=True).as_matrix()
    return _Ellipsoid(
        tuple(float(c) for c in centre),
        tuple(float(r) for r in radii),
        tuple(tuple(float(v) for v in row) for row in matrix),
    )


@dataclass(frozen=True)
class _Anatomy:
    """One patient's anatomy in the anatomy frame (module docstring); lengths in mm."""

    # Torso: an ellipse with its own anterior and posterior semi-axes, flat at the back.
    body_lateral: float
    body_anterior: float
    body_posterior: float
    back_y: float
    fat_lateral: float  # subcutaneous fat thickness
    fat_anterior: float
    fat_posterior: float
    muscle: float  # abdominal wall thickness
    # Spine: vertebral bodies (elliptic cross-section) repeating along z, discs between them.
    vertebra_y: float
    vertebra_radii: tuple[float, float]  # x, y
    canal_y: float
    spinous_tip_y: float
    vertebra_period: float
    disc: float
    vertebra_phase: float
    # Vessels: tubes along z, slightly oblique.
    aorta: tuple[float, float, float]  # centre x, centre y, radius
    aorta_slope: tuple[float, float]  # dx/dz, dy/dz
    ivc: tuple[float, float, float, float]  # centre x, centre y, radius x, radius y
    ivc_slope: float  # dx/dz
    # Organs.
    kidneys: tuple[_Ellipsoid, _Ellipsoid]  # right, left
    spleen: _Ellipsoid
    liver_lobes: tuple[_Ellipsoid, _Ellipsoid]  # right, left
    liver_cut: tuple[float, float, float]  # inferior surface: z = cut z + slope * (x - cut x)
    stomach_parts: tuple[_Ellipsoid, _Ellipsoid]  # body, antrum
    stomach_wall: float
    stomach_gas: float  # fraction of the stomach's depth (anterior part) holding gas
    pancreas_x: tuple[float, float]  # head, tail
    pancreas_radii: tuple[float, float]  # head, tail
    pancreas_y: float  # of the body; the tail curves back by pancreas_tail_dy
    pancreas_tail_dy: float
    pancreas_z: float  # of the head; rises towards the tail by pancreas_rise per mm of x
    pancreas_rise: float
    pancreas_flatness: float  # craniocaudal / anteroposterior thickness
    pancreas_fat: float  # peripancreatic fat, mm: the plane that parts it from liver, stomach and bowel
    # Ribs, bowel, deformation.
    ribs: tuple[float, float, float, float]  # lowest z, period, thickness, phase
    bowel_threshold: float  # of the unit-variance bowel field
    gas_threshold: float  # above the bowel threshold
    deformation_mm: float  # standard deviation of each displacement component
    field_seed: int


def draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    u = rng.uniform
    s = u(0.88, 1.12)  # overall size
    lateral, anterior = 160 * s * u(0.93, 1.07), 120 * s * u(0.93, 1.07)
    posterior = anterior * u(0.85, 0.95)
    fat_scale = u(0.4, 1.6)
    fat_lateral, fat_anterior, fat_posterior = 18 * fat_scale, 22 * fat_scale, 12 * fat_scale
    muscle = u(7, 13)
    cavity_x = lateral - fat_lateral - muscle
    cavity_front = anterior - fat_anterior - muscle
    cavity_back = posterior - fat_posterior - muscle

    tip = 0.92 * posterior - fat_posterior - u(6, 12)
    canal = tip - u(34, 40)
    vb_rx, vb_ry = 22 * s * u(0.9, 1.1), 17 * s * u(0.9, 1.1)
    vb_y = canal - 9 - vb_ry
    period = u(30, 36)
    r_aorta = 11 * np.sqrt(s) * u(0.85, 1.15)
    aorta_y = vb_y - vb_ry - r_aorta - u(1, 4)

    kidneys = []
    for side, z_range in ((-1, (-40, -20)), (1, (-25, -5))):
        centre = (side * u(68, 82) * s, vb_y + u(-5, 8), u(*z_range))
        radii = np.array((u(22, 28), u(19, 24), u(48, 58))) * s
        kidneys.append(_ellipsoid(centre, radii, (u(-5, 5), -side * u(8, 18), -side * u(25, 40))))
    spleen = _ellipsoid(
        (u(0.6, 0.7) * cavity_x, u(0.3, 0.5) * cavity_back, u(25, 50)),
        np.array((u(18, 26), u(45, 60), u(40, 55))) * s,
        (u(-8, 8), u(-8, 8), u(40, 65)),
    )
    right_lobe = _ellipsoid(
        (-u(0.35, 0.45) * cavity_x, u(-0.1, 0.1) * cavity_front, u(30, 50)),
        np.array((u(65, 80), u(70, 85), u(80, 95))) * s,
        (u(-5, 5), u(-8, 8), u(-10, 10)),
    )
    left_lobe = _ellipsoid(
        (u(0, 25) * s, -u(0.4, 0.55) * cavity_front, u(45, 70)),
        np.array((u(50, 70), u(25, 35), u(35, 45))) * s,
        (u(-5, 5), u(-5, 5), u(-15, 5)),
    )
    stomach_body = _ellipsoid(
        (u(0.3, 0.45) * cavity_x, -u(0.35, 0.5) * cavity_front, u(45, 65)),
        np.array((u(32, 42), u(26, 34), u(45, 60))) * s,
        (u(-8, 8), u(-20, -5), u(20, 40)),
    )
    antrum = _ellipsoid(
        (u(0.0, 0.15) * cavity_x, -u(0.45, 0.6) * cavity_front, u(15, 35)),
        np.array((u(40, 55), u(15, 22), u(15, 22))) * s,
        (u(-5, 5), u(-25, -10), u(-10, 10)),
    )
    return _Anatomy(
        body_lateral=lateral,
        body_anterior=anterior,
        body_posterior=posterior,
        back_y=0.92 * posterior,
        fat_lateral=fat_lateral,
        fat_anterior=fat_anterior,
        fat_posterior=fat_posterior,
        muscle=muscle,
        vertebra_y=vb_y,
        vertebra_radii=(vb_rx, vb_ry),
        canal_y=canal,
        spinous_tip_y=tip,
        vertebra_period=period,
        disc=u(7, 10),
        vertebra_phase=u(0, period),
        aorta=(u(10, 22) * s, aorta_y, r_aorta),
        aorta_slope=(u(-0.05, 0.05), u(-0.05, 0.05)),
        ivc=(-u(18, 28) * s, vb_y - vb_ry - u(5, 10), u(11, 15) * s, u(7, 11) * s),
        ivc_slope=u(-0.05, 0.05),
        kidneys=(kidneys[0], kidneys[1]),
        spleen=spleen,
        liver_lobes=(right_lobe, left_lobe),
        liver_cut=(
            right_lobe.centre[0] - right_lobe.radii[0],
            right_lobe.centre[2] - right_lobe.radii[2] * u(0.75, 0.95),
            u(0.15, 0.3),
        ),
        stomach_parts=(stomach_body, antrum),
        stomach_wall=u(3, 5),
        stomach_gas=u(0.05, 0.35),
        pancreas_x=(-u(30, 45) * s, u(75, 95) * s),
        pancreas_radii=(u(10, 14) * s, u(6, 9) * s),
        pancreas_y=aorta_y - r_aorta - u(12, 20),
        pancreas_tail_dy=u(25, 45),
        pancreas_z=u(-10, 10),
        pancreas_rise=u(0.05, 0.2),
        pancreas_flatness=u(0.7, 0.9),
        pancreas_fat=float(np.clip(fat_lateral / 5, 3, 6)),  # no draw: keeps every later draw as it was
        ribs=(u(10, 40), u(22, 30), u(8, 11), u(0, 30)),
        bowel_threshold=u(-0.7, 0.1),
        gas_threshold=u(1.2, 1.8),
        deformation_mm=u(3, 6),
        field_seed=int(rng.integers(2**63)),
    )
