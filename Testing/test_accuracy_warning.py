"""The accuracy warning a segmentation carries (m4oe.card_summary.real_accuracy_warning): the
structures its model scored low on, or never measured on, real scans of the scan's modality, read
from the model card. Its rule on card dicts, then the embedded model on a real MRI. The Slicer
panel's side is in Testing/slicer/test_segmenter.py and Testing/slicer/test_panel_logic.py."""

from __future__ import annotations

import pytest
import SimpleITK as sitk

from m4oe.card_summary import WEAK_DICE, check_closely_lines, real_accuracy_warning, real_dice_by_structure
from m4oe.terminology import standard_label

STRUCTURES = {"liver": "liver", "kidney_right": "right kidney", "pancreas": "pancreas"}


def card(scans: dict | None = None, held_out: dict | None = None) -> dict:
    metrics = {}
    if scans is not None:
        metrics["real_validation"] = {"scans": scans}
    if held_out is not None:
        metrics["held_out_validation"] = {"datasets": held_out}
    return {"metrics": metrics}


MR_SCAN = {"modality": "mr", "dice": {"liver": 0.81, "kidney_right": 0.37, "pancreas": 0.0}}
CT_SCAN = {"modality": "ct", "dice": {"liver": 0.94, "pancreas": 0.06}}
CHAOS = {"modality": "mr", "dice": {"liver": 0.63, "kidney_right": 0.67}}


def test_figures_are_gathered_per_modality_from_both_sections():
    both = card({"mr scan": MR_SCAN, "ct scan": CT_SCAN}, {"chaos": CHAOS})
    assert real_dice_by_structure(both, "mr") == {
        "liver": [0.81, 0.63],
        "kidney_right": [0.37, 0.67],
        "pancreas": [0.0],
    }
    assert real_dice_by_structure(both, "CT") == {"liver": [0.94], "pancreas": [0.06]}
    assert real_dice_by_structure(card(), "mr") == {}
    assert real_dice_by_structure({}, "ct") == {}


def test_weak_structures_are_named_with_every_figure_lowest_first():
    warning = real_accuracy_warning(card({"mr scan": MR_SCAN}, {"chaos": CHAOS}), "mr", STRUCTURES)
    assert warning.startswith(f"on the real MR scans its card reports, Dice was below {WEAK_DICE:.2f} for ")
    assert "right kidney 0.37/0.67" in warning and "pancreas 0.00" in warning
    assert "liver" not in warning, "0.81 and 0.63 are not weak"
    assert "not measured" not in warning and "no real MR scan" not in warning
    # The lowest figure decides: a structure weak on one scan is named though another scored well.
    assert "right kidney" in real_accuracy_warning(card({"a": MR_SCAN}, {"b": CHAOS}), "mr", STRUCTURES)


def test_only_the_structures_segmented_count():
    only_liver = real_accuracy_warning(card({"mr scan": MR_SCAN}), "mr", {"liver": "liver"})
    assert only_liver is None
    pancreas = real_accuracy_warning(card({"mr scan": MR_SCAN}), "mr", {"pancreas": "pancreas"})
    assert "pancreas 0.00" in pancreas and "right kidney" not in pancreas


def test_structures_no_real_scan_of_the_modality_measured_are_named():
    warning = real_accuracy_warning(card({"ct scan": CT_SCAN}), "ct", STRUCTURES)
    assert "pancreas 0.06" in warning
    assert warning.split("; ")[1].startswith("no real CT scan measured right kidney")
    measured_only = real_accuracy_warning(card({"ct scan": CT_SCAN}), "ct", {"kidney_right": "right kidney"})
    assert measured_only.startswith("no real CT scan measured right kidney:")


def test_no_warning_without_real_figures_for_the_modality():
    # A card without real-scan figures (a phantom model, a user's own model) gives no cause.
    assert real_accuracy_warning(card(), "mr", STRUCTURES) is None
    assert real_accuracy_warning({}, "ct", STRUCTURES) is None
    # CT figures say nothing about MR scans, and the other way round.
    assert real_accuracy_warning(card({"ct scan": CT_SCAN}), "mr", STRUCTURES) is None
    assert real_accuracy_warning(card(held_out={"chaos": CHAOS}), "ct", STRUCTURES) is None


def test_threshold_is_a_parameter():
    strict = real_accuracy_warning(card({"mr scan": MR_SCAN}), "mr", {"liver": "liver"}, threshold=0.9)
    assert strict.startswith("on the real MR scans its card reports, Dice was below 0.90 for liver 0.81")
    assert real_accuracy_warning(card({"mr scan": MR_SCAN}), "mr", STRUCTURES, threshold=0.0) is None


def test_check_closely_lines_name_each_modalitys_structures_from_the_task_labels():
    task = {
        "name": "abdomen",
        "labels": [standard_label(k, v + 1).to_dict() for v, k in enumerate(STRUCTURES)],
    }
    both = dict(card({"mr scan": MR_SCAN, "ct scan": CT_SCAN}, {"chaos": CHAOS}), tasks=[task])
    assert check_closely_lines(both) == [
        "CT: Dice below 0.50 on a real scan: pancreas 0.06; not measured on a real CT scan: right kidney",
        "MR: Dice below 0.50 on a real scan: right kidney 0.37/0.67, pancreas 0.00",
    ]
    assert check_closely_lines(dict(card({"ct scan": CT_SCAN}), tasks=[task]), threshold=0.05) == [
        "CT: not measured on a real CT scan: right kidney"
    ]
    assert check_closely_lines(dict(card(), tasks=[task])) == [], "no real figures: nothing to say"
    assert check_closely_lines(card({"mr scan": MR_SCAN})) == [], "no task: no structures"


@pytest.fixture(scope="module")
def predictor():
    from m4oe.predictor import Predictor

    return Predictor.from_pretrained(None, device="cpu", threads=1)


def test_embedded_model_warns_on_a_real_mri_from_its_card(predictor, shared_data):
    """The embedded model's card holds real MR figures (the validation MRI and held-out CHAOS
    studies): a segmentation of an MRI names the pancreas and the stomach, which scored low there;
    asked for the liver alone, it has no accuracy warning."""
    image = sitk.ReadImage(str(shared_data / "example_mr_sm.nii.gz"))
    figures = real_dice_by_structure({"metrics": predictor.card.metrics}, "mr")
    prediction = predictor.predict(image, modality="mr", test_time_passes=1)
    warning = prediction.warnings["accuracy"]
    assert warning.startswith("on the real MR scans its card reports")
    for key, name in (("pancreas", "pancreas"), ("stomach", "stomach")):
        assert min(figures[key]) < WEAK_DICE
        assert f"{name} {min(figures[key]):.2f}" in warning
    assert f"liver {min(figures['liver']):.2f}" not in warning
    assert prediction.warning.endswith(warning)
    liver = predictor.predict(image, modality="mr", test_time_passes=1, structures=["liver"])
    assert min(figures["liver"]) >= WEAK_DICE and "accuracy" not in liver.warnings
