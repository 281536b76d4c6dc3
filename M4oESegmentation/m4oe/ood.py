"""Does a scan look like the abdomen the model knows? Plausibility checks on a predicted label map.

A segmentation model labels whatever it is given. Measured on the embedded model
(``benchmarks/ood.py``, figures in ``benchmarks/README.md``): a pelvis-only CT, a head phantom,
noise volumes and flipped abdomens all came out with abdominal labels, and the gate's routing
confidence stayed 1.0 on every CT-like input, so the gate cannot tell. The network's own
confidence (mean highest class probability in the labelled voxels) fell on most of those inputs,
but with the default test-time augmentation it was 0.73 on the real abdominal MRI and 0.74 on the
CT head phantom, and it moves with the number of passes. So this check reads only the label map,
for the anatomy a radiologist looks at first, with thresholds far from every abdominal scan
measured (4 real scans, 24 phantoms, with 1 and with 5 test-time passes):

- a solid organ is there: the liver, the spleen or a kidney reaches :data:`SOLID_ORGAN_ML`;
- the spine is there: every axial slice of the abdomen shows a vertebra, so the vertebrae reach
  :data:`FOUND_ML`;
- the liver lies on the patient's right: its centroid at least :data:`LIVER_RIGHT_OF_SPINE_MM`
  to the right of the vertebrae's (left-right flipped or rotated images fail this);
- the liver is not below the kidneys: its centroid no more than :data:`LIVER_BELOW_KIDNEYS_MM`
  below theirs (head-feet flipped images fail this);
- the spleen is smaller than the liver (abdominal scans: spleen / liver 0.03-0.29).

An organ counts as found from :data:`FOUND_ML`; the position and size checks run only between
found organs, and only for the organs the task has (found by their standard codes, so a model
numbering or naming its classes differently is checked the same way). A task with none of these
organs gets no check. What it cannot see: an abdomen the model segments badly but plausibly; and
a situs inversus or a massive splenomegaly is warned about like a flipped image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .labels import Label
from .terminology import organ_keys

FOUND_ML = 10.0
"""An organ smaller than this (mL) counts as not found: a few stray voxels are not an organ.
Vertebrae measured: 41 mL and more on abdominal scans, at most 7 mL on the non-abdominal inputs
but for the crop below the kidneys (128-140 mL, caught by :data:`SOLID_ORGAN_ML`)."""
SOLID_ORGAN_ML = 50.0
"""The largest of liver, spleen and kidneys must reach this (mL). Measured: 455 mL and more on
abdominal scans; at most 11 mL on the pelvis and lower-abdomen crops, the MR-range noise and the
MR head phantom. Other noise (up to 129 mL) and the CT head phantom (a 770-845 mL "liver") pass
it and are caught by the vertebrae."""
LIVER_RIGHT_OF_SPINE_MM = 30.0
"""The liver's centroid lies at least this far (mm) to the patient's right of the vertebrae's.
Measured: 48-92 mm on abdominal scans, 13 and -24 mm on the left-right flipped example_ct."""
LIVER_BELOW_KIDNEYS_MM = 20.0
"""The liver's centroid may lie at most this far (mm) below the mean of the kidneys'. Measured:
the liver 31-77 mm above them on abdominal scans, 43 mm below on the head-feet flipped one."""
SOLID_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left")
NAMES = {"liver": "liver", "spleen": "spleen", "kidney_right": "kidney", "kidney_left": "kidney"}
CHECKED_ORGANS = (*SOLID_ORGANS, "vertebrae")


@dataclass(frozen=True)
class ScanCheck:
    """The outcome of :func:`check_scan`.

    ``statistics``: JSON-ready figures the rule reads: ``organ_ml`` (mL of each checked organ the
    task has, by TERMS key), ``largest_solid_organ_ml``, ``vertebrae_ml``,
    ``liver_right_of_spine_mm``, ``liver_above_kidneys_mm``, ``spleen_to_liver_volume`` (None
    where an organ it needs was not found or is not in the task). ``reasons``: one plain-language
    sentence per failed check, empty when the scan looks abdominal.
    """

    statistics: dict
    reasons: tuple[str, ...]

    @property
    def warning(self) -> str | None:
        """The reasons in one line, with what they mean, or None when every check passed."""
        if not self.reasons:
            return None
        return (
            "the scan may not be one the model knows (an abdomen, oriented as its header says): "
            f"{'; '.join(self.reasons)}; check the result closely"
        )

    def to_dict(self) -> dict:
        return {"statistics": self.statistics, "reasons": list(self.reasons), "warning": self.warning}


def organ_counts(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxels of each label value per slice and per column of an axial stack.

    Args:
        labels: (Z, Y, X) integer label values 0..num_classes-1, laid out as
            :class:`m4oe.geometry.AxialStack` (slices inferior -> superior, rows anterior ->
            posterior, columns patient right -> left).
    Returns:
        ``(per_slice (Z, K), per_column (X, K))`` int64 counts. One slice at a time, so the
        temporary arrays stay one slice large (0.4 s for 512 x 512 x 300 voxels on one core).
    """
    Z, _, X = labels.shape
    K = num_classes
    per_slice = np.zeros((Z, K), np.int64)
    per_column = np.zeros(X * K, np.int64)
    columns = (np.arange(X, dtype=np.int64) * K)[None, :]
    for k in range(Z):
        values = labels[k].astype(np.int64)
        per_slice[k] = np.bincount(values.ravel(), minlength=K)
        per_column += np.bincount((values + columns).ravel(), minlength=X * K)
    return per_slice, per_column.reshape(X, K)


def check_scan(
    labels: np.ndarray, spacing: tuple[float, float, float], task_labels: list[Label]
) -> ScanCheck | None:
    """Check that a predicted label map shows abdominal anatomy the way an abdomen does.

    Args:
        labels: (Z, Y, X) label values of the task, an axial stack (see :func:`organ_counts`).
        spacing: (sz, sy, sx) of that stack in mm.
        task_labels: the task's classes; organs are recognised by their standard codes.
    Returns:
        A :class:`ScanCheck`, or None when the task has none of the organs checked.
    """
    keys = {key: value for value, key in organ_keys(task_labels).items() if key in CHECKED_ORGANS}
    if not keys:
        return None
    num_classes = max(int(labels.max(initial=0)), *(label.value for label in task_labels)) + 1
    per_slice, per_column = organ_counts(labels, num_classes)
    voxels = per_slice.sum(axis=0)
    ml_per_voxel = float(np.prod(spacing)) / 1000.0
    ml = {key: round(float(voxels[value]) * ml_per_voxel, 1) for key, value in keys.items()}
    found = {key for key in keys if ml[key] >= FOUND_ML}

    def centroid(key: str, counts: np.ndarray, step_mm: float) -> float:
        """Mean position (mm from the first slice, row or column) of organ ``key``'s voxels."""
        column = counts[:, keys[key]]
        return float((column * np.arange(len(column))).sum() / column.sum()) * step_mm

    sz, _, sx = spacing
    stats: dict = {
        "organ_ml": ml,
        "largest_solid_organ_ml": max((ml[k] for k in SOLID_ORGANS if k in ml), default=None),
        "vertebrae_ml": ml.get("vertebrae"),
        "liver_right_of_spine_mm": None,
        "liver_above_kidneys_mm": None,
        "spleen_to_liver_volume": None,
    }
    reasons = []
    if stats["largest_solid_organ_ml"] is not None and stats["largest_solid_organ_ml"] < SOLID_ORGAN_ML:
        names = sorted({NAMES[k] for k in SOLID_ORGANS if k in ml}, key=list(NAMES.values()).index)
        reasons.append(
            f"no {' or '.join(names)} of {SOLID_ORGAN_ML:g} mL or more was found "
            f"(largest: {stats['largest_solid_organ_ml']:.0f} mL)"
        )
    if "vertebrae" in ml and "vertebrae" not in found:
        reasons.append(f"no vertebrae were found ({ml['vertebrae']:.0f} mL)")
    if {"liver", "vertebrae"} <= found:
        # Columns run from the patient's right to the left: right of the spine is a smaller column.
        offset = centroid("vertebrae", per_column, sx) - centroid("liver", per_column, sx)
        stats["liver_right_of_spine_mm"] = round(offset, 1)
        if offset < LIVER_RIGHT_OF_SPINE_MM:
            reasons.append(
                f"the liver is not on the patient's right ({offset:.0f} mm right of the spine, "
                f"expected {LIVER_RIGHT_OF_SPINE_MM:g} mm or more; is the image flipped?)"
            )
    kidneys = [k for k in ("kidney_right", "kidney_left") if k in found]
    if "liver" in found and kidneys:
        kidney_z = np.mean([centroid(k, per_slice, sz) for k in kidneys])
        height = centroid("liver", per_slice, sz) - float(kidney_z)
        stats["liver_above_kidneys_mm"] = round(height, 1)
        if height < -LIVER_BELOW_KIDNEYS_MM:
            reasons.append(f"the liver lies {-height:.0f} mm below the kidneys (is the image upside down?)")
    if {"liver", "spleen"} <= found:
        ratio = ml["spleen"] / ml["liver"]
        stats["spleen_to_liver_volume"] = round(ratio, 3)
        if ratio > 1.0:
            reasons.append(
                f"the spleen ({ml['spleen']:.0f} mL) is larger than the liver ({ml['liver']:.0f} mL)"
            )
    return ScanCheck(stats, tuple(reasons))
