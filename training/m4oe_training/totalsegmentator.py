"""TotalSegmentator label ids -> this project's organ keys (the phantom's nine structures).

TotalSegmentator v2 writes one label map per task: ``total`` for CT (117 classes) and
``total_mr`` for MRI. Many users have such outputs for their scans; mapping them onto the
project's organ keys (keys of :data:`m4oe.terminology.TERMS`, the values of
:data:`m4oe.phantom.PHANTOM_LABELS`) turns a folder of volumes into training data, and the
reference labels of the real validation scans into something a model's output can be scored
against. Ids from TotalSegmentator's class map (``totalsegmentator/map_to_binary.py``, v2).
"""

from __future__ import annotations

import numpy as np

from m4oe.phantom import PHANTOM_LABELS

TS_TASKS = ("total", "total_mr")

TOTALSEGMENTATOR_IDS: dict[str, dict[str, tuple[int, ...]]] = {
    "total": {
        "liver": (5,),
        "spleen": (1,),
        "kidney_right": (2,),
        "kidney_left": (3,),
        "aorta": (52,),
        "inferior_vena_cava": (63,),
        # vertebrae L5 (26) ... C1 (50); the sacrum (25) is not a vertebra in the phantom.
        "vertebrae": tuple(range(26, 51)),
        "stomach": (6,),
        "pancreas": (7,),
    },
    "total_mr": {
        "liver": (5,),
        "spleen": (1,),
        "kidney_right": (2,),
        "kidney_left": (3,),
        "aorta": (23,),
        "inferior_vena_cava": (24,),
        "vertebrae": (19,),
        "stomach": (6,),
        "pancreas": (7,),
    },
}
"""Per TotalSegmentator task, the ids that make up each project organ key."""


def lookup_table(task: str, labels: dict[str, int] | None = None) -> np.ndarray:
    """A 256-entry uint8 table: ``table[ts_id]`` is the project label value (0 where unmapped).

    Args:
        task: ``"total"`` (CT) or ``"total_mr"`` (MRI).
        labels: project key -> label value; default :data:`m4oe.phantom.PHANTOM_LABELS`.
    """
    if task not in TOTALSEGMENTATOR_IDS:
        raise ValueError(f"TotalSegmentator task must be one of {TS_TASKS}, got {task!r}")
    labels = PHANTOM_LABELS if labels is None else labels
    table = np.zeros(256, dtype=np.uint8)
    for key, ids in TOTALSEGMENTATOR_IDS[task].items():
        if key in labels:
            table[list(ids)] = labels[key]
    return table


def map_labels(array: np.ndarray, task: str, labels: dict[str, int] | None = None) -> np.ndarray:
    """Map a TotalSegmentator label array (any shape, integer ids 0..255) to project label values.

    Returns a uint8 array of the same shape; structures the project does not segment become 0.
    """
    values = np.asarray(array)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f"TotalSegmentator ids must lie in 0..255, got {values.min()}..{values.max()}")
    return lookup_table(task, labels)[values.astype(np.int64)]
