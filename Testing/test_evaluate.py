"""Dice and HD95 in millimetres: units, axis order, label renumbering, geometry, conventions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from m4oe.errors import InputError
from m4oe.evaluate import evaluate, format_table, geometry_mismatch, load_label_map

SPACING_XYZ = (1.0, 1.0, 2.0)


def label_image(array: np.ndarray, spacing=SPACING_XYZ, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    """A label map from an array in (z, y, x) order; spacing and origin in (x, y, z), mm."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def sphere(radius_mm=20.0, shape=(32, 64, 64), spacing=SPACING_XYZ) -> np.ndarray:
    """A ball that is round in millimetres on an anisotropic grid, (z, y, x), uint8."""
    z, y, x = np.indices(shape, dtype=np.float64)
    centre = [n / 2 for n in shape]
    sx, sy, sz = spacing
    distance2 = ((z - centre[0]) * sz) ** 2 + ((y - centre[1]) * sy) ** 2 + ((x - centre[2]) * sx) ** 2
    return (distance2 <= radius_mm**2).astype(np.uint8)


def row(result, label):
    return next(r for r in result["labels"] if r["label"] == label)


def test_identical_masks():
    ball = sphere()
    ball[ball == 1] = 3
    result = evaluate(label_image(ball), label_image(ball))
    assert [r["label"] for r in result["labels"]] == [3]
    assert row(result, 3)["dice"] == pytest.approx(1.0)
    assert row(result, 3)["hd95_mm"] == pytest.approx(0.0)
    assert result["mean_dice"] == pytest.approx(1.0) and result["resampled"] is False
    voxels = int((ball == 3).sum())
    assert row(result, 3)["pred_voxels"] == voxels
    assert row(result, 3)["ref_ml"] == pytest.approx(voxels * 2.0 / 1000)


@pytest.mark.parametrize(("axis", "expected_mm"), [(0, 6.0), (2, 3.0)])
def test_box_shift_gives_hd95_in_mm_along_the_right_axis(axis, expected_mm):
    # z voxels are 2 mm and x voxels 1 mm: a 3-voxel shift of a flat-faced box is exactly 6 mm
    # along z and 3 mm along x. Spacing passed in (x, y, z) order to (z, y, x) arrays swaps these.
    box = np.zeros((32, 64, 64), np.uint8)
    box[8:20, 20:44, 20:44] = 1
    result = evaluate(label_image(np.roll(box, 3, axis=axis)), label_image(box))
    assert row(result, 1)["hd95_mm"] == pytest.approx(expected_mm, abs=1e-4)
    assert 0 < row(result, 1)["dice"] < 1


@pytest.mark.parametrize(("axis", "low", "high"), [(0, 5.4, 6.0), (2, 2.5, 3.0)])
def test_sphere_shift_hd95(axis, low, high):
    # For a round sphere shifted by d, surface distances are about d*|cos(theta)|: HD95 is a
    # little under d (6 mm along z at 2 mm, 3 mm along x at 1 mm).
    ball = sphere()
    result = evaluate(label_image(np.roll(ball, 3, axis=axis)), label_image(ball))
    assert low <= row(result, 1)["hd95_mm"] <= high + 1e-4


def test_label_map_renumbers_prediction():
    ref = np.zeros((8, 16, 16), np.uint8)
    ref[2:6, 2:8, 2:8] = 5
    ref[2:6, 10:14, 10:14] = 2
    pred = np.zeros_like(ref)
    pred[ref == 5] = 7
    pred[2:6, 10:14, 10:12] = 3
    pred[2:6, 10:14, 12:14] = 4
    pred[0, 0, 0] = 9
    result = evaluate(label_image(pred), label_image(ref), label_map={7: 5, 3: 2, 4: 2})
    assert [r["label"] for r in result["labels"]] == [2, 5]
    assert row(result, 5)["dice"] == pytest.approx(1.0)
    assert row(result, 2)["dice"] == pytest.approx(1.0)
    assert any("[9]" in note for note in result["notes"])
    ref[0, 15, 15] = 8
    only_mapped = evaluate(label_image(pred), label_image(ref), label_map={7: 5})
    assert [r["label"] for r in only_mapped["labels"]] == [5]
    unmapped = evaluate(label_image(pred), label_image(ref))
    assert row(unmapped, 5)["status"] == "missing in prediction"
    with pytest.raises(InputError, match="-1"):
        evaluate(label_image(pred), label_image(ref), label_map={7: -1})


def test_absent_labels_conventions():
    ref = np.zeros((6, 12, 12), np.uint8)
    ref[1:4, 1:5, 1:5] = 1
    ref[1:4, 6:10, 6:10] = 2
    pred = np.zeros_like(ref)
    pred[1:4, 1:5, 1:5] = 1
    pred[4:6, 0:2, 0:2] = 3
    result = evaluate(label_image(pred), label_image(ref), labels=[1, 2, 3, 4])
    assert (row(result, 2)["dice"], row(result, 2)["hd95_mm"], row(result, 2)["status"]) == (
        0.0,
        None,
        "missing in prediction",
    )
    assert (row(result, 3)["dice"], row(result, 3)["status"]) == (0.0, "absent from reference")
    assert (row(result, 4)["dice"], row(result, 4)["status"]) == (None, "absent in both")
    assert result["mean_dice"] == pytest.approx(1 / 3)
    assert result["mean_hd95_mm"] == pytest.approx(0.0)
    assert result["labels_missing_in_one"] == 2
    json.dumps(result)
    table = format_table(result)
    assert "missing in prediction" in table and "mean" in table and table.count("\n") == 5


def test_flipped_and_moved_grid_is_resampled():
    # The same mask stored with a flipped y axis and the origin moved to match: equal in space,
    # different in arrays, as example_seg_dicom.nii.gz is relative to its DICOM series.
    mask = np.zeros((10, 20, 24), np.uint8)
    mask[2:7, 3:9, 4:15] = 1
    mask[3:8, 12:18, 6:20] = 2
    pred = label_image(mask, origin=(5.0, -7.0, 11.0))
    flipped = label_image(mask[:, ::-1, :], origin=(5.0, -7.0 + 19 * SPACING_XYZ[1], 11.0))
    flipped.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert geometry_mismatch(pred, flipped)
    result = evaluate(pred, flipped)
    assert result["resampled"] is True and "nearest neighbour" in result["notes"][0]
    assert [r["dice"] for r in result["labels"]] == pytest.approx([1.0, 1.0])


def test_geometry_within_tolerance_is_not_resampled():
    mask = np.ones((2, 3, 4), np.uint8)
    result = evaluate(label_image(mask), label_image(mask, origin=(1e-5, 0.0, 0.0)))
    assert result["resampled"] is False


def test_bad_inputs_name_the_file():
    mask = np.ones((2, 3, 4), np.uint8)
    far = label_image(mask, origin=(1000.0, 0.0, 0.0))
    with pytest.raises(InputError, match=r"ref\.nii\.gz: does not overlap"):
        evaluate(label_image(mask), far, pred_path="pred.nii.gz", ref_path="ref.nii.gz")
    fractional = label_image(np.full((2, 3, 4), 0.5, np.float32))
    with pytest.raises(InputError, match=r"pred\.nrrd: is not a label map"):
        evaluate(fractional, label_image(mask), pred_path="pred.nrrd")
    whole_floats = label_image(mask.astype(np.float32))
    assert evaluate(whole_floats, label_image(mask))["mean_dice"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="label 0"):
        evaluate(label_image(mask), label_image(mask), labels=[0])


def test_load_label_map_json_and_csv(tmp_path):
    as_json = tmp_path / "map.json"
    as_json.write_text(json.dumps({"5": 6, "1": 1}))
    assert load_label_map(as_json) == {5: 6, 1: 1}
    as_csv = tmp_path / "map.csv"
    as_csv.write_text("pred_value,ref_value\n# liver\n5,6\n\n1, 1\n")
    assert load_label_map(as_csv) == {5: 6, 1: 1}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("map.json", "{not json", "not valid JSON"),
        ("map.json", "[1, 2]", "JSON object"),
        ("map.json", '{"liver": 5}', "'liver'"),
        ("map.json", '{"5": 2.5}', "2.5"),
        ("map.json", '{"0": 5}', "label 0"),
        ("map.csv", "5,6\n5,7\n", "listed twice"),
        ("map.csv", "5,6,7\n", "two columns"),
        ("map.txt", "5 6\n", ".json or .csv"),
    ],
)
def test_load_label_map_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=message) as error:
        load_label_map(path)
    assert str(path) in str(error.value)
    with pytest.raises(InputError, match="not found"):
        load_label_map(tmp_path / "missing.json")


@pytest.mark.realdata
def test_real_segmentation_against_itself(shared_data):
    seg = sitk.ReadImage(str(shared_data / "example_seg.nii.gz"))
    result = evaluate(seg, seg)
    assert len(result["labels"]) == 41
    assert all(r["dice"] == pytest.approx(1.0) and r["hd95_mm"] == 0.0 for r in result["labels"])


@pytest.mark.realdata
def test_real_dicom_segmentation_lines_up_through_directions(shared_data):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(shared_data / "example_ct_dicom")))
    ct = reader.Execute()
    seg = sitk.ReadImage(str(shared_data / "example_seg_dicom.nii.gz"))
    # A "prediction" on the DICOM grid: the stored array flipped back along y, CT geometry.
    pred = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(seg)[:, ::-1, :]))
    pred.CopyInformation(ct)
    result = evaluate(pred, seg, labels=[1, 5, 52], ref_path="example_seg_dicom.nii.gz")
    assert result["resampled"] is True
    assert [r["dice"] for r in result["labels"]] == pytest.approx([1.0, 1.0, 1.0])
    assert row(result, 5)["ref_ml"] > 100
