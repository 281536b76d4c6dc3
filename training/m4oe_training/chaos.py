"""CHAOS abdominal MRI (liver, kidneys, spleen; manual labels) -> an nnU-Net v2 raw dataset folder.

CHAOS (Kavur et al., "CHAOS Challenge - combined (CT-MR) healthy abdominal organ segmentation",
Medical Image Analysis 2021; data CC BY-NC-SA 4.0, non-commercial use only,
zenodo.org/record/3431873) has 20 labelled MRI studies, each a T2-SPIR (fat-suppressed T2) and a
T1-DUAL (in- and opposed-phase) series, with the liver, both kidneys and the spleen traced by
radiologists. The release is DICOM plus PNG masks; the form read here is the NIfTI pairs most
segmentation code works from (the pre-processing of Ouyang et al., ECCV 2020, kept by the few-shot
segmentation repositories that use CHAOS): one folder with ``image_<N>.nii.gz`` and
``label_<N>.nii.gz`` per study, labels 1 liver, 2 right kidney, 3 left kidney, 4 spleen (in any
numeric voxel type). Other files in the folder (supervoxels, masks, JSON) are ignored.

The label maps are rewritten onto the project's nine-organ numbering (liver 1, spleen 2, right
kidney 3, left kidney 4, as the TotalSegmentator converter writes them), so a CHAOS dataset shares
the embedded model's task with fully labelled data: it labels four of its nine structures, and
training counts the other five as unknown on its slices, not as background (partial labels,
:func:`.export.labelled_classes`).

Command::

    python -m m4oe_training.converters chaos SRC DST [--sequence t2|t1] [--overwrite]

``SRC`` is that folder or a parent holding ``chaos_MR_T2_normalized/`` (``CHAOST2/...``, or the
T1 names with ``--sequence t1``). Geometry is checked as for every converter (:mod:`.nnunet`);
errors name the file; the dataset is built in a hidden folder and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from m4oe.errors import InputError

from .dataset_writer import FILE_ENDING, Case, ConversionResult, Job, Structure, write_datasets

CHAOS_STRUCTURES = (
    Structure(1, "liver", "liver", "liver"),
    Structure(2, "spleen", "spleen", "spleen"),
    Structure(3, "kidney_right", "kidney_right", "right kidney"),
    Structure(4, "kidney_left", "kidney_left", "left kidney"),
)
"""Written values (the project's organ numbering) with CHAOS's own names."""

CHAOS_IDS = {"liver": 1, "kidney_right": 2, "kidney_left": 3, "spleen": 4}
"""Label ids of the CHAOS NIfTI pairs."""

SEQUENCES = {"t2": "T2", "t1": "T1"}
_IMAGE = re.compile(r"image_(\d+)\.nii\.gz")


def chaos_remap() -> np.ndarray:
    """256-entry table: CHAOS id -> written value (0 elsewhere)."""
    table = np.zeros(256, dtype=np.uint8)
    for structure in CHAOS_STRUCTURES:
        table[CHAOS_IDS[structure.name]] = structure.value
    return table


def find_cases(src: str | Path, sequence: str = "t2") -> tuple[Path, tuple[Case, ...]]:
    """The folder holding the pairs, and its cases ``chaos_<sequence>_<NN>`` sorted by id.

    Raises:
        InputError: ``src`` is not a folder, holds no ``image_<N>.nii.gz``, or an image lacks its label.
    """
    src = Path(src)
    if not src.is_dir():
        raise InputError("is not a folder", src)
    name = f"chaos_MR_{SEQUENCES[sequence]}_normalized"
    candidates = (src, src / name, src / f"CHAOS{SEQUENCES[sequence]}" / name)
    root = next((c for c in candidates if c.is_dir() and any(c.glob(f"image_*{FILE_ENDING}"))), None)
    if root is None:
        raise InputError(
            f"holds no CHAOS image_N{FILE_ENDING} files (looked in ., ./{name}, ./CHAOS.../{name})", src
        )
    cases = []
    for image in sorted(root.iterdir()):
        match = _IMAGE.fullmatch(image.name)
        if match is None:
            continue
        label = root / f"label_{match[1]}{FILE_ENDING}"
        if not label.is_file():
            raise InputError(f"missing: no label for image {image.name}", label)
        cases.append(Case(f"chaos_{sequence}_{int(match[1]):02d}", match[1], image, label))
    return root, tuple(sorted(cases, key=lambda case: case.case_id))


def convert_chaos(
    src: str | Path,
    dst: str | Path,
    *,
    sequence: str = "t2",
    overwrite: bool = False,
    progress=None,
    cancel=None,
) -> ConversionResult:
    """Write the CHAOS MRI pairs of ``src`` as an nnU-Net dataset at ``dst`` (modality "mr").

    Images are copied as they are (LPS geometry, the scanner's intensities); label maps are
    rewritten as uint8 in the project's numbering on each image's exact grid. Returns what was
    written. Raises InputError or OutputError naming the file.
    """
    if sequence not in SEQUENCES:
        raise InputError(f"unknown CHAOS sequence {sequence!r}; expected one of {sorted(SEQUENCES)}", src)
    root, cases = find_cases(src, sequence)
    source = {
        "dataset": f"CHAOS MR {SEQUENCES[sequence]}",
        "reference": "https://chaos.grand-challenge.org/ (Kavur et al., MedIA 2021)",
        "license": "CC-BY-NC-SA-4.0",
        "folder": str(root.resolve()),
        "layout": {"image": "image_{id}.nii.gz", "label": "label_{id}.nii.gz"},
        "original_labels": {str(CHAOS_IDS[s.name]): s.original for s in CHAOS_STRUCTURES},
        "partial_labels": "liver, spleen and kidneys only; other organs are not labelled",
    }
    job = Job(
        f"CHAOS_MR_{SEQUENCES[sequence]}", "mr", CHAOS_STRUCTURES, Path(dst), cases, 0, source, chaos_remap()
    )
    return write_datasets([job], root, link=False, overwrite=overwrite, progress=progress, cancel=cancel)[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="folder of image_N.nii.gz / label_N.nii.gz pairs, or a parent")
    parser.add_argument("dst", type=Path, help="output dataset folder")
    parser.add_argument(
        "--sequence", choices=sorted(SEQUENCES), default="t2", help="which series (default t2)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
