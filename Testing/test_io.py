"""Reading volumes (formats and refusals) and writing images and .seg.nrrd files atomically."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from m4oe.errors import InputError, OutputError
from m4oe.io import (
    all_or_nothing,
    check_volume,
    image_geometry,
    read_image,
    same_geometry,
    write_atomic,
    write_image,
    write_segmentation,
)
from m4oe.labels import Code, Label

DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def volume(shape=(6, 7, 8), dtype=np.int16) -> sitk.Image:
    """A (z, y, x) = ``shape`` image with distinct voxel values and a CT-like flipped direction."""
    values = (np.arange(np.prod(shape)) - 100).reshape(shape).astype(dtype)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((177.9, -11.3, 94.3))
    image.SetDirection(DIRECTION)
    return image


def oblique_direction() -> tuple[float, ...]:
    angle = np.radians(20.0)
    c, s = np.cos(angle), np.sin(angle)
    return tuple(np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).flatten().tolist())


def assert_refused(path: Path, match: str) -> InputError:
    with pytest.raises(InputError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and "Traceback" not in message and ".cxx" not in message, message
    assert match in message, message
    assert info.value.exit_code == 2
    return info.value


# Reading.


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_read_each_file_format(tmp_path, extension):
    original = volume()
    path = tmp_path / f"ct{extension}"
    sitk.WriteImage(original, str(path), useCompression=True)
    loaded = read_image(path)
    assert loaded.image.GetPixelID() == sitk.sitkInt16
    assert loaded.pixel_type == "int16"
    assert loaded.dicom_modality is None
    assert loaded.path == path
    assert same_geometry(loaded.image, original)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded.image), sitk.GetArrayFromImage(original))


@pytest.mark.parametrize(
    "dtype, kept",
    [
        (np.int8, True),
        (np.uint8, True),
        (np.int16, True),
        (np.uint16, True),
        (np.float32, True),
        (np.int32, False),
        (np.uint32, False),
        (np.float64, False),
    ],
)
def test_read_keeps_types_float32_holds_exactly_and_casts_the_others(tmp_path, dtype, kept):
    """A 512x512x300 int16 CT stays 157 MB; types float32 cannot hold exactly are cast on reading."""
    values = (np.arange(6 * 7 * 8) * 3 - 100).reshape(6, 7, 8)
    if np.issubdtype(dtype, np.integer):
        values = np.clip(values, np.iinfo(dtype).min, np.iinfo(dtype).max)
    original = sitk.GetImageFromArray(values.astype(dtype))
    if not kept:  # a value float32 rounds, to show that the cast is done once, as before
        original.SetPixel(1, 2, 3, 16_777_217)
    path = tmp_path / "volume.nrrd"
    sitk.WriteImage(original, str(path))
    loaded = read_image(path)
    array = sitk.GetArrayViewFromImage(loaded.image)
    assert loaded.pixel_type == np.dtype(dtype).name
    assert array.dtype == (np.dtype(dtype) if kept else np.float32)
    expected = sitk.GetArrayViewFromImage(original)
    np.testing.assert_array_equal(array, expected if kept else expected.astype(np.float32))


def write_dicom_series(
    folder: Path,
    image: sitk.Image,
    modality: str,
    series_uid: str,
    *,
    names: list[str] | None = None,
    uid_per_file: bool = False,
) -> None:
    """Write a 3D int16 image as one DICOM file per slice, with the position tags a reader needs.

    ``names``: the file name of each slice (default ``<uid>_<k>.dcm``); ``uid_per_file``: give every
    file a SeriesInstanceUID of its own, as some anonymised releases do.
    """
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3]))
    for k in range(image.GetSize()[2]):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": modality,
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": f"{series_uid}.{k + 1}.1" if uid_per_file else series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / (names[k] if names else f"{series_uid}_{k:03d}.dcm")))
        writer.Execute(slice_)


def test_read_synthetic_dicom_series(tmp_path):
    original = volume(shape=(5, 9, 10))
    original.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    write_dicom_series(tmp_path / "series", original, "MR", "1.2.826.0.1.3680043.2.1125.7")
    loaded = read_image(tmp_path / "series")
    assert loaded.dicom_modality == "MR"
    assert loaded.warnings == []
    assert loaded.image.GetSize() == (10, 9, 5)
    assert same_geometry(loaded.image, original, tol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded.image), sitk.GetArrayFromImage(original))


def test_chosen_dicom_files_are_one_volume_whatever_their_series_uids(tmp_path):
    """``dicom_files``: files whose SeriesInstanceUIDs all differ (GDCM would see 5 one-file series)
    are read as one volume, stacked by position whatever their names' order; a file at the same
    position as another is refused, naming the folder."""
    original = volume(shape=(5, 9, 10))
    original.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    names = [f"IMG-{5 - k:03d}.dcm" for k in range(5)]  # name order runs against position
    folder = tmp_path / "series"
    write_dicom_series(
        folder, original, "MR", "1.2.826.0.1.3680043.2.1125.11", names=names, uid_per_file=True
    )
    files = sorted(folder.iterdir())
    loaded = read_image(folder, dicom_files=files)
    assert loaded.image.GetSize() == (10, 9, 5) and same_geometry(loaded.image, original, tol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded.image), sitk.GetArrayFromImage(original))
    assert loaded.dicom_files == [folder / name for name in names]
    shutil.copy(files[0], folder / "copy.dcm")
    with pytest.raises(InputError, match="two slices at the same position"):
        read_image(folder, dicom_files=sorted(folder.iterdir()))


def test_folder_with_two_series_reads_the_larger_and_warns(tmp_path):
    small, large = volume(shape=(3, 9, 10)), volume(shape=(6, 9, 10))
    write_dicom_series(tmp_path, small, "CT", "1.2.826.0.1.3680043.2.1125.8")
    write_dicom_series(tmp_path, large, "CT", "1.2.826.0.1.3680043.2.1125.9")
    loaded = read_image(tmp_path)
    assert loaded.image.GetSize() == (10, 9, 6)
    assert len(loaded.warnings) == 1
    assert "2 DICOM series" in loaded.warnings[0] and "1.2.826.0.1.3680043.2.1125.9" in loaded.warnings[0]


@pytest.mark.realdata
def test_read_real_dicom_series(shared_data):
    loaded = read_image(shared_data / "example_ct_dicom")
    assert loaded.dicom_modality == "CT"
    assert loaded.pixel_type == "int16"
    assert loaded.image.GetSize() == (512, 512, 20)
    assert loaded.image.GetSpacing() == pytest.approx((0.9765625, 0.9765625, 2.0))
    air = sitk.GetArrayViewFromImage(loaded.image).min()
    assert -1100 < air < -900, "HU rescale applied"


@pytest.mark.realdata
def test_single_real_dicom_file_is_refused_with_a_hint(shared_data):
    first = sorted((shared_data / "example_ct_dicom").iterdir())[0]
    assert_refused(first, "pass the folder")


# Refusals.


def test_refuses_a_missing_file(tmp_path):
    assert_refused(tmp_path / "absent.nii.gz", "no such file")


def test_refuses_a_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not a DICOM file")
    assert_refused(tmp_path, "no DICOM series")


def test_refuses_a_non_image_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert_refused(path, "not a supported image file")


def test_refuses_a_text_file_named_like_an_image(tmp_path):
    path = tmp_path / "fake.nii.gz"
    path.write_text("hello")
    assert_refused(path, "cannot be read")


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_refuses_a_truncated_file(tmp_path, extension):
    path = tmp_path / f"ct{extension}"
    noise = np.random.default_rng(0).normal(size=(20, 30, 30)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(noise), str(path), useCompression=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2000])
    assert_refused(path, "")


def test_refuses_a_nii_gz_whose_uncompressed_data_is_short(tmp_path):
    # A valid gzip stream around a truncated NIfTI: only the header's byte count shows it.
    plain = tmp_path / "ct.nii"
    sitk.WriteImage(volume(shape=(10, 10, 10)), str(plain))
    path = tmp_path / "ct.nii.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()[:-100]))
    assert_refused(path, "truncated")


def test_refuses_a_2d_image(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image([16, 16], sitk.sitkInt16), str(path))
    assert_refused(path, "2D image")


def test_refuses_a_4d_image(tmp_path):
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkInt16), str(path))
    assert_refused(path, "4D image")


def test_accepts_a_4d_image_with_one_frame(tmp_path):
    path = tmp_path / "one_frame.nrrd"
    frame = volume()
    sitk.WriteImage(sitk.JoinSeries([frame]), str(path))
    loaded = read_image(path)
    assert loaded.image.GetSize() == (8, 7, 6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded.image), sitk.GetArrayFromImage(frame))


def test_refuses_a_single_slice_volume(tmp_path):
    path = tmp_path / "one_slice.nii.gz"
    sitk.WriteImage(sitk.Image([16, 16, 1], sitk.sitkInt16), str(path))
    assert_refused(path, "single slice")


@pytest.mark.parametrize("extension", [".nrrd", ".mha"])
def test_refuses_a_vector_image(tmp_path, extension):
    path = tmp_path / f"rgb{extension}"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), str(path))
    assert_refused(path, "3 components")


def test_refuses_a_png(tmp_path):
    path = tmp_path / "photo.png"
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkUInt8), str(path))
    assert_refused(path, "not a supported image file")


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd"])
@pytest.mark.parametrize(
    ("bad", "dtype"), [(np.nan, np.float32), (np.inf, np.float64), (-np.inf, np.float32)]
)
def test_refuses_non_finite_voxels(tmp_path, extension, bad, dtype):
    # ITK's NIfTI reader turns NaN and infinities into 0 without a word: the check must not rely on it.
    values = np.zeros((4, 5, 6), dtype=dtype)
    values[1, 2, 3] = bad
    path = tmp_path / f"bad{extension}"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    assert_refused(path, "1 NaN or infinite")


def test_refuses_float64_beyond_float32_range(tmp_path):
    values = np.zeros((4, 5, 6), dtype=np.float64)
    values[0, 0, 0] = 1e300
    path = tmp_path / "huge.mha"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    assert_refused(path, "infinite")


def test_check_volume_refuses_a_constant_volume(tmp_path):
    path = tmp_path / "blank.nii.gz"
    constant = sitk.Image([8, 8, 8], sitk.sitkFloat32) - 1000
    with pytest.raises(InputError, match=r"blank\.nii\.gz: is empty: every voxel has the value -1000"):
        check_volume(constant, path)
    check_volume(volume(), path)


# Writing.


def test_write_image_refuses_an_existing_file_and_leaves_it_untouched(tmp_path):
    path = tmp_path / "out.nii.gz"
    path.write_bytes(b"precious")
    with pytest.raises(OutputError) as info:
        write_image(volume(), path)
    assert str(info.value) == f"{path}: exists; pass --overwrite to replace it"
    assert info.value.exit_code == 3
    assert path.read_bytes() == b"precious"
    assert sorted(tmp_path.iterdir()) == [path]

    write_image(volume(), path, overwrite=True)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(path))), sitk.GetArrayFromImage(volume())
    )


def test_write_image_refuses_a_missing_folder_and_a_path_under_a_file(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        write_image(volume(), tmp_path / "absent" / "out.nii.gz")
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    with pytest.raises(OutputError, match="does not exist"):
        write_image(volume(), regular / "out.nii.gz")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_write_image_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            write_image(volume(), folder / "out.nii.gz")
    finally:
        folder.chmod(0o700)


def test_write_image_refuses_an_unsupported_extension(tmp_path):
    with pytest.raises(OutputError, match="unsupported output type"):
        write_image(volume(), tmp_path / "out.mhd")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("maximum", "pixel_id"), [(117, sitk.sitkUInt8), (300, sitk.sitkUInt16)])
def test_write_image_narrows_label_maps(tmp_path, maximum, pixel_id):
    values = np.zeros((4, 5, 6), dtype=np.int64)
    values[1, 2, 3] = maximum
    labelmap = sitk.GetImageFromArray(values)
    path = write_image(labelmap, tmp_path / "labels.nrrd")
    written = sitk.ReadImage(str(path))
    assert written.GetPixelID() == pixel_id
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), values)


def test_write_image_keeps_signed_intensities_and_geometry(tmp_path):
    image = volume()
    image.SetDirection(oblique_direction())
    path = write_image(image, tmp_path / "ct.mha")
    written = sitk.ReadImage(str(path))
    assert written.GetPixelID() == sitk.sitkInt16
    assert image_geometry(written) == image_geometry(image)


@pytest.mark.parametrize("name", ["out.nii.gz", "out.seg.nrrd", "out.nrrd", "out.json"])
def test_write_atomic_temporary_name_keeps_the_extensions(tmp_path, name):
    seen: list[Path] = []

    image = sitk.Image([4, 3, 2], sitk.sitkUInt8)  # a real file of the format: write_atomic checks it

    def writer(temporary: Path) -> None:
        seen.append(temporary)
        if name.endswith(".json"):
            temporary.write_text("content")
        else:
            sitk.WriteImage(image, str(temporary), useCompression=True)

    write_atomic(tmp_path / name, writer)
    extension = name[name.index(".") :]
    assert seen[0].parent == tmp_path and seen[0].name.endswith(extension) and seen[0].name != name
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    if name.endswith(".json"):
        assert (tmp_path / name).read_text() == "content"
    else:
        assert sitk.ReadImage(str(tmp_path / name)).GetSize() == (4, 3, 2)


@pytest.mark.parametrize(
    "failure", [OSError(28, "No space left on device"), RuntimeError("ITK ERROR: broken")]
)
def test_write_atomic_turns_write_failures_into_output_errors_and_cleans_up(tmp_path, failure):
    def writer(temporary: Path) -> None:
        temporary.write_bytes(b"half")
        raise failure

    path = tmp_path / "out.nii.gz"
    with pytest.raises(OutputError, match=r"out\.nii\.gz: cannot be written"):
        write_atomic(path, writer)
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_cleans_up_after_any_exception_and_reraises_it(tmp_path):
    def writer(temporary: Path) -> None:
        temporary.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "out.seg.nrrd", writer)
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_refuses_a_folder_as_output(tmp_path):
    with pytest.raises(OutputError, match="is a folder"):
        write_atomic(tmp_path, lambda temporary: None, overwrite=True)


# Slicer segmentations.

ANATOMY = Code("SCT", "123037004", "Anatomical Structure")
LABELS = [
    Label(1, "spleen", (0.62, 0.36, 0.21), ANATOMY, Code("SCT", "78961009", "Spleen")),
    Label(2, "right kidney", (0.73, 0.41, 0.38), ANATOMY, Code("SCT", "64033007", "Kidney"),
          Code("SCT", "24028007", "Right")),
    Label(5, "liver", (0.87, 0.51, 0.39), ANATOMY, Code("SCT", "10200004", "Liver")),
    Label(6, "stomach", (0.85, 0.64, 0.54), ANATOMY, Code("SCT", "69695003", "Stomach")),
]  # fmt: skip


def labelmap_image() -> sitk.Image:
    """A (z, y, x) = (5, 6, 7) label map with labels 1, 2, 5 (stomach absent), oblique geometry."""
    values = np.zeros((5, 6, 7), dtype=np.uint8)
    values[1:3, 1:3, 1:3] = 1
    values[3, 4, 5] = 2
    values[4, :, 6] = 5
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7421875, 0.83, 2.5))
    image.SetOrigin((177.95632934570312, -11.319000244140625, 94.3017578125))
    image.SetDirection(oblique_direction())
    return image


def test_seg_nrrd_round_trip_with_slicerio_and_simpleitk(tmp_path):
    labelmap = labelmap_image()
    path = write_segmentation(labelmap, LABELS, tmp_path / "organs.seg.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["organs.seg.nrrd"]

    segmentation = slicerio.read_segmentation(str(path))
    segments = segmentation["segments"]
    assert [s["name"] for s in segments] == ["spleen", "right kidney", "liver", "stomach"]
    assert [s["labelValue"] for s in segments] == [1, 2, 5, 6]
    assert all(s["layer"] == 0 for s in segments)
    for segment, label in zip(segments, LABELS, strict=True):
        assert segment["color"] == pytest.approx(list(label.color))
        assert segment["terminology"]["type"] == [label.type.scheme, label.type.value, label.type.meaning]
        assert segment["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert segments[1]["terminology"]["typeModifier"] == ["SCT", "24028007", "Right"]
    assert not slicerio.segment_mask(segmentation, "stomach").any(), "absent label is an empty segment"
    np.testing.assert_array_equal(
        slicerio.segment_mask(segmentation, "liver"), sitk.GetArrayFromImage(labelmap).transpose(2, 1, 0) == 5
    )
    assert segmentation["masterRepresentation"] == "Binary labelmap"
    assert segmentation["containedRepresentationNames"] == ["Binary labelmap"]

    header = path.read_bytes().split(b"\n\n")[0].decode()
    for index, label in enumerate(LABELS):
        assert f"Segment{index}_Tags:=TerminologyEntry:{label.terminology_entry()}|" in header

    read_back = sitk.ReadImage(str(path))
    assert read_back.GetPixelID() == sitk.sitkUInt8
    # NRRD stores spacing times direction, so the last bit of spacing and direction may differ.
    assert same_geometry(read_back, labelmap, tol=1e-12)
    assert read_back.GetSize() == labelmap.GetSize() and read_back.GetOrigin() == labelmap.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_back), sitk.GetArrayFromImage(labelmap))


def test_seg_nrrd_reference_geometry_is_in_ras(tmp_path):
    labelmap = labelmap_image()
    labelmap.SetDirection(DIRECTION)
    path = write_segmentation(labelmap, LABELS, tmp_path / "organs.seg.nrrd")
    parameters = slicerio.read_segmentation(str(path), skip_voxels=True)["conversionParameters"]
    (geometry,) = [p["value"] for p in parameters if p["name"] == "Reference image geometry"]
    numbers = [float(v) for v in geometry.rstrip(";").split(";")]
    ijk_to_ras = np.array(numbers[:16]).reshape(4, 4)
    # LPS direction diag(-1, -1, 1) is RAS identity; the LPS origin's x and y change sign.
    np.testing.assert_allclose(ijk_to_ras[:3, :3], np.diag([0.7421875, 0.83, 2.5]))
    np.testing.assert_allclose(ijk_to_ras[:3, 3], [-177.95632934570312, 11.319000244140625, 94.3017578125])
    assert numbers[16:] == [0, 6, 0, 5, 0, 4]


def test_seg_nrrd_uses_uint16_for_large_label_values(tmp_path):
    values = np.zeros((3, 3, 3), dtype=np.int32)
    values[1, 1, 1] = 300
    labels = [Label(300, "lesion", (1.0, 0.0, 0.0), ANATOMY, Code("SCT", "52988006", "Lesion"))]
    path = write_segmentation(sitk.GetImageFromArray(values), labels, tmp_path / "big.seg.nrrd")
    assert slicerio.read_segmentation(str(path))["voxels"].dtype == np.uint16


def test_seg_nrrd_refusals(tmp_path):
    labelmap = labelmap_image()
    with pytest.raises(ValueError, match=r"values \[5\] that no label"):
        write_segmentation(labelmap, LABELS[:2], tmp_path / "a.seg.nrrd")
    with pytest.raises(OutputError, match=r"\.seg\.nrrd"):
        write_segmentation(labelmap, LABELS, tmp_path / "a.nrrd")
    existing = tmp_path / "b.seg.nrrd"
    existing.write_bytes(b"keep")
    with pytest.raises(OutputError, match="exists"):
        write_segmentation(labelmap, LABELS, existing)
    assert existing.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.seg.nrrd"]


def test_same_geometry():
    a, b = volume(), volume()
    assert same_geometry(a, b)
    b.SetOrigin((177.9 + 1e-7, -11.3, 94.3))
    assert same_geometry(a, b)
    b.SetOrigin((178.0, -11.3, 94.3))
    assert not same_geometry(a, b)
    assert not same_geometry(a, volume(shape=(6, 7, 9)))
    c = volume()
    c.SetDirection(oblique_direction())
    assert not same_geometry(a, c)
    assert image_geometry(a)["size"] == (8, 7, 6)


def text_writer(text: str):
    def writer(temporary: Path) -> None:
        temporary.write_text(text)

    return writer


def test_all_or_nothing_renames_every_file_at_the_end_of_the_block(tmp_path):
    (tmp_path / "b.json").write_text("old")
    with all_or_nothing():
        write_atomic(tmp_path / "a.json", text_writer("a"))
        with all_or_nothing():  # a nested block defers to the outer one
            write_atomic(tmp_path / "b.json", text_writer("b"), overwrite=True)
        assert not (tmp_path / "a.json").exists()  # nothing appears before the block ends
        assert (tmp_path / "b.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
    assert (tmp_path / "a.json").read_text() == "a" and (tmp_path / "b.json").read_text() == "b"
    write_atomic(tmp_path / "c.json", text_writer("c"))  # outside a block: written at once
    assert (tmp_path / "c.json").read_text() == "c"


def test_all_or_nothing_leaves_no_new_or_replaced_file_when_a_later_write_fails(tmp_path):
    (tmp_path / "old.txt").write_text("previous result")

    def full_disk(temporary: Path) -> None:
        temporary.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"last\.json: cannot be written \(No space left on device\)"):
        with all_or_nothing():
            write_atomic(tmp_path / "first.json", text_writer("1"))
            write_atomic(tmp_path / "old.txt", text_writer("new"), overwrite=True)
            write_atomic(tmp_path / "last.json", full_disk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
    assert (tmp_path / "old.txt").read_text() == "previous result"
