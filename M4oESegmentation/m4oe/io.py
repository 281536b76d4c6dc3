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

The work is split by responsibility: :mod:`m4oe.header_checks` (size, voxel count, geometry and
NIfTI header checks), :mod:`m4oe.dicom_series` (a DICOM series folder), :mod:`m4oe.itk_console`
(ITK's console output as one-line warnings), :mod:`m4oe.writing` (atomic writes, images, Slicer
segmentations) and :mod:`m4oe.geometry` (geometry helpers). This module reads volumes and
re-exports the names of the others that callers use, so ``from m4oe.io import write_atomic``
keeps working.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m4oe.dicom_series import (
    DICOM_MODALITY_TAG,
    DICOM_TAGS,
    SAME_POSITION_MM,
    UNEVEN_SPACING_TOLERANCE,
    _read_dicom_series,
)
from m4oe.errors import InputError
from m4oe.geometry import ijk_to_lps, image_geometry, same_geometry
from m4oe.header_checks import (
    DEFAULT_MAX_VOXELS,
    KEPT_PIXEL_IDS,
    MAX_VOXELS_ENV,
    MIN_AXIS_SIZE,
    ORTHONORMAL_TOLERANCE,
    _check_geometry,
    _check_nifti_data,
    _check_nifti_sform,
    _check_size,
    _check_voxels,
    _nifti_geometry_notes,
    _read_nifti_header,
    max_voxels_limit,
)
from m4oe.itk_console import _itk_warnings, _read_failure
from m4oe.writing import (
    COMPOUND_EXTENSIONS,
    STALE_TEMPORARY_S,
    WRITE_EXTENSIONS,
    all_or_nothing,
    sweep_temporaries,
    write_atomic,
    write_image,
    write_segmentation,
)

__all__ = [
    "COMPOUND_EXTENSIONS",
    "DEFAULT_MAX_VOXELS",
    "DICOM_MODALITY_TAG",
    "DICOM_TAGS",
    "KEPT_PIXEL_IDS",
    "MAX_VOXELS_ENV",
    "MIN_AXIS_SIZE",
    "ORTHONORMAL_TOLERANCE",
    "READ_EXTENSIONS",
    "SAME_POSITION_MM",
    "STALE_TEMPORARY_S",
    "UNEVEN_SPACING_TOLERANCE",
    "WRITE_EXTENSIONS",
    "LoadedImage",
    "_itk_warnings",
    "all_or_nothing",
    "check_volume",
    "ijk_to_lps",
    "image_geometry",
    "max_voxels_limit",
    "read_image",
    "same_geometry",
    "sweep_temporaries",
    "write_atomic",
    "write_image",
    "write_segmentation",
]

logger = logging.getLogger(__name__)

READ_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_COMPLEX_PIXEL_IDS = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


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


def read_image(
    path: str | Path, *, max_voxels: int | None = None, dicom_files: Sequence[str | Path] | None = None
) -> LoadedImage:
    """Read a 3D scalar volume from NIfTI, NRRD, MetaImage or a DICOM series folder.

    A folder is read as a DICOM series; when it holds several series, the one with the most files
    is read and a warning says so; when one series holds several acquisitions at the same slice
    positions (a blank or shared SeriesInstanceUID), the largest acquisition is read and a warning
    says so. The voxels (HU for CT) keep an 8- or 16-bit integer or float32 type, other types are
    cast to float32; the geometry (size, spacing in mm, origin and direction in LPS) is the file's.

    ``max_voxels``: the largest volume read (None: :func:`max_voxels_limit`); the size comes from
    the header, so a larger volume is refused before any voxel is read.

    ``dicom_files``: with a folder ``path``, read exactly these DICOM files as one volume, whatever
    their series UIDs, stacked by ascending position along the slice normal (for releases whose
    anonymisation gives each file a UID of its own); refused if one has no position or two share one.

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
    if dicom_files is not None and not path.is_dir():
        raise ValueError(f"dicom_files needs a folder path, got {path}")
    if path.is_dir():
        chosen = None if dicom_files is None else [Path(f) for f in dicom_files]
        image, modality, files = _read_dicom_series(path, warnings, limit, chosen)
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
