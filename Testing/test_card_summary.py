"""Model facts a reviewer needs: the card's licence, intended use and training-data statement, and
``m4oe info`` as a readable page (the full card behind ``--json``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from m4oe import cli
from m4oe.card_summary import (
    NOT_STATED,
    held_out_validation_lines,
    human_duration,
    info_page,
    licence_text,
    real_validation_lines,
    training_data_text,
    weights_facts,
)
from m4oe.checkpoint import read_model_card
from m4oe.errors import ModelError
from m4oe.hub import resolve_model
from m4oe.model_card import ModelCard


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_embedded_card_states_licence_intended_use_and_training_data():
    card = read_model_card(resolve_model(None))
    # Its MR experts learnt from CHAOS (CC BY-NC-SA 4.0): the weights share that licence.
    assert card.license == "CC-BY-NC-SA-4.0"
    assert "not for clinical use" in card.intended_use
    # The data it was trained on, with their licences.
    assert "TotalSegmentator" in card.training_data and "CC-BY-4.0" in card.training_data
    assert "Apache-2.0" in card.training_data and "phantom" in card.training_data
    assert "CHAOS" in card.training_data and "CC BY-NC-SA 4.0" in card.training_data


def test_card_facts_round_trip_are_optional_and_checked(tiny_model_dir, tmp_path):
    card = read_model_card(tiny_model_dir)
    assert (card.license, card.intended_use, card.training_data) == ("", "", "")
    assert not {"license", "intended_use", "training_data"} & set(card.to_dict())  # older engines read it
    stated = dataclasses.replace(card, license="CC-BY-4.0", intended_use="tests", training_data="none")
    data = stated.to_dict()
    assert ModelCard.from_dict(data) == stated
    assert list(data)[-4:] == ["license", "intended_use", "training_data", "weights_sha256"]
    with pytest.raises(ModelError, match="model card key 'license' must be a string, got an integer"):
        ModelCard.from_dict(dict(data, license=2), tmp_path / "model.json")


def test_info_prints_a_readable_page_of_the_embedded_model(capsys):
    code, out, _ = run_cli(["info"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert len(out) < 5000, f"{len(out)} characters: a page, not the provenance dump"
    assert "phantomt1_000" not in out and "provenance" not in out
    assert lines[0].startswith("m4oe-phantom: M4oE abdominal model")
    assert "licence: CC-BY-NC-SA-4.0" in lines
    assert any(line.startswith("intended use: Research and demonstration") for line in lines)
    assert any(line.startswith("architecture: Swin-UNet 128px, M4oE, 3 experts") for line in lines)
    assert any("13.1 MB, 6.5 M parameters" in line for line in lines)
    (pre,) = [line for line in lines if line.startswith("preprocessing: ")]
    assert "3.5 x 3.5 mm" in pre and "CT: clip -732 to 837" in pre and "MR: percentiles 0.5 to 99.5" in pre
    (training,) = [line for line in lines if line.startswith("training data: ")]
    assert "CC-BY-4.0" in training and "CHAOS" in training
    # Its experts came from two runs, merged onto the previous embedded model: each run's data,
    # then the base run's.
    assert "Experts merged onto a base model (weights f19f364e2f16): ct from m4oe-phantom" in training
    assert "data/real/btcv 26 (CT); 5000 iterations" in training
    assert "mr-t1/mr-t2 from m4oe-phantom" in training and "data/real/chaos_t2 16 (MR)" in training
    assert "The base model: 4 datasets, 65 training cases" in training
    assert "4000 iterations of batch 8 in 39 min 22 s, continued from an earlier model." in training
    # The base run's phantom validation measured the base, and went with its experts.
    assert not any(line.startswith("  held-out") for line in lines)
    (btcv,) = [line for line in lines if line.startswith("  real held-out btcv (4 held out) (CT;")]
    assert "mean Dice 0.75" in btcv and "pancreas 0.63" in btcv
    (ct_scan,) = [line for line in lines if line.startswith("  real scan example_ct_dicom (CT)")]
    assert "mean Dice 0.66" in ct_scan and "liver 0.94" in ct_scan and "aorta 0.85" in ct_scan
    assert any(line.startswith("  real scan example_mr_sm (MR): mean Dice 0.49") for line in lines)
    # What those figures say to check closely, per modality (test_accuracy_warning.py has the rule).
    closely = lines.index("check closely on real scans:")
    # The held-out BTCV CTs measured the kidneys (0.86 / 0.88): nothing is left unmeasured on CT.
    assert (
        lines[closely + 1]
        == "  CT: Dice below 0.50 on a real scan: inferior vena cava 0.41/0.52, pancreas 0.13/0.63"
    )
    assert lines[closely + 2].startswith("  MR: Dice below 0.50 on a real scan: right kidney 0.37/0.67")
    assert "weights sha256: 36cce98136dcb9da0f8a93d077976207466d01f880b41dc090248b1395346284" in lines
    code, out, _ = run_cli(["info", "--json"], capsys)
    assert code == 0 and json.loads(out)["provenance"]["data"]["0:t1"]["train_cases"][0] == "phantomt1_000"


def test_info_of_a_card_that_states_nothing_says_so(tiny_model_dir, tmp_path, capsys):
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "bare"))
    card = json.loads((folder / "model.json").read_text())
    card["metrics"], card["provenance"] = {}, {}
    (folder / "model.json").write_text(json.dumps(card))
    code, out, _ = run_cli(["info", folder], capsys)
    assert code == 0
    for line in ("licence: not stated", "intended use: not stated", "validation: not stated"):
        assert line in out.splitlines()
    assert "training data: Training data not stated." in out.splitlines()


def test_summary_pieces():
    assert human_duration(4358.4) == "1 h 12 min" and human_duration(95) == "1 min 35 s"
    assert human_duration(7) == "7 s"
    assert licence_text({}) == NOT_STATED and licence_text({"license": "MIT"}) == "MIT"
    card = {
        "training_data": "Phantoms.",
        "provenance": {
            "data": {
                "0:ct": {"path": "a", "modality": "ct", "train_cases": ["x", "y"]},
                "1:ct": {"path": "a", "modality": "mr", "train_cases": ["x", "y"]},
                "2:t1": {"path": "b", "modality": "mr", "train_cases": ["z"]},
            },
            "config": {"iterations_per_epoch": 10, "batch_size": 4, "stages": [{"epochs": 2}, {"epochs": 3}]},
            "training_seconds": 61,
        },
        "metrics": {
            "real_validation": {
                "scans": {"s": {"modality": "mr", "dice": {"liver": 0.9, "spleen": None}, "mean_dice": 0.9}},
                "labels": "manual",
            }
        },
    }
    assert training_data_text(card) == (
        "Phantoms. 2 datasets, 3 training cases: a 2 (CT/MR), b 1 (MR). "
        "50 iterations of batch 4 in 1 min 01 s."
    )
    assert real_validation_lines(card) == [
        "s (MR): mean Dice 0.90, mean HD95 n/a mm; liver 0.90, spleen n/a",
        "reference labels: manual",
    ]
    assert info_page(dict(card, name="m", architecture={"img_size": 8, "in_chans": 1})).endswith("--json)")
    assert held_out_validation_lines(card) == []
    card["metrics"]["held_out_validation"] = {
        "datasets": {
            "chaos_t2 (4 held out)": {
                "modality": "mr",
                "source": {"dataset": "CHAOS MR T2", "license": "CC-BY-NC-SA-4.0"},
                "cases": ["36", "37", "38", "39"],
                "dice": {"liver": 0.631, "spleen": 0.745},
                "mean_dice": 0.688,
                "mean_hd95_mm": 68.4,
            }
        },
        "labels": "their own",
        "date": "2026-12-06",
    }
    assert held_out_validation_lines(card) == [
        "chaos_t2 (4 held out) (MR; CHAOS MR T2, CC-BY-NC-SA-4.0; 4 cases): mean Dice 0.69, "
        "mean HD95 68.4 mm; liver 0.63, spleen 0.74",
        "reference labels: their own (2026-12-06)",
    ]
    page = info_page(dict(card, name="m", architecture={"img_size": 8, "in_chans": 1}))
    assert "\n  real held-out chaos_t2 (4 held out) (MR; CHAOS MR T2" in page
    assert "\n  reference labels: their own (2026-12-06)\n" in page


def test_weights_facts_read_the_safetensors_header(tiny_model_dir):
    from safetensors.numpy import load_file

    weights = tiny_model_dir / "model.safetensors"
    count = sum(array.size for array in load_file(str(weights)).values())
    size = weights.stat().st_size
    assert weights_facts(weights) == f"{size / 1e6:.1f} MB, {count / 1e6:.1f} M parameters"


def test_a_fine_tuned_cards_lineage_is_told_in_one_sentence():
    def run(name, sha, path, iterations):
        data = {"0:x": {"path": path, "modality": "ct", "train_cases": ["a", "b"]}}
        return {"name": name, "weights_sha256": sha, "data": data, "iterations": iterations}

    config = {"iterations_per_epoch": 10, "batch_size": 4, "stages": [{"epochs": 3}]}
    card = {
        "training_data": "Corrections.",
        "provenance": {
            "config": config,
            "training_seconds": 75,
            "init_weights_sha256": "ab" * 32,
            "lineage": [
                run("tuned", "ab" * 32, "data/fixes", 600),
                run("base", "cd" * 32, "data/phantom", 4000),
            ],
        },
    }
    text = training_data_text(card)
    assert text.endswith(
        "30 iterations of batch 4 in 1 min 15 s, continued from tuned (weights abababababab), the last of "
        "2 earlier runs: 4600 iterations, data/fixes, data/phantom."
    )
    card["provenance"]["lineage"] = card["provenance"]["lineage"][:1]
    assert text_end(training_data_text(card)) == "tuned (weights abababababab): 600 iterations, data/fixes."
    del card["provenance"]["lineage"]  # a card written before lineages were recorded
    assert training_data_text(card).endswith("continued from an earlier model.")


def text_end(text: str) -> str:
    return text.split("continued from ")[1]
