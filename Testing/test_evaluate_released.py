"""The released M4oE code's evaluation protocol beside ours (issue #26, point 2).

Constructed volumes where the two protocols differ in known ways: HD95 in mm on an anisotropic
grid against HD95 in voxels; an organ absent from both images (ours: left out; released: Dice 0,
HD95 0); an organ in the prediction only (ours: Dice 0; released: Dice 1, HD95 0); the nnU-Net
v1 resampling into a test grid.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from m4oe.cli import main as cli_main
from m4oe.evaluate import evaluate
from m4oe.evaluate_released import hd95_voxels, released_scores, resample_labels

SPACING_XYZ = (1.0, 1.0, 4.0)


def image(array: np.ndarray, spacing=SPACING_XYZ) -> sitk.Image:
    out = sitk.GetImageFromArray(array.astype(np.uint8))
    out.SetSpacing(spacing)
    return out


def shifted_boxes(shift_z: int = 2):
    """Label 1: a box, and in the prediction the same box shifted ``shift_z`` slices along z (4 mm
    slices); label 2: a box in the prediction only; label 3 in neither."""
    ref = np.zeros((20, 24, 24), np.uint8)
    ref[5:12, 6:18, 6:18] = 1
    pred = np.zeros_like(ref)
    pred[5 + shift_z : 12 + shift_z, 6:18, 6:18] = 1
    pred[15:18, 2:5, 2:5] = 2
    return pred, ref


def test_released_protocol_differs_from_native_as_documented():
    pred, ref = shifted_boxes()
    result = evaluate(image(pred), image(ref), labels=[1, 2, 3], protocol="released")
    native = {row["label"]: row for row in result["labels"]}
    released = {row["label"]: row for row in result["released"]["labels"]}

    # A 2-slice shift along z: 8 mm natively, 2 voxels in the released units.
    assert native[1]["hd95_mm"] == pytest.approx(8.0)
    assert released[1]["hd95_voxels"] == pytest.approx(2.0)
    assert native[1]["dice"] == pytest.approx(released[1]["dice"]) == pytest.approx(5 / 7)
    # Prediction only: Dice 0 here, Dice 1 and HD95 0 in the released code.
    assert native[2]["dice"] == 0.0 and native[2]["hd95_mm"] is None
    assert (released[2]["dice"], released[2]["hd95_voxels"]) == (1.0, 0.0)
    assert released[2]["case"] == "prediction only"
    # Absent from both: left out here, Dice 0 and HD95 0 counted in the released means.
    assert native[3]["dice"] is None and native[3]["status"] == "absent in both"
    assert (released[3]["dice"], released[3]["hd95_voxels"], released[3]["case"]) == (0.0, 0.0, "neither")
    assert result["mean_dice"] == pytest.approx((5 / 7 + 0.0) / 2)
    assert result["released"]["mean_dice"] == pytest.approx((5 / 7 + 1.0 + 0.0) / 3)
    assert result["released"]["mean_hd95_voxels"] == pytest.approx(2.0 / 3)
    assert result["mean_hd95_mm"] == pytest.approx(8.0)
    assert not result["released"]["resampled"]
    # The native block is what the native protocol returns.
    plain = evaluate(image(pred), image(ref), labels=[1, 2, 3])
    assert plain["labels"] == result["labels"] and "released" not in plain


def test_released_hd95_pools_both_directions_as_medpy_does():
    # Reference: one voxel; prediction: that voxel and a far one. Directed distances: from the
    # prediction's two surface voxels 0 and 10, from the reference's one 0. Pooled [0, 10, 0]:
    # the 95th percentile is 9.0, not max of the two directed 95th percentiles (9.5).
    ref = np.zeros((1, 1, 12), bool)
    ref[0, 0, 0] = True
    pred = ref.copy()
    pred[0, 0, 10] = True
    assert hd95_voxels(pred, ref) == pytest.approx(np.percentile([0.0, 10.0, 0.0], 95))


def test_test_grid_resampling_follows_nnunet_v1():
    # 4 mm slices to 2 mm: twice the slices; the coarse axis (4 > 3 x 1) by nearest neighbour.
    labels = np.zeros((5, 8, 8), np.uint8)
    labels[2, 2:6, 2:6] = 1
    out = resample_labels(labels, (4.0, 1.0, 1.0), (2.0, 1.0, 1.0), [1])
    assert out.shape == (10, 8, 8)
    np.testing.assert_array_equal(np.flatnonzero(out[:, 4, 4]), [4, 5])
    # In plane, linear then >= 0.5: a 4-pixel square halves to 2 pixels.
    half = resample_labels(labels, (4.0, 1.0, 1.0), (4.0, 2.0, 2.0), [1])
    assert half.shape == (5, 4, 4) and int((half[2] == 1).sum()) == 4
    # Scored in that grid: the 2-slice (8 mm) shift becomes 4 voxels of 2 mm.
    pred, ref = shifted_boxes()
    scores = released_scores(pred, ref, (4.0, 1.0, 1.0), [1], test_spacing_zyx=(2.0, 1.0, 1.0))
    assert scores["resampled"] and scores["test_shape"] == [40, 24, 24]
    assert scores["labels"][0]["hd95_voxels"] == pytest.approx(4.0)
    assert scores["test_spacing_mm"] == [1.0, 1.0, 2.0]


def test_cli_released_protocol_json_and_table(tmp_path, capsys):
    pred, ref = shifted_boxes()
    sitk.WriteImage(image(pred), str(tmp_path / "pred.nii.gz"))
    sitk.WriteImage(image(ref), str(tmp_path / "ref.nii.gz"))
    args = ["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"), "--labels", "1,2,3"]
    assert cli_main([*args, "--protocol", "released", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["protocol"] == "released"
    assert result["mean_hd95_mm"] == pytest.approx(8.0)
    assert result["released"]["mean_hd95_voxels"] == pytest.approx(2.0 / 3)
    assert cli_main([*args, "--protocol", "released", "--test-spacing", "1", "1", "2"]) == 0
    table = capsys.readouterr().out
    assert "native (this grid, mm) beside released" in table
    row = next(line for line in table.splitlines() if line.split()[:1] == ["1"] and "both" in line)
    assert row.split()[-2:] == ["4.00", "both"]  # HD95 in voxels of the 2 mm test grid
    assert "resampled as nnU-Net v1 does" in table
    assert cli_main([*args, "--test-spacing", "1", "1", "2"]) != 0
    assert "--test-spacing applies to --protocol released only" in capsys.readouterr().err


def test_real_accuracy_score_adds_released_columns():
    from m4oe_training.realval import format_table, score

    pred, ref = shifted_boxes()
    names = {1: "liver", 2: "spleen", 3: "pancreas"}
    native = score(image(pred), image(ref), names)
    both = score(image(pred), image(ref), names, protocol="released")
    assert {k: v for k, v in both.items() if not k.startswith("released_")} == native
    assert both["released_dice"] == {"liver": pytest.approx(0.7143, abs=1e-4), "spleen": 1.0, "pancreas": 0.0}
    assert both["released_hd95_voxels"]["liver"] == 2.0
    assert both["released_mean_dice"] == pytest.approx((5 / 7 + 1) / 3, abs=1e-4)
    entry = {"modality": "ct", **both, "gate_mean_weights": None, "routing_confidence": None}
    table = format_table({"scan": entry})
    assert "rel. HD95 vox" in table.splitlines()[0]
    assert any(line.split()[1:3] == ["pancreas", "-"] for line in table.splitlines())
