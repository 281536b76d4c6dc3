"""Writing results: atomic, verified, all-or-nothing file writes, images and Slicer segmentations.

Outputs are written to a temporary file in the target folder, synced to disk, checked to hold
everything their header announces and only then renamed into place, so a failed or interrupted
write (a full disk included) never leaves a partial file behind; :func:`all_or_nothing` makes
several outputs appear together or not at all. Images are SimpleITK images (index order
(x, y, z), geometry in LPS and mm), written with their geometry unchanged. Every failure is an
:class:`~m4oe.errors.OutputError` whose message is one line, ``"PATH: problem"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import logging
import os
import re
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicerio
from slicerio.segmentation import terminology_entry_from_string

from m4oe.errors import OutputError
from m4oe.geometry import ijk_to_lps
from m4oe.header_checks import _nifti_header
from m4oe.itk_console import _sitk_reason
from m4oe.labels import Label

logger = logging.getLogger(__name__)

# Single-file formats only: a detached header (.mhd, .nhdr) names its data file, which would keep
# the temporary name after the atomic rename.
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
# Extensions made of several dots, kept whole when a temporary name is built.
COMPOUND_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".tar.gz")

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
