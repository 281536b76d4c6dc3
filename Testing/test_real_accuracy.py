"""The real-scan validation (m4oe_training.realval, benchmarks/real_accuracy.py) on ../shared/data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from m4oe.hub import resolve_model
from m4oe.model_card import ModelCard
from m4oe.phantom import PHANTOM_LABELS
from m4oe.predictor import Predictor
from m4oe.terminology import standard_label
from m4oe_training.realval import REAL_SCANS, benchmark, load_scan, organ_keys, record, score
from m4oe_training.totalsegmentator import TOTALSEGMENTATOR_IDS, lookup_table, map_labels

ROOT = Path(__file__).resolve().parents[1]
NAMES = {v: k for k, v in PHANTOM_LABELS.items()}


def test_totalsegmentator_ids_map_onto_the_project_organs():
    ids = np.array([0, 5, 1, 2, 3, 52, 63, 25, 26, 50, 6, 7, 99])
    assert map_labels(ids, "total").tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 7, 7, 8, 9, 0]
    mr = np.array([5, 1, 2, 3, 23, 24, 19, 6, 7, 52])
    assert map_labels(mr, "total_mr").tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert set(TOTALSEGMENTATOR_IDS["total"]) == set(PHANTOM_LABELS)
    assert lookup_table("total", {"liver": 3})[5] == 3 and lookup_table("total", {"liver": 3})[1] == 0
    with pytest.raises(ValueError, match="task must be one of"):
        lookup_table("total_v1")
    with pytest.raises(ValueError, match=r"ids must lie in 0\.\.255"):
        map_labels(np.array([300]), "total")


def physical_centroid(image: sitk.Image, value: int) -> np.ndarray:
    """Centre of the voxels of ``value`` in LPS mm."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(image) == value).mean(axis=0)[::-1]  # (x, y, z)
    return np.array(image.TransformContinuousIndexToPhysicalPoint(idx.tolist()))


@pytest.mark.realdata
def test_the_ct_reference_is_resampled_onto_the_dicom_grid_through_physical_space(shared_data):
    scan = REAL_SCANS[0]
    image, reference = load_scan(shared_data, scan)
    assert reference.GetSize() == image.GetSize() and reference.GetDirection() == image.GetDirection()
    raw = sitk.ReadImage(str(shared_data / scan.reference))
    raw_array = sitk.GetArrayViewFromImage(raw)
    # The stored file is flipped in y relative to the series: matched by index it would not line up.
    assert raw.GetDirection() != image.GetDirection() or raw.GetOrigin() != image.GetOrigin()
    voxel_ml = np.prod(image.GetSpacing()) / 1000
    raw_ml = np.prod(raw.GetSpacing()) / 1000
    for organ in ("liver", "spleen"):
        value = PHANTOM_LABELS[organ]
        ts_id = TOTALSEGMENTATOR_IDS["total"][organ][0]
        ml = (sitk.GetArrayViewFromImage(reference) == value).sum() * voxel_ml
        assert ml == pytest.approx((raw_array == ts_id).sum() * raw_ml, rel=0.03)
        ts_only = sitk.GetImageFromArray((raw_array == ts_id).astype(np.uint8))
        ts_only.CopyInformation(raw)
        shift = physical_centroid(reference, value) - physical_centroid(ts_only, 1)
        assert np.all(np.abs(shift) <= np.array(image.GetSpacing())), shift
    # The liver lies on the patient's right: negative x in LPS is the patient's right.
    liver = physical_centroid(reference, PHANTOM_LABELS["liver"])
    spleen = physical_centroid(reference, PHANTOM_LABELS["spleen"])
    assert liver[0] < spleen[0]


CT_ORGANS = {"liver", "spleen", "aorta", "inferior_vena_cava", "vertebrae", "stomach", "pancreas"}


@pytest.mark.realdata
def test_a_reference_scored_against_itself_is_perfect_and_an_empty_prediction_scores_zero(shared_data):
    for scan, organs in zip(REAL_SCANS, (CT_ORGANS, set(PHANTOM_LABELS)), strict=True):
        _, reference = load_scan(shared_data, scan)
        perfect = score(reference, reference, NAMES)
        assert set(perfect["organs"]) == organs, scan.name  # the 20 CT slices hold no kidney
        assert perfect["mean_dice"] == 1.0 and all(v == 0.0 for v in perfect["hd95_mm"].values())
    empty = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(reference)
    missed = score(empty, reference, NAMES)
    assert missed["mean_dice"] == 0.0 and missed["hd95_mm"]["liver"] is None


@pytest.mark.realdata
@pytest.mark.slow
def test_the_benchmark_scores_the_embedded_model_and_records_it_in_a_card(shared_data, tmp_path):
    predictor = Predictor.from_pretrained(None, device="cpu")
    results = benchmark(predictor, shared_data, test_time_passes=1)
    assert set(results) == {"example_ct_dicom", "example_mr_sm"}
    ct, mr = results["example_ct_dicom"], results["example_mr_sm"]
    assert set(ct["organs"]) == CT_ORGANS and set(mr["organs"]) == set(PHANTOM_LABELS)
    for entry in results.values():
        assert all(0.0 <= d <= 1.0 for d in entry["dice"].values())
        assert entry["mean_dice"] == pytest.approx(np.mean(list(entry["dice"].values())), abs=1e-3)
        assert sum(entry["gate_mean_weights"].values()) == pytest.approx(1.0, abs=1e-3)
    assert ct["gate_mean_weights"]["ct"] > 0.9  # the CT routes to the CT expert
    assert mr["gate_mean_weights"]["ct"] < 0.1  # the MRI to the MR experts
    assert ct["dice"]["liver"] > 0.8  # every model so far finds the liver on real CT

    folder = tmp_path / "model"
    shutil.copytree(resolve_model(None), folder)
    record(folder / "model.json", results, "test")
    card = ModelCard.read(folder / "model.json")
    assert card.metrics["real_validation"]["scans"] == json.loads(json.dumps(results))
    assert card.weights_sha256 == ModelCard.read(resolve_model(None) / "model.json").weights_sha256


def test_the_benchmark_command_refuses_a_missing_data_folder(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "real_accuracy.py"), "--data", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {tmp_path / 'none'}: real validation data folder not found"


def test_model_classes_are_matched_to_organs_by_their_codes_not_their_values():
    labels = [standard_label("kidney_left", 1), standard_label("kidney_right", 2), standard_label("liver", 5)]
    labels.append(standard_label("liver_tumor", 6))
    assert organ_keys(labels) == {1: "kidney_left", 2: "kidney_right", 5: "liver", 6: "liver_tumor"}


@pytest.mark.realdata
def test_the_reference_is_written_in_the_models_own_label_values(shared_data):
    scan = REAL_SCANS[1]
    _, default = load_scan(shared_data, scan)
    _, renumbered = load_scan(shared_data, scan, {"liver": 3, "kidney_right": 1})
    default, renumbered = sitk.GetArrayFromImage(default), sitk.GetArrayFromImage(renumbered)
    assert np.array_equal(renumbered == 3, default == PHANTOM_LABELS["liver"])
    assert np.array_equal(renumbered == 1, default == PHANTOM_LABELS["kidney_right"])
    assert set(np.unique(renumbered)) == {0, 1, 3}


def test_the_benchmark_command_records_only_into_a_model_folder_of_the_users(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "real_accuracy.py"), "--data", str(tmp_path), "--record"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--record needs --model FOLDER" in done.stderr


@pytest.mark.realdata
@pytest.mark.slow
def test_the_spacing_sweep_scores_each_spacing_and_the_cards_own_as_the_plain_run(shared_data, tmp_path):
    """Held-out datasets are swept too (they were silently left out before)."""
    from m4oe_training.mome import write_partial_phantoms

    dataset = write_partial_phantoms(tmp_path / "t1", "t1", 2, seed=5, structures=["liver", "spleen"])
    command = [sys.executable, str(ROOT / "benchmarks" / "real_accuracy.py"), "--data", str(shared_data)]
    common = ["--tta", "1", "--threads", "2", "--json", "--held-out", str(dataset), "--held-out-cases", "1"]
    plain = json.loads(subprocess.run([*command, *common], capture_output=True, text=True, check=True).stdout)
    done = subprocess.run([*command, *common, "--spacing-sweep", "3.5,4.5"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["card_spacing_mm"] == [3.5, 3.5]  # the embedded card's own spacing
    assert [row["spacing_mm"] for row in result["sweep"]] == [3.5, 4.5]
    at_card, wider = (row["scans"] for row in result["sweep"])
    assert list(at_card) == ["example_ct_dicom", "example_mr_sm", "t1 (1 held out)"]
    assert at_card == plain["scans"]  # the sweep's row at the card's spacing is the plain benchmark
    # The MRI's and the phantom's fields of view fit the input at both spacings, so 4.5 mm pixels
    # show them smaller.
    assert wider["example_mr_sm"]["dice"] != at_card["example_mr_sm"]["dice"]
    assert wider["t1 (1 held out)"]["dice"] != at_card["t1 (1 held out)"]["dice"]
    assert wider["t1 (1 held out)"]["organs"] == ["liver", "spleen"]


def test_the_spacing_sweep_is_refused_for_a_model_without_a_target_spacing(tiny_model_dir, tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "real_accuracy.py"), "--data", str(tmp_path)]
    done = subprocess.run(
        [*command, "--model", str(tiny_model_dir), "--spacing-sweep", "3.5"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "it has no target spacing to sweep" in done.stderr
    for bad in ("0", "3.5,x"):
        done = subprocess.run([*command, "--spacing-sweep", bad], capture_output=True, text=True)
        assert done.returncode == 2 and "--spacing-sweep" in done.stderr
    done = subprocess.run([*command, "--spacing-sweep", "4", "--record"], capture_output=True, text=True)
    assert done.returncode == 2 and "cannot go with --spacing-sweep" in done.stderr


@pytest.mark.realdata
def test_record_with_held_out_writes_both_into_the_model_folders_card(shared_data, tiny_model_dir, tmp_path):
    """``--record --held-out DATASET``: the two scans and the dataset's held-out case go into the
    card of ``--model``'s folder (not into the dataset folder), with the command that measured them."""
    from m4oe_training.mome import write_partial_phantoms

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    dataset = write_partial_phantoms(tmp_path / "t1", "t1", 2, seed=3, structures=["liver"], max_size=32)
    args = ["--model", str(model), "--data", str(shared_data), "--held-out", str(dataset)]
    args += ["--held-out-cases", "1", "--tta", "1", "--threads", "1", "--record"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "real_accuracy.py"), *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert not (dataset / "model.json").exists()
    metrics = ModelCard.read(model / "model.json").metrics
    assert set(metrics["real_validation"]["scans"]) == {"example_ct_dicom", "example_mr_sm"}
    (name,) = metrics["held_out_validation"]["datasets"]
    assert name == "t1 (1 held out)"
    assert metrics["held_out_validation"]["datasets"][name]["organs"] == ["liver"]
    assert metrics["held_out_validation"]["command"].endswith(" ".join(args))
