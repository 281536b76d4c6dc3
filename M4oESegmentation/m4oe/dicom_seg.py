"""DICOM Segmentation (SEG) output: a label map written as a DICOM SEG object that references the DICOM
series it was computed from, so that the result can go back to a PACS beside its images.

Written with ``highdicom`` (the optional extra ``m4oe[dicom]``), read back by ``pydicom``,
``highdicom.seg.segread`` and by the DICOM SEG readers built on the standard (dcmqi, which 3D
Slicer's QuantitativeReporting extension uses to load a SEG from the DICOM database). The SEG is
of type BINARY, with one segment per structure found (an empty structure has no segment), each
with its SNOMED CT category, type and laterality modifier (:mod:`m4oe.terminology`), its
recommended colour and the algorithm that made it (AUTOMATIC, "M4oE Segmentation", the engine's
version, the model and the task). Patient and study attributes are the source's, copied by
highdicom; the SEG is a new series in the source's study and frame of reference.

Frames map to source slices through the geometry, never through the order of the files: each source
file's Image Position (Patient) is taken to the label map's voxel index (i, j, k) with the label
map's own geometry (LPS, mm), and must fall on a slice of it (i = j = 0, k a whole number).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m4oe import __version__
from m4oe.errors import InputError, OutputError
from m4oe.io import LoadedImage, same_geometry, write_atomic
from m4oe.labels import Code, Label

SUFFIX = ".dcm"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
ALGORITHM_NAME = "M4oE Segmentation"
MANUFACTURER = "M4oE Segmentation"
CONTENT_LABEL = "M4OE"
# Added to the source's Series Number, so that the SEG lists after its images in a study.
SERIES_NUMBER_OFFSET = 1000
# How far (in voxels) a source slice's corner may lie from a voxel of the label map's grid, and how
# far (direction cosines, pixel spacing relative) its orientation and spacing from the grid's:
# positions printed to a few decimals differ by far less; an uneven series by far more.
ON_GRID_VOXELS = 0.05
GEOMETRY_TOLERANCE = 1e-3
# Attributes a SEG must copy from its source to be filed and displayed with it.
REQUIRED = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
)
INSTALL_HINT = "pip install 'm4oe[dicom]' (or pip install highdicom)"


@dataclass(frozen=True)
class SourceSeries:
    """The DICOM series a label map is computed from.

    ``datasets``: the header (no pixel data) of each source file, ordered by the slice index k of
    ``grid`` that its Image Position (Patient) falls on, so ``datasets[k]`` is slice k of a (z, y, x)
    array of the grid: its rows are the grid's y (j) axis and its columns the x (i) axis. ``grid``:
    the volume read from the series (size, spacing in mm, origin and direction in LPS), whose
    geometry a label map must have to be written against this series.
    """

    folder: Path
    datasets: list
    grid: sitk.Image


def check_dicom_input(path: str | Path) -> None:
    """Refuse, before any voxel is read, an input that cannot be the source of a DICOM SEG: anything
    but a DICOM series folder, or a computer without highdicom. Raises :class:`InputError`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(
            "is not a DICOM series folder: a DICOM SEG output (.dcm) references the images it "
            "segments, so it needs a DICOM series as input; write a label map or .seg.nrrd instead",
            path,
        )
    _highdicom()


def read_source_series(loaded: LoadedImage) -> SourceSeries:
    """The headers of the DICOM files ``loaded`` was read from, each mapped to its slice of ``loaded.image``.

    Refused with :class:`InputError` naming the folder or file: an input not read from a DICOM
    series; a multi-frame (enhanced) file; a file without one of :data:`REQUIRED` (an anonymised
    copy often has blank UIDs), or with a study, series or frame of reference other than the first
    file's; two files with the same SOP Instance UID; a file whose orientation, pixel spacing, rows
    or columns differ from the volume's, or whose position is not on a slice of it (an unevenly
    spaced series, read onto an even grid); two files on the same slice.
    """
    _highdicom()
    import pydicom  # installed with highdicom

    folder = loaded.path
    if not loaded.dicom_files:
        raise InputError(
            "is not a DICOM series: a DICOM SEG output needs a DICOM series folder as input", folder
        )
    grid = loaded.image
    size = grid.GetSize()
    direction = np.array(grid.GetDirection(), dtype=float).reshape(3, 3)
    by_slice: dict[int, object] = {}
    for file in loaded.dicom_files:
        try:  # force: a file without the DICOM preamble, which GDCM has just read, is read too
            ds = pydicom.dcmread(file, stop_before_pixels=True, force=True)
        except Exception as error:  # pydicom's read errors have no common base class
            raise InputError(f"DICOM file cannot be read by pydicom ({error})", file) from None
        frames = int(ds.get("NumberOfFrames") or 1)
        if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            raise InputError(
                f"is a multi-frame (enhanced) DICOM image ({frames} frames); DICOM SEG output supports "
                "series of single-frame images (one file per slice)",
                file,
            )
        missing = [name for name in REQUIRED if not ds.get(name)]
        if missing:
            raise InputError(
                f"has no {', '.join(missing)} (blank or absent; an anonymised copy?): a DICOM SEG must "
                "reference its source images by them",
                file,
            )
        first = next(iter(by_slice.values()), ds)
        for name in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            if ds.get(name) != first.get(name):
                raise InputError(f"has {name} {ds.get(name)}, unlike the series' first file", file)
        k = _slice_index(ds, grid, direction, size, file)
        if k in by_slice:
            raise InputError(f"lies on slice {k}, as {by_slice[k].filename}, of the volume read", file)
        by_slice[k] = ds
    uids = {ds.SOPInstanceUID for ds in by_slice.values()}
    if len(uids) != len(by_slice):
        raise InputError("holds files with the same SOP Instance UID", folder)
    if sorted(by_slice) != list(range(size[2])):  # cannot happen for a series read by read_image
        covered = f"{len(by_slice)} of the {size[2]} slices"
        raise InputError(f"its files cover {covered} of the volume read", folder)
    return SourceSeries(folder, [by_slice[k] for k in range(size[2])], grid)


def _slice_index(ds, grid: sitk.Image, direction: np.ndarray, size, file: Path) -> int:
    """Slice index k of ``grid`` that the file's first pixel lies on; refused when off the grid."""
    # Image Orientation (Patient): the LPS direction along a row (of increasing column index, the
    # grid's i axis), then along a column (increasing row index, j).
    cosines = np.array([float(v) for v in ds.ImageOrientationPatient])
    along_row, along_column = cosines[:3], cosines[3:]
    spacing = grid.GetSpacing()
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    if (
        np.max(np.abs(along_row - direction[:, 0])) > GEOMETRY_TOLERANCE
        or np.max(np.abs(along_column - direction[:, 1])) > GEOMETRY_TOLERANCE
        or abs(column_spacing / spacing[0] - 1) > GEOMETRY_TOLERANCE
        or abs(row_spacing / spacing[1] - 1) > GEOMETRY_TOLERANCE
        or (ds.Columns, ds.Rows) != tuple(size[:2])
    ):
        raise InputError(
            "has another orientation, pixel spacing or size than the volume read from its series",
            file,
        )
    position = [float(v) for v in ds.ImagePositionPatient]
    i, j, k = grid.TransformPhysicalPointToContinuousIndex(position)
    if max(abs(i), abs(j), abs(k - round(k))) > ON_GRID_VOXELS or not 0 <= round(k) < size[2]:
        raise InputError(
            f"lies at voxel index ({i:.3g}, {j:.3g}, {k:.3g}) of the volume read, not on one of its "
            "slices (an unevenly spaced series?); DICOM SEG output needs every file on the volume's grid",
            file,
        )
    return round(k)


def present_labels(labelmap: sitk.Image, labels: list[Label]) -> list[Label]:
    """The labels whose value occurs in ``labelmap`` (any 3D integer image), in ``labels``' order."""
    values = set(np.unique(sitk.GetArrayViewFromImage(labelmap)).tolist())
    return [label for label in labels if label.value in values]


def write_dicom_seg(
    labelmap: sitk.Image,
    labels: list[Label],
    source: SourceSeries,
    path: str | Path,
    *,
    model: str,
    task: str,
    model_sha256: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``labelmap`` as a BINARY DICOM SEG referencing ``source``, atomically.

    ``labelmap``: 3D integer image on ``source.grid`` (same size, spacing, origin, direction), 0 =
    background, other values = ``Label.value``. Segment n (1, 2, ...) is the n-th label of
    ``labels`` present in it; absent labels get no segment (:func:`present_labels` names them).
    Frame of segment n for source file ``source.datasets[k]`` is ``labelmap`` slice k (rows = y,
    columns = x) equal to its label's value; empty frames are left out. ``model``, ``task``,
    ``model_sha256``: the algorithm's parameters, recorded in every segment's Algorithm
    Identification. The written file is read back with pydicom and checked to hold every frame.

    Raises ValueError for a label map off the source grid or holding a value no label describes;
    :class:`OutputError` when no structure was found (a SEG needs one segment), and as
    :func:`m4oe.io.write_atomic`.
    """
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    path = Path(path)
    if not path.name.lower().endswith(SUFFIX):
        raise OutputError(f"a DICOM SEG must be written as {SUFFIX}", path)
    if not same_geometry(labelmap, source.grid):
        raise ValueError(f"{path}: the label map is not on the grid of its source series {source.folder}")
    values = sitk.GetArrayViewFromImage(labelmap)  # (z, y, x)
    unknown = sorted(set(np.unique(values).tolist()) - {0} - {label.value for label in labels})
    if unknown:
        raise ValueError(f"{path}: the label map holds values {unknown} that no label describes")
    present = present_labels(labelmap, labels)
    if not present:
        raise OutputError(
            "cannot be written: no structure was found, and a DICOM SEG needs at least one segment", path
        )
    segment_of = np.zeros(int(values.max()) + 1, np.uint8 if len(present) < 256 else np.uint16)
    for number, label in enumerate(present, start=1):
        segment_of[label.value] = number
    frames = segment_of[values]  # frames[k] is slice k = source.datasets[k], segment numbers
    parameters = {"model": model, "task": task}
    if model_sha256:
        parameters["weights_sha256"] = model_sha256
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        parameters=parameters,
    )
    first = source.datasets[0]
    seg = hd.seg.Segmentation(
        source_images=source.datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(hd, n, label, algorithm) for n, label in enumerate(present, start=1)],
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER_OFFSET + int(first.get("SeriesNumber") or 0),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model[:64],
        software_versions=__version__,
        device_serial_number=(model_sha256 or "none")[:16],
        content_label=CONTENT_LABEL,
        content_description=f"{task} by {model}"[:64],
        series_description=f"M4oE {task} segmentation"[:64],
    )

    def write(temporary: Path) -> None:
        seg.save_as(temporary, enforce_file_format=True)
        _check_written(temporary, seg, path)

    return write_atomic(path, write, overwrite)


def _segment(hd, number: int, label: Label, algorithm):
    """Segment ``number``'s description: the label's name, codes, colour and the algorithm."""
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label.name[:64],
        segmented_property_category=_coded(hd, label.category),
        segmented_property_type=_coded(hd, label.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*(255 * float(c) for c in label.color)),
    )
    if label.modifier is not None:  # laterality ("Right", "Left"): in the type's item, as the standard has it
        kind = description.SegmentedPropertyTypeCodeSequence[0]
        kind.SegmentedPropertyTypeModifierCodeSequence = [_coded(hd, label.modifier)]
    return description


def _coded(hd, code: Code):
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _check_written(temporary: Path, seg, path: Path) -> None:
    """Read the file back with pydicom: it must be the SEG just made, with all its frames' bits."""
    import pydicom

    try:
        ds = pydicom.dcmread(temporary)
        frames = int(ds.NumberOfFrames)
        expected = math.ceil(ds.Rows * ds.Columns * frames / 8)  # BINARY: one bit a pixel
        problems = []
        if ds.SOPInstanceUID != seg.SOPInstanceUID or ds.SOPClassUID != SEGMENTATION_STORAGE:
            problems.append("it is not the segmentation written")
        if frames != seg.NumberOfFrames or len(ds.PerFrameFunctionalGroupsSequence) != frames:
            problems.append(f"it has {frames} of {seg.NumberOfFrames} frames")
        if len(ds.PixelData) < expected:
            problems.append(f"it holds {len(ds.PixelData)} of the {expected} bytes of pixel data")
    except Exception as error:  # a truncated or corrupt file: pydicom's errors have no common base
        problems = [f"pydicom cannot read it back ({type(error).__name__}: {error})"]
    if problems:
        raise OutputError(f"cannot be written (incomplete file: {'; '.join(problems)})", path)


def _highdicom():
    """The highdicom module, or an :class:`InputError` saying how to install it."""
    try:
        import highdicom
    except ImportError:
        raise InputError(f"DICOM SEG output needs the highdicom package: {INSTALL_HINT}") from None
    return highdicom
