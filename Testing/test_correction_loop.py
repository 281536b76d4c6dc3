"""benchmarks/correction_loop.py: before/after figures of a fine-tune on corrected cases, and its verdict."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from m4oe.hub import resolve_model
from m4oe.phantom import PHANTOM_LABELS, write_dataset
from m4oe.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = resolve_model(None)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "correction_loop", ROOT / "benchmarks" / "correction_loop.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corrected(tmp_path_factory) -> Path:
    """One CT phantom case as an nnU-Net data set, the shape of an "Export for training" folder."""
    return write_dataset(tmp_path_factory.mktemp("corrected") / "ct", "ct", 1, 7, max_size=64)


def figures(corrected=0.70, real=(0.50, 0.40), phantoms=(0.84, 0.84, 0.83)) -> dict:
    return {
        "corrected": {"cases": {"mean_dice": corrected}},
        "real": {"ct_scan": real[0], "mr_scan": real[1]},
        "phantoms": dict(zip(("ct", "t1", "t2"), phantoms, strict=True)),
    }


def test_the_verdict_needs_a_gain_on_the_corrected_cases_and_no_held_out_fall_past_the_tolerance(bench):
    good = bench.compare(figures(), figures(corrected=0.75, real=(0.49, 0.39)), 0.02)
    assert good["improved"] and good["kept"] and good["passed"]
    assert good["worst_held_out_change"] == pytest.approx(-0.01)
    assert [row["kind"] for row in good["rows"]] == ["corrected"] + ["held-out"] * 5

    forgot = bench.compare(figures(), figures(corrected=0.75, phantoms=(0.84, 0.81, 0.83)), 0.02)
    assert forgot["improved"] and not forgot["kept"] and not forgot["passed"]
    assert forgot["worst_held_out_change"] == pytest.approx(-0.03)
    assert "held-out figures kept (worst change -0.030, allowed -0.02): NO" in bench.format_report(
        forgot, 0.02
    )

    no_gain = bench.compare(figures(), figures(), 0.02)
    assert not no_gain["improved"] and no_gain["kept"] and not no_gain["passed"]
    assert "corrected cases improved: NO" in bench.format_report(no_gain, 0.02)


def renumbered_copy(source: Path, target: Path) -> Path:
    """The data set with every structure under another label value (v -> 10 - v)."""
    shutil.copytree(source, target)
    meta = json.loads((target / "dataset.json").read_text())
    meta["labels"] = {name: (10 - value if value else 0) for name, value in meta["labels"].items()}
    (target / "dataset.json").write_text(json.dumps(meta))
    for path in (target / "labelsTr").glob("*.nii.gz"):
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        renumbered = sitk.GetImageFromArray(np.where(array > 0, 10 - array, 0).astype(np.uint8))
        renumbered.CopyInformation(image)
        sitk.WriteImage(renumbered, str(path), True)
    return target


def test_corrected_cases_are_matched_to_the_model_by_structure_not_by_label_value(bench, corrected, tmp_path):
    predictor = Predictor.from_pretrained(EMBEDDED, device="cpu", threads=1)
    natural = bench.score_corrected(predictor, corrected)
    renumbered = bench.score_corrected(predictor, renumbered_copy(corrected, tmp_path / "renumbered"))
    assert natural["modality"] == "ct" and natural["mean_dice"] > 0.6  # the embedded model finds the organs
    assert renumbered == natural
    (case,) = natural["cases"].values()
    assert set(case["dice"]) == set(PHANTOM_LABELS)  # all nine structures, by their keys


def test_check_fails_a_fine_tune_that_did_not_help_the_corrected_cases(bench, corrected, tmp_path, capsys):
    # The same model before and after: no gain on the corrected case, so --check exits 1.
    args = ["--after", str(EMBEDDED), "--corrected", str(corrected), "--phantoms", "0"]
    args += ["--real", str(tmp_path / "absent"), "--threads", "1", "--json", str(tmp_path / "out.json")]
    assert bench.main([*args, "--check"]) == 1
    out, err = capsys.readouterr()
    assert "corrected cases improved: NO" in out and "real scans left out" in err
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["before"]["corrected"] == written["after"]["corrected"] and not written["passed"]
    assert bench.main(args) == 0  # without --check the report is all


def test_a_data_set_sharing_no_structure_with_the_model_is_refused(bench, corrected, tmp_path, capsys):
    other = tmp_path / "lesions"
    shutil.copytree(corrected, other)
    meta = json.loads((other / "dataset.json").read_text())
    meta["labels"] = {("background" if v == 0 else f"lesion_{v}"): v for v in meta["labels"].values()}
    meta.pop("terminology", None)
    (other / "dataset.json").write_text(json.dumps(meta))
    args = ["--after", str(EMBEDDED), "--corrected", str(other), "--phantoms", "0"]
    assert bench.main([*args, "--real", str(tmp_path / "absent"), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "shares no structure" in err and "lesion_1" in err and str(other) in err
