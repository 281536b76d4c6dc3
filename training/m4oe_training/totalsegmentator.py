"""TotalSegmentator label ids -> this project's organ keys (the phantom's nine structures).

TotalSegmentator v2 writes one label map per task: ``total`` for CT (117 classes) and
``total_mr`` for MRI. Many users have such outputs for their scans; mapping them onto the
project's organ keys (keys of :data:`m4oe.terminology.TERMS`, the values of
:data:`m4oe.phantom.PHANTOM_LABELS`) turns a folder of volumes into training data, and the
reference labels of the real validation scans into something a model's output can be scored
against. Ids from TotalSegmentator's class map (``totalsegmentator/map_to_binary.py``, v2).

A folder of scans with TotalSegmentator multi-label outputs becomes an nnU-Net training dataset
(the layout ``m4oe train`` reads, see :mod:`.dataset_writer`) in one command (the same as
``python -m m4oe_training.totalsegmentator ...``)::

    python -m m4oe_training.converters totalsegmentator SRC DST --modality ct|mr [--task total|total_mr]
    python -m m4oe_training.converters totalsegmentator DST --modality ct \
        --image CT.nii.gz --labels SEG.nii.gz --case NAME

``SRC`` holds ``images/<case>.nii.gz`` and ``labels/<case>.nii.gz`` (TotalSegmentator's
multi-label file of the same name: ``TotalSegmentator -i images/<case>.nii.gz -o
labels/<case>.nii.gz --ml``), or TotalSegmentator's default output: one folder per case,
``SRC/<case>/<image>.nii.gz`` beside ``SRC/<case>/segmentations/<structure>.nii.gz`` (one binary
mask per structure; every structure that maps to a project organ must be there).
Labels are mapped to the project's nine organs (liver 1 ... pancreas 9, the values of
:data:`m4oe.phantom.PHANTOM_LABELS`), written as uint8 on the image's exact grid; every other
structure becomes 0. The image and label map must share size, spacing, origin and direction.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from m4oe.errors import InputError, M4oEError
from m4oe.phantom import PHANTOM_LABELS
from m4oe.progress import CancelCheck, ProgressCallback

from .anatomy import GENERATION_CLASSES
from .dataset_writer import (
    FILE_ENDING,
    Case,
    ConversionResult,
    Job,
    Structure,
    print_progress,
    write_datasets,
)

TS_TASKS = ("total", "total_mr")

TOTALSEGMENTATOR_IDS: dict[str, dict[str, tuple[int, ...]]] = {
    "total": {
        "liver": (5,),
        "spleen": (1,),
        "kidney_right": (2,),
        "kidney_left": (3,),
        "aorta": (52,),
        "inferior_vena_cava": (63,),
        # vertebrae S1 (26), L5 (27) ... C1 (50); the sacrum (25) is not a vertebra in the phantom.
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

_SPINE = (
    "S1",
    "L5",
    "L4",
    "L3",
    "L2",
    "L1",
    *(f"T{n}" for n in range(12, 0, -1)),
    *(f"C{n}" for n in range(7, 0, -1)),
)

TOTALSEGMENTATOR_NAMES: dict[str, dict[int, str]] = {
    "total": {
        5: "liver",
        1: "spleen",
        2: "kidney_right",
        3: "kidney_left",
        52: "aorta",
        63: "inferior_vena_cava",
        6: "stomach",
        7: "pancreas",
        **{26 + i: f"vertebrae_{level}" for i, level in enumerate(_SPINE)},  # vertebrae_S1 26 ... C1 50
    },
    "total_mr": {
        5: "liver",
        1: "spleen",
        2: "kidney_right",
        3: "kidney_left",
        23: "aorta",
        24: "inferior_vena_cava",
        19: "vertebrae",
        6: "stomach",
        7: "pancreas",
    },
}
"""Per task, TotalSegmentator's structure name (its mask file ``<name>.nii.gz``) of each id in
:data:`TOTALSEGMENTATOR_IDS`."""


_RIBS = tuple(range(92, 116))
TOTALSEGMENTATOR_GENERATION: dict[str, dict[str, tuple[int, ...]]] = {
    "total": {
        "muscle": (80, 81, 82, 83, 84, 85, 86, 87, 88, 89),  # gluteus, autochthon, iliopsoas
        "bowel": (15, 18, 19, 20),  # oesophagus, small bowel, duodenum, colon
        "lung": (10, 11, 12, 13, 14, 16),  # lobes, trachea
        "bone": (25, *range(69, 79), 91, *_RIBS, 116, 117),  # sacrum, limbs, girdles, skull, ribs...
        "spinal_canal": (79,),
        "fluid_organ": (4, 21, 23, 24),  # gallbladder, urinary bladder, kidney cysts
        "blood": (51, *range(53, 63), *range(64, 69)),  # heart, other arteries and veins
        "gland": (8, 9, 17, 22),  # adrenals, thyroid, prostate
    },
    "total_mr": {
        "muscle": tuple(range(40, 50)),
        "bowel": (12, 13, 14, 15),
        "lung": (10, 11),
        "bone": (18, 20, *range(30, 40)),  # sacrum, intervertebral discs, limbs and girdles
        "spinal_canal": (21,),
        "fluid_organ": (4, 16),
        "blood": (22, *range(25, 30)),
        "gland": (8, 9, 17),
    },
}
"""Per TotalSegmentator task, the ids drawn as each generation class
(:data:`m4oe_training.anatomy.GENERATION_CLASSES`) in the anatomy maps of label-map renders: the
structures the project does not segment. Ids not listed (the brain) stay unlabelled tissue."""


TOTALSEGMENTATOR_CLASSES: dict[str, dict[int, str]] = {
    "total": {
        4: "gallbladder",
        8: "adrenal_gland_right",
        9: "adrenal_gland_left",
        10: "lung_upper_lobe_left",
        11: "lung_lower_lobe_left",
        12: "lung_upper_lobe_right",
        13: "lung_middle_lobe_right",
        14: "lung_lower_lobe_right",
        15: "esophagus",
        16: "trachea",
        17: "thyroid_gland",
        18: "small_bowel",
        19: "duodenum",
        20: "colon",
        21: "urinary_bladder",
        22: "prostate",
        23: "kidney_cyst_left",
        24: "kidney_cyst_right",
        25: "sacrum",
        51: "heart",
        53: "pulmonary_vein",
        54: "brachiocephalic_trunk",
        55: "subclavian_artery_right",
        56: "subclavian_artery_left",
        57: "common_carotid_artery_right",
        58: "common_carotid_artery_left",
        59: "brachiocephalic_vein_left",
        60: "brachiocephalic_vein_right",
        61: "atrial_appendage_left",
        62: "superior_vena_cava",
        64: "portal_vein_and_splenic_vein",
        65: "iliac_artery_left",
        66: "iliac_artery_right",
        67: "iliac_vena_left",
        68: "iliac_vena_right",
        69: "humerus_left",
        70: "humerus_right",
        71: "scapula_left",
        72: "scapula_right",
        73: "clavicula_left",
        74: "clavicula_right",
        75: "femur_left",
        76: "femur_right",
        77: "hip_left",
        78: "hip_right",
        79: "spinal_cord",
        80: "gluteus_maximus_left",
        81: "gluteus_maximus_right",
        82: "gluteus_medius_left",
        83: "gluteus_medius_right",
        84: "gluteus_minimus_left",
        85: "gluteus_minimus_right",
        86: "autochthon_left",
        87: "autochthon_right",
        88: "iliopsoas_left",
        89: "iliopsoas_right",
        91: "skull",
        92: "rib_left_1",
        93: "rib_left_2",
        94: "rib_left_3",
        95: "rib_left_4",
        96: "rib_left_5",
        97: "rib_left_6",
        98: "rib_left_7",
        99: "rib_left_8",
        100: "rib_left_9",
        101: "rib_left_10",
        102: "rib_left_11",
        103: "rib_left_12",
        104: "rib_right_1",
        105: "rib_right_2",
        106: "rib_right_3",
        107: "rib_right_4",
        108: "rib_right_5",
        109: "rib_right_6",
        110: "rib_right_7",
        111: "rib_right_8",
        112: "rib_right_9",
        113: "rib_right_10",
        114: "rib_right_11",
        115: "rib_right_12",
        116: "sternum",
        117: "costal_cartilages",
    },
    "total_mr": {
        4: "gallbladder",
        8: "adrenal_gland_right",
        9: "adrenal_gland_left",
        10: "lung_left",
        11: "lung_right",
        12: "esophagus",
        13: "small_bowel",
        14: "duodenum",
        15: "colon",
        16: "urinary_bladder",
        17: "prostate",
        18: "sacrum",
        20: "intervertebral_discs",
        21: "spinal_cord",
        22: "heart",
        25: "portal_vein_and_splenic_vein",
        26: "iliac_artery_left",
        27: "iliac_artery_right",
        28: "iliac_vena_left",
        29: "iliac_vena_right",
        30: "humerus_left",
        31: "humerus_right",
        32: "scapula_left",
        33: "scapula_right",
        34: "clavicula_left",
        35: "clavicula_right",
        36: "femur_left",
        37: "femur_right",
        38: "hip_left",
        39: "hip_right",
        40: "gluteus_maximus_left",
        41: "gluteus_maximus_right",
        42: "gluteus_medius_left",
        43: "gluteus_medius_right",
        44: "gluteus_minimus_left",
        45: "gluteus_minimus_right",
        46: "autochthon_left",
        47: "autochthon_right",
        48: "iliopsoas_left",
        49: "iliopsoas_right",
    },
}
"""Per task, TotalSegmentator's name (its mask file ``<name>.nii.gz``) of each id in
:data:`TOTALSEGMENTATOR_GENERATION` (class map of TotalSegmentator v2, ``map_to_binary.py``,
Apache-2.0)."""


def generation_table(task: str) -> np.ndarray:
    """A 256-entry uint8 table: ``table[ts_id]`` is ``i + 1`` for ``GENERATION_CLASSES[i]``, else 0."""
    if task not in TOTALSEGMENTATOR_GENERATION:
        raise ValueError(f"TotalSegmentator task must be one of {TS_TASKS}, got {task!r}")
    table = np.zeros(256, dtype=np.uint8)
    for key, ids in TOTALSEGMENTATOR_GENERATION[task].items():
        table[list(ids)] = GENERATION_CLASSES.index(key) + 1
    return table


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


TS_MODALITY_TASK = {"ct": "total", "mr": "total_mr"}
_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def convert_totalsegmentator(
    dst: str | Path,
    modality: str,
    *,
    src: str | Path | None = None,
    image: str | Path | None = None,
    labels: str | Path | None = None,
    case: str | None = None,
    task: str | None = None,
    link: bool = False,
    overwrite: bool = False,
    anatomy_classes: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> ConversionResult:
    """Scans with TotalSegmentator label maps -> an nnU-Net dataset at ``dst`` with the project's organs.

    Either ``src`` or one ``image`` with its ``labels`` file (a multi-label map) and a ``case``
    name. ``src`` is a folder with ``images/<case>.nii.gz`` and ``labels/<case>.nii.gz``
    (multi-label maps), or TotalSegmentator's default output, one folder per case holding the
    image (its only ``.nii.gz`` file) and ``segmentations/<structure>.nii.gz`` binary masks, of
    which every structure in :data:`TOTALSEGMENTATOR_NAMES` must be present (a subset run would
    otherwise turn a missing organ into background). ``modality`` is "ct" or "mr";
    ``task`` is the TotalSegmentator task whose ids the label maps hold (default "total" for CT,
    "total_mr" for MR). Images are copied (or linked with ``link``); label maps are rewritten
    through :func:`lookup_table`. Errors (missing or unpaired files, a label map on another grid
    than its image, ids outside 0..255, an existing ``dst`` without ``overwrite``) name the file,
    and nothing is left at ``dst``. ``anatomy_classes``: also write ``anatomyTr/<case>``, the
    structures the project does not segment as generation classes (:data:`TOTALSEGMENTATOR_GENERATION`;
    dataset.json ``anatomy_classes``), which label-map renders draw with intensities of their own
    (:mod:`.anatomy`); from per-structure masks, those TotalSegmentator wrote.
    """
    if modality not in TS_MODALITY_TASK:
        raise InputError(f"modality must be 'ct' or 'mr', got {modality!r}")
    task = task or TS_MODALITY_TASK[modality]
    table = lookup_table(task)
    if src is not None:
        if image is not None or labels is not None:
            raise InputError("give a source folder or one image with its labels, not both")
        root = Path(src)
        cases = _folder_cases(root, task, anatomy_classes)
    else:
        if image is None or labels is None or case is None:
            raise InputError("one case needs --image, --labels and --case")
        if not _CASE_ID.fullmatch(case):
            raise InputError(f"case name {case!r} must be letters, digits, '_', '.', '-'")
        for path in (image, labels):
            if not Path(path).is_file():
                raise InputError("not found", path)
        root = Path(image).parent
        cases = (Case(case, case, Path(image), Path(labels)),)
    structures = tuple(
        Structure(value, key, key, f"TotalSegmentator {task}") for key, value in PHANTOM_LABELS.items()
    )
    source = {
        "dataset": "TotalSegmentator outputs",
        "reference": "https://github.com/wasserth/TotalSegmentator",
        "folder": str(root.resolve()),
        "task": task,
        "original_labels": {key: list(ids) for key, ids in TOTALSEGMENTATOR_IDS[task].items()},
    }
    if anatomy_classes:
        source["generation_labels"] = {
            key: list(ids) for key, ids in TOTALSEGMENTATOR_GENERATION[task].items()
        }
    job = Job(
        f"TotalSegmentator_{modality.upper()}",
        modality,
        structures,
        Path(dst),
        cases,
        0,
        source,
        table,
        generation_table(task) if anatomy_classes else None,
    )
    return write_datasets([job], root, link=link, overwrite=overwrite, progress=progress, cancel=cancel)[0]


def _folder_cases(root: Path, task: str, anatomy_classes: bool = False) -> tuple[Case, ...]:
    """The cases of ``root``: ``images/`` with ``labels/``, else one folder per case with masks."""
    if not root.is_dir():
        raise InputError("is not a folder", root)
    images, labels = root / "images", root / "labels"
    if not images.is_dir() and any(root.glob("*/segmentations")):
        return _mask_cases(root, task, anatomy_classes)
    for folder in (images, labels):
        if not folder.is_dir():
            raise InputError(
                "expected images/ and labels/ (multi-label maps) or <case>/segmentations/ folders", folder
            )
    cases = []
    for path in sorted(images.glob(f"*{FILE_ENDING}")):
        case_id = path.name[: -len(FILE_ENDING)]
        label = labels / path.name
        if not label.is_file():
            raise InputError(f"has no label map {label.name} in {labels}", path)
        if not _CASE_ID.fullmatch(case_id):
            raise InputError(f"case name {case_id!r} must be letters, digits, '_', '.', '-'", path)
        cases.append(Case(case_id, case_id, path, label))
    if not cases:
        raise InputError(f"holds no {FILE_ENDING} images", images)
    return tuple(cases)


def _mask_cases(root: Path, task: str, anatomy_classes: bool = False) -> tuple[Case, ...]:
    """``root/<case>/<image>.nii.gz`` with ``root/<case>/segmentations/<structure>.nii.gz``
    (with ``anatomy_classes``, also the masks of the generation classes' structures that exist)."""
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        masks = folder / "segmentations"
        if not masks.is_dir():
            raise InputError("has no segmentations/ folder (TotalSegmentator's per-structure output)", folder)
        if not _CASE_ID.fullmatch(folder.name):
            raise InputError(f"case name {folder.name!r} must be letters, digits, '_', '.', '-'", folder)
        found = sorted(p for p in folder.glob(f"*{FILE_ENDING}") if not p.name.startswith("."))
        if len(found) != 1:
            raise InputError(
                f"must hold exactly one {FILE_ENDING} image beside segmentations/, found {len(found)}", folder
            )
        parts = []
        for ts_id, name in TOTALSEGMENTATOR_NAMES[task].items():
            mask = masks / f"{name}{FILE_ENDING}"
            if not mask.is_file():
                raise InputError(f"missing: TotalSegmentator {task} mask of {name}", mask)
            parts.append((ts_id, mask))
        # The other structures' masks, where TotalSegmentator wrote them, for the anatomy maps.
        for ts_id, name in TOTALSEGMENTATOR_CLASSES[task].items() if anatomy_classes else ():
            mask = masks / f"{name}{FILE_ENDING}"
            if mask.is_file():
                parts.append((ts_id, mask))
        cases.append(Case(folder.name, folder.name, found[0], masks, tuple(parts)))
    return tuple(cases)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line arguments of a TotalSegmentator conversion (shared by both commands)."""
    parser.add_argument(
        "src", type=Path, nargs="?", help="folder with images/ and labels/, or <case>/segmentations/ folders"
    )
    parser.add_argument("dst", type=Path, help="output dataset folder")
    parser.add_argument("--modality", required=True, choices=("ct", "mr"))
    parser.add_argument(
        "--task", choices=TS_TASKS, help="TotalSegmentator task of the label maps (default: the modality's)"
    )
    parser.add_argument("--image", type=Path, help="one image (instead of src)")
    parser.add_argument("--labels", type=Path, help="its TotalSegmentator multi-label map")
    parser.add_argument("--case", help="its case name in the dataset")
    parser.add_argument("--link", action="store_true", help="hard-link images instead of copying them")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--anatomy-classes",
        action="store_true",
        help="also write anatomyTr/: the structures the project does not segment (muscle, bowel, lung, "
        "bone, ...) as generation classes for label-map renders",
    )


def run_from_arguments(args: argparse.Namespace) -> int:
    """Run the conversion :func:`add_arguments` describes; print a one-line result or error.

    Returns 0, or the error's exit code (2 for bad input, 3 for an output problem).
    """
    progress = print_progress if sys.stderr.isatty() else None
    try:
        result = convert_totalsegmentator(
            args.dst,
            args.modality,
            src=args.src,
            image=args.image,
            labels=args.labels,
            case=args.case,
            task=args.task,
            link=args.link,
            overwrite=args.overwrite,
            anatomy_classes=args.anatomy_classes,
            progress=progress,
        )
    except M4oEError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(f"{result.dataset}: {len(result.cases)} cases -> {result.folder}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m m4oe_training.totalsegmentator",
        description="Scans with TotalSegmentator multi-label outputs -> an nnU-Net training dataset.",
    )
    add_arguments(parser)
    return run_from_arguments(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
