"""Reading volumes and writing results, with one-line errors and atomic writes.

Images are SimpleITK images throughout: voxel index order (x, y, z) = (i, j, k), physical
coordinates in millimetres in the LPS frame (SimpleITK's and DICOM's), geometry given by size,
spacing (mm), origin (mm, LPS) and the direction cosine matrix (row-major 3x3, column n is the
LPS direction of index axis n). ``sitk.GetArrayFromImage`` turns an image into a numpy array with
the reversed axis order (z, y, x).

Every user-facing failure is an :class:`~m4oe.errors.InputError` (bad input) or
:class:`~m4oe.errors.OutputError` (output that cannot be written) whose message is one line,
``"PATH: problem"``. Outputs are written to a temporary file in the target folder, synced to disk,
checked to hold everything their header announces and only then renamed into place, so a failed
or interrupted write (a full disk included) never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import logging
import os
import re
import struct
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import SimpleITK as sitk
import slicerio
from slicerio.segmentation import terminology_entry_from_string

from m4oe.errors import InputError, OutputError
from m4oe.labels import Label

logger = logging.getLogger(__name__)

READ_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Single-file formats only: a detached header (.mhd, .nhdr) names its data file, which would keep
# the temporary name after the atomic rename.
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
# Extensions made of several dots, kept whole when a temporary name is built.
COMPOUND_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".tar.gz")
MIN_AXIS_SIZE = 2
DICOM_MODALITY_TAG = "0008|0060"
_COMPLEX_PIXEL_IDS = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}
# Pixel types read as they are: float32 holds every value of them exactly, so casting a batch of
# slices at normalisation gives the same numbers as casting the volume on reading, and a CT stays
# 2 bytes a voxel. Every other type (32- and 64-bit integers, float64) is cast to float32 here.
KEPT_PIXEL_IDS = {sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkFloat32}
_PIXEL_BYTES = {
    sitk.sitkInt8: 1, sitk.sitkUInt8: 1, sitk.sitkInt16: 2, sitk.sitkUInt16: 2, sitk.sitkInt32: 4,
    sitk.sitkUInt32: 4, sitk.sitkFloat32: 4, sitk.sitkInt64: 8, sitk.sitkUInt64: 8, sitk.sitkFloat64: 8,
}  # fmt: skip
# Volumes above this many voxels are refused from their header, before any voxel is read: 2^30, a
# 512x512x4096 CT (2 GB as int16). A header claiming more is far likelier corrupt or hostile than a
# scan; --max-voxels or this environment variable raises the limit.
DEFAULT_MAX_VOXELS = 1 << 30
MAX_VOXELS_ENV = "M4OE_MAX_VOXELS"
# Direction cosines further than this from orthonormal (largest entry of D^T D - I; 1e-3 is an
# angle of 0.06 degrees between axes) are refused: SimpleITK's writers and resamplers would change
# them, and the output would not have the input's direction.
ORTHONORMAL_TOLERANCE = 1e-3
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


@dataclass
class LoadedImage:
    """A volume read from disk.

    ``image`` is 3D, scalar, with the file's geometry unchanged (LPS, mm); its voxels keep the
    file's type when it is an 8- or 16-bit integer or float32 (:data:`KEPT_PIXEL_IDS`), and are
    float32 otherwise.
    ``dicom_modality`` is the DICOM Modality tag (0008,0060), e.g. ``"CT"`` or ``"MR"``, when the
    volume was read from a DICOM series, else None. ``pixel_type`` is the numpy name of the voxel
    type as SimpleITK read it, after any rescale slope of the file (``"int16"``, ``"float32"``).
    ``warnings`` holds one-line notes about choices made while reading (for example which of
    several DICOM series was read). ``dicom_files``: the files of a DICOM series that were read, in
    the order the reader stacked them (empty for other formats); a DICOM SEG output references them.
    """

    image: sitk.Image
    path: Path
    dicom_modality: str | None
    pixel_type: str
    warnings: list[str] = field(default_factory=list)
    dicom_files: list[Path] = field(default_factory=list)


def read_image(path: str | Path, *, max_voxels: int | None = None) -> LoadedImage:
    """Read a 3D scalar volume from NIfTI, NRRD, MetaImage or a DICOM series folder.

    A folder is read as a DICOM series; when it holds several series, the one with the most files
    is read and a warning says so; when one series holds several acquisitions at the same slice
    positions (a blank or shared SeriesInstanceUID), the largest acquisition is read and a warning
    says so. The voxels (HU for CT) keep an 8- or 16-bit integer or float32 type, other types are
    cast to float32; the geometry (size, spacing in mm, origin and direction in LPS) is the file's.

    ``max_voxels``: the largest volume read (None: :func:`max_voxels_limit`); the size comes from
    the header, so a larger volume is refused before any voxel is read.

    Refused with :class:`InputError` naming the file: a missing path, a folder without a DICOM
    series, a single DICOM file (pass its folder), an unsupported or corrupt or truncated file, a
    2D image, a 4D image (unless its 4th axis has size 1), an axis with fewer than
    ``MIN_AXIS_SIZE`` voxels (a single slice has no slice spacing, and the model needs real
    in-plane extent whichever axis turns out to be axial), more voxels than ``max_voxels`` or than
    the computer's memory holds, a zero or non-finite spacing, direction cosines that are singular
    or not orthonormal (a NIfTI sform included), DICOM slices at the same position that no
    acquisition or series number separates, vector or RGB or complex voxels, and NaN or infinite
    voxels. An empty (constant) volume is accepted here; see :func:`check_volume`. ITK's console
    warnings are caught and become one-line ``warnings``.
    """
    path = Path(path)
    warnings: list[str] = []
    modality, files = None, []
    limit = max_voxels_limit(max_voxels)
    if not path.exists():
        raise InputError("no such file or folder", path)
    if path.is_dir():
        image, modality, files = _read_dicom_series(path, warnings, limit)
    else:
        image = _read_file(path, warnings, limit)
    _check_size(image.GetSize(), path)
    if image.GetDimension() == 4:
        image = sitk.Extract(image, [*image.GetSize()[:3], 0], [0, 0, 0, 0])
    pixel_type = sitk.GetArrayViewFromImage(image).dtype.name
    if image.GetPixelID() not in KEPT_PIXEL_IDS:
        image = sitk.Cast(image, sitk.sitkFloat32)
    if pixel_type.startswith("float"):
        bad = int(np.count_nonzero(~np.isfinite(sitk.GetArrayViewFromImage(image))))
        if bad:
            raise InputError(f"holds {bad} NaN or infinite voxels (or values beyond float32 range)", path)
    for warning in warnings:
        logger.warning(warning)
    return LoadedImage(
        image=image,
        path=path,
        dicom_modality=modality,
        pixel_type=pixel_type,
        warnings=warnings,
        dicom_files=files,
    )


def max_voxels_limit(max_voxels: int | None = None) -> int:
    """The largest volume :func:`read_image` reads, in voxels: ``max_voxels``, else the environment
    variable ``M4OE_MAX_VOXELS``, else :data:`DEFAULT_MAX_VOXELS`. Raises InputError for a value
    that is not a positive integer."""
    source = "--max-voxels"
    if max_voxels is None:
        text = os.environ.get(MAX_VOXELS_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_VOXELS
        source = MAX_VOXELS_ENV
        try:
            max_voxels = int(text)
        except ValueError:
            raise InputError(f"{source} must be a positive number of voxels, got {text!r}") from None
    if max_voxels < 1:
        raise InputError(f"{source} must be a positive number of voxels, got {max_voxels}")
    return max_voxels


def check_volume(image: sitk.Image, path: str | Path) -> None:
    """Refuse an empty volume: every voxel has the same value (nothing to segment)."""
    values = sitk.GetArrayViewFromImage(image)
    low, high = values.min(), values.max()
    if low == high:
        raise InputError(f"is empty: every voxel has the value {low:g}", path)


def _read_file(path: Path, warnings: list[str], max_voxels: int) -> sitk.Image:
    """Read one image file: header checks first (size, voxel count, geometry), then the voxels."""
    name = path.name.lower()
    supported = name.endswith(READ_EXTENSIONS)
    nifti = _read_nifti_header(path) if name.endswith((".nii", ".nii.gz")) else None
    if nifti is not None:
        _check_nifti_sform(nifti, path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _itk_warnings(path, warnings) as console:
            reader.ReadImageInformation()
    except RuntimeError as error:
        if not supported:
            raise InputError(f"is not a supported image file; expected {_READ_FORMATS}", path) from None
        reason = _read_failure(console, error)
        raise InputError(f"cannot be read, corrupt or not an image ({reason})", path) from None
    if sitk.ImageFileReader.GetImageIOFromFileName(str(path)) == "GDCMImageIO":
        raise InputError("is a single DICOM file; pass the folder that holds the whole series", path)
    if not supported:
        raise InputError(f"is not a supported image file; expected {_READ_FORMATS}", path)
    _check_size(reader.GetSize(), path)
    if reader.GetNumberOfComponents() > 1:
        raise InputError(
            f"has {reader.GetNumberOfComponents()} components per voxel (vector or RGB); "
            "expected a scalar volume",
            path,
        )
    if reader.GetPixelID() in _COMPLEX_PIXEL_IDS:
        raise InputError("has complex voxels; expected a real scalar volume", path)
    _check_voxels(reader.GetSize()[:3], reader.GetPixelID(), path, max_voxels)
    _check_geometry(reader.GetSpacing(), reader.GetDirection(), path)
    if nifti is not None:
        _check_nifti_data(path, nifti)
        warnings.extend(_nifti_geometry_notes(nifti, reader, path))
    try:
        with _itk_warnings(path, warnings, keep_other=True) as console:
            image = reader.Execute()
    except RuntimeError as error:
        reason = _read_failure(console, error)
        raise InputError(f"cannot be read, corrupt or truncated ({reason})", path) from None
    if console:
        # A reader that prints anything but a warning has failed, whether or not it says so: MetaIO
        # reads a cut compressed .mha whose header has no CompressedDataSize as garbage voxels,
        # printing only "Uncompress failed".
        raise InputError(f"cannot be read, corrupt or truncated ({'; '.join(console)})", path)
    return image


_READ_FORMATS = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"


def _check_voxels(size: Sequence[int], pixel_id: int, path: Path, max_voxels: int) -> None:
    """Refuse a volume of ``size`` (x, y, z) voxels of ``pixel_id`` before it is read: more than
    ``max_voxels`` voxels, or more bytes (as read, plus the float32 copy of a cast type) than the
    computer's memory."""
    count = int(np.prod(size, dtype=np.int64))
    nbytes = count * (_PIXEL_BYTES.get(pixel_id, 8) + (0 if pixel_id in KEPT_PIXEL_IDS else 4))
    shape = "x".join(str(n) for n in size)
    if count > max_voxels:
        raise InputError(
            f"has size {shape} (x, y, z) = {count:,} voxels ({nbytes / 1e9:.1f} GB to read), more than "
            f"the limit of {max_voxels:,}; if the volume is real, raise the limit with --max-voxels "
            f"or {MAX_VOXELS_ENV}",
            path,
        )
    memory = psutil.virtual_memory().total
    if nbytes > memory:
        raise InputError(
            f"has size {shape} (x, y, z) = {count:,} voxels, {nbytes / 1e9:.1f} GB to read: more than "
            f"this computer's {memory / 1e9:.1f} GB of memory",
            path,
        )


def _check_geometry(spacing: Sequence[float], direction: Sequence[float], path: Path) -> None:
    """Refuse a zero or non-finite spacing (mm) and singular or non-orthonormal direction cosines.

    ``spacing`` and ``direction`` (row-major, column n = LPS direction of index axis n) as a reader
    gives them, for 3 or more axes; the first three axes are checked. ITK would refuse the first
    two with a message naming neither, and keep or silently change the third.
    """
    axes = "xyz"
    dimension = len(spacing)
    spacing = np.asarray(spacing[:3], dtype=float)
    matrix = np.asarray(direction, dtype=float).reshape(dimension, dimension)[:3, :3]
    bad = [axes[n] for n in range(3) if not np.isfinite(spacing[n]) or spacing[n] == 0]
    if bad:
        shown = " x ".join(f"{v:g}" for v in spacing)
        raise InputError(
            f"has voxel spacing {shown} mm (x, y, z): zero or not a number along {', '.join(bad)}; "
            "expected a positive voxel size along every axis",
            path,
        )
    if not np.all(np.isfinite(matrix)):
        raise InputError("has direction cosines that are not numbers (NaN or infinite)", path)
    lengths = np.linalg.norm(matrix, axis=0)
    if np.any(lengths < 1e-6) or abs(np.linalg.det(matrix / np.where(lengths > 0, lengths, 1))) < 1e-6:
        columns = ", ".join(f"{axes[n]} ({' '.join(f'{v:g}' for v in matrix[:, n])})" for n in range(3))
        raise InputError(
            f"has a singular direction matrix: the voxel axes {columns} do not span 3D space "
            "(two are parallel or one is zero); the header is corrupt",
            path,
        )
    problem = _not_orthonormal(matrix)
    if problem:
        raise InputError(
            f"has direction cosines that are not orthonormal ({problem}): a sheared or scaled grid "
            "cannot be kept exactly, so the output could not have the input's direction",
            path,
        )


def _not_orthonormal(matrix: np.ndarray) -> str | None:
    """What keeps a 3x3 direction matrix (columns = axis directions) from being orthonormal, or None."""
    gram = matrix.T @ matrix
    if np.max(np.abs(gram - np.eye(3))) <= ORTHONORMAL_TOLERANCE:
        return None
    lengths = np.sqrt(np.diag(gram))
    for m, n in ((0, 1), (0, 2), (1, 2)):
        cosine = gram[m, n] / (lengths[m] * lengths[n])
        if abs(cosine) > ORTHONORMAL_TOLERANCE:
            angle = np.degrees(np.arccos(np.clip(cosine, -1, 1)))
            return f"axes {'xyz'[m]} and {'xyz'[n]} are {angle:.2f} degrees apart, expected 90"
    n = int(np.argmax(np.abs(lengths - 1)))
    return f"axis {'xyz'[n]} has length {lengths[n]:.4g}, expected 1"


def _read_dicom_series(
    folder: Path, warnings: list[str], max_voxels: int
) -> tuple[sitk.Image, str | None, list[Path]]:
    """Read the largest DICOM series of ``folder`` (not its subfolders); return it, its Modality and
    the files read, in the order they were stacked.

    Every file's header is read first (position, orientation, acquisition and series numbers), so
    that several acquisitions under one SeriesInstanceUID are split, and the voxel limit checked,
    before any voxel is read.
    """
    reader = sitk.ImageSeriesReader()
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
            f"{folder}: holds {len(series)} DICOM series; read series {uid!r} ({len(series[uid])} files), "
            "the one with the most files"
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


def _check_size(size: Sequence[int], path: Path) -> None:
    """Refuse a 2D image, a 4D image with several frames, or an axis with too few voxels."""
    shape = "x".join(str(n) for n in size)
    if len(size) not in (3, 4) or (len(size) == 4 and size[3] != 1):
        raise InputError(f"is a {len(size)}D image (size {shape}); expected a 3D volume", path)
    if min(size[:3]) < MIN_AXIS_SIZE:
        raise InputError(
            f"has size {shape} (x, y, z): a single slice; "
            f"expected a 3D volume with at least {MIN_AXIS_SIZE} voxels along each axis",
            path,
        )


@dataclass(frozen=True)
class _NiftiHeader:
    """The fields of a single-file NIfTI-1 or NIfTI-2 header that the checks here use.

    ``offset``: bytes before the voxel data; ``data_bytes``: length of the voxel data; ``dtype``:
    numpy type of floating-point voxels, else None; ``pixdim``: voxel size (x, y, z) as stored;
    ``sform_code``, ``qform_code``: NIfTI xform codes; ``sform``: the 3x4 sform (RAS, mm).
    """

    offset: int
    data_bytes: int
    dtype: np.dtype | None
    pixdim: tuple[float, float, float]
    qform_code: int
    sform_code: int
    sform: np.ndarray


def _read_nifti_header(path: Path) -> _NiftiHeader | None:
    """The header of a ``.nii`` / ``.nii.gz`` file; None when it is not single-file NIfTI-1/-2
    (left to ITK, which then refuses or reads it). A truncated gzip header is left to ITK too."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            return _nifti_header(stream.read(540))
    except (EOFError, OSError, zlib.error):
        return None


def _check_nifti_data(path: Path, header: _NiftiHeader) -> None:
    """Refuse a truncated NIfTI file, or one holding NaN or infinite voxels.

    ITK reads both silently: zeros in place of missing data, and zeros in place of NaN and
    infinities. So the voxel data is streamed once here (decompressed for ``.nii.gz``, which also
    catches a truncated gzip stream).
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    missing, dtype, bad = header.data_bytes, header.dtype, 0
    try:
        with opener(path, "rb") as stream:
            stream.seek(header.offset)
            while missing > 0 and (chunk := stream.read(min(missing, 1 << 22))):
                missing -= len(chunk)
                if dtype is not None:
                    usable = len(chunk) - len(chunk) % dtype.itemsize
                    bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk[:usable], dtype))))
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(f"is truncated or corrupt ({error})", path) from None
    if missing > 0:
        raise InputError(f"is truncated: {missing} bytes of voxel data missing", path)
    if bad:
        raise InputError(f"holds {bad} NaN or infinite voxels", path)


def _nifti_header(header: bytes) -> _NiftiHeader | None:
    """Parse the first 540 bytes of a file as a NIfTI-1 or NIfTI-2 header; None if it is neither."""
    if len(header) < 348:
        return None
    for endian in "<>":
        size_of_header = struct.unpack(endian + "i", header[:4])[0]
        if size_of_header == 348 and header[344:347] == b"n+1":
            code, bits = struct.unpack(endian + "2h", header[70:74])
            dims = struct.unpack(endian + "8h", header[40:56])
            pixdim = struct.unpack(endian + "8f", header[76:108])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            qform_code, sform_code = struct.unpack(endian + "2h", header[252:256])
            sform = struct.unpack(endian + "12f", header[280:328])
            break
        if size_of_header == 540 and len(header) == 540 and header[4:7] == b"n+2":
            code, bits = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            pixdim = struct.unpack(endian + "8d", header[104:168])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            qform_code, sform_code = struct.unpack(endian + "2i", header[344:352])
            sform = struct.unpack(endian + "12d", header[400:496])
            break
    else:
        return None
    count = int(np.prod([max(n, 1) for n in dims[1 : 1 + min(max(dims[0], 1), 7)]], dtype=np.int64))
    floats = {16: "f4", 64: "f8"}  # NIfTI datatype codes FLOAT32, FLOAT64
    dtype = np.dtype(endian + floats[code]) if code in floats else None
    return _NiftiHeader(
        offset=offset,
        data_bytes=count * bits // 8,
        dtype=dtype,
        pixdim=tuple(float(v) for v in pixdim[1:4]),
        qform_code=int(qform_code),
        sform_code=int(sform_code),
        sform=np.array(sform, dtype=float).reshape(3, 4),
    )


def _check_nifti_sform(header: _NiftiHeader, path: Path) -> None:
    """Refuse a NIfTI whose sform (in use: sform_code > 0) is singular or sheared.

    ITK would replace it by the qform without a word (or refuse with "no orthonormal definition
    found" when there is none), so the output's geometry would differ from the input's sform.
    """
    if header.sform_code <= 0:
        return
    matrix = header.sform[:, :3]
    lengths = np.linalg.norm(matrix, axis=0)
    if not np.all(np.isfinite(matrix)) or np.any(lengths < 1e-6):
        raise InputError("has a NIfTI sform with a zero or non-finite axis; the header is corrupt", path)
    if abs(np.linalg.det(matrix / lengths)) < 1e-6:
        raise InputError(
            "has a singular NIfTI sform (two voxel axes are parallel); the header is corrupt", path
        )
    problem = _not_orthonormal(matrix / lengths)
    if problem:
        raise InputError(
            f"has a sheared NIfTI sform ({problem}): its voxels are not on a rectangular grid, which "
            "ITK would silently replace by the qform, so the output could not have the input's geometry",
            path,
        )


def _nifti_geometry_notes(header: _NiftiHeader, reader: sitk.ImageFileReader, path: Path) -> list[str]:
    """Warnings where the geometry ITK reads differs from the NIfTI header's: a pixdim of 0 (read
    as 1 mm) and an sform in use (sform_code > 0) that ITK set aside for the qform."""
    notes = []
    zero = ["xyz"[n] for n in range(3) if header.pixdim[n] == 0]
    if zero:
        notes.append(
            f"{path}: NIfTI pixdim gives voxel size 0 along {', '.join(zero)}; read as 1 mm, "
            "so distances, volumes and the in-plane resampling may be wrong"
        )
    if header.sform_code > 0:
        dimension = reader.GetDimension()
        direction = np.array(reader.GetDirection()).reshape(dimension, dimension)[:3, :3]
        read = np.diag([-1.0, -1.0, 1.0]) @ direction @ np.diag(reader.GetSpacing()[:3])  # LPS -> RAS
        sform = header.sform[:, :3]
        if not np.allclose(read, sform, rtol=0, atol=1e-3 * max(1.0, float(np.abs(sform).max()))):
            sizes = " x ".join(f"{v:.4g}" for v in np.linalg.norm(sform, axis=0))
            read_sizes = " x ".join(f"{v:.4g}" for v in reader.GetSpacing()[:3])
            notes.append(
                f"{path}: NIfTI sform (voxel size {sizes} mm) was set aside by ITK, which read the qform "
                f"and pixdim instead (voxel size {read_sizes} mm; the sform's scales disagree with pixdim "
                "or its rotation with the qform's): check the geometry"
            )
    return notes


def _sitk_reason(error: RuntimeError) -> str:
    """The last line of a SimpleITK exception, without its C++ source location (one line)."""
    # MetaImage adds "Reason: <errno text>", which is misleading ("No such file or directory" for a
    # truncated file); the line before it says what failed.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Reason:")]
    reason = lines[-1] if lines else "unknown error"
    for prefix in ("sitk::ERROR:", "ITK ERROR:", "[nrrd]"):
        reason = reason.removeprefix(prefix).strip()
    return re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", reason)[:300]


def _read_failure(console: list[str], error: RuntimeError) -> str:
    """Why a read failed: what the reader printed (MetaIO says which data were short, where
    SimpleITK's exception says only "File cannot be read"), else the exception's last line."""
    return "; ".join(console) or _sitk_reason(error)


# ITK's console warning: "WARNING: In FILE, line N\nClass (0xADDRESS): message...\n\n".
_ITK_WARNING = re.compile(r"WARNING: In [^\n]*, line \d+\n(.*?)(?:\n[ \t]*\n|\Z)", re.DOTALL)
# ITK warnings that the checks here already report in their own words.
_ITK_WARNINGS_REPORTED = ("unexpected scales in sform", "Non uniform sampling or missing slices")


@contextlib.contextmanager
def _itk_warnings(path: Path, warnings: list[str], *, keep_other: bool = False) -> Iterator[list[str]]:
    """Catch what ITK prints on the process's stderr during the block (file descriptor 2: its C++
    output goes there, past Python) and add each multi-line ITK warning to ``warnings`` as one
    line, ``"PATH: ITK: message"``, once. Anything else it caught is written back to stderr, unless
    the block raised or ``keep_other`` is set: then it goes, as one line, into the list the block
    received (``with _itk_warnings(path, warnings) as console:``), for the caller's error message.
    A failed read must print one line, the error, not first what the reader printed (MetaIO:
    "MetaImage: M_ReadElementsData: data not read completely" and the byte counts on a line of
    their own)."""
    console: list[str] = []
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a process without a console): nothing reaches a terminal
        yield console
        return
    failed = False
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield console
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            for match in _ITK_WARNING.finditer(text):
                message = " ".join(match.group(1).split())
                message = re.sub(r"^\w+ \(0x[0-9a-fA-F]+\):\s*", "", message)
                line = f"{path}: ITK: {message[:300]}"
                if not any(known in message for known in _ITK_WARNINGS_REPORTED) and line not in warnings:
                    warnings.append(line)
            rest = _ITK_WARNING.sub("", text).strip()
            if rest and (failed or keep_other):
                console.append(" ".join(rest.split())[:300])
            elif rest and sys.stderr is not None:
                sys.stderr.write(rest + "\n")


# Files written inside ``all_or_nothing()`` wait here under their temporary names: (temporary, final).
_PENDING: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar(
    "m4oe_pending_writes", default=None
)
# A temporary file of write_atomic older than this (by modification time) belongs to a run that was
# killed: no run keeps one that long (it lives from the start of its write to the end of the run's
# last output), so the next write into the same folder removes it.
STALE_TEMPORARY_S = 24 * 3600
# ".<stem>.<12 hex digits>.tmp<extension>", the extension as _extension() takes it.
_TEMPORARY_NAME = re.compile(
    r"\..*\.[0-9a-f]{12}\.tmp(?:"
    + "".join(f"(?i:{re.escape(compound)})|" for compound in COMPOUND_EXTENSIONS)
    + r"\.[^.]+)?"
)
_SWEPT_FOLDERS: set[Path] = set()


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Make the files :func:`write_atomic` writes inside the block appear together, or not at all.

    Inside the block each file stays under its temporary name in its own folder; when the block
    ends normally every one is renamed into place, and when it raises every temporary file is
    removed, so that an error in a later output (a full disk, a failing report) leaves neither new
    files nor replaced ones behind. Blocks may nest; the outermost one decides. A rename that
    fails is an :class:`OutputError`; the files not yet renamed are removed.
    """
    if _PENDING.get() is not None:
        yield
        return
    pending: list[tuple[Path, Path]] = []
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException:
        for temporary, _ in pending:
            temporary.unlink(missing_ok=True)
        raise
    finally:
        _PENDING.reset(token)
    for done, (temporary, final) in enumerate(pending):
        try:
            os.replace(temporary, final)
        except OSError as error:
            for left, _ in pending[done:]:
                left.unlink(missing_ok=True)
            raise OutputError(f"cannot be renamed into place ({error.strerror or error})", final) from None
    for folder in {final.parent for _, final in pending}:
        _sync_folder(folder)


def write_atomic(path: str | Path, writer: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Write a file through a temporary name in its folder, check it, then rename it into place.

    ``writer(temporary_path)`` writes the whole file; the temporary name
    (``.<stem>.<12 hex digits>.tmp<extension>``) keeps the extension(s) of ``path`` (``.nii.gz``,
    ``.seg.nrrd``, ...) so that format-by-extension writers pick the right format. The file is then
    synced to disk and checked to be complete (:func:`_missing_data`: ITK's NIfTI writer, for one,
    leaves a short file on a full disk without any error); only then is it renamed and its folder
    synced. On any failure the temporary file is removed and ``path`` is left as it was. Inside
    :func:`all_or_nothing` the rename waits for the end of the block. The first write into a
    folder removes the temporary files that killed runs left there (:func:`sweep_temporaries`).

    Raises :class:`OutputError` when ``path`` exists and not ``overwrite``, when it is a folder,
    when its folder is missing or not writable, when the writer fails with an OSError or SimpleITK
    RuntimeError, or when the written file is incomplete; the message carries the file system's
    error (``No space left on device``) when one more write to the file is refused. Returns ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError("is a folder; expected a file name", path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError("exists; pass --overwrite to replace it", path)
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"folder {folder} does not exist", path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"folder {folder} is not writable", path)
    if folder.resolve() not in _SWEPT_FOLDERS:
        sweep_temporaries(folder)
        _SWEPT_FOLDERS.add(folder.resolve())
    extension = _extension(path.name)
    stem = path.name[: len(path.name) - len(extension)]
    temporary = folder / f".{stem}.{uuid.uuid4().hex[:12]}.tmp{extension}"
    pending = _PENDING.get()
    try:
        writer(temporary)
        with open(temporary, "r+b") as stream:  # r+: Windows syncs only a file open for writing
            os.fsync(stream.fileno())
        missing = _missing_data(temporary, extension)
        if missing:
            raise _IncompleteFile(f"incomplete file: {missing}")
        if pending is None:
            os.replace(temporary, path)
            _sync_folder(folder)
        else:
            pending.append((temporary, path))
    except (OSError, RuntimeError, _IncompleteFile) as error:
        if isinstance(error, OSError) and error.strerror:
            reason = error.strerror
        else:
            reason = _sitk_reason(error) if isinstance(error, RuntimeError) else str(error)
            refused = _disk_error(temporary)
            reason = reason if refused is None else f"{refused}; {reason}"
        temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot be written ({reason})", path) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


class _IncompleteFile(Exception):
    """A file that its writer reported as written holds less than its header announces."""


def _disk_error(temporary: Path) -> str | None:
    """The file system's error for one more 64 KiB block written to ``temporary``; None if it takes it.

    Writers that ignore a failed write (ITK's NIfTI writer) or word it vaguely (``_nrrdGzWrite:
    failed to write to file``) hide the reason; the same write from here shows it (``No space left
    on device``, ``Disk quota exceeded``). ``temporary`` is removed afterwards by the caller.
    """
    try:
        with open(temporary, "ab") as stream:
            stream.write(bytes(1 << 16))
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as error:
        return error.strerror or str(error)
    return None


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; Windows cannot open a folder to sync it)."""
    if os.name == "nt":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sweep_temporaries(folder: str | Path, older_than_s: float = STALE_TEMPORARY_S) -> list[Path]:
    """Remove the temporary files of killed runs from ``folder``; return the removed paths.

    Only regular files named as :func:`write_atomic` names them (``.<stem>.<12 hex
    digits>.tmp<extension>``) and last modified more than ``older_than_s`` seconds ago are removed;
    subfolders are not visited. A file that cannot be removed is left (and logged).
    """
    removed = []
    now = time.time()
    try:
        with os.scandir(folder) as listing:
            entries = [entry for entry in listing if _TEMPORARY_NAME.fullmatch(entry.name)]
    except OSError as error:  # a folder that can be written but not listed: nothing to sweep
        logger.debug("cannot list %s for stale temporary files: %s", folder, error)
        return removed
    for entry in entries:
        try:
            if (
                entry.is_file(follow_symlinks=False)
                and now - entry.stat(follow_symlinks=False).st_mtime > older_than_s
            ):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError as error:
            logger.debug("cannot remove the stale temporary file %s: %s", entry.path, error)
    for path in removed:
        logger.info("removed %s, a temporary file left by a killed run", path)
    return removed


_NRRD_TYPE_SIZES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(
        ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
         "unsigned short", "unsigned short int", "uint16", "uint16_t"),
        2,
    ),
    **dict.fromkeys(
        ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4
    ),
    **dict.fromkeys(
        ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
         "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
         "double"),
        8,
    ),
}  # fmt: skip
_MET_TYPE_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last 8 bytes of every PNG


def _missing_data(path: Path, extension: str) -> str | None:
    """What a file just written lacks, or None when it holds everything its header announces.

    NIfTI, NRRD (``.seg.nrrd`` too) and MetaImage files are streamed once (decompressed when
    gzip- or zlib-compressed: the stream must also end with its trailer, and gzip checks its CRC)
    and their voxel data is measured against the size the header gives; a PNG must end with its
    IEND chunk. Other files (JSON, NumPy) come from Python writers, which raise on a failed write.
    """
    lower = extension.lower()
    try:
        with open(path, "rb") as stream:
            if lower in (".nii", ".nii.gz"):
                return _missing_nifti_data(gzip.GzipFile(fileobj=stream) if lower == ".nii.gz" else stream)
            if lower in (".nrrd", ".seg.nrrd"):
                return _missing_nrrd_data(stream)
            if lower == ".mha":
                return _missing_metaimage_data(stream)
            if lower == ".png":
                stream.seek(0, os.SEEK_END)
                stream.seek(max(stream.tell() - len(_PNG_END), 0))
                return None if stream.read() == _PNG_END else "the PNG stops before its end chunk"
    except (EOFError, OSError, zlib.error) as error:
        return f"the compressed data is truncated or corrupt: {error}"
    return None


def _stream_length(stream, decompressor=None) -> tuple[int, bool]:
    """(bytes read to the end of ``stream``, after ``decompressor`` if given; whether its stream ended)."""
    total = 0
    while chunk := stream.read(1 << 22):
        total += len(chunk if decompressor is None else decompressor.decompress(chunk))
    if decompressor is None:
        return total, True
    return total + len(decompressor.flush()), decompressor.eof


def _shortfall(found: int, expected: int, what: str) -> str | None:
    return f"holds {found} of the {expected} bytes of {what}" if found < expected else None


def _missing_nifti_data(stream) -> str | None:
    header = stream.read(540)
    parsed = _nifti_header(header)
    if parsed is None:
        return "has no NIfTI-1 or NIfTI-2 header"
    found, _ = _stream_length(stream)
    return _shortfall(len(header) + found, parsed.offset + parsed.data_bytes, "header and voxel data")


def _missing_nrrd_data(stream) -> str | None:
    fields = {}
    while (line := stream.readline()) not in (b"\n", b"\r\n", b""):
        key, colon, value = line.decode("latin-1").partition(":")
        if colon and not value.startswith("="):  # "key:=value" lines are key/value pairs, not fields
            fields[key.strip().lower()] = value.strip()
    if not {"sizes", "type", "encoding"} <= fields.keys() or fields["type"] not in _NRRD_TYPE_SIZES:
        return "has no complete NRRD header"
    if "data file" in fields or "datafile" in fields:
        return None  # detached data: not a format written here (WRITE_EXTENSIONS)
    expected = int(np.prod([int(n) for n in fields["sizes"].split()])) * _NRRD_TYPE_SIZES[fields["type"]]
    if fields["encoding"] in ("gzip", "gz"):
        found, _ = _stream_length(gzip.GzipFile(fileobj=stream))
    elif fields["encoding"] == "raw":
        found, _ = _stream_length(stream)
    else:
        return None
    return _shortfall(found, expected, "voxel data")


def _missing_metaimage_data(stream) -> str | None:
    fields = {}
    while line := stream.readline():
        key, equals, value = line.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile" or not equals:
            break
    if "ElementDataFile" not in fields:
        return "has no complete MetaImage header"
    if fields["ElementDataFile"] != "LOCAL" or fields.get("ElementType") not in _MET_TYPE_SIZES:
        return None  # detached data (not written here: WRITE_EXTENSIONS) or a type without a fixed size
    count = np.prod([int(n) for n in fields.get("DimSize", "0").split()], dtype=np.int64)
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    expected = int(count) * channels * _MET_TYPE_SIZES[fields["ElementType"]]
    compressed = fields.get("CompressedData", "False") == "True"
    found, ended = _stream_length(stream, zlib.decompressobj() if compressed else None)
    if not ended:
        return "the compressed voxel data stops before its end"
    return _shortfall(found, expected, "voxel data")


def _extension(name: str) -> str:
    lower = name.lower()
    for compound in COMPOUND_EXTENSIONS:
        if lower.endswith(compound) and len(name) > len(compound):
            return name[-len(compound) :]
    return Path(name).suffix


def write_image(image: sitk.Image, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write an image (any dimension, scalar or vector) with compression, atomically.

    Integer images whose values fit are narrowed losslessly to uint8, else uint16 (label maps: a
    few bytes per voxel less, and what viewers expect); other pixel types are written as they are.
    The format follows the extension: ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``. Geometry is
    written unchanged. Same refusals as :func:`write_atomic`.
    """
    path = Path(path)
    if not path.name.lower().endswith(WRITE_EXTENSIONS):
        raise OutputError(f"unsupported output type; use one of {', '.join(WRITE_EXTENSIONS)}", path)
    image = _narrow_labels(image)

    def write(temporary: Path) -> None:
        sitk.WriteImage(image, str(temporary), useCompression=True)

    return write_atomic(path, write, overwrite)


def _narrow_labels(image: sitk.Image) -> sitk.Image:
    """Cast a non-negative integer scalar image to uint8 or uint16 when its values fit."""
    values = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() != 1 or not np.issubdtype(values.dtype, np.integer):
        return image
    if values.size == 0 or values.min() < 0 or values.max() > np.iinfo(np.uint16).max:
        return image
    return sitk.Cast(image, sitk.sitkUInt8 if values.max() <= np.iinfo(np.uint8).max else sitk.sitkUInt16)


def write_segmentation(
    labelmap: sitk.Image, labels: Sequence[Label], path: str | Path, *, overwrite: bool = False
) -> Path:
    """Write a label map as a 3D Slicer segmentation (``.seg.nrrd``), atomically.

    ``labelmap``: 3D scalar integer image, 0 = background, other values = ``Label.value``; its
    geometry (LPS, mm) is written unchanged. Every label becomes a segment of one shared layer
    with its name, colour, label value and ``TerminologyEntry`` tag, including labels absent from
    the label map (empty segments), so a Slicer user sees every organ of the task. Voxels are
    stored as uint8 (uint16 when a value exceeds 255), gzip-compressed. Written with ``slicerio``;
    Slicer, ``slicerio.read_segmentation`` and ``sitk.ReadImage`` read it back.

    Raises ValueError for a label map that is not 3D scalar integer, holds a value no label
    describes, or for duplicate label values; :class:`OutputError` as :func:`write_atomic`.
    """
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise OutputError("a segmentation must be written as .seg.nrrd", path)
    voxels = _segmentation_voxels(labelmap, labels, path)
    segmentation = {
        "voxels": voxels.transpose(2, 1, 0),  # slicerio writes (i, j, k) = (x, y, z) arrays
        "ijkToLPS": ijk_to_lps(labelmap),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "conversionParameters": [_reference_geometry_parameter(labelmap)],
        "segments": [_segment(label, labelmap.GetSize()) for label in labels],
    }

    def write(temporary: Path) -> None:
        slicerio.write_segmentation(str(temporary), segmentation, compression_level=6)

    return write_atomic(path, write, overwrite)


def _segmentation_voxels(labelmap: sitk.Image, labels: Sequence[Label], path: Path) -> np.ndarray:
    """The label map as a (z, y, x) uint8/uint16 array, after checking it against ``labels``."""
    values = sitk.GetArrayFromImage(labelmap)
    if labelmap.GetDimension() != 3 or labelmap.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: the label map must be a 3D scalar image")
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{path}: the label map must have integer voxels, got {values.dtype}")
    known = [label.value for label in labels]
    if len(set(known)) != len(known):
        raise ValueError(f"{path}: duplicate label values {sorted(known)}")
    unknown = sorted(set(np.unique(values).tolist()) - {0, *known})
    if unknown:
        raise ValueError(f"{path}: the label map holds values {unknown} that no label describes")
    return values.astype(np.uint8 if max(known, default=0) <= 255 else np.uint16)


def _segment(label: Label, size: Sequence[int]) -> dict:
    # The full extent on every segment (even an empty one): older Slicer versions crop a shared
    # layer to the first segment's extent.
    return {
        "id": f"Segment_{label.value}",
        "name": label.name,
        "nameAutoGenerated": False,
        "color": [float(c) for c in label.color],
        "colorAutoGenerated": False,
        "labelValue": label.value,
        "layer": 0,
        "extent": [0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1],
        "terminology": terminology_entry_from_string(label.terminology_entry()),
    }


def _reference_geometry_parameter(image: sitk.Image) -> dict:
    """Slicer's "Reference image geometry" conversion parameter: IJK-to-RAS matrix and extent."""
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps(image)
    size = image.GetSize()
    matrix = ";".join(f"{v:.17g}" for v in ijk_to_ras.flatten())
    extent = ";".join(f"0;{n - 1}" for n in size)
    return {
        "name": "Reference image geometry",
        "value": f"{matrix};{extent};",
        "description": "Image geometry description string determining the geometry of the labelmap "
        "that is created in course of conversion. Can be copied from a volume, using the button.",
    }


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix mapping voxel index (i, j, k) = (x, y, z) to physical LPS coordinates in mm."""
    matrix = np.eye(4)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def image_geometry(image: sitk.Image) -> dict:
    """Size (voxels, x y z), spacing (mm), origin (mm, LPS) and direction (row-major) as tuples."""
    return {
        "size": tuple(image.GetSize()),
        "spacing": tuple(image.GetSpacing()),
        "origin": tuple(image.GetOrigin()),
        "direction": tuple(image.GetDirection()),
    }


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> bool:
    """Whether two images share size exactly, and spacing, origin and direction within ``tol``.

    ``tol`` is relative for values above 1 (mm) and absolute below.
    """
    ga, gb = image_geometry(a), image_geometry(b)
    if ga["size"] != gb["size"]:
        return False
    return all(
        np.allclose(ga[key], gb[key], rtol=tol, atol=tol) for key in ("spacing", "origin", "direction")
    )
