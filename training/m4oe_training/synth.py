"""Training images rendered from label maps: domain randomisation in the manner of SynthSeg.

SynthSeg (Billot et al., Medical Image Analysis 2023) trains a network on images drawn from
anatomical label maps with random intensities per structure, so that it learns shapes rather
than one scanner's contrast. Here the anatomy is an *anatomy map* (:mod:`m4oe_training.anatomy`):
the organ labels of a case plus sub-classes of the unlabelled body (fat, two kinds of soft tissue
such as muscle and bowel, dense tissue such as bone or oral contrast) derived from its image.
:func:`render_slice` turns three neighbouring anatomy slices on the model grid into one
normalised training slice:

1. optionally (``p_fat_layer``, off by default), the body's habitus: its outline grown by a layer
   of subcutaneous fat or its outer fat thinned, the organs left as they are
   (:func:`~m4oe_training.anatomy.change_fat_layer`); optionally (``p_organ_interior``, off by
   default), the inside of the kidneys and stomach drawn as another tissue, the target unchanged
   (:func:`~m4oe_training.anatomy.add_organ_interiors`); then deformation of the anatomy (random
   affine: rotation, anisotropic scaling, shear, shift; and a smooth elastic field), applied to the
   anatomy and the target labels alike (nearest neighbour);
2. an intensity per structure drawn for the contrast family: ``"ct"`` (Hounsfield units in
   CT-plausible ranges for a random phase: native, arterial, portal venous, delayed), ``"t1"``
   (T1-like, in/opposed phase, fat-suppressed), ``"t2"`` (T2-like, fat-suppressed) or ``"any"``
   (every structure uniform at random, sometimes inverted); the "t1" and "t2" families draw like
   "any" for a share ``p_random_contrast`` of their images, because a real sequence often breaks
   the textbook ordering (a fatty liver darker than the spleen on T1) and a network that has only
   seen the textbook misreads it; each structure gets a texture (Gaussian, its own standard
   deviation);
3. slice thickness: the neighbouring slices mixed in with random weights (partial volume);
4. blur, a smooth multiplicative bias field (MR), a gamma curve (MR), noise (Gaussian for CT,
   Rician for MR), and a lower in-plane resolution (down- then up-sampled);
5. the engine's own intensity normalisation (:func:`m4oe.preprocessing.normalize_slices`): the
   model's CT window for CT, per-image percentiles and z-score for MR.

:func:`enhance_slice` is the other source, for a CT dataset's own images (family "ct-phase"): the
real slice keeps its texture (cortical bone, bowel content, fat stranding) and only the enhancing
organs are moved to a random contrast phase's values, so that one native CT also teaches what its
anatomy looks like in the arterial, portal venous and delayed phases.

All randomness comes from one ``numpy.random.Generator``, so a (seed, case, slice) always renders
the same image. Arrays are (Z, S, S) or (S, S) on the model grid: rows anterior -> posterior,
columns patient right -> left (:func:`m4oe.geometry.to_axial_stack`), S the model input size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from m4oe.preprocessing import IntensityParams, mr_volume_statistics, normalize_slices

from .anatomy import add_organ_interiors, change_fat_layer
from .families import FAMILIES

CT_PHASES = ("native", "arterial", "portal", "delayed")
# HU range of each structure per phase (native, arterial, portal venous, delayed), from the usual
# abdominal CT attenuation values; keys not listed use "soft_tissue_high".
CT_HU: dict[str, tuple[tuple[float, float], ...]] = {
    "air": ((-1010, -950),) * 4,
    "fat": ((-130, -70),) * 4,
    "fluid": ((-5, 25),) * 4,
    "soft_tissue_low": ((-15, 35), (-15, 35), (-10, 40), (-10, 40)),
    "soft_tissue_high": ((30, 60), (40, 80), (50, 100), (45, 90)),
    "dense": ((180, 700), (180, 700), (180, 700), (180, 700)),
    "liver": ((40, 70), (55, 95), (90, 150), (70, 110)),
    "spleen": ((35, 60), (70, 170), (95, 145), (70, 110)),
    "kidney_right": ((25, 45), (120, 250), (130, 220), (110, 200)),
    "kidney_left": ((25, 45), (120, 250), (130, 220), (110, 200)),
    "aorta": ((30, 55), (200, 420), (120, 210), (90, 150)),
    "inferior_vena_cava": ((30, 55), (60, 140), (110, 190), (90, 150)),
    "vertebrae": ((150, 450),) * 4,
    "stomach": ((-20, 50), (-20, 60), (-10, 70), (-10, 70)),
    "pancreas": ((30, 55), (80, 140), (70, 120), (60, 100)),
    # Generation classes (m4oe_training.anatomy.GENERATION_CLASSES): structures no organ label covers.
    "muscle": ((35, 60), (40, 70), (45, 75), (45, 70)),
    "bowel": ((-60, 60), (-60, 90), (-50, 120), (-50, 110)),  # wall and content: gas, fluid, food
    "lung": ((-900, -700),) * 4,
    "bone": ((200, 800),) * 4,
    "spinal_canal": ((10, 45),) * 4,
    "fluid_organ": ((-5, 25),) * 4,
    "blood": ((30, 55), (80, 300), (110, 190), (90, 150)),
    "gland": ((25, 50), (60, 120), (60, 110), (50, 90)),
}

# MR families: a structure's mean on [0, 1] drawn from a range; keys not listed are uniform.
MR_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "t1": {
        "air": (0.0, 0.04),
        "fat": (0.7, 1.0),
        "fluid": (0.02, 0.2),
        "soft_tissue_low": (0.1, 0.35),
        "soft_tissue_high": (0.25, 0.5),
        "dense": (0.05, 0.3),
        "liver": (0.35, 0.65),
        "spleen": (0.25, 0.5),
        "kidney_right": (0.2, 0.55),
        "kidney_left": (0.2, 0.55),
        "vertebrae": (0.35, 0.75),
        "stomach": (0.05, 0.4),
        "pancreas": (0.4, 0.7),
        "muscle": (0.12, 0.35),
        "bowel": (0.05, 0.55),
        "lung": (0.0, 0.08),
        "bone": (0.4, 0.85),  # marrow fat
        "spinal_canal": (0.05, 0.35),
        "fluid_organ": (0.02, 0.25),
        "gland": (0.25, 0.5),
    },
    "t2": {
        "air": (0.0, 0.04),
        "fat": (0.45, 0.85),
        "fluid": (0.75, 1.0),
        "soft_tissue_low": (0.35, 0.9),
        "soft_tissue_high": (0.15, 0.4),
        "dense": (0.05, 0.25),
        "liver": (0.12, 0.3),
        "spleen": (0.35, 0.6),
        "kidney_right": (0.4, 0.75),
        "kidney_left": (0.4, 0.75),
        "vertebrae": (0.2, 0.5),
        "stomach": (0.2, 0.95),
        "pancreas": (0.2, 0.45),
        "muscle": (0.05, 0.2),
        "bowel": (0.1, 0.95),
        "lung": (0.0, 0.08),
        "bone": (0.25, 0.65),
        "spinal_canal": (0.6, 1.0),  # cerebrospinal fluid
        "fluid_organ": (0.75, 1.0),
        "gland": (0.2, 0.45),
    },
}
VESSELS = ("aorta", "inferior_vena_cava", "blood")

CT_ENHANCING = ("liver", "spleen", "kidney_right", "kidney_left", "aorta", "inferior_vena_cava", "pancreas")
"""Structures :func:`enhance_slice` moves to a phase's HU range (organ parenchyma and blood pool).
Bone, air-filled bowel and the stomach keep their own values: their HU do not follow the phase."""


@dataclass(frozen=True)
class SynthSettings:
    """Ranges of the random draws (pixels are model-grid pixels)."""

    max_rotation_deg: float = 20.0
    scale: tuple[float, float] = (0.75, 1.3)
    max_shear: float = 0.08
    max_shift: float = 0.06
    p_elastic: float = 0.6
    elastic_grid: int = 5
    elastic_max_shift: float = 5.0
    texture_std: tuple[float, float] = (0.0, 0.08)
    neighbour_weight: tuple[float, float] = (0.0, 0.5)
    blur_sigma: tuple[float, float] = (0.0, 1.0)
    bias_strength: tuple[float, float] = (0.0, 0.4)
    gamma_std: float = 0.3
    ct_noise_hu: tuple[float, float] = (3.0, 25.0)
    mr_noise: tuple[float, float] = (0.0, 0.05)
    resolution_factor: tuple[float, float] = (1.0, 2.2)
    p_low_resolution: float = 0.5
    p_opposed_phase: float = 0.2
    p_fat_suppressed: float = 0.25
    p_invert: float = 0.2
    p_random_contrast: float = 0.5
    # Body habitus: the share of renders whose subcutaneous fat layer is changed, and the change in
    # model-grid pixels (negative: thinned; positive: grown). Off by default, so that every run
    # configured before it draws the same renders.
    p_fat_layer: float = 0.0
    fat_layer_px: tuple[float, float] = (-3.0, 8.0)
    # The share of renders whose kidneys and stomach show an interior (sinus fat, urine, gas, fluid, food:
    # m4oe_training.anatomy.add_organ_interiors). Off by default, for the same reason.
    p_organ_interior: float = 0.0
    # The share of "ct-to-mr" images (m4oe_training.crossmodal) drawn as opposed-phase T1, fat and
    # tissue cancelling at their borders. Off by default, for the same reason.
    p_ct_opposed_phase: float = 0.0


def deform(maps: torch.Tensor, rng: np.random.Generator, settings: SynthSettings) -> torch.Tensor:
    """Warp integer maps (C, S, S) (anatomy slices and target labels) by one random affine + elastic field.

    Nearest-neighbour sampling keeps label values; outside the grid is 0 (air, background).
    """
    grid = random_grid(maps.shape[-1], rng, settings)
    warped = F.grid_sample(
        maps[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return warped[0].round().to(maps.dtype)


def random_grid(size: int, rng: np.random.Generator, settings: SynthSettings) -> torch.Tensor:
    """One random affine + elastic sampling grid (1, S, S, 2) for ``F.grid_sample`` (normalised x, y)."""
    angle = math.radians(rng.uniform(-settings.max_rotation_deg, settings.max_rotation_deg))
    sy, sx = (1.0 / rng.uniform(*settings.scale) for _ in range(2))
    shear = rng.uniform(-settings.max_shear, settings.max_shear)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    matrix = rot @ np.array([[sx, shear], [0.0, sy]])
    theta = torch.zeros(1, 2, 3)
    theta[0, :, :2] = torch.from_numpy(matrix)
    theta[0, :, 2] = torch.from_numpy(rng.uniform(-settings.max_shift, settings.max_shift, 2))
    grid = F.affine_grid(theta, [1, 1, size, size], align_corners=False)
    if rng.random() < settings.p_elastic:
        coarse = torch.from_numpy(rng.standard_normal((1, 2, settings.elastic_grid, settings.elastic_grid)))
        coarse = coarse.float() / coarse.abs().max().clamp_min(1e-6)
        field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
        grid = grid + (field * settings.elastic_max_shift * 2 / size).permute(0, 2, 3, 1)
    return grid


def _structure_means(keys: list[str], family: str, rng: np.random.Generator, settings: SynthSettings):
    """Mean intensity of each structure: HU for "ct", [0, 1] units for the MR families."""
    if family == "ct":
        phase = int(rng.integers(len(CT_PHASES)))
        means = []
        for key in keys:
            low, high = CT_HU.get(key, CT_HU["soft_tissue_high"])[phase]
            means.append(rng.uniform(low, high))
        return np.array(means, dtype=np.float32)
    if family == "any" or rng.random() < settings.p_random_contrast:
        means = rng.uniform(0.0, 1.0, len(keys)).astype(np.float32)
        if rng.random() < settings.p_invert:
            means = 1.0 - means
        means[keys.index("air")] = rng.uniform(0.0, 0.05)  # air stays dark in every MR image
        return means
    ranges = MR_RANGES[family]
    means = np.array([rng.uniform(*ranges.get(k, (0.0, 1.0))) for k in keys], dtype=np.float32)
    fat = keys.index("fat")
    if rng.random() < settings.p_fat_suppressed:
        means[fat] = rng.uniform(0.03, 0.2)
    for vessel in VESSELS:  # flow void, or bright blood (gradient echo, contrast)
        if vessel in keys:
            bright = rng.random() < (0.5 if family == "t1" else 0.15)
            means[keys.index(vessel)] = rng.uniform(0.6, 0.95) if bright else rng.uniform(0.0, 0.12)
    return means


def check_slices(caller: str, image: np.ndarray, target: np.ndarray) -> None:
    """Raise ValueError unless ``image`` is one (S, S) slice or a (C, S, S) stack of adjacent
    slices (C odd) and ``target`` its labels, the same shape."""
    if (
        image.shape != target.shape
        or image.ndim not in (2, 3)
        or (image.ndim == 3 and image.shape[0] % 2 == 0)
    ):
        raise ValueError(
            f"{caller}: image and target must be one (S, S) slice or a (C, S, S) stack with C odd, "
            f"the same shape; got {image.shape}, {target.shape}"
        )


def centre(stack: np.ndarray) -> np.ndarray:
    """The (S, S) centre slice of a (C, S, S) stack; an (S, S) slice itself."""
    return stack if stack.ndim == 2 else stack[stack.shape[0] // 2]


def in_plane(image: np.ndarray, sigma: float) -> tuple[float, ...]:
    """A Gaussian's sigma per axis of an (S, S) slice or (C, S, S) stack: ``sigma`` in plane only."""
    return (0.0,) * (image.ndim - 2) + (sigma, sigma)


def deform_slice(
    image: np.ndarray, target: np.ndarray, rng: np.random.Generator, settings: SynthSettings
) -> tuple[np.ndarray, np.ndarray]:
    """An (S, S) image, or a (C, S, S) stack of adjacent slices, and the (S, S) labels of its slice
    (the centre one) deformed together by one :func:`random_grid`.

    Bilinear for the image, nearest neighbour for the labels; what comes from outside the slice is
    0 in both (shift the image so that 0 is its background). Returns (image float32 of the image's
    shape, labels uint8 (S, S)).
    """
    grid = random_grid(image.shape[-1], rng, settings)
    size = image.shape[-1]
    planes = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).reshape(1, -1, size, size)
    labels = torch.from_numpy(target.astype(np.float32))[None, None]
    warped_image = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped_label = F.grid_sample(labels, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return warped_image.reshape(image.shape).numpy(), warped_label[0, 0].round().numpy().astype(np.uint8)


def render_slice(
    anatomy: np.ndarray,
    target: np.ndarray,
    keys: dict[int, str],
    family: str,
    rng: np.random.Generator,
    ct_params: IntensityParams,
    settings: SynthSettings | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one training slice, or a stack of adjacent ones, from an anatomy map.

    Args:
        anatomy: (C + 2, S, S) uint8 anatomy map of slices k-1-n .. k+1+n on the model grid, C = 2n + 1
            (repeat the end slices at the ends of a volume): C = 1 renders slice k, C > 1 the stack
            k-n .. k+n for a model reading n adjacent slices per side. Each rendered slice blends
            its anatomy slice with its two neighbours (slice thickness); every draw (deformation,
            structure intensities, bias field, blur, resolution) is shared by the stack, the noise
            is not.
        target: (S, S) integer organ labels of slice k (what the network must predict).
        keys: anatomy value -> structure key (:func:`structure_keys`); values not in it are treated
            as "soft_tissue_high".
        family: one of :data:`FAMILIES`.
        rng: the only source of randomness.
        ct_params: the model's CT normalisation (used when ``family == "ct"``).
        settings: ranges of the draws (default :class:`SynthSettings`).

    Returns:
        (image, labels): float32 (S, S) (C = 1) or (C, S, S), normalised as the engine normalises
        that modality, and the target deformed with it, uint8 (S, S).
    """
    if family not in FAMILIES:
        raise ValueError(f"synthesis family must be one of {FAMILIES}, got {family!r}")
    ok = anatomy.ndim == 3 and anatomy.shape[0] >= 3 and anatomy.shape[0] % 2 == 1
    if not ok or anatomy.shape[1:] != target.shape:
        raise ValueError(
            f"render_slice: anatomy (C + 2, S, S) with C odd and target (S, S), got {anatomy.shape}, "
            f"{target.shape}"
        )
    channels = anatomy.shape[0] - 2
    settings = settings or SynthSettings()
    if settings.p_fat_layer > 0 and rng.random() < settings.p_fat_layer:
        anatomy = change_fat_layer(anatomy, target, rng.uniform(*settings.fat_layer_px))
    if settings.p_organ_interior > 0 and rng.random() < settings.p_organ_interior:
        anatomy = add_organ_interiors(anatomy, keys, rng)
    maps = torch.from_numpy(np.concatenate([anatomy, target[None]]).astype(np.int64))
    maps = deform(maps, rng, settings).numpy()
    anatomy, target = maps[:-1], maps[-1].astype(np.uint8)
    present = np.unique(anatomy)
    names = [keys.get(int(v), "soft_tissue_high") for v in present]
    for needed in ("air", "fat"):
        if needed not in names:
            names.append(needed)
    means = _structure_means(names, family, rng, settings)
    scale = 1000.0 if family == "ct" else 1.0  # texture in HU for CT (0..80 HU), else [0, 1] units
    stds = rng.uniform(*settings.texture_std, len(names)).astype(np.float32) * scale
    index = np.searchsorted(present, anatomy)  # anatomy values -> rows of present (== names order)
    weights = np.array(
        [rng.uniform(*settings.neighbour_weight), 1.0, rng.uniform(*settings.neighbour_weight)]
    )
    values = means[index]  # (C + 2, S, S)
    weights = weights / weights.sum()
    # Slice c of the stack is anatomy slice c + 1 blended with its two neighbours: (C, S, S).
    image = np.tensordot(weights, np.stack([values[i : i + channels] for i in range(3)]), axes=1)
    texture = stds[index[1 : 1 + channels]]
    image = image + texture * rng.standard_normal(image.shape).astype(np.float32)
    if family == "t1" and rng.random() < settings.p_opposed_phase:
        image = np.stack([_opposed_phase(image[c], anatomy[c + 1], keys) for c in range(channels)])
    image = acquire(image.astype(np.float32), family, rng, settings)
    if family == "ct":
        image = normalize_slices(image, "ct", ct_params)
    else:
        image = normalize_slices(image, "mr", volume_stats=mr_volume_statistics(image))
    return (image[0] if channels == 1 else image), target


def enhance_slice(
    image: np.ndarray,
    target: np.ndarray,
    keys: dict[int, str],
    rng: np.random.Generator,
    ct_params: IntensityParams,
    settings: SynthSettings | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A contrast phase simulated on one real CT slice: the image's own texture, the phase's organ values.

    A label-map render (:func:`render_slice`) draws every structure flat, so bone has no cortex and
    bowel no content; a single real CT is often native (unenhanced), so its aorta is never bright.
    Here the real slice is kept and only the enhancing structures (:data:`CT_ENHANCING`) are
    shifted: each organ's median moves to a value drawn from its :data:`CT_HU` range for one random
    phase (native, arterial, portal venous, delayed), its texture kept; the shift map is blurred by
    0.7 pixels so the boundaries stay partial-volume rather than cut. Then the slice and its labels
    are deformed together (:func:`render_slice`'s random affine and elastic field; bilinear for the
    image, nearest neighbour for the labels; outside the slice is air) and acquired again (blur,
    noise, lower resolution).

    Args:
        image: (S, S) float CT slice on the model grid, normalised with ``ct_params``
            (rows anterior -> posterior, columns patient right -> left); values the window
            clipped stay clipped. Or (C, S, S), C odd, adjacent slices (a model reading
            neighbouring slices): each organ's shift, the deformation and the acquisition are shared.
        target: the integer organ labels of ``image``, the same shape.
        keys: label value -> structure key (:func:`structure_keys`); labels without a key or not in
            :data:`CT_ENHANCING` keep their values.
        rng: the only source of randomness.
        ct_params: the model's CT normalisation (a linear map of HU inside its window).
        settings: ranges of the draws (default :class:`SynthSettings`).

    Returns:
        (image, labels): float32 of the image's shape, normalised with ``ct_params``, and uint8
        (S, S) labels of its (centre) slice.
    """
    from scipy import ndimage

    check_slices("enhance_slice", image, target)
    settings = settings or SynthSettings()
    hu = np.asarray(image, dtype=np.float32) * np.float32(ct_params.std) + np.float32(ct_params.mean)
    phase = int(rng.integers(len(CT_PHASES)))
    shift = np.zeros_like(hu)
    for value in np.unique(target):  # one draw per organ, shared by a stack's slices
        key = keys.get(int(value))
        if key not in CT_ENHANCING:
            continue
        organ = target == value
        low, high = CT_HU[key][phase]
        shift[organ] = rng.uniform(low, high) - float(np.median(hu[organ]))
    hu = hu + ndimage.gaussian_filter(shift, in_plane(hu, 0.7))
    air = float(ct_params.clip[0])
    hu, labels = deform_slice(hu - air, centre(target), rng, settings)
    hu = hu + air
    hu = acquire(hu.astype(np.float32), "ct", rng, settings)
    return normalize_slices(hu, "ct", ct_params), labels


def _opposed_phase(image: np.ndarray, anatomy: np.ndarray, keys: dict[int, str]) -> np.ndarray:
    """Opposed-phase T1: voxels where fat meets water-rich tissue cancel (the 'India ink' edge)."""
    from scipy import ndimage

    fat = np.isin(anatomy, [v for v, k in keys.items() if k in ("fat", "vertebrae")])
    water = (anatomy > 0) & ~fat
    edge = (ndimage.binary_dilation(fat) & water) | (ndimage.binary_dilation(water) & fat)
    return np.where(edge, image * 0.15, image)


def acquire(image: np.ndarray, family: str, rng: np.random.Generator, settings: SynthSettings) -> np.ndarray:
    """Blur, bias field and gamma (MR), noise and reduced resolution of an (S, S) slice, or of a
    (C, S, S) stack of adjacent slices (each draw shared by the stack, the noise not)."""
    from scipy import ndimage

    size = image.shape[-1]
    sigma = rng.uniform(*settings.blur_sigma)
    if sigma > 0.05:
        image = ndimage.gaussian_filter(image, in_plane(image, sigma))
    if family != "ct":
        coarse = torch.from_numpy(rng.standard_normal((1, 1, 4, 4)).astype(np.float32))
        field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0, 0].numpy()
        image = image * np.exp(field * rng.uniform(*settings.bias_strength))
        image = np.clip(image, 0.0, None) ** math.exp(rng.normal(0.0, settings.gamma_std))
        noise = rng.uniform(*settings.mr_noise)
        real = image + noise * rng.standard_normal(image.shape)
        imaginary = noise * rng.standard_normal(image.shape)
        image = np.sqrt(real**2 + imaginary**2)  # Rician: magnitude of a complex signal
    else:
        image = image + rng.uniform(*settings.ct_noise_hu) * rng.standard_normal(image.shape)
    if rng.random() < settings.p_low_resolution:
        small = max(8, round(size / rng.uniform(*settings.resolution_factor)))
        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).reshape(1, -1, size, size)
        t = F.interpolate(t, size=(small, small), mode="bilinear", align_corners=False, antialias=True)
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        image = t.reshape(image.shape).numpy()
    return image.astype(np.float32)


def neighbours(volume: np.ndarray, k: int) -> np.ndarray:
    """Slices k-1, k, k+1 of a (Z, S, S) volume as (3, S, S), the end slices repeated at the edges."""
    z = volume.shape[0]
    return volume[[max(k - 1, 0), k, min(k + 1, z - 1)]]
