"""Scores as the released M4oE code computes them, to set beside :mod:`m4oe.evaluate`'s.

The released repository (github.com/csyfjiang/M4oE) tests on nnU-Net v1 preprocessed volumes
(``datasets/volumn2slice.py`` and ``datasets/remap_3d.py`` read ``nnUNetData_plans_v2.1_stage0``):
every case resampled to the dataset's target spacing, then scored per case and per class in that
voxel grid (``utils.py``, ``calculate_metric_percase``, with medpy):

- organ in both: medpy ``dc`` (Dice) and ``hd95`` without a voxel spacing, so HD95 is in voxels
  of the test grid (the 95th percentile of both directed surface distances pooled);
- organ in the prediction only: Dice 1, HD95 0;
- organ absent from the prediction (present in the reference or not): Dice 0, HD95 0;

and ``test.py`` averages every class of the task over the cases, these zeros and ones included.
:mod:`m4oe.evaluate` instead measures in the image's own grid, in mm, leaves an organ absent from
both out of the means, gives Dice 0 to an organ in one image only and leaves it out of the mean
HD95. The numbers of the two differ by construction; this module reproduces the released ones so
a trained model's figures can be set beside the published tables.

Test space: nnU-Net v1 resamples a label map one label at a time (its ``resize_segmentation``):
the label's mask interpolated linearly and kept where >= 0.5, except along the low-resolution axis
when one spacing is more than 3 times another (``RESAMPLING_SEPARATE_Z_ANISO_THRESHOLD``), which
is resampled by nearest neighbour. Its target spacing comes from the plans file of each dataset,
which the released repository does not include: give it (``test_spacing_mm``, e.g. the median
spacing of the training cases, as nnU-Net v1 chose it), or the image's own grid stands in. The
nonzero-region crop nnU-Net also applies changes neither Dice nor surface distances, so it is
left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

ANISOTROPY_THRESHOLD = 3.0
"""nnU-Net v1: above this ratio of largest to smallest spacing, the coarse axis is resampled apart."""

CONVENTIONS = (
    "Dice and HD95 as the released M4oE code computes them (utils.py calculate_metric_percase)",
    "HD95 in voxels of the test grid (medpy hd95 without a voxel spacing)",
    "organ in the prediction only: Dice 1, HD95 0; absent from the prediction: Dice 0, HD95 0",
    "means over every scored label, those values included",
)


def released_scores(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing_zyx: Sequence[float],
    labels: Sequence[int],
    test_spacing_zyx: Sequence[float] | None = None,
    names: dict[int, str] | None = None,
) -> dict:
    """Per-label Dice and HD95 (voxels) of two label maps under the released code's protocol.

    Args:
        pred, ref: integer label maps (z, y, x) on one grid of voxel spacing ``spacing_zyx`` (mm).
        labels: the label values to score: every class of the task, as the released test does
            (a label absent from both images then scores Dice 0, HD95 0).
        test_spacing_zyx: spacing (mm, z y x) of the released test grid; None scores on the input
            grid.
        names: label value -> structure name, copied into each row.

    Returns:
        A JSON-ready dict: ``labels`` (one dict per label: ``label``, ``name``, ``dice``,
        ``hd95_voxels``, ``case``: "both", "prediction only", "reference only" or "neither"),
        ``mean_dice``, ``mean_hd95_voxels``, ``test_spacing_mm`` (x, y, z), ``test_shape`` (z, y, x),
        ``resampled``, ``conventions``.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} must share one grid")
    spacing = tuple(float(s) for s in spacing_zyx)
    resampled = test_spacing_zyx is not None and not np.allclose(test_spacing_zyx, spacing, rtol=1e-3)
    if resampled:
        target = tuple(float(s) for s in test_spacing_zyx)
        if len(target) != pred.ndim or min(target) <= 0:
            raise ValueError(f"the test spacing needs {pred.ndim} positive values in mm, got {target}")
        pred = resample_labels(pred, spacing, target, labels)
        ref = resample_labels(ref, spacing, target, labels)
        spacing = target
    rows = []
    for label in labels:
        p, r = pred == label, ref == label
        in_pred, in_ref = bool(p.any()), bool(r.any())
        if in_pred and in_ref:
            dice = 2.0 * np.count_nonzero(p & r) / (np.count_nonzero(p) + np.count_nonzero(r))
            hd95 = hd95_voxels(p, r)
        else:
            dice, hd95 = (1.0, 0.0) if in_pred else (0.0, 0.0)
        case = {(True, True): "both", (True, False): "prediction only", (False, True): "reference only"}
        rows.append(
            {
                "label": int(label),
                "name": (names or {}).get(label),
                "dice": float(dice),
                "hd95_voxels": float(hd95),
                "case": case.get((in_pred, in_ref), "neither"),
            }
        )
    return {
        "labels": rows,
        "mean_dice": float(np.mean([r["dice"] for r in rows])) if rows else None,
        "mean_hd95_voxels": float(np.mean([r["hd95_voxels"] for r in rows])) if rows else None,
        "test_spacing_mm": list(reversed(spacing)),
        "test_shape": list(pred.shape),
        "resampled": bool(resampled),
        "conventions": list(CONVENTIONS),
    }


def hd95_voxels(pred: np.ndarray, ref: np.ndarray) -> float:
    """medpy's ``hd95`` without a spacing: the 95th percentile of the distances (in voxels) from
    each surface voxel of one mask to the other mask's surface, both directions pooled.

    Surface: the mask minus its erosion by the face-connected structuring element (so a voxel on
    the array's edge is a surface voxel). Both masks must be non-empty.
    """
    structure = ndimage.generate_binary_structure(pred.ndim, 1)

    def surface(mask):
        return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1)

    pred_surface, ref_surface = surface(pred), surface(ref)
    to_ref = ndimage.distance_transform_edt(~ref_surface)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface)[ref_surface]
    return float(np.percentile(np.hstack((to_ref, to_pred)), 95))


def resample_labels(
    labels_zyx: np.ndarray, spacing_zyx: Sequence[float], target_zyx: Sequence[float], values: Sequence[int]
) -> np.ndarray:
    """A label map (z, y, x) resampled from ``spacing_zyx`` to ``target_zyx`` (mm) as nnU-Net v1 does.

    The new shape is round(shape * spacing / target). Each of ``values`` in turn: its mask
    interpolated linearly (voxel centres aligned, edges clamped) and set where >= 0.5 (later values
    win a tie); along the coarse axis by nearest neighbour when the input or target spacing is
    anisotropic (largest / smallest > 3). Values not listed become background.
    """
    spacing, target = np.asarray(spacing_zyx, float), np.asarray(target_zyx, float)
    shape = [max(1, round(n * s / t)) for n, s, t in zip(labels_zyx.shape, spacing, target, strict=True)]
    coarse = None
    for grid in (spacing, target):
        if grid.max() / grid.min() > ANISOTROPY_THRESHOLD:
            coarse = int(np.argmax(grid))
            break
    out = np.zeros(shape, dtype=labels_zyx.dtype)
    for value in values:
        mask = (labels_zyx == value).astype(np.float32)
        if not mask.any():
            continue
        for axis, size in enumerate(shape):
            mask = _resize_axis(mask, axis, size, nearest=axis == coarse)
        out[mask >= 0.5] = value
    return out


def _resize_axis(array: np.ndarray, axis: int, size: int, nearest: bool) -> np.ndarray:
    """``array`` resized to ``size`` along ``axis``, linearly or by nearest neighbour, with the
    voxel centres of both grids aligned and coordinates clamped to the edge (skimage's ``resize``)."""
    n = array.shape[axis]
    if n == size:
        return array
    coords = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    if nearest:
        return np.take(array, np.rint(coords).astype(int), axis=axis)
    low = np.floor(coords).astype(int)
    high = np.minimum(low + 1, n - 1)
    weight = (coords - low).astype(np.float32)
    shape = [1] * array.ndim
    shape[axis] = size
    weight = weight.reshape(shape)
    return np.take(array, low, axis=axis) * (1 - weight) + np.take(array, high, axis=axis) * weight
