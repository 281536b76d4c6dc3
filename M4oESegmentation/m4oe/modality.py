"""Which imaging modality a volume is: CT or MR.

The modality chooses the intensity normalisation (``m4oe.preprocessing``) and, for forced routing,
the expert. It comes, in this order of precedence, from the user, from the DICOM Modality tag
(0008,0060), or from intensity statistics. The statistics rest on what Hounsfield units are: air
is -1000 HU, fat -100 HU, soft tissue 0-100 HU, so a CT has a mode near -1000 and many negative
voxels, whereas MR signal is non-negative on an arbitrary scale.

One trap is recognised but not repaired: a CT stored as unsigned integers without its rescale
intercept has air at about 0 and soft tissue at about 1040. It is reported as ``"ct"`` with a low
confidence and ``statistics["suspected_hu_offset"] == 1024``, so that the caller can warn; the
intensities are not shifted here, because shifting a genuine MR by mistake would be worse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from m4oe.errors import InputError

MODALITIES = ("ct", "mr")
"""The modalities the engine knows, as lower-case names."""

AIR_HU = (-1100.0, -900.0)
FAT_HU = (-200.0, -30.0)
SOFT_TISSUE_HU = (-30.0, 100.0)
TISSUE_HU = (-200.0, 300.0)
BODY_THRESHOLD_HU = AIR_HU[1]
UNSIGNED_HU_OFFSET = 1024.0
DETECTION_VOXELS = 1 << 18


@dataclass(frozen=True)
class ModalityResult:
    """The modality of a volume and why it was chosen.

    ``modality`` is ``"ct"`` or ``"mr"``; ``source`` is ``"user"``, ``"dicom"`` or ``"intensity"``;
    ``evidence`` is one human-readable line; ``confidence`` is in [0, 1]; ``statistics`` holds the
    intensity figures measured on the volume and the guess made from them alone
    (``intensity_guess``, ``intensity_confidence``), JSON-serialisable.
    """

    modality: str
    source: str
    evidence: str
    confidence: float
    statistics: dict = field(default_factory=dict)


def parse_modality(value: str, what: str = "modality") -> str:
    """``"CT"``, ``" ct "`` -> ``"ct"``; anything other than CT or MR raises an ``InputError`` naming it."""
    name = value.strip().lower() if isinstance(value, str) else None
    if name not in MODALITIES:
        raise InputError(f"{what} {value!r} is not one of {', '.join(repr(m) for m in MODALITIES)}")
    return name


def strided_subsample(array: np.ndarray, max_voxels: int) -> np.ndarray:
    """A regular grid of at most ``max_voxels`` voxels of ``array`` (any shape), as a flat copy.

    Each axis gets its own stride, the axis with the most samples left being thinned first, so a
    thin slab keeps its few slices, and no stride aliases with a row length as a flat stride
    could. Deterministic: the same voxels are chosen for every array of the same shape.
    """
    if max_voxels < 1:
        raise ValueError(f"max_voxels must be at least 1, got {max_voxels}")
    steps = [1] * array.ndim
    counts = list(array.shape)
    while math.prod(counts) > max_voxels:
        axis = int(np.argmax(counts))
        steps[axis] += 1
        counts[axis] = -(-array.shape[axis] // steps[axis])
    view = array[tuple(slice(None, None, step) for step in steps)]
    return np.array(view, copy=True).reshape(-1)


def detect_modality(
    array: np.ndarray, dicom_modality: str | None = None, override: str | None = None
) -> ModalityResult:
    """Decide whether ``array`` is a CT or an MR volume.

    Args:
        array: image intensities, shape (Z, Y, X) (any shape works), in HU for CT, arbitrary units
            for MR. Statistics are taken on a regular subsample of about 260 000 voxels, so a
            512x512x300 volume takes a few milliseconds.
        dicom_modality: the DICOM Modality tag (0008,0060) of the series, if read from DICOM.
            ``"CT"`` and ``"MR"`` are trusted; any other value (``"PT"``, ``"OT"``) falls through to
            the intensity statistics, and the evidence says so.
        override: ``"ct"`` or ``"mr"`` (any case) forces the result; ``None`` or ``"auto"`` detects.

    Returns:
        A :class:`ModalityResult`. Ambiguous statistics never raise: the more likely modality is
        returned with a low confidence.

    Raises:
        InputError: ``override`` is not ct, mr or auto; or the array holds no finite value.
    """
    if override is not None and not (isinstance(override, str) and override.strip().lower() == "auto"):
        forced = parse_modality(override, "modality override")
    else:
        forced = None

    statistics = intensity_statistics(array)
    guess, confidence, reason = _guess_from_statistics(statistics)
    statistics["intensity_guess"] = guess
    statistics["intensity_confidence"] = confidence

    # A CT without its rescale intercept is worth saying even when the tag or the user agrees.
    caveat = f"; {reason}" if statistics["suspected_hu_offset"] else ""
    if forced is not None:
        agreement = caveat if forced == guess else f" (intensities suggest {guess}: {reason})"
        return ModalityResult(forced, "user", f"set by the user to {forced}{agreement}", 1.0, statistics)

    tag = dicom_modality.strip().upper() if isinstance(dicom_modality, str) else ""
    if tag in ("CT", "MR"):
        modality = tag.lower()
        if modality == guess:
            evidence = f"DICOM Modality tag is {tag!r}{caveat}"
            return ModalityResult(modality, "dicom", evidence, 1.0, statistics)
        evidence = f"DICOM Modality tag is {tag!r}, but intensities suggest {guess}: {reason}"
        return ModalityResult(modality, "dicom", evidence, 0.8, statistics)

    prefix = f"DICOM Modality tag is {tag!r}, neither CT nor MR; " if tag else ""
    return ModalityResult(guess, "intensity", prefix + reason, confidence, statistics)


def intensity_statistics(array: np.ndarray) -> dict:
    """The figures modality detection rests on, measured on a subsample of ``array`` (any shape).

    Values are read as HU: ``air_fraction`` is the share of voxels in [-1100, -900]; of the body
    voxels (above -900), ``fat_fraction`` is the share in [-200, -30], ``soft_tissue_fraction`` in
    [-30, 100] (muscle, organs, blood) and ``tissue_fraction`` in [-200, 300], where an abdominal
    CT's body mostly lies. The ``shifted_*`` figures are the same for the values minus 1024;
    ``suspected_hu_offset`` is 1024 when they look like a CT stored unsigned without its rescale
    intercept (no negative value, but air, fat and soft tissue all 1024 too high), else 0.
    """
    array = np.asarray(array)
    if array.size == 0:
        raise InputError(f"image is empty (shape {array.shape})")
    if array.dtype.kind not in "biuf":
        raise InputError(f"image has non-numeric voxel type {array.dtype}")
    sample = strided_subsample(array, DETECTION_VOXELS).astype(np.float32, copy=False)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise InputError("image holds no finite voxel value")
    p1, median, p99 = np.percentile(sample, [1, 50, 99])
    stats = {
        "sampled_voxels": float(sample.size),
        "minimum": float(sample.min()),
        "maximum": float(sample.max()),
        "percentile_1": float(p1),
        "median": float(median),
        "percentile_99": float(p99),
        "negative_fraction": float(np.mean(sample < 0)),
    }
    stats.update(_hu_fractions(sample, ""))
    stats.update(_hu_fractions(sample - UNSIGNED_HU_OFFSET, "shifted_"))
    unsigned_ct = (
        stats["negative_fraction"] <= 0.01
        and stats["shifted_air_fraction"] >= 0.05
        and stats["shifted_fat_fraction"] >= 0.05
        and stats["shifted_soft_tissue_fraction"] >= 0.1
        and stats["shifted_tissue_fraction"] >= 0.7
    )
    stats["suspected_hu_offset"] = UNSIGNED_HU_OFFSET if unsigned_ct else 0.0
    return stats


def _hu_fractions(values: np.ndarray, prefix: str) -> dict:
    body = values[values > BODY_THRESHOLD_HU]
    return {
        f"{prefix}air_fraction": _fraction_within(values, AIR_HU),
        f"{prefix}fat_fraction": _fraction_within(body, FAT_HU),
        f"{prefix}soft_tissue_fraction": _fraction_within(body, SOFT_TISSUE_HU),
        f"{prefix}tissue_fraction": _fraction_within(body, TISSUE_HU),
    }


def _fraction_within(values: np.ndarray, bounds: tuple[float, float]) -> float:
    if values.size == 0:
        return 0.0
    return float(np.mean((values >= bounds[0]) & (values <= bounds[1])))


def _guess_from_statistics(s: dict) -> tuple[str, float, str]:
    """(modality, confidence, one-line reason) from :func:`intensity_statistics` figures."""
    summary = (
        f"1st percentile {s['percentile_1']:.0f}, {100 * s['negative_fraction']:.0f}% of voxels negative, "
        f"range [{s['minimum']:.0f}, {s['maximum']:.0f}]"
    )
    if s["air_fraction"] >= 0.01 and s["negative_fraction"] >= 0.1:
        air_mode = AIR_HU[0] <= s["percentile_1"] <= AIR_HU[1] or s["air_fraction"] >= 0.05
        reason = f"{100 * s['air_fraction']:.0f}% of voxels at air (-1000 HU); {summary}"
        return "ct", 0.95 if air_mode else 0.8, reason
    if s["suspected_hu_offset"]:
        reason = (
            "(nearly) no negative values, but air near 0 and fat/soft tissue near 1000: looks like CT stored "
            f"without its rescale intercept (HU + {UNSIGNED_HU_OFFSET:.0f}); {summary}"
        )
        return "ct", 0.5, reason
    fat_cluster = s["fat_fraction"] >= 0.03 and s["percentile_1"] <= FAT_HU[1]
    if fat_cluster and s["minimum"] >= AIR_HU[0] - 100:
        reason = (
            f"no air, but {100 * s['fat_fraction']:.0f}% of the body at fat values (-200..-30 HU): "
            f"CT cropped to soft tissue?; {summary}"
        )
        return "ct", 0.6, reason
    if s["negative_fraction"] <= 0.05:
        # Values all within a soft-tissue HU window could as well be a CT cropped inside an organ.
        soft_tissue_only = s["minimum"] >= TISSUE_HU[0] and s["maximum"] <= TISSUE_HU[1] + 100
        reason = f"(nearly) non-negative, no air at -1000; {summary}"
        return "mr", 0.6 if soft_tissue_only else 0.9, reason
    reason = f"negative values without air at -1000 or a HU pattern (rescaled data?); {summary}"
    return "mr", 0.5, reason
