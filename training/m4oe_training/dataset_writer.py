"""Write nnU-Net v2 raw dataset folders from checked image-label pairs: the converters' machinery.

Every converter (:mod:`.converters` for FLARE22, AMOS22, ATLAS2023; :mod:`.totalsegmentator` for
TotalSegmentator outputs) describes what to write as :class:`Job` s of :class:`Case` s and hands
them to :func:`write_datasets`, which checks each pair (:func:`.nnunet.check_pair`: the label map
on the image's grid, values allowed), copies or links the image, copies the label map or rewrites
it through a lookup table, writes ``dataset.json`` (with our ``modality``, ``source`` and
``terminology`` keys), all in a hidden folder next to the destination that is renamed into place
when complete: a failed or cancelled run leaves no partial dataset behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m4oe.errors import OutputError
from m4oe.progress import CancelCheck, ProgressCallback, ProgressEvent

from .anatomy import GENERATION_CLASSES
from .nnunet import CHANNEL_NAMES, Tracker, check_cancel, check_pair

FILE_ENDING = ".nii.gz"


@dataclass(frozen=True)
class Structure:
    """One class of a public dataset: label value, our label name, TERMS key, the release's own name."""

    value: int
    name: str
    term: str | None
    original: str


@dataclass(frozen=True)
class Case:
    """One image-label pair: case id in the dataset, number in the source naming, the two files.

    ``masks``: for a label map stored as one binary mask per structure (TotalSegmentator's default
    output), the (source id, mask file) pairs it is made of; ``label`` is then their folder. Masks
    need a ``Job.remap`` table: they are combined into source ids, then rewritten through it.
    """

    case_id: str
    number: str
    image: Path
    label: Path
    masks: tuple[tuple[int, Path], ...] = ()


@dataclass(frozen=True)
class Job:
    """One dataset to write. ``remap``: None copies label files byte for byte; a 256-entry table
    rewrites each label map through it (source id -> written value), allowing source ids 0..255.
    ``generation``: with ``remap``, a second 256-entry table (source id -> generation class
    ``i + 1`` of ``GENERATION_CLASSES[i]``, :mod:`.anatomy`) whose map of each case is written to
    ``anatomyTr/<case>`` and named in dataset.json's ``anatomy_classes``."""

    dataset: str
    modality: str
    structures: tuple[Structure, ...]
    dst: Path
    cases: tuple[Case, ...]
    unlabelled: int
    source: dict
    remap: np.ndarray | None = None
    generation: np.ndarray | None = None


@dataclass(frozen=True)
class ConversionResult:
    """One written dataset: its folder, modality ("ct" | "mr"), case ids, unlabelled cases skipped."""

    dataset: str
    folder: Path
    modality: str
    cases: tuple[str, ...]
    unlabelled_skipped: int


def write_datasets(
    jobs: Sequence[Job],
    src: Path,
    *,
    link: bool,
    overwrite: bool,
    progress: ProgressCallback | None,
    cancel: CancelCheck | None,
) -> list[ConversionResult]:
    destinations = [job.dst.resolve() for job in jobs]
    if len(set(destinations)) < len(destinations):
        raise OutputError(
            "is given as two outputs; the CT and MRI datasets need their own folders", jobs[0].dst
        )
    for job in jobs:
        _check_destination(job.dst, src, overwrite)
    tracker = Tracker("convert", sum(len(job.cases) for job in jobs), progress)
    staged: list[Path] = []
    try:
        for job in jobs:
            job.dst.parent.mkdir(parents=True, exist_ok=True)
            stage = job.dst.parent / f".{job.dst.name}.{uuid.uuid4().hex[:12]}.partial"
            stage.mkdir()
            staged.append(stage)
            (stage / "imagesTr").mkdir()
            (stage / "labelsTr").mkdir()
            if job.generation is not None:
                (stage / "anatomyTr").mkdir()
            allowed = {0} | {s.value for s in job.structures} if job.remap is None else set(range(256))
            for case in job.cases:
                check_cancel(cancel, case.image)
                if case.masks:
                    assert job.remap is not None, "per-structure masks are always remapped"
                    for _, mask in case.masks:
                        check_pair([case.image], mask, {0, 1}, "a binary mask")
                else:
                    check_pair([case.image], case.label, allowed, f"among the {job.source['dataset']} labels")
                _place(case.image, stage / "imagesTr" / f"{case.case_id}_0000{FILE_ENDING}", link)
                target = stage / "labelsTr" / f"{case.case_id}{FILE_ENDING}"
                if job.remap is None:
                    _place(case.label, target, link)
                else:
                    ids = _source_ids(case)
                    _write_remapped(ids, case.image, target, job.remap)
                    if job.generation is not None:
                        anatomy = stage / "anatomyTr" / f"{case.case_id}{FILE_ENDING}"
                        _write_remapped(ids, case.image, anatomy, job.generation)
                tracker.step(case.case_id)
            text = json.dumps(_dataset_json(job), indent=2) + "\n"
            (stage / "dataset.json").write_text(text, encoding="utf-8")
        for job, stage in zip(jobs, staged, strict=True):
            _swap_into_place(stage, job.dst)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputError(f"cannot be read or written ({reason})", error.filename or jobs[0].dst) from None
    finally:
        for stage in staged:
            shutil.rmtree(stage, ignore_errors=True)
    return [
        ConversionResult(
            job.dataset, job.dst, job.modality, tuple(c.case_id for c in job.cases), job.unlabelled
        )
        for job in jobs
    ]


def _check_destination(dst: Path, src: Path, overwrite: bool) -> None:
    resolved = dst.resolve()
    if resolved == src.resolve() or src.resolve().is_relative_to(resolved):
        raise OutputError(f"would replace the source folder {src}", dst)
    if not (dst.exists() or dst.is_symlink()):
        return
    if not dst.is_dir():
        raise OutputError("exists and is not a folder", dst)
    if not any(dst.iterdir()):
        return
    if not overwrite:
        raise OutputError("exists; pass overwrite=True (--overwrite) to replace it", dst)
    if not any((dst / name).exists() for name in ("dataset.json", "imagesTr", "labelsTr")):
        raise OutputError(
            "is not a dataset folder (no dataset.json, imagesTr, labelsTr); not replacing it", dst
        )


def _place(source: Path, target: Path, link: bool) -> None:
    """Copy ``source`` to ``target``, or hard-link it (symbolic link where hard links fail)."""
    if not link:
        shutil.copyfile(source, target)
        return
    try:
        os.link(source, target)
    except OSError:
        target.symlink_to(source.resolve())


def _source_ids(case: Case) -> np.ndarray:
    """The case's source label ids, (z, y, x): its label map, or its masks combined.

    Masks are painted in order, each voxel set in a mask taking the mask's id (TotalSegmentator's
    masks come from one label map, so they do not overlap).
    """
    if not case.masks:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
    ids = None
    for value, mask in case.masks:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
        ids = np.zeros(array.shape, np.uint8) if ids is None else ids
        ids[array != 0] = value
    return ids


def _write_remapped(ids: np.ndarray, image: Path, target: Path, table: np.ndarray) -> None:
    """Write source label ``ids`` (z, y, x) through ``table`` (id -> value) as uint8 on ``image``'s grid.

    The pair has been checked (:func:`.nnunet.check_pair`): same size, geometry within tolerance;
    the written map takes the image's spacing, origin and direction exactly.
    """
    mapped = sitk.GetImageFromArray(table[ids.astype(np.int64)])
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image))
    reader.ReadImageInformation()
    mapped.SetSpacing(reader.GetSpacing())
    mapped.SetOrigin(reader.GetOrigin())
    mapped.SetDirection(reader.GetDirection())
    sitk.WriteImage(mapped, str(target), useCompression=True)


def _swap_into_place(stage: Path, dst: Path) -> None:
    """Rename the finished ``stage`` to ``dst``; an old ``dst`` is moved aside first, then deleted."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:12]}.old"
        os.replace(dst, old)
        os.replace(stage, dst)
        shutil.rmtree(old)
    else:
        os.replace(stage, dst)


def _dataset_json(job: Job) -> dict:
    extra = {} if job.generation is None else {"anatomy_classes": list(GENERATION_CLASSES)}
    return {
        "name": job.dataset,
        "channel_names": {"0": CHANNEL_NAMES[job.modality]},
        "labels": {"background": 0, **{s.name: s.value for s in job.structures}},
        "numTraining": len(job.cases),
        "file_ending": FILE_ENDING,
        "modality": job.modality,
        "source": {**job.source, "unlabelled_skipped": job.unlabelled},
        "terminology": {s.name: s.term for s in job.structures},
        **extra,
    }


def print_progress(event: ProgressEvent) -> None:
    sys.stderr.write(f"\r{event.stage} {event.done}/{event.total} {event.item:<24}")
    if event.done == event.total:
        sys.stderr.write("\n")
    sys.stderr.flush()
