"""Intensity normalisation per modality: the single definition that training and inference share.

Both modalities use one formula, ``(clip(x, lo, hi) - mean) / std``; they differ in where the four
numbers come from:

- CT (Hounsfield units are absolute): from the dataset, stored in the model card. Training derives
  them nnU-Net style with :func:`ct_statistics_from_samples`: clip to the 0.5 and 99.5 percentiles
  of the foreground (labelled) voxels of the training set, then z-score with the mean and standard
  deviation of the clipped foreground values.
- MR (arbitrary scale per scanner and sequence): from each volume, by :func:`mr_volume_statistics`:
  clip to the 0.5 and 99.5 percentiles of the volume's foreground, then z-score with the mean and
  standard deviation of the clipped foreground. The foreground is every voxel above the volume's
  minimum, which drops constant padding (the zeros outside the field of view) and, unlike a
  "nonzero" mask, is unchanged by a global offset, so the result is invariant to ``a * x + b``
  with ``a > 0``: the property that makes one MR expert usable across scanners.

Z-scoring both modalities puts them on one scale for the layers they share. The default CT
parameters clip to the abdominal window [-125, 275] HU of the published M4oE / TransUNet Synapse
preprocessing and centre and scale it to [-2, 2] (mean 75, std 100), the spread a z-scored volume
has over its central 95 %; they serve untrained models and tests, while a trained model's card
carries its dataset's figures. The published [0, 1] scaling is ``IntensityParams.ct((-125, 275),
mean=-125, std=400)``.

MR statistics are per volume, so a predictor that streams slices computes them once with
:func:`mr_volume_statistics` and passes them to :func:`normalize_slices` for every batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import NamedTuple

import numpy as np
import torch

from m4oe.modality import parse_modality, strided_subsample

STATISTICS_VOXELS = 1 << 20


@dataclass(frozen=True)
class IntensityParams:
    """How one modality's intensities are normalised; lives in the model card.

    CT: ``clip`` (lo, hi) in HU, ``mean`` and ``std`` in HU of the clipped training foreground.
    MR: ``percentiles`` (lo, hi) in percent, taken per volume. Fields of the other modality are None.
    Build with :meth:`ct` / :meth:`mr`; invalid values raise ``ValueError``.
    """

    modality: str
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None
    percentiles: tuple[float, float] | None = None

    @classmethod
    def ct(cls, clip: tuple[float, float], mean: float, std: float) -> IntensityParams:
        return cls("ct", clip=(float(clip[0]), float(clip[1])), mean=float(mean), std=float(std))

    @classmethod
    def mr(cls, percentiles: tuple[float, float] = (0.5, 99.5)) -> IntensityParams:
        return cls("mr", percentiles=(float(percentiles[0]), float(percentiles[1])))

    def __post_init__(self):
        if self.modality not in ("ct", "mr"):
            raise ValueError(f"intensity params: modality must be 'ct' or 'mr', got {self.modality!r}")
        if self.modality == "ct":
            if self.clip is None or self.mean is None or self.std is None or self.percentiles is not None:
                raise ValueError("intensity params for ct need clip, mean and std, and no percentiles")
            lo, hi = self.clip
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(
                    f"intensity params for ct: clip must be finite with lo < hi, got {self.clip}"
                )
            if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
                raise ValueError(
                    f"intensity params for ct: mean must be finite and std positive, "
                    f"got mean {self.mean}, std {self.std}"
                )
        else:
            if self.percentiles is None or any(v is not None for v in (self.clip, self.mean, self.std)):
                raise ValueError("intensity params for mr need percentiles, and no clip, mean or std")
            lo, hi = self.percentiles
            if not 0.0 <= lo < hi <= 100.0:
                raise ValueError(
                    f"intensity params for mr: percentiles must satisfy 0 <= lo < hi <= 100, "
                    f"got {self.percentiles}"
                )

    def to_dict(self) -> dict:
        """JSON-ready dict holding only this modality's fields."""
        if self.modality == "ct":
            return {"modality": "ct", "clip": list(self.clip), "mean": self.mean, "std": self.std}
        return {"modality": "mr", "percentiles": list(self.percentiles)}

    @classmethod
    def from_dict(cls, data: dict) -> IntensityParams:
        """Inverse of :meth:`to_dict`. Unknown or missing keys and wrong types raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"intensity params must be a JSON object, got {type(data).__name__}")
        modality = data.get("modality")
        if modality not in ("ct", "mr"):
            raise ValueError(f"intensity params: 'modality' must be 'ct' or 'mr', got {modality!r}")
        fields = {"ct": ("clip", "mean", "std"), "mr": ("percentiles",)}[modality]
        for key in data:
            if key != "modality" and key not in fields:
                raise ValueError(f"intensity params for {modality}: unknown key {key!r}")
        for key in fields:
            if key not in data:
                raise ValueError(f"intensity params for {modality}: missing key {key!r}")
        values = {}
        for key in fields:
            if key in ("clip", "percentiles"):
                values[key] = _number_pair(data[key], key)
            else:
                values[key] = _number(data[key], key)
        return cls(modality, **values)


DEFAULT_PARAMS = {
    "ct": IntensityParams.ct(clip=(-125.0, 275.0), mean=75.0, std=100.0),
    "mr": IntensityParams.mr(percentiles=(0.5, 99.5)),
}
"""Defaults for models without dataset statistics; see the module docstring for the reasons."""


class VolumeStatistics(NamedTuple):
    """Per-volume normalisation figures, in the volume's units: clip bounds, then mean and std."""

    lo: float
    hi: float
    mean: float
    std: float


def mr_volume_statistics(array: np.ndarray, params: IntensityParams | None = None) -> VolumeStatistics:
    """Clip bounds and z-score figures of one MR volume, computed once before streaming its slices.

    Args:
        array: the whole volume, shape (Z, Y, X) (any shape works), arbitrary MR units; a numpy
            array or a torch tensor. A regular subsample of about a million voxels is measured.
        params: MR params (percentiles); default ``DEFAULT_PARAMS["mr"]``.

    Returns:
        (lo, hi, mean, std): the params' percentiles of the foreground (voxels above the volume
        minimum), and the mean and standard deviation of the foreground clipped to [lo, hi].
        A constant volume gets std 1, so that it normalises to zeros rather than NaN.
    """
    params = DEFAULT_PARAMS["mr"] if params is None else params
    if params.modality != "mr":
        raise ValueError(f"mr_volume_statistics needs MR params, got params for {params.modality}")
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    sample = strided_subsample(np.asarray(array), STATISTICS_VOXELS).astype(np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise ValueError("MR volume holds no finite voxel value")
    foreground = sample[sample > sample.min()]
    if foreground.size == 0:
        foreground = sample
    lo, hi = np.percentile(foreground, params.percentiles)
    if not hi > lo:
        return VolumeStatistics(float(lo), float(lo), float(lo), 1.0)
    clipped = np.clip(foreground, lo, hi)
    return VolumeStatistics(float(lo), float(hi), float(clipped.mean()), float(clipped.std()))


def normalize_slices(
    slices,
    modality: str,
    params: IntensityParams | None = None,
    volume_stats: VolumeStatistics | None = None,
):
    """Normalise part of a volume: ``(clip(x, lo, hi) - mean) / std``, element by element.

    Args:
        slices: intensities of any shape, e.g. a batch of axial slices (B, Y, X) or (B, 1, H, W);
            HU for CT. A numpy array (returned as float32) or a torch tensor (kept on its device,
            integer tensors become float32).
        modality: ``"ct"`` or ``"mr"``.
        params: the modality's params, default ``DEFAULT_PARAMS[modality]``.
        volume_stats: MR only, required: :func:`mr_volume_statistics` of the whole volume.

    Returns:
        The normalised intensities, same shape.
    """
    modality = parse_modality(modality)
    params = DEFAULT_PARAMS[modality] if params is None else params
    if params.modality != modality:
        raise ValueError(f"normalising {modality} with intensity params for {params.modality}")
    if modality == "ct":
        if volume_stats is not None:
            raise ValueError("volume_stats apply to MR only; CT uses the dataset params")
        lo, hi = params.clip
        mean, std = params.mean, params.std
    else:
        if volume_stats is None:
            raise ValueError("MR normalisation needs the volume statistics (see mr_volume_statistics)")
        lo, hi, mean, std = volume_stats
    if isinstance(slices, torch.Tensor):
        values = slices if slices.is_floating_point() else slices.float()
        return (values.clamp(lo, hi) - mean) / std
    values = np.asarray(slices, dtype=np.float32)
    return ((np.clip(values, lo, hi) - np.float32(mean)) / np.float32(std)).astype(np.float32, copy=False)


def normalize(array, modality: str, params: IntensityParams | None = None):
    """Normalise a whole volume (Z, Y, X) (any shape): numpy in, float32 numpy out (torch: tensor).

    For MR the statistics are those of ``array`` itself; see :func:`normalize_slices` for batches.
    """
    modality = parse_modality(modality)
    stats = mr_volume_statistics(array, params) if modality == "mr" else None
    return normalize_slices(array, modality, params, stats)


def ct_statistics_from_samples(
    foreground_values, clip_percentiles: tuple[float, float] = (0.5, 99.5)
) -> IntensityParams:
    """CT params from training data, nnU-Net style.

    Args:
        foreground_values: HU of foreground (labelled) voxels pooled over the training volumes,
            any shape; a subsample per volume is fine. Non-finite values are ignored.
        clip_percentiles: percentiles (in percent) of those values that become the clip window.

    Returns:
        ``IntensityParams.ct(clip=(p_lo, p_hi), mean, std)``, mean and std of the clipped values.
    """
    lo_pct, hi_pct = _number_pair(clip_percentiles, "clip_percentiles")
    if not 0.0 <= lo_pct < hi_pct <= 100.0:
        raise ValueError(f"clip_percentiles must satisfy 0 <= lo < hi <= 100, got {clip_percentiles}")
    values = np.asarray(foreground_values, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no finite foreground values to derive CT statistics from")
    lo, hi = np.percentile(values, [lo_pct, hi_pct])
    clipped = np.clip(values, lo, hi)
    std = float(clipped.std())
    if not (hi > lo and std > 0):
        raise ValueError(f"foreground values are constant ({lo:g} HU): no CT normalisation can be derived")
    return IntensityParams.ct(clip=(float(lo), float(hi)), mean=float(clipped.mean()), std=std)


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"intensity params: {key!r} must be a number, got {value!r}")
    return float(value)


def _number_pair(value, key: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"intensity params: {key!r} must be a pair [lo, hi], got {value!r}")
    return (_number(value[0], key), _number(value[1], key))
