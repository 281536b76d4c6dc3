"""The scan check (m4oe.ood): its rule on label maps, on real and non-abdominal scans with the
embedded model, and the warning in every place a user reads it (CLI, JSON progress,
gate_summary.json, the report). The Slicer panel's side is in Testing/slicer/test_segmenter.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from m4oe.errors import InputError
from m4oe.ood import check_scan
from m4oe.terminology import standard_label

ROOT = Path(__file__).resolve().parents[1]

ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "vertebrae")
LABELS = [standard_label(key, n + 1) for n, key in enumerate(ORGANS)]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("ood_benchmark", ROOT / "benchmarks" / "ood.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def abdomen_labels() -> np.ndarray:
    """A (Z, Y, X) axial stack at 4 mm voxels, laid out as an abdomen is: liver on the patient's
    right (low columns) and high, spleen on the left, kidneys lower and posterior, a vertebral
    column through every slice in the midline at the back."""
    a = np.zeros((40, 64, 64), np.uint8)
    a[20:40, 10:40, 4:28] = 1  # liver: 20 x 30 x 24 voxels = 921.6 mL
    a[24:36, 26:40, 44:56] = 2  # spleen: 129 mL
    a[8:24, 40:50, 12:20] = 3  # right kidney
    a[10:26, 40:50, 42:50] = 4  # left kidney
    a[:, 44:52, 28:36] = 5  # vertebrae
    return a


SPACING = (4.0, 4.0, 4.0)


def test_an_abdomen_passes_and_its_statistics_are_measured():
    check = check_scan(abdomen_labels(), SPACING, LABELS)
    assert check.reasons == () and check.warning is None
    stats = check.statistics
    assert stats["organ_ml"]["liver"] == pytest.approx(20 * 30 * 24 * 0.064)
    assert stats["largest_solid_organ_ml"] == stats["organ_ml"]["liver"]
    # Liver columns 4-27 (centre 15.5), vertebrae 28-35 (centre 31.5): 16 columns of 4 mm.
    assert stats["liver_right_of_spine_mm"] == pytest.approx(64.0)
    # Liver slices 20-39 (centre 29.5), kidneys 8-23 and 10-25 (centres 15.5, 17.5).
    assert stats["liver_above_kidneys_mm"] == pytest.approx(4 * (29.5 - 16.5))
    assert stats["spleen_to_liver_volume"] == pytest.approx(12 * 14 * 12 / (20 * 30 * 24), abs=1e-3)


def test_each_check_fails_on_what_it_is_for():
    empty = check_scan(np.zeros((10, 32, 32), np.uint8), SPACING, LABELS)
    assert len(empty.reasons) == 2
    assert "no liver or spleen or kidney of 50 mL or more" in empty.reasons[0]
    assert "no vertebrae" in empty.reasons[1]
    assert empty.warning.startswith("the scan may not be one the model knows")

    flipped = check_scan(abdomen_labels()[:, :, ::-1], SPACING, LABELS)
    assert len(flipped.reasons) == 1 and "not on the patient's right" in flipped.reasons[0]
    assert flipped.statistics["liver_right_of_spine_mm"] == pytest.approx(-64.0)

    upside_down = check_scan(abdomen_labels()[::-1], SPACING, LABELS)
    assert len(upside_down.reasons) == 1 and "below the kidneys" in upside_down.reasons[0]

    swapped = abdomen_labels()
    liver, spleen = swapped == 1, swapped == 2
    swapped[liver], swapped[spleen] = 2, 1  # a large "spleen", a small "liver"
    reasons = check_scan(swapped, SPACING, LABELS).reasons
    assert any("spleen (922 mL) is larger than the liver (129 mL)" in r for r in reasons)


def test_organs_are_found_by_their_codes_and_other_tasks_are_not_checked():
    # The same anatomy under other values and names: the codes say which organ is which.
    renumbered = [
        dataclasses.replace(standard_label(key, value), name=f"organ {value}")
        for key, value in zip(ORGANS, (7, 3, 9, 2, 5), strict=True)
    ]
    remap = np.zeros(6, np.uint8)
    remap[[1, 2, 3, 4, 5]] = [7, 3, 9, 2, 5]
    check = check_scan(remap[abdomen_labels()], SPACING, renumbered)
    assert check.reasons == () and check.statistics["organ_ml"]["liver"] == pytest.approx(921.6)
    assert check_scan(abdomen_labels(), SPACING, [standard_label("pancreas", 1)]) is None


# --- the embedded model on real and non-abdominal scans ------------------------------------------


@pytest.fixture(scope="module")
def predictor():
    from m4oe.predictor import Predictor

    return Predictor.from_pretrained(None, device="cpu", threads=1)


def pelvis(shared_data) -> sitk.Image:
    """The lowest 20 slices of example_ct: pelvis and hips, no abdominal organ."""
    return sitk.ReadImage(str(shared_data / "example_ct.nii.gz"))[:, :, :20]


@pytest.mark.parametrize("name", ["example_ct_sm.nii.gz", "example_ct_dicom", "example_mr_sm.nii.gz"])
def test_no_warning_on_real_abdominal_scans(predictor, shared_data, name):
    from m4oe.io import read_image

    loaded = read_image(shared_data / name)
    prediction = predictor.predict(loaded.image, dicom_modality=loaded.dicom_modality, test_time_passes=1)
    assert prediction.scan_check is not None and prediction.scan_check.warning is None
    assert "scan" not in prediction.warnings


def test_chosen_structures_and_regions_do_not_raise_false_warnings(predictor, shared_data):
    # The check reads every class of the task, cleaned up as for the whole task, also when only the
    # liver is kept; a user's region (here, one slab of the upper abdomen) is not checked at all.
    from m4oe.region import VoxelBox

    image = sitk.ReadImage(str(shared_data / "example_ct_sm.nii.gz"))
    whole = predictor.predict(image, test_time_passes=1)
    liver = predictor.predict(image, test_time_passes=1, structures=["liver"])
    assert [label.name for label in liver.labels] == ["liver"]
    assert liver.scan_check.warning is None and "scan" not in liver.warnings
    assert liver.scan_check.to_dict() == whole.scan_check.to_dict()
    slab = VoxelBox((0, 0, 10), (image.GetWidth(), image.GetHeight(), 14))
    part = predictor.predict(image, test_time_passes=1, roi=slab)
    assert part.scan_check is None and "scan" not in part.warnings
    # the pelvis is still warned about when one structure is asked for
    assert "scan" in predictor.predict(pelvis(shared_data), test_time_passes=1, structures=["liver"]).warnings


def test_warning_on_pelvis_noise_and_head(predictor, shared_data):
    bench = load_benchmark()
    noise = bench.volume(np.random.default_rng(0).normal(0, 200, (30, 120, 120)))
    for image in (pelvis(shared_data), noise, bench.head_phantom("ct"), bench.head_phantom("mr")):
        prediction = predictor.predict(image, test_time_passes=1)
        assert prediction.warnings["scan"] == prediction.scan_check.warning
        assert prediction.warning.startswith("the scan may not be one the model knows")
    with pytest.raises(InputError, match="is empty"):  # a constant volume never reaches the model
        predictor.predict(bench.volume(np.zeros((30, 120, 120))))


def test_warning_reaches_stderr_json_progress_gate_summary_and_report(shared_data, tmp_path, capsys):
    from m4oe.cli import main

    source = tmp_path / "pelvis.nii.gz"
    sitk.WriteImage(pelvis(shared_data), str(source))
    common = [source, "--threads", "1", "--tta", "1", "--device", "cpu"]
    gates = tmp_path / "gates"
    json_run = ["-o", tmp_path / "a.nii.gz", "--gates", gates, "--progress", "json"]
    assert main(["segment", *common, *json_run]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    done = records[-1]
    assert done["stage"] == "done"
    scan = done["warnings"]["scan"]
    assert scan.startswith("the scan may not be one the model knows") and "no vertebrae" in scan
    assert scan in done["warning"] and done["scan_check"]["warning"] == scan
    assert done["scan_check"]["statistics"]["largest_solid_organ_ml"] < 50
    summary = json.loads((gates / "gate_summary.json").read_text())
    assert summary["warnings"]["scan"] == scan and scan in summary["warning"]
    assert summary["scan_check"]["reasons"] == done["scan_check"]["reasons"]

    assert main(["segment", *common, "-o", tmp_path / "b.nii.gz", "--report", tmp_path / "r.png"]) == 0
    err = capsys.readouterr().err
    assert f"WARNING: {scan}" in err.splitlines()
    assert (tmp_path / "r.png").is_file()


def test_report_shows_the_scan_warning(predictor, shared_data):
    from m4oe.report import render_report

    image = pelvis(shared_data)
    prediction = predictor.predict(image, test_time_passes=1)
    figure = render_report(image, prediction)
    lines = [t.get_text() for t in figure.texts if t.get_color() == "#c00000"]
    assert lines and lines[0].startswith("\u26a0 the scan may not be one the model knows")


def test_routing_and_scan_warnings_combine(tmp_path, capsys):
    """The MR head phantom segmented as CT: the gate disagrees with the modality and the labels
    show no abdomen. Both warnings are kept, in the CLI and in gate_summary.json, in that order."""
    from m4oe.cli import main

    source = tmp_path / "head.nii.gz"
    sitk.WriteImage(load_benchmark().head_phantom("mr"), str(source))
    gates = tmp_path / "gates"
    args = ["segment", source, "-o", tmp_path / "s.nii.gz", "--modality", "ct", "--gates", gates]
    assert main([*args, "--threads", "1", "--tta", "1", "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING: ")]
    summary = json.loads((gates / "gate_summary.json").read_text())
    # The embedded card's real CT figures add the accuracy warning to any CT run (test_accuracy_warning.py).
    assert list(summary["warnings"]) == ["routing", "scan", "accuracy"]
    assert lines == [f"WARNING: {text}" for text in summary["warnings"].values()]
    assert summary["warning"] == "; ".join(summary["warnings"].values())
    assert summary["warnings"]["routing"].startswith("routing disagrees with the input modality")
