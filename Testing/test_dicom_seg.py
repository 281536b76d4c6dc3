"""DICOM SEG output (issue #24 point 6): ``m4oe segment SERIES -o result.dcm`` or ``--dicom-seg``.

The sources are DICOM series written here with pydicom from a phantom (an oblique orientation, slices
stored head to feet, file names and instance numbers in random order), and the real CT series of
../shared/data with the UIDs its anonymisation blanked filled in. Every SEG is read back with
highdicom and compared, per source SOP instance and per segment, with the label map it was made from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

import m4oe  # noqa: E402
from m4oe import cli  # noqa: E402
from m4oe.dicom_seg import read_source_series, write_dicom_seg  # noqa: E402
from m4oe.errors import InputError, OutputError  # noqa: E402
from m4oe.io import LoadedImage, all_or_nothing, ijk_to_lps, read_image, write_image  # noqa: E402
from m4oe.phantom import generate_case, phantom_labels  # noqa: E402
from m4oe.terminology import TERMS  # noqa: E402

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
FAST = ["--threads", "1", "--tta", "1", "--progress", "json"]


def oblique_series(folder: Path, *, seed: int = 3, size: int = 24, thickness_mm=None):
    """Write a phantom CT as one file per slice; return (phantom HU image, its labels, {SOP UID: k}).

    The phantom's grid is rotated 20 degrees about the patient's z axis and its slice index k runs
    against the slice normal (row x column direction), so a reader sorts the files in the reverse of
    the phantom's k order; file names and instance numbers are shuffled. ``thickness_mm``: the gaps
    between slice positions (mm, len = slices - 1), to make an uneven series; default even.
    """
    image, labels = generate_case("ct", seed, max_size=size)
    angle = np.radians(20.0)
    along_row = np.array([np.cos(angle), np.sin(angle), 0.0])
    along_column = np.array([-np.sin(angle), np.cos(angle), 0.0])
    direction = np.column_stack([along_row, along_column, -np.cross(along_row, along_column)])
    for volume in (image, labels):
        volume.SetDirection(direction.flatten().tolist())
        volume.SetOrigin((-100.0, -80.0, 40.0))
    hu = sitk.GetArrayFromImage(image).round().astype(np.int16)  # (z, y, x)
    study, series, frame = (generate_uid() for _ in range(3))
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    instances = {}
    z_offsets = np.concatenate([[0.0], np.cumsum(thickness_mm)]) if thickness_mm is not None else None
    for k, number in enumerate(rng.permutation(hu.shape[0]) + 1):
        position = np.array(image.TransformIndexToPhysicalPoint((0, 0, k)))
        if z_offsets is not None:
            position = np.array(image.GetOrigin()) + direction[:, 2] * z_offsets[k]
        ds = _ct_slice(hu[k], image.GetSpacing(), along_row, along_column, position)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = int(number)
        ds.save_as(folder / f"{rng.integers(1 << 40):x}.dcm", enforce_file_format=True)
        instances[ds.SOPInstanceUID] = k
    return image, labels, instances


def generate_uid() -> str:
    return pydicom.uid.generate_uid()


def _ct_slice(pixels: np.ndarray, spacing, along_row, along_column, position) -> pydicom.Dataset:
    """A CT Image Storage dataset for one slice of int16 HU ``pixels`` (rows = y, columns = x)."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "PH-24", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A24"
    ds.ReferringPhysicianName, ds.SeriesNumber, ds.Manufacturer = "", 7, "m4oe tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*along_row, *along_column)]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # between rows, between columns
    ds.SliceThickness = f"{spacing[2]:.6f}"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def phantom_label_map(series: Path, labels_image: sitk.Image) -> tuple[LoadedImage, sitk.Image]:
    """The series read by the engine, and the phantom's labels on its grid (nearest neighbour, by ITK)."""
    loaded = read_image(series)
    on_grid = sitk.Resample(labels_image, loaded.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return loaded, on_grid


def engine_grid(image: sitk.Image):
    """The geometry of an engine image as highdicom's: array axes (k, j, i) = (z, y, x), LPS mm."""
    affine = ijk_to_lps(image)[:, [2, 1, 0, 3]]
    return hd.VolumeGeometry(affine, image.GetSize()[::-1], coordinate_system="PATIENT")


def seg_frames(seg, sop_uid: str, segment: int, shape) -> np.ndarray:
    """Segment ``segment``'s mask (rows, columns) on source instance ``sop_uid`` (zeros: no frame)."""
    found = [
        n
        for n, item in enumerate(seg.PerFrameFunctionalGroupsSequence)
        if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == segment
        and item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == sop_uid
    ]
    assert len(found) <= 1
    return seg.pixel_array[found[0]] if found else np.zeros(shape, np.uint8)


def test_seg_frames_equal_the_label_map_per_source_instance_and_segment(tmp_path):
    _, labels_image, instances = oblique_series(tmp_path / "series")
    loaded, label_map = phantom_label_map(tmp_path / "series", labels_image)
    values = sitk.GetArrayFromImage(label_map)
    values[values == 2] = 0  # the spleen is absent: no segment for it
    empty = sitk.GetImageFromArray(values)
    empty.CopyInformation(label_map)
    labels = phantom_labels()
    source = read_source_series(loaded)

    out = write_dicom_seg(empty, labels, source, tmp_path / "result.dcm", model="tiny", task="abdomen")

    seg = hd.seg.segread(out)
    first = pydicom.dcmread(loaded.dicom_files[0], stop_before_pixels=True)
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert (seg.StudyInstanceUID, seg.PatientID, seg.FrameOfReferenceUID) == (
        first.StudyInstanceUID,
        "PH-24",
        first.FrameOfReferenceUID,
    )
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == set(instances)
    present = [label for label in labels if label.value in np.unique(values)]
    assert 2 not in [label.value for label in present] and len(present) >= 5
    assert {label.name for label in present} >= {"right kidney", "left kidney"}  # laterality modifiers
    assert [d.SegmentLabel for d in seg.SegmentSequence] == [label.name for label in present]
    # Each file's frame is the phantom's slice written into that file, whatever the file order.
    phantom = sitk.GetArrayFromImage(labels_image)
    phantom[phantom == 2] = 0
    for number, label in enumerate(present, start=1):
        for sop_uid, k in instances.items():
            expected = phantom[k] == label.value
            np.testing.assert_array_equal(seg_frames(seg, sop_uid, number, expected.shape), expected)
    # The same through highdicom's own volume assembly, on the engine's label map (z, y, x).
    volume = seg.get_volume(combine_segments=True, relabel=False).match_geometry(
        engine_grid(label_map), tol=1e-3
    )
    segment_values = np.zeros(max(label.value for label in labels) + 1, np.int64)
    for number, label in enumerate(present, start=1):
        segment_values[label.value] = number
    np.testing.assert_array_equal(volume.array, segment_values[values])
    assert_segments_describe(seg, present, model="tiny", task="abdomen")


def assert_segments_describe(seg, present, *, model: str, task: str) -> None:
    """Every segment's codes are its structure's in TERMS (laterality included), its algorithm ours."""
    terms = {term.name: term for term in TERMS.values()}
    for number, (item, label) in enumerate(zip(seg.SegmentSequence, present, strict=True), start=1):
        term = terms[label.name]
        assert item.SegmentNumber == number
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == (term.category.value, "SCT")
        assert (kind.CodeValue, kind.CodeMeaning) == (term.type.value, term.type.meaning)
        modifiers = kind.get("SegmentedPropertyTypeModifierCodeSequence", [])
        assert [m.CodeValue for m in modifiers] == ([term.modifier.value] if term.modifier else [])
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (
            "M4oE Segmentation",
            m4oe.__version__,
        )
        assert f"model={model}" in algorithm.AlgorithmParameters
        assert f"task={task}" in algorithm.AlgorithmParameters


def test_source_slices_are_mapped_by_position_whatever_the_file_order(tmp_path):
    oblique_series(tmp_path / "series")
    loaded = read_image(tmp_path / "series")
    reversed_files = LoadedImage(**{**loaded.__dict__, "dicom_files": loaded.dicom_files[::-1]})
    in_order = [ds.SOPInstanceUID for ds in read_source_series(loaded).datasets]
    assert [ds.SOPInstanceUID for ds in read_source_series(reversed_files).datasets] == in_order
    positions = [
        loaded.image.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])
        for ds in read_source_series(reversed_files).datasets
    ]
    assert positions == [(0, 0, k) for k in range(loaded.image.GetSize()[2])]


def test_an_unevenly_spaced_series_is_refused_for_dicom_seg(tmp_path):
    gaps = [3.0] * 10 + [4.5] + [3.0] * 12  # one slice missing halfway: read onto an even grid
    oblique_series(tmp_path / "series", thickness_mm=gaps)
    loaded = read_image(tmp_path / "series")
    assert any("unevenly spaced" in warning for warning in loaded.warnings)
    with pytest.raises(InputError, match="not on one of its slices"):
        read_source_series(loaded)


def test_a_multi_frame_file_is_refused_for_dicom_seg(tmp_path):
    oblique_series(tmp_path / "series")
    loaded = read_image(tmp_path / "series")
    ds = pydicom.dcmread(loaded.dicom_files[3])
    ds.NumberOfFrames = 2
    ds.save_as(loaded.dicom_files[3])
    with pytest.raises(InputError, match=r"multi-frame \(enhanced\) DICOM image \(2 frames\)") as error:
        read_source_series(loaded)
    assert str(loaded.dicom_files[3]) in str(error.value)


def test_an_empty_result_writes_no_seg_and_takes_the_other_outputs_with_it(tmp_path):
    _, labels_image, _ = oblique_series(tmp_path / "series")
    loaded, label_map = phantom_label_map(tmp_path / "series", labels_image)
    nothing = sitk.Image(label_map.GetSize(), sitk.sitkUInt8)
    nothing.CopyInformation(label_map)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputError, match="no structure was found"), all_or_nothing():
        write_image(nothing, out / "labels.nii.gz")
        write_dicom_seg(
            nothing, phantom_labels(), read_source_series(loaded), out / "r.dcm", model="m", task="t"
        )
    assert list(out.iterdir()) == []


def test_the_seg_has_the_modules_a_dicom_seg_reader_needs(tmp_path):
    """What dcmqi (Slicer's reader) and a PACS look up, checked with pydicom on the file as written."""
    _, labels_image, instances = oblique_series(tmp_path / "series")
    loaded, label_map = phantom_label_map(tmp_path / "series", labels_image)
    path = write_dicom_seg(
        label_map, phantom_labels(), read_source_series(loaded), tmp_path / "r.dcm", model="m", task="t"
    )
    ds = pydicom.dcmread(path)
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    required = [
        # Patient, General Study, General Series, Segmentation Series, Frame of Reference
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
        "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "Modality",
        "SeriesInstanceUID", "SeriesNumber", "FrameOfReferenceUID", "PositionReferenceIndicator",
        # General and Enhanced General Equipment
        "Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions",
        # Image Pixel, Segmentation Image, Multi-frame, Multi-frame Dimension, Common Instance Reference
        "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
        "SamplesPerPixel", "PhotometricInterpretation", "PixelData", "ImageType", "InstanceNumber",
        "ContentLabel", "ContentDate", "ContentTime", "SegmentationType", "SegmentSequence",
        "NumberOfFrames", "DimensionOrganizationSequence", "DimensionIndexSequence",
        "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "ReferencedSeriesSequence",
        "LossyImageCompression",
    ]  # fmt: skip
    assert [name for name in required if name not in ds] == []
    assert (ds.Modality, ds.SegmentationType, ds.BitsAllocated, ds.LossyImageCompression) == (
        "SEG",
        "BINARY",
        1,
        "00",
    )
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert shared.PixelMeasuresSequence[0].PixelSpacing == pytest.approx(list(label_map.GetSpacing()[1::-1]))
    for item in ds.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID in instances
        assert source.ReferencedSOPClassUID == CT_IMAGE_STORAGE
        assert len(item.PlanePositionSequence[0].ImagePositionPatient) == 3
        assert item.FrameContentSequence[0].DimensionIndexValues
    assert len(ds.PixelData) == -(-ds.Rows * ds.Columns * ds.NumberOfFrames // 8)


# --- the command line ---------------------------------------------------------------------------


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run ``m4oe`` in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def done_record(out: str) -> dict:
    return next(r for r in map(json.loads, out.splitlines()) if r["stage"] == "done")


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(folder.rglob("*"))
    }


def test_segment_to_dcm_then_exists_then_overwrite(tmp_path, tiny_model_dir, capsys):
    oblique_series(tmp_path / "series")
    out = tmp_path / "out" / "result.dcm"
    out.parent.mkdir()
    argv = ["segment", tmp_path / "series", "-o", out, "--model", tiny_model_dir, *FAST]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    record = done_record(stdout)
    assert record["outputs"] == {"segmentation": str(out)}
    first = hd.seg.segread(out)
    named = [item.SegmentLabel for item in first.SegmentSequence]
    assert sorted(named + record["dicom_seg_left_out"]) == sorted(["liver", "spleen", "right kidney"])
    before = snapshot(tmp_path / "out")
    # An existing SEG is kept, refused before the model loads (an unknown model would exit 4).
    code, _, stderr = run_cli([*argv[:4], "--model", "no-such-model", *FAST], capsys)
    assert code == 3 and f"{out}: exists; pass --overwrite" in stderr
    assert snapshot(tmp_path / "out") == before
    code, stdout, stderr = run_cli([*argv, "--overwrite"], capsys)
    assert code == 0, stderr
    assert hd.seg.segread(out).SOPInstanceUID != first.SOPInstanceUID
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.dcm"]


@pytest.mark.parametrize("option", ["-o", "--dicom-seg"])
def test_a_non_dicom_input_is_refused_for_dicom_seg_before_the_model_loads(tmp_path, capsys, option):
    image, _ = generate_case("ct", 1, max_size=24)
    volume = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(volume))
    out = tmp_path / "out"
    out.mkdir()
    outputs = (
        ["-o", out / "r.dcm"] if option == "-o" else ["-o", out / "l.nii.gz", "--dicom-seg", out / "r.dcm"]
    )
    code, _, stderr = run_cli(["segment", volume, *outputs, "--model", "no-such-model", *FAST], capsys)
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (
        f"m4oe: error: {volume}: is not a DICOM series folder: a DICOM SEG output (.dcm) references the "
        "images it segments, so it needs a DICOM series as input; write a label map or .seg.nrrd instead"
    )
    assert list(out.iterdir()) == []


def test_a_dicom_seg_option_without_dcm_is_refused_before_anything_is_read(tmp_path, capsys):
    argv = ["segment", tmp_path / "absent", "-o", tmp_path / "l.nii.gz", "--dicom-seg", tmp_path / "r.nrrd"]
    code, _, stderr = run_cli(argv, capsys)
    assert code == 3
    assert stderr.strip() == f"m4oe: error: {tmp_path / 'r.nrrd'}: a DICOM SEG must be written as .dcm"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.realdata
def test_an_anonymised_series_without_uids_is_refused_before_the_model_loads(shared_data, tmp_path, capsys):
    out = tmp_path / "r.dcm"
    argv = ["segment", shared_data / "example_ct_dicom", "-o", out, "--model", "no-such-model", *FAST]
    code, _, stderr = run_cli(argv, capsys)
    assert code == 2
    line = stderr.strip().splitlines()[-1]
    assert "example_ct_dicom/CT." in line
    assert "has no StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, SOPClassUID (blank" in line
    assert not out.exists()


def real_series_with_uids(source: Path, folder: Path) -> dict[str, Path]:
    """The real CT series with the UIDs its anonymisation blanked filled in; {SOP UID: file}."""
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    files = {}
    for file in sorted(source.iterdir()):
        ds = pydicom.dcmread(file)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(folder / file.name)
        files[ds.SOPInstanceUID] = folder / file.name
    return files


@pytest.mark.realdata
@pytest.mark.slow
def test_real_ct_series_seg_beside_the_label_map_equals_it_voxel_for_voxel(
    shared_data, tmp_path, tiny_model_dir, capsys
):
    files = real_series_with_uids(shared_data / "example_ct_dicom", tmp_path / "series")
    labels_path, seg_path = tmp_path / "labels.nii.gz", tmp_path / "result.dcm"
    argv = ["segment", tmp_path / "series", "-o", labels_path, "--dicom-seg", seg_path]
    code, stdout, stderr = run_cli([*argv, "--model", tiny_model_dir, *FAST], capsys)
    assert code == 0, stderr
    record = done_record(stdout)
    assert record["outputs"] == {"segmentation": str(labels_path), "dicom_seg": str(seg_path)}
    label_map = sitk.ReadImage(str(labels_path))
    values = sitk.GetArrayFromImage(label_map)
    seg = hd.seg.segread(seg_path)
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == pydicom.dcmread(next(iter(files.values()))).SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == set(files)
    names = {item.SegmentNumber: item.SegmentLabel for item in seg.SegmentSequence}
    card = {"liver": 1, "spleen": 2, "right kidney": 3}
    assert sorted(names.values()) == sorted(n for n, v in card.items() if (values == v).any())
    assert set(record["dicom_seg_left_out"]) == set(card) - set(names.values())
    # Each source file's frame, found by its SOP Instance UID, is the label map's slice at its position.
    for sop_uid, file in files.items():
        position = [float(v) for v in pydicom.dcmread(file, stop_before_pixels=True).ImagePositionPatient]
        i, j, k = label_map.TransformPhysicalPointToIndex(position)
        assert (i, j) == (0, 0)
        for number, name in names.items():
            expected = values[k] == card[name]
            np.testing.assert_array_equal(seg_frames(seg, sop_uid, number, expected.shape), expected)
    assert_segments_describe(
        seg,
        [next(t for t in TERMS.values() if t.name == n) for n in names.values()],
        model="tiny-test-model",
        task="abdomen",
    )
