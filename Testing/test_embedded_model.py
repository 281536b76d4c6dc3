"""The embedded default model: present, small, self-describing, and segmenting as it did when shipped.

The end-to-end regression check compares a fresh segmentation of a held-out phantom (an anatomy
no training case used) with the label map stored in ``Testing/data`` when the model was embedded
(see Testing/data/README.md for the command). Voxel agreement allows for last-bit floating-point
differences between CPUs; the Dice against the phantom's ground truth must match the stored
figure.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from m4oe import onnx_runtime
from m4oe.checkpoint import load_checkpoint, read_model_card
from m4oe.evaluate import evaluate
from m4oe.hub import DEFAULT_MODEL, EMBEDDED_DIR, resolve_model
from m4oe.phantom import case_contrast, generate_case
from m4oe.predictor import Predictor
from m4oe_training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
EXPECTED = json.loads((DATA / "embedded_model_expected.json").read_text())
MAX_BYTES = 25 * 1000 * 1000


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_pretrained(None, device="cpu", threads=1)


def test_default_model_is_embedded_small_and_verified():
    folder = resolve_model(None)
    assert folder == EMBEDDED_DIR / DEFAULT_MODEL
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size <= MAX_BYTES, f"embedded model is {size / 1e6:.1f} MB, the limit is 25 MB"
    model, card = load_checkpoint(folder)  # verifies the card's SHA-256 of the weights
    assert card.weights_sha256
    assert model.cfg.is_moe and [e.modality for e in card.experts] == ["ct", "mr", "mr"]


def test_card_says_what_the_model_is_and_how_it_was_made():
    card = read_model_card(resolve_model(None))
    assert "synthetic" in card.notes and "not for clinical use" in card.notes
    # Made by a committed config, whose seed and (for a continued run) starting point it records.
    command = card.provenance["command"].split()
    assert command[:2] == ["m4oe", "train"]
    config, _ = load_config(ROOT / command[2])
    assert card.provenance["seed"] == config.seed
    if config.init:
        assert len(card.provenance["init_weights_sha256"]) == 64
    # Its clean-up is the config's (a fine-tune that leaves it unset inherits its init model's, the
    # previous embedded model's 3 mm), so validation measured what the engine does.
    expected_sigma = 3.0 if config.through_plane_sigma_mm is None else config.through_plane_sigma_mm
    assert config.init or config.through_plane_sigma_mm is not None
    assert card.task(None).through_plane_sigma_mm == expected_sigma
    merged = card.provenance.get("merged_experts")
    if merged:
        # Experts taken from other runs (m4oe merge-experts): each from a committed config's run,
        # whose data the card records; the base run's validation figures were dropped with its
        # experts, and the real scans below validate the model as merged.
        assert merged["command"].split()[:2] == ["m4oe", "merge-experts"]
        sources = {name: entry for name, entry in merged.items() if isinstance(entry, dict)}
        assert sources and set(sources) <= {expert.name for expert in card.experts}
        for entry in sources.values():
            assert len(entry["weights_sha256"]) == 64 and entry["run"]["data"]
            run_command = entry["run"]["command"].split()
            assert run_command[:2] == ["m4oe", "train"] and (ROOT / run_command[2]).is_file()
    else:
        # Data sets may be for training only (no validation cases); the run validated what it
        # trained (an MR-experts-only run: MR), and the real scans below validate every modality.
        validation = [v for v in card.metrics["validation"].values() if v["cases"]]
        assert validation and {v["modality"] for v in validation} <= {"ct", "mr"}
        for result in validation:
            assert set(result["dice"]) >= {"liver", "spleen", "kidney_right", "kidney_left"}
    labels = {lab.name for lab in card.task(None).labels}
    assert {"liver", "spleen", "pancreas"} <= labels
    # Its figures on the two real validation scans (benchmarks/real_accuracy.py --record) travel with it.
    real = card.metrics["real_validation"]["scans"]
    assert set(real) == {"example_ct_dicom", "example_mr_sm"}
    assert {scan["modality"] for scan in real.values()} == {"ct", "mr"}
    assert all(
        0.0 <= scan["mean_dice"] <= 1.0 and scan["dice"]["liver"] is not None for scan in real.values()
    )
    # And on the CHAOS MRIs and BTCV CTs its training held out (manual labels), recorded by the
    # same command: each scored on the organs its dataset labels, routed to its modality's experts.
    held = card.metrics["held_out_validation"]
    assert held["command"] == card.metrics["real_validation"]["command"]
    datasets = {entry["source"]["dataset"]: entry for entry in held["datasets"].values()}
    assert set(datasets) == {"CHAOS MR T2", "BTCV abdomen CT"}
    chaos, btcv = datasets["CHAOS MR T2"], datasets["BTCV abdomen CT"]
    assert chaos["source"]["license"] == "CC-BY-NC-SA-4.0" and chaos["modality"] == "mr"
    assert set(chaos["dice"]) == {"liver", "spleen", "kidney_right", "kidney_left"}
    assert chaos["gate_mean_weights"]["ct"] < 0.1
    assert btcv["modality"] == "ct" and btcv["gate_mean_weights"]["ct"] > 0.9
    organs = {"liver", "spleen", "kidney_right", "kidney_left", "aorta", "inferior_vena_cava", "stomach"}
    assert set(btcv["dice"]) == organs | {"pancreas"}  # BTCV does not label the vertebrae
    assert len(chaos["cases"]) == len(btcv["cases"]) == 4


OWN_EXPERT = {"ct": "ct", "t1": "mr-t1", "t2": "mr-t2"}


@pytest.mark.parametrize("sequence", ["ct", "t1", "t2"])
def test_held_out_phantom_matches_the_stored_segmentation(predictor, sequence):
    expected = EXPECTED[sequence]
    image, truth = generate_case(sequence, expected["seed"], max_size=expected["max_size"])
    prediction = predictor.predict(image, gates=True)
    labels = sitk.GetArrayFromImage(prediction.labelmap)
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / expected["file"])))
    assert labels.shape == stored.shape
    agreement = float(np.mean(labels == stored))
    assert agreement >= 0.999, f"only {agreement:.4%} of voxels agree with the stored output"
    score = evaluate(prediction.labelmap, truth, labels=list(range(1, 10)))["mean_dice"]
    assert score == pytest.approx(expected["mean_dice"], abs=0.01)
    assert prediction.modality.modality == ("ct" if sequence == "ct" else "mr")
    summary = prediction.gate_summary
    assert summary["overall"]["dominant_expert"] == expected["dominant_expert"]
    # The routing target of the embedded model: each modality mostly to its own expert.
    assert summary["overall"]["mean_weights"][OWN_EXPERT[sequence]] > 0.5, summary["overall"]["mean_weights"]


@pytest.mark.slow
@pytest.mark.skipif(bool(onnx_runtime.missing_packages()), reason="ONNX Runtime not installed")
def test_embedded_model_on_onnx_runtime_gives_the_stored_segmentations(tmp_path, monkeypatch):
    """The real model exported to ONNX (every block a mixture of 3 experts) segments as in PyTorch."""
    monkeypatch.setenv("M4OE_CACHE_DIR", str(tmp_path))
    predictor = Predictor.from_pretrained(None, device="cpu", threads=1, backend="onnx")
    for sequence in ("ct", "t1", "t2"):
        expected = EXPECTED[sequence]
        image, _ = generate_case(sequence, expected["seed"], max_size=expected["max_size"])
        prediction = predictor.predict(image, gates=True)
        assert prediction.backend == "onnx"
        labels = sitk.GetArrayFromImage(prediction.labelmap)
        stored = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / expected["file"])))
        assert float(np.mean(labels == stored)) >= 0.999
        weights = prediction.gate_summary["overall"]["mean_weights"]
        for name, value in expected["mean_weights"].items():
            assert weights[name] == pytest.approx(value, abs=1e-3), name


def test_phantom_accuracy_benchmark_scores_fresh_phantoms(tmp_path, capsys):
    # benchmarks/phantom_accuracy.py measures the model's targets; one small case per modality here.
    spec = importlib.util.spec_from_file_location(
        "phantom_accuracy", ROOT / "benchmarks" / "phantom_accuracy.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "accuracy.json"
    bench.main(["--cases", "1", "--max-size", "64", "--threads", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    for sequence, expert in (("ct", "ct"), ("t1", "mr-t1"), ("t2", "mr-t2")):
        row = result[sequence]
        assert len(row["organs"]) == 9 and all(0.0 <= d <= 1.0 for d in row["organs"].values())
        assert row["mean_dice"] == pytest.approx(row["case_mean_dice"][0])
        assert row["mean_dice"] > 0.4  # a working model, even on a coarse 64-voxel phantom
        assert row["own_expert"] == expert and row["mean_weights"][expert] > 0.5
        assert sum(row["mean_weights"].values()) == pytest.approx(1.0, abs=1e-3)
        assert row["case_contrast"] == [case_contrast(sequence, 20261201)]
        assert row["contrast_mean_dice"] == {row["case_contrast"][0]: row["mean_dice"]}
    printed = capsys.readouterr().out
    assert f"ct by contrast    {case_contrast('ct', 20261201)} " in printed
    assert result["test_time_passes"] == read_model_card(resolve_model(None)).task(None).test_time_passes
    assert "own-expert weight" in printed and "each modality mostly to its own expert: met" in printed
    assert "MR to the MR experts, mean weight >= 0.9: met" in printed
    assert bench.modality_weight({"ct": 0.05, "mr-t1": 0.6, "mr-t2": 0.35}, "t2") == pytest.approx(0.95)
    assert bench.modality_weight({"ct": 0.05, "mr-t1": 0.6, "mr-t2": 0.35}, "ct") == pytest.approx(0.05)
