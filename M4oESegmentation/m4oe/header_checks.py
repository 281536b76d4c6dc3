"""Checks on a volume's header, made before any voxel is read: size, voxel count, geometry.

Sizes are in voxels, index order (x, y, z) = (i, j, k); spacing in mm; direction cosines row-major,
column n the LPS direction of index axis n, as SimpleITK's readers give them. NIfTI headers are
also parsed here, because ITK reads some broken ones without a word (a truncated file, NaN voxels, a
sheared sform). Every refusal is an :class:`~m4oe.errors.InputError`, ``"PATH: problem"``; the
reader that uses these checks is :func:`m4oe.io.read_image`.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import SimpleITK as sitk

from m4oe.errors import InputError

MIN_AXIS_SIZE = 2
# Pixel types read as they are: float32 holds every value of them exactly, so casting a batch of
# slices at normalisation gives the same numbers as casting the volume on reading, and a CT stays
# 2 bytes a voxel. Every other type (32- and 64-bit integers, float64) is cast to float32 on
# reading.
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


def max_voxels_limit(max_voxels: int | None = None) -> int:
    """The largest volume :func:`m4oe.io.read_image` reads, in voxels: ``max_voxels``, else the
    environment variable ``M4OE_MAX_VOXELS``, else :data:`DEFAULT_MAX_VOXELS`. Raises InputError for
    a value that is not a positive integer."""
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
