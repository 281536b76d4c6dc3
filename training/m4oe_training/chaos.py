"""CHAOS abdominal MRI (liver, kidneys, spleen) and CT (liver; manual labels) -> nnU-Net v2 raw datasets.

CHAOS (Kavur et al., "CHAOS Challenge - combined (CT-MR) healthy abdominal organ segmentation",
Medical Image Analysis 2021; data CC BY-NC-SA 4.0, non-commercial use only,
zenodo.org/record/3431873) has 20 labelled MRI studies, each a T2-SPIR (fat-suppressed T2) and a
T1-DUAL (in- and opposed-phase) series, with the liver, both kidneys and the spleen traced by
radiologists. Two forms are read:

* **The release itself** (``CHAOS_Train_Sets/Train_Sets/MR/<study>/...``): one DICOM file per
  slice and one 8-bit PNG mask per slice::

      <study>/T2SPIR/DICOM_anon/*.dcm            <study>/T2SPIR/Ground/*.png
      <study>/T1DUAL/DICOM_anon/InPhase/*.dcm    <study>/T1DUAL/Ground/*.png   (one mask for both
      <study>/T1DUAL/DICOM_anon/OutPhase/*.dcm                                  phases: co-registered)

  A mask holds the DICOM slice's pixel rows and columns as stored; the organs are grey values,
  liver 63, right kidney 126, left kidney 189, spleen 252 (the challenge reads the ranges 56-70,
  111-135, 176-200, 241-255; other values are background). A mask belongs to the DICOM file of the
  same name; where the names differ (the masks are named after one T1-DUAL phase), the i-th mask in
  file-name order belongs to the i-th DICOM file in file-name order, as the challenge numbers
  them. Files are read by that pairing, whatever their series UIDs, and stacked by position along
  the slice normal (LPS), each slice carrying its mask. With ``--sequence t1-in`` or ``t1-out`` the
  phase paired by order is checked against the other phase paired by name: both must put every
  mask on the slice at the same position. The release's CT part (``CT/<study>/DICOM_anon/*.dcm``,
  ``CT/<study>/Ground/liver_GT_*.png``: 20 portal-venous CTs, the liver alone, any non-zero grey
  value) is read the same way with ``--sequence ct``: its masks pair by file order.
* **NIfTI pairs** (the pre-processing of Ouyang et al., ECCV 2020, kept by the few-shot
  segmentation repositories that use CHAOS): one folder with ``image_<N>.nii.gz`` and
  ``label_<N>.nii.gz`` per study, labels 1 liver, 2 right kidney, 3 left kidney, 4 spleen (in any
  numeric voxel type). Other files in the folder (supervoxels, masks, JSON) are ignored.

The label maps are rewritten onto the project's nine-organ numbering (liver 1, spleen 2, right
kidney 3, left kidney 4, as the TotalSegmentator converter writes them), so a CHAOS dataset shares
the embedded model's task with fully labelled data: it labels four of its nine structures, and
training counts the other five as unknown on its slices, not as background (partial labels,
:func:`.export.labelled_classes`).

Command::

    python -m m4oe_training.converters chaos SRC DST [--sequence t2|t1-in|t1-out|ct|t1] [--overwrite]

``SRC`` is the release (``CHAOS_Train_Sets/``, its ``Train_Sets/``, ``MR/`` or ``CT/``), or a folder
of NIfTI pairs or a parent holding ``chaos_MR_T2_normalized/`` (``CHAOST2/...``, or the T1 names
with ``--sequence t1``). Case ids: ``chaos_t2_<NN>``, ``chaos_t1in_<NN>``, ``chaos_t1out_<NN>``,
``chaos_ct_<NN>`` (``chaos_t1_<NN>`` for T1 NIfTI pairs), NN the study number. Studies of the
release without masks (the test set) are skipped and counted. Geometry is checked as for every
converter (:mod:`.nnunet`); errors name the file; the dataset is built in a hidden folder and renamed
into place when complete.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from m4oe.errors import InputError
from m4oe.io import read_image
from m4oe.progress import CancelCheck, ProgressCallback

from .dataset_writer import (
    FILE_ENDING,
    Case,
    ConversionResult,
    Job,
    Structure,
    _check_destination,
    write_datasets,
)
from .nnunet import Tracker, check_cancel

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
"""Sequences of the NIfTI pairs: the name in their folder."""


class ReleaseSeries(NamedTuple):
    """Where one series of a release study lies: ``<part>/<study>/<series>/DICOM_anon/<phase>``,
    masks in ``<part>/<study>/<series>/Ground``; its case-id tag, description and modality."""

    part: str
    series: str
    phase: str | None
    tag: str
    description: str
    modality: str


RELEASE_SEQUENCES = {
    "t2": ReleaseSeries("MR", "T2SPIR", None, "t2", "MR T2-SPIR", "mr"),
    "t1-in": ReleaseSeries("MR", "T1DUAL", "InPhase", "t1in", "MR T1-DUAL in-phase", "mr"),
    "t1-out": ReleaseSeries("MR", "T1DUAL", "OutPhase", "t1out", "MR T1-DUAL opposed-phase", "mr"),
    "ct": ReleaseSeries("CT", "", None, "ct", "CT (portal venous phase), liver only", "ct"),
}
"""The release's series, by ``--sequence``."""

PNG_RANGES = {"liver": (56, 70), "kidney_right": (111, 135), "kidney_left": (176, 200), "spleen": (241, 255)}
"""Grey values (inclusive) of each organ in the release's PNG masks (written as 63, 126, 189, 252)."""

_IMAGE = re.compile(r"image_(\d+)\.nii\.gz")


def chaos_remap() -> np.ndarray:
    """256-entry table: CHAOS id -> written value (0 elsewhere)."""
    table = np.zeros(256, dtype=np.uint8)
    for structure in CHAOS_STRUCTURES:
        table[CHAOS_IDS[structure.name]] = structure.value
    return table


def png_ids(modality: str = "mr") -> np.ndarray:
    """256-entry table: grey value of a release PNG mask -> CHAOS id. MR: the organ ranges (0
    outside them); CT, whose masks hold the liver only: every non-zero value is the liver."""
    table = np.zeros(256, dtype=np.uint8)
    if modality == "ct":
        table[1:] = CHAOS_IDS["liver"]
        return table
    for name, (low, high) in PNG_RANGES.items():
        table[low : high + 1] = CHAOS_IDS[name]
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
    root = _pairs_folder(src, sequence)
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
    """Write one CHAOS series of ``src`` (the release, or NIfTI pairs) as an nnU-Net dataset at ``dst``
    (modality "mr", or "ct" for the release's CT).

    Images keep their LPS geometry and the scanner's intensities (HU for CT); label maps are written
    as uint8 in the project's numbering on each image's exact grid. Returns what was written.
    Raises InputError or OutputError naming the file.
    """
    known = sorted(set(SEQUENCES) | set(RELEASE_SEQUENCES))
    if sequence not in known:
        raise InputError(f"unknown CHAOS sequence {sequence!r}; expected one of {known}", src)
    src = Path(src)
    if src.is_dir() and not _has_pairs(src):
        if sequence == "t1" and _release_root(src, "MR") is not None:
            raise InputError(
                "is the CHAOS release, whose T1-DUAL series has two phases; pass --sequence t1-in or t1-out",
                src,
            )
        release = (
            _release_root(src, RELEASE_SEQUENCES[sequence].part) if sequence in RELEASE_SEQUENCES else None
        )
        if release is not None:
            return _convert_release(
                release, Path(dst), sequence, overwrite=overwrite, progress=progress, cancel=cancel
            )
    if sequence not in SEQUENCES:
        part = RELEASE_SEQUENCES[sequence].part
        raise InputError(
            f"holds no CHAOS release ({part}/<study>/... with numbered study folders) and NIfTI pairs "
            f"have no sequence {sequence!r}; use t2 or t1 for them",
            src,
        )
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


def _pairs_folder(src: Path, sequence: str) -> Path | None:
    """The folder of ``src`` holding NIfTI pairs of ``sequence`` (``src`` itself,
    ``chaos_MR_<T>_normalized/`` or ``CHAOS<T>/chaos_MR_<T>_normalized/``), or None."""
    name = f"chaos_MR_{SEQUENCES[sequence]}_normalized"
    candidates = (src, src / name, src / f"CHAOS{SEQUENCES[sequence]}" / name)
    return next((c for c in candidates if c.is_dir() and any(c.glob(f"image_*{FILE_ENDING}"))), None)


def _has_pairs(src: Path) -> bool:
    """Whether ``src`` (or a folder the NIfTI-pair form looks in) holds ``image_<N>.nii.gz`` files."""
    return any(_pairs_folder(src, sequence) is not None for sequence in SEQUENCES)


def _is_study(folder: Path, part: str) -> bool:
    """A numbered study folder of the release's ``part`` ("MR": T2SPIR or T1DUAL; "CT": DICOM_anon)."""
    inside = ("T2SPIR", "T1DUAL") if part == "MR" else ("DICOM_anon",)
    return folder.is_dir() and folder.name.isdigit() and any((folder / s).is_dir() for s in inside)


def _release_root(src: Path, part: str) -> Path | None:
    """The release's ``part`` folder ("MR" or "CT", numbered study folders) at or under ``src``."""
    for candidate in (
        src,
        src / part,
        src / "Train_Sets" / part,
        src / "CHAOS_Train_Sets" / "Train_Sets" / part,
    ):
        if candidate.is_dir() and any(_is_study(child, part) for child in candidate.iterdir()):
            return candidate
    return None


def _natural_key(path: Path) -> tuple:
    """File-name order with numbers compared as numbers (``IMG-0002-00010`` after ``IMG-0002-00009``)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem.lower()))


def _files(folder: Path, suffix: str) -> list[Path]:
    return sorted(
        (f for f in folder.iterdir() if f.is_file() and f.suffix.lower() == suffix), key=_natural_key
    )


def pair_masks(dicoms: Sequence[Path], masks: Sequence[Path], folder: Path) -> tuple[dict[Path, Path], str]:
    """Each DICOM file's mask, and how they were paired: ``"name"`` or ``"order"``.

    By name when every mask and file share their stems one to one; otherwise the i-th mask in
    file-name order belongs to the i-th file in file-name order, which needs as many masks as files.
    Raises InputError naming ``folder`` when neither applies.
    """
    stems = {mask.stem: mask for mask in masks}
    if len(stems) == len(dicoms) == len(masks) and all(d.stem in stems for d in dicoms):
        return {d: stems[d.stem] for d in dicoms}, "name"
    if len(dicoms) != len(masks):
        raise InputError(
            f"holds {len(dicoms)} DICOM files and its Ground folder {len(masks)} PNG masks, "
            "whose names do not match; cannot pair them",
            folder,
        )
    return dict(zip(dicoms, masks, strict=True)), "order"


def _read_mask(path: Path, shape: tuple[int, int], table: np.ndarray) -> np.ndarray:
    """One PNG mask as CHAOS ids through ``table`` (:func:`png_ids`), (rows, columns) = ``shape`` of
    its DICOM slice.

    The release's masks are 8-bit grey; a grey mask saved as RGB(A) (equal colour channels) or as
    16-bit values up to 255 is read as the same grey values. Refused, naming the file: unreadable,
    not 2D, colour, values above 255, or a size other than the slice's.
    """
    try:
        mask = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"PNG mask cannot be read ({str(error).strip().splitlines()[-1]})", path) from None
    if mask.GetDimension() != 2:
        raise InputError(f"PNG mask is {mask.GetDimension()}D; expected one 2D slice", path)
    grey = sitk.GetArrayFromImage(mask)
    if grey.ndim == 3:  # (rows, columns, channels): grey, grey + alpha, RGB or RGBA
        colour = grey[..., : 3 if grey.shape[-1] >= 3 else 1]
        if np.any(colour != colour[..., :1]):
            raise InputError("PNG mask is in colour; expected grey values (63, 126, 189, 252 or 255)", path)
        grey = colour[..., 0]
    if not np.issubdtype(grey.dtype, np.integer) or grey.min() < 0 or grey.max() > 255:
        raise InputError(f"PNG mask holds values outside 0-255 (up to {grey.max()})", path)
    if grey.shape != shape:
        raise InputError(
            f"PNG mask is {grey.shape[1]}x{grey.shape[0]} pixels, its DICOM slice {shape[1]}x{shape[0]}", path
        )
    return table[grey.astype(np.int64)]


def _series_folder(study: Path, sequence: str, phase: str | None = None) -> Path:
    series = RELEASE_SEQUENCES[sequence]
    phase = series.phase if phase is None else phase
    base = study / series.series / "DICOM_anon"
    return base if phase is None else base / phase


def _read_study(study: Path, sequence: str) -> tuple[sitk.Image, sitk.Image, str] | None:
    """A release study's series (LPS, mm, the scanner's values) and its CHAOS-id label map on that
    grid (uint8, 0 background), and how masks were paired; None when the study has no masks.
    """
    series = RELEASE_SEQUENCES[sequence]
    ground = study / series.series / "Ground"
    folder = _series_folder(study, sequence)
    masks = _files(ground, ".png") if ground.is_dir() else []
    if not masks:
        return None
    if not folder.is_dir():
        raise InputError("is missing: the study has masks but no DICOM series there", folder)
    dicoms = _files(folder, ".dcm")
    if not dicoms:
        raise InputError("holds no .dcm files", folder)
    mask_of, pairing = pair_masks(dicoms, masks, folder)
    loaded = read_image(folder, dicom_files=dicoms)
    order = loaded.dicom_files
    if pairing == "order" and series.phase is not None:
        _check_phases(study, sequence, order, mask_of, masks, loaded.image)
    image = loaded.image
    columns, rows, _ = image.GetSize()
    table = png_ids(series.modality)
    ids = np.stack([_read_mask(mask_of[file], (rows, columns), table) for file in order])
    label = sitk.GetImageFromArray(ids)
    label.CopyInformation(image)
    return image, label, pairing


def _check_phases(
    study: Path,
    sequence: str,
    order: list[Path],
    mask_of: dict[Path, Path],
    masks: list[Path],
    image: sitk.Image,
) -> None:
    """For a T1-DUAL phase whose masks were paired by file order: where the other phase pairs with
    them by name, each mask must fall on the slice at the same position (same stacking index on the
    same grid) in both phases. Raises InputError naming the folder otherwise."""
    phase = RELEASE_SEQUENCES[sequence].phase
    other = _series_folder(study, sequence, "OutPhase" if phase == "InPhase" else "InPhase")
    if not other.is_dir():
        return
    other_dicoms = _files(other, ".dcm")
    if not other_dicoms:
        return
    try:
        other_mask_of, other_pairing = pair_masks(other_dicoms, masks, other)
    except InputError:
        return
    if other_pairing != "name":
        return
    other_loaded = read_image(other, dicom_files=other_dicoms)
    same_grid = other_loaded.image.GetSize() == image.GetSize() and np.allclose(
        other_loaded.image.GetOrigin(), image.GetOrigin(), atol=0.1
    )
    mine = [mask_of[f] for f in order]
    theirs = [other_mask_of[f] for f in other_loaded.dicom_files]
    if not same_grid or mine != theirs:
        raise InputError(
            f"masks pair with {other.name} by file name but not with these files by file order onto the "
            "same slices; cannot tell which mask belongs to which slice",
            _series_folder(study, sequence),
        )


def _convert_release(
    root: Path,
    dst: Path,
    sequence: str,
    *,
    overwrite: bool,
    progress: ProgressCallback | None,
    cancel: CancelCheck | None,
) -> ConversionResult:
    """Convert the release's studies under ``root`` (its ``MR`` or ``CT`` folder) for one sequence."""
    series = RELEASE_SEQUENCES[sequence]
    _check_destination(dst, root, overwrite)
    studies = sorted((s for s in root.iterdir() if _is_study(s, series.part)), key=lambda s: int(s.name))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", suffix=".read", dir=dst.parent) as scratch:
        cases, pairings, unlabelled = [], {}, 0
        tracker = Tracker("read", len(studies), progress)
        for study in studies:
            check_cancel(cancel, study)
            read = _read_study(study, sequence)
            tracker.step(study.name)
            if read is None:
                unlabelled += 1
                continue
            image, label, pairing = read
            case_id = f"chaos_{series.tag}_{int(study.name):02d}"
            image_file = Path(scratch) / f"{case_id}_image{FILE_ENDING}"
            label_file = Path(scratch) / f"{case_id}_label{FILE_ENDING}"
            sitk.WriteImage(image, str(image_file), useCompression=True)
            sitk.WriteImage(label, str(label_file), useCompression=True)
            cases.append(Case(case_id, study.name, image_file, label_file))
            pairings[pairing] = pairings.get(pairing, 0) + 1
        if not cases:
            what = series.series or series.part
            raise InputError(f"holds no {what} study with Ground masks (is it the test set?)", root)
        folder = "/".join(p for p in (series.series, "DICOM_anon", series.phase) if p)
        ground = "/".join(p for p in (series.series, "Ground") if p)
        ct = series.modality == "ct"
        structures = CHAOS_STRUCTURES[:1] if ct else CHAOS_STRUCTURES
        source = {
            "dataset": f"CHAOS {series.description}",
            "reference": "https://chaos.grand-challenge.org/ (Kavur et al., MedIA 2021)",
            "license": "CC-BY-NC-SA-4.0",
            "folder": str(root.resolve()),
            "layout": {"image": f"{{study}}/{folder}/*.dcm", "label": f"{{study}}/{ground}/*.png"},
            "original_labels": (
                {"1-255": "liver"} if ct else {f"{lo}-{hi}": name for name, (lo, hi) in PNG_RANGES.items()}
            ),
            "mask_pairing": {f"by file {how}": n for how, n in sorted(pairings.items())},
            "partial_labels": ("the liver only" if ct else "liver, spleen and kidneys only")
            + "; other organs are not labelled",
        }
        name = "_".join(p for p in ("CHAOS", series.part, series.series, series.phase) if p)
        job = Job(name, series.modality, structures, dst, tuple(cases), unlabelled, source, chaos_remap())
        return write_datasets([job], root, link=False, overwrite=overwrite, progress=progress, cancel=cancel)[
            0
        ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        type=Path,
        help="the CHAOS release (CHAOS_Train_Sets/, Train_Sets/, or its MR/ or CT/), or a folder of "
        "image_N.nii.gz / label_N.nii.gz pairs or a parent",
    )
    parser.add_argument("dst", type=Path, help="output dataset folder")
    parser.add_argument(
        "--sequence",
        choices=sorted(set(SEQUENCES) | set(RELEASE_SEQUENCES)),
        default="t2",
        help="which series (default t2); the release's T1-DUAL is t1-in or t1-out, its CT ct; "
        "NIfTI pairs' T1 is t1",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
