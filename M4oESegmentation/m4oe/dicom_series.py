"""Reading a DICOM series folder into one volume, one acquisition of it.

Every file's header is read before any voxel (positions along the slice normal in mm, LPS frame;
orientation; series and acquisition numbers), so that several acquisitions sharing a
SeriesInstanceUID are told apart and the voxel limit is checked first. The volume is read by
SimpleITK's series reader: index order (x, y, z), z the stacking order, geometry in LPS and mm.
Used by :func:`m4oe.io.read_image` for a folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m4oe.errors import InputError
from m4oe.header_checks import _check_geometry, _check_voxels
from m4oe.itk_console import _itk_warnings, _read_failure, _sitk_reason

DICOM_MODALITY_TAG = "0008|0060"
# DICOM slice gaps further than this fraction of the mean gap from it are reported as uneven.
# Positions printed to a few decimals differ from an even grid by about 1e-5 mm.
UNEVEN_SPACING_TOLERANCE = 0.01
SAME_POSITION_MM = 1e-3
DICOM_TAGS = {
    "position": "0020|0032",
    "orientation": "0020|0037",
    "acquisition": "0020|0012",
    "series": "0020|0011",
}


def _read_dicom_series(
    folder: Path, warnings: list[str], max_voxels: int, files: Sequence[Path] | None = None
) -> tuple[sitk.Image, str | None, list[Path]]:
    """Read the largest DICOM series of ``folder`` (not its subfolders); return it, its Modality and
    the files read, in the order they were stacked.

    Every file's header is read first (position, orientation, acquisition and series numbers), so
    that several acquisitions under one SeriesInstanceUID are split, and the voxel limit checked,
    before any voxel is read.

    ``files``: read exactly these files as one volume instead, whatever their series UIDs (some
    anonymised releases give every file a UID of its own), stacked in ascending position along the
    slice normal; every file needs ImagePositionPatient and ImageOrientationPatient, and no two may
    lie at the same position.
    """
    reader = sitk.ImageSeriesReader()
    if files is not None:
        slices = _positioned_slices([str(f) for f in files], folder, warnings)
    else:
        with _itk_warnings(folder, warnings):
            series = {
                uid: reader.GetGDCMSeriesFileNames(str(folder), uid)
                for uid in reader.GetGDCMSeriesIDs(str(folder))
            }
        if not series:
            raise InputError("folder holds no DICOM series", folder)
        uid = max(series, key=lambda key: len(series[key]))
        if len(series) > 1:
            warnings.append(
                f"{folder}: holds {len(series)} DICOM series; read series {uid!r} "
                f"({len(series[uid])} files), the one with the most files"
            )
        slices = _dicom_slices(series[uid], folder, warnings)
        slices = _one_acquisition(slices, uid, folder, warnings)
    first = slices[0]
    frames = int(np.prod(first.size[2:], dtype=np.int64))  # 1, or the frames of a multi-frame file
    _check_voxels((first.size[0], first.size[1], frames * len(slices)), first.pixel_id, folder, max_voxels)
    reader.SetFileNames([s.file for s in slices])
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOn()
    try:
        with _itk_warnings(folder, warnings) as console:
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"DICOM series cannot be read ({_read_failure(console, error)})", folder) from None
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError("DICOM series has colour (RGB) voxels; expected a scalar volume", folder)
    _check_geometry(image.GetSpacing(), image.GetDirection(), folder)
    gaps = _slice_gaps(slices)
    if gaps.size > 1 and np.max(np.abs(gaps - gaps.mean())) > UNEVEN_SPACING_TOLERANCE * gaps.mean():
        warnings.append(
            f"{folder}: DICOM slices are unevenly spaced or some are missing (gaps of {gaps.min():.4g} to "
            f"{gaps.max():.4g} mm); read on an even grid of {image.GetSpacing()[2]:.4g} mm"
        )
    modality = None
    if reader.HasMetaDataKey(0, DICOM_MODALITY_TAG):
        modality = reader.GetMetaData(0, DICOM_MODALITY_TAG).strip() or None
    return image, modality, [Path(s.file) for s in slices]


@dataclass(frozen=True)
class _DicomSlice:
    """One DICOM file's header: ``position`` along the first file's slice normal (mm; None when the
    file has no ImagePositionPatient or ImageOrientationPatient), size (columns, rows, frames), pixel
    type, ``group``: series number, acquisition number and orientation, which tell acquisitions
    apart, and ``normal``: the slice normal used (LPS, unit length for orthonormal cosines)."""

    file: str
    position: float | None
    size: tuple[int, ...]
    pixel_id: int
    group: tuple[str, str, str]
    normal: np.ndarray | None = None


def _dicom_slices(files: Sequence[str], folder: Path, warnings: list[str]) -> list[_DicomSlice]:
    """The header of every file of a series, in the reader's order (no voxel is read)."""
    reader = sitk.ImageFileReader()
    slices, normal = [], None
    with _itk_warnings(folder, warnings):
        for file in files:
            slices.append(_dicom_slice(reader, file, normal))
            normal = normal if normal is not None else slices[-1].normal
    return slices


def _positioned_slices(files: Sequence[str], folder: Path, warnings: list[str]) -> list[_DicomSlice]:
    """The headers of ``files`` sorted by ascending position along the first file's slice normal.

    Raises InputError naming the folder: no files, a file without a position, or two files at the
    same position (they are two acquisitions, or the same slice twice).
    """
    if not files:
        raise InputError("holds no DICOM files", folder)
    slices = _dicom_slices(files, folder, warnings)
    unplaced = next((s for s in slices if s.position is None), None)
    if unplaced is not None:
        raise InputError("DICOM file has no ImagePositionPatient or ImageOrientationPatient", unplaced.file)
    slices.sort(key=lambda s: s.position)
    if _has_duplicates(slices):
        raise InputError(
            f"DICOM files ({len(slices)}) hold two slices at the same position; "
            "put each acquisition in a folder of its own",
            folder,
        )
    return slices


def _dicom_slice(reader: sitk.ImageFileReader, file: str, normal: np.ndarray | None) -> _DicomSlice:
    """One file's header; ``normal``: the series' slice normal (None: this file's own)."""
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"DICOM file cannot be read ({_sitk_reason(error)})", file) from None
    tags = {
        key: reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
        for key, tag in DICOM_TAGS.items()
    }
    position = None
    try:
        if normal is None:
            cosines = np.array([float(v) for v in tags["orientation"].split("\\")])
            normal = np.cross(cosines[:3], cosines[3:])
        position = float(np.array([float(v) for v in tags["position"].split("\\")]) @ normal)
    except ValueError:  # no or unreadable ImagePositionPatient / ImageOrientationPatient
        pass
    group = (tags["series"], tags["acquisition"], tags["orientation"])
    return _DicomSlice(file, position, tuple(reader.GetSize()), reader.GetPixelID(), group, normal)


def _one_acquisition(
    slices: list[_DicomSlice], uid: str, folder: Path, warnings: list[str]
) -> list[_DicomSlice]:
    """The slices of one acquisition: all of them, unless two lie at the same position.

    Then the series mixes acquisitions (often a blank SeriesInstanceUID shared by several scans),
    which ITK would interleave into one volume: they are split by series number, acquisition number
    and orientation, and the one with the most slices is kept, with a warning. Refused when that
    does not separate them.
    """
    if not _has_duplicates(slices):
        return slices
    groups: dict[tuple[str, str, str], list[_DicomSlice]] = {}
    for s in slices:
        groups.setdefault(s.group, []).append(s)
    named = "blank SeriesInstanceUID" if not uid.strip() else f"SeriesInstanceUID {uid!r}"
    positions = np.array([s.position for s in slices])
    distinct = len(np.unique(np.round(positions / SAME_POSITION_MM)))
    if len(groups) == 1 or any(_has_duplicates(g) for g in groups.values()):
        raise InputError(
            f"DICOM series ({named}) holds {len(slices)} slices at only {distinct} distinct positions: "
            "several acquisitions share it and no series or acquisition number tells them apart; "
            "put each acquisition in a folder of its own",
            folder,
        )
    key = max(groups, key=lambda k: len(groups[k]))
    names = ("series number", "acquisition number", "orientation")
    differ = [n for n in range(3) if len({k[n] for k in groups}) > 1]
    which = ", ".join(f"{names[n]} {key[n] or '(none)'}" for n in differ)
    warnings.append(
        f"{folder}: DICOM series ({named}) holds {len(groups)} acquisitions with slices at the same "
        f"positions; read the one with the most slices ({which}, {len(groups[key])} files)"
    )
    return groups[key]


def _has_duplicates(slices: Sequence[_DicomSlice]) -> bool:
    """Whether two slices lie within SAME_POSITION_MM of each other along the slice normal."""
    if any(s.position is None for s in slices):
        return False
    return bool(np.any(np.diff(np.sort([s.position for s in slices])) < SAME_POSITION_MM))


def _slice_gaps(slices: Sequence[_DicomSlice]) -> np.ndarray:
    """Distances (mm) between neighbouring slice positions; empty when a position is unknown."""
    if any(s.position is None for s in slices):
        return np.zeros(0)
    return np.diff(np.sort([s.position for s in slices]))
