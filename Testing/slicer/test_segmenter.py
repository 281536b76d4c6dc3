"""The module's whole run on a real MRML scene (slicer-core) with the engine CLI in a real subprocess.

``M4oESegmentationLib.segmenter`` is what the Slicer module's Logic delegates to: write the input
volume to a temporary file, run ``m4oe segment --progress json`` in its own process, poll it, and
load the outputs (segmentation, gate views) into the input's scene and study. Here the engine runs
with this interpreter (in Slicer it is ``PythonSlicer``) on a tiny untrained model; nothing is
mocked. Every test checks that the temporary folder is gone afterwards.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

try:
    import slicer
except ImportError as error:
    pytest.skip(f"slicer-core cannot be imported ({error})", allow_module_level=True)
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

import psutil
import vtk
from M4oESegmentationLib import gate_review, segmenter, status, volumes

from m4oe.demo import synthetic_ct
from m4oe.labels import Label

MODULE_DIR = Path(__file__).resolve().parents[2] / "M4oESegmentation"
TIMEOUT_S = 300
pytestmark = pytest.mark.slow


@pytest.fixture
def study_volume(scene):
    """A small CT volume node inside patient > study in the subject hierarchy, as DICOM import makes it."""
    volume = volumes.sitk_to_volume_node(synthetic_ct((6, 48, 48), (5.0, 5.0, 4.0), seed=2), "abdomen CT")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    study = hierarchy.CreateStudyItem(patient, "study")
    hierarchy.CreateItem(study, volume)
    return volume, study


def new_segmenter() -> segmenter.Segmenter:
    return segmenter.Segmenter(sys.executable, MODULE_DIR)


def poll_until_done(runner: segmenter.Segmenter) -> None:
    """What the module's QTimer does: poll until the run has been reported."""
    deadline = time.monotonic() + TIMEOUT_S
    while runner.poll():
        assert time.monotonic() < deadline, "the segmentation did not end in time"
        time.sleep(0.05)


def card_task(model_dir: Path, task: str = "abdomen") -> dict:
    card = json.loads((model_dir / "model.json").read_text())
    return next(t for t in card["tasks"] if t["name"] == task)


def test_run_loads_the_result_into_the_input_study(scene, study_volume, tiny_model_dir, temp_root):
    volume, study = study_volume
    records, finished = [], []
    runner = new_segmenter()

    result = runner.run(
        volume,
        modality="CT",
        model=str(tiny_model_dir),
        device="cpu",
        extra_args=("--batch-size", "2"),
        on_progress=records.append,
        on_finished=lambda result, error: finished.append(error),
    )

    assert finished == [None] and not runner.running
    # Progress: stages in the engine's order, the bar never moves back, and reaches the end.
    stages = [r["stage"] for r in records]
    assert stages[0] == "load" and "done" not in stages and "log" not in stages
    assert stages.index("preprocess") < stages.index("inference") < stages.index("postprocess")
    fractions = [status.overall_fraction(r) for r in records]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert all(status.progress_text(r) for r in records)

    # The result: one segment per label of the card, in order, with name, colour, terminology.
    node = result.segmentation
    assert result.modality == "ct" and result.task == "abdomen" and result.compared_with is None
    labels = card_task(tiny_model_dir)["labels"]
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(labels)
    for n, label in enumerate(labels):
        segment = segmentation.GetNthSegment(n)
        assert segmentation.GetNthSegmentID(n) == f"Segment_{label['value']}"
        assert segment.GetName() == label["name"]
        np.testing.assert_allclose(segment.GetColor(), label["color"], atol=1e-6)
        entry = segment.GetTerminology()
        assert label["type"]["value"] in entry and label["category"]["value"] in entry
    # Reference geometry from the input, placed in the input's study, visible in 2D and 3D.
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")
    display = node.GetDisplayNode()
    assert display.GetVisibility() and display.GetVisibility3D() and display.GetVisibility2DFill()
    # The labels round-trip to the engine's label map on the input's grid.
    labels_back = volumes.segmentation_to_labelmap(node, volume, [Label.from_dict(label) for label in labels])
    assert labels_back.GetSize() == volumes.volume_node_to_sitk(volume).GetSize()
    # What produced it travels with it.
    assert node.GetAttribute("M4oESegmentation.Modality") == "ct"
    assert node.GetAttribute("M4oESegmentation.Task") == "abdomen"
    assert node.GetAttribute("M4oESegmentation.TestTimePasses") == "1"  # the tiny card's default
    assert status.detected_modality_text(node).startswith("CT (")

    # Gate views, found again from the node alone (as after saving and reloading the scene).
    review = segmenter.gate_review_of(node)
    assert review is not None
    assert [e["name"] for e in review.summary["experts"]] == ["ct", "mr", "mr-t2"]
    assert review.table.GetTable().GetNumberOfRows() == len(review.summary["per_segment"])
    assert review.chart.GetNumberOfPlotSeriesNodes() == 3 + 1  # one per expert, and the slice marker
    assert review.overlay.IsA("vtkMRMLLabelMapVolumeNode")
    assert review.overlay.GetDisplayNode().GetColorNodeID() == review.colors.GetID()
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(review.overlay)) == study
    assert review.warning == gate_review.routing_warning(review.summary)
    assert list(temp_root.iterdir()) == [], "the temporary folder is removed"


def test_scan_warning_reaches_the_result_and_the_panel(scene, shared_data, temp_root):
    """The embedded model on a pelvis-only CT (the lowest 20 slices of example_ct): the engine's
    scan warning comes back with the result, stays on the segmentation, and the panel shows it."""
    image = sitk.ReadImage(str(shared_data / "example_ct.nii.gz"))[:, :, :20]
    volume = volumes.sitk_to_volume_node(image, "pelvis CT")
    result = new_segmenter().run(
        volume, modality="ct", device="cpu", test_time_passes=1, extra_args=("--threads", "1")
    )
    assert result.scan_warning.startswith("the scan may not be one the model knows")
    assert "no vertebrae" in result.scan_warning
    assert result.warning is None, "the gate agreed with the modality: no routing warning"
    node = result.segmentation
    assert node.GetAttribute(status.RESULT_ATTRIBUTE + "ScanWarning") == result.scan_warning
    assert status.scan_warning_text(node) == f"Warning: {result.scan_warning}"
    review = segmenter.gate_review_of(node)
    assert review.summary["warnings"]["scan"] == result.scan_warning
    assert review.warning is None, "the scan warning is not shown as a routing warning"
    # The embedded card's real CT figures: its pancreas scored low on a real CT (the held-out BTCV
    # CTs measured its kidneys, above 0.50); the result, the node and the panel carry that too.
    assert "pancreas" in result.accuracy_warning and "kidney" not in result.accuracy_warning
    assert node.GetAttribute(status.RESULT_ATTRIBUTE + "AccuracyWarning") == result.accuracy_warning
    assert status.accuracy_warning_text(node) == f"Check closely: {result.accuracy_warning}"
    assert review.summary["warnings"]["accuracy"] == result.accuracy_warning
    done = status.done_text(result)
    assert "may not be one the model knows" in done and "need a close check" in done
    assert "routing" not in done
    assert list(temp_root.iterdir()) == []


def test_new_result_by_default_replaced_only_when_asked(scene, study_volume, tiny_model_dir, temp_root):
    volume, _ = study_volume
    runner = new_segmenter()
    options = {"modality": "ct", "model": str(tiny_model_dir), "device": "cpu", "task": "liver"}
    first = runner.run(volume, **options).segmentation
    tables = scene.GetNumberOfNodesByClass("vtkMRMLTableNode")

    second = runner.run(volume, first, **options).segmentation  # selected but not to be replaced
    assert second is not first
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    assert first.GetName() != second.GetName()

    old_review = segmenter.gate_review_of(first)
    replaced = runner.run(volume, first, replace_existing=True, **options).segmentation
    assert replaced is first
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 2 * tables, "old gate views removed"
    assert (
        old_review.chart.GetScene() is None and segmenter.gate_review_of(first).chart is not old_review.chart
    )
    assert list(temp_root.iterdir()) == []


def test_forced_expert_comparison_goes_into_a_second_segmentation(
    scene, study_volume, tiny_model_dir, temp_root
):
    volume, _ = study_volume
    runner = new_segmenter()
    options = {"modality": "ct", "model": str(tiny_model_dir), "device": "cpu", "task": "liver"}
    result = runner.run(volume, **options).segmentation

    compared = runner.run(volume, force_expert="mr-t2", compared_with=result, **options)
    comparison = compared.segmentation
    assert compared.compared_with is result and comparison is not result
    assert segmenter.comparison_of(result, "mr-t2") is comparison
    assert segmenter.gate_review_of(comparison) is None, "a forced run has no gate views"
    assert segmenter.gate_review_of(result) is not None, "the result keeps its own"
    assert comparison.GetAttribute("M4oESegmentation.ForcedExpert") == "mr-t2"
    assert not comparison.GetDisplayNode().GetVisibility2DFill(), "outlines over the result's fill"

    again = runner.run(volume, force_expert="mr-t2", compared_with=result, **options).segmentation
    assert again is comparison, "comparing with the same expert again replaces the comparison"
    with pytest.raises(ValueError, match="no expert 'nobody'"):
        runner.start(volume, force_expert="nobody", compared_with=result, **options)
    assert not runner.running
    assert list(temp_root.iterdir()) == []


def test_test_time_passes_reach_the_engine_and_are_recorded(scene, study_volume, tiny_model_dir, temp_root):
    volume, _ = study_volume
    runner = new_segmenter()
    maps = {}
    for passes in (1, 5):
        result = runner.run(
            volume, modality="ct", model=str(tiny_model_dir), device="cpu", test_time_passes=passes
        )
        assert result.segmentation.GetAttribute("M4oESegmentation.TestTimePasses") == str(passes)
        labels = [Label.from_dict(label) for label in card_task(tiny_model_dir)["labels"]]
        maps[passes] = sitk.GetArrayFromImage(
            volumes.segmentation_to_labelmap(result.segmentation, volume, labels)
        )
    assert not np.array_equal(maps[1], maps[5])  # the engine averaged other passes
    assert list(temp_root.iterdir()) == []


def test_smoothing_clean_up_and_backend_reach_the_engine_and_are_recorded(
    scene, study_volume, tiny_model_dir, temp_root
):
    volume, _ = study_volume
    runner = new_segmenter()
    labels = [Label.from_dict(label) for label in card_task(tiny_model_dir)["labels"]]
    options = dict(modality="ct", model=str(tiny_model_dir), device="cpu", test_time_passes=1)

    def segment(**chosen):
        result = runner.run(volume, **options, **chosen)
        array = sitk.GetArrayFromImage(volumes.segmentation_to_labelmap(result.segmentation, volume, labels))
        return result.segmentation, array

    raw_node, raw = segment(through_plane_sigma_mm=0, keep_all_components=True)
    assert raw_node.GetAttribute("M4oESegmentation.ThroughPlaneSigmaMm") == "0.0"
    assert raw_node.GetAttribute("M4oESegmentation.KeepAllComponents") == "true"
    assert raw_node.GetAttribute("M4oESegmentation.LargestComponentLabels") == "[]"
    assert raw_node.GetAttribute("M4oESegmentation.Backend") == "torch"
    cleaned_node, cleaned = segment(through_plane_sigma_mm=0)
    assert cleaned_node.GetAttribute("M4oESegmentation.KeepAllComponents") == "false"
    cleaned_names = cleaned_node.GetAttribute("M4oESegmentation.LargestComponentLabels")
    assert json.loads(cleaned_names) == [labels[0].name]
    # The tiny card keeps the largest component of label 1 only: the clean-up removes, never adds.
    assert np.array_equal(cleaned[raw != 1], raw[raw != 1])
    assert np.all(raw[cleaned == 1] == 1) and np.all(cleaned[raw == 1] <= 1)
    touching = np.ones((3, 3, 3), bool)  # the clean-up's 26-connectivity
    _, pieces = ndimage.label(raw == 1, structure=touching)
    _, kept = ndimage.label(cleaned == 1, structure=touching)
    assert pieces > 1 and kept == 1
    smoothed_node, smoothed = segment(through_plane_sigma_mm=8.0)
    assert smoothed_node.GetAttribute("M4oESegmentation.ThroughPlaneSigmaMm") == "8.0"
    assert not np.array_equal(smoothed, cleaned)  # slices 4 mm apart share probabilities
    with pytest.raises(ValueError, match="through_plane_sigma_mm must be a number >= 0"):
        runner.start(volume, through_plane_sigma_mm=-1.0, **options)
    assert not runner.running
    assert list(temp_root.iterdir()) == []


def test_dicom_modality_tag_chooses_the_modality(scene, study_volume, tiny_model_dir, temp_root):
    volume, _ = study_volume
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    name = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
    hierarchy.SetItemAttribute(hierarchy.GetItemByDataNode(volume), name, "MR")
    assert segmenter.dicom_modality(volume) == "mr"

    result = new_segmenter().run(volume, model=str(tiny_model_dir), device="cpu", task="liver")

    # The CT-like intensities would be detected as CT; the series says MR, and wins.
    assert result.modality == "mr" and result.modality_source == "DICOM Modality tag"
    assert status.detected_modality_text(result.segmentation) == "MR (DICOM Modality tag)"
    assert result.segmentation.GetAttribute("M4oESegmentation.ModalitySource") == "DICOM Modality tag"


def test_cancel_kills_the_engine_and_leaves_the_scene_as_it_was(scene, tiny_model_dir, temp_root):
    big = volumes.sitk_to_volume_node(synthetic_ct((48, 128, 128), (2.0, 2.0, 2.5), seed=3), "big CT")
    nodes_before = scene.GetNumberOfNodes()
    records, finished = [], []
    runner = new_segmenter()
    inference = runner.start(
        big,
        modality="ct",
        model=str(tiny_model_dir),
        device="cpu",
        extra_args=("--batch-size", "1"),
        on_progress=records.append,
        on_finished=lambda result, error: finished.append((result, error)),
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not any(r["stage"] == "inference" for r in records):
        assert runner.poll() and time.monotonic() < deadline, inference.stderr
        time.sleep(0.05)
    tree = [psutil.Process(inference.pid), *psutil.Process(inference.pid).children(recursive=True)]

    runner.cancel(wait=True)

    assert finished == [(None, status.CANCELLED)] and not runner.running
    assert [p.pid for p in tree if psutil.pid_exists(p.pid)] == [], "no engine process is left"
    assert scene.GetNumberOfNodes() == nodes_before, "nothing was added to the scene"
    assert list(temp_root.iterdir()) == [], "no output and no temporary file is left"
    runner.cancel()  # nothing running: nothing happens
    assert not runner.poll()


def test_engine_error_reaches_the_caller_and_adds_nothing(
    scene, study_volume, tiny_model_dir, tmp_path, temp_root
):
    volume, _ = study_volume
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the card's SHA-256 no longer matches
    weights.write_bytes(bytes(data))
    nodes_before = scene.GetNumberOfNodes()
    finished = []

    with pytest.raises(RuntimeError) as raised:
        new_segmenter().run(
            volume, model=str(broken), device="cpu", on_finished=lambda r, e: finished.append((r, e))
        )

    message = str(raised.value)
    assert str(broken) in message and "sha" in message.lower(), message
    assert finished == [(None, message)]
    assert scene.GetNumberOfNodes() == nodes_before
    assert list(temp_root.iterdir()) == []


def test_start_refuses_bad_requests_before_running_anything(scene, study_volume, tiny_model_dir, temp_root):
    volume, _ = study_volume
    runner = new_segmenter()
    with pytest.raises(ValueError, match="input volume"):
        runner.start(None, model=str(tiny_model_dir))
    with pytest.raises(ValueError, match="modality"):
        runner.start(volume, modality="PET", model=str(tiny_model_dir))
    with pytest.raises(ValueError, match=r"no task 'brain'.*abdomen, liver"):
        runner.start(volume, model=str(tiny_model_dir), task="brain")
    with pytest.raises(ValueError, match="no such model"):
        runner.start(volume, model=str(tiny_model_dir / "missing.json"))
    assert not runner.running and list(temp_root.iterdir()) == []
    runner.start(volume, model=str(tiny_model_dir), device="cpu", task="liver")
    with pytest.raises(RuntimeError, match="already running"):
        runner.start(volume, model=str(tiny_model_dir), device="cpu")
    runner.cancel(wait=True)


def test_edited_result_exports_as_a_training_case(scene, study_volume, tiny_model_dir, tmp_path, temp_root):
    from m4oe_training.data import DatasetInfo

    volume, _ = study_volume
    node = new_segmenter().run(volume, modality="ct", model=str(tiny_model_dir), device="cpu", task="liver")
    node = node.segmentation
    # The radiologist repaints the liver (Segment_1) as a block, as the Segment Editor would.
    reference = volumes.volume_node_to_sitk(volume)
    liver = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)  # (z, y, x)
    liver[1:5, 10:30, 12:36] = 1
    painted = sitk.GetImageFromArray(liver)
    painted.CopyInformation(reference)
    paint = volumes.sitk_to_volume_node(painted, "paint", labelmap=True)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    edit = logic.CreateOrientedImageDataFromVolumeNode(paint)
    edit.UnRegister(None)
    assert logic.SetBinaryLabelmapToSegment(edit, node, "Segment_1", logic.MODE_REPLACE)
    scene.RemoveNode(paint)
    dataset = tmp_path / "Dataset777_Reviewed"

    case = segmenter.export_case(volume, node, dataset)

    info = DatasetInfo.read(dataset)
    assert info.cases == (case,) and info.modality == "ct"
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / "labelsTr" / f"{case}.nii.gz")))
    assert np.array_equal(written == 1, liver.astype(bool)), "the edit is what was exported"
    image = sitk.ReadImage(str(dataset / "imagesTr" / f"{case}_0000.nii.gz"))
    np.testing.assert_allclose(image.GetOrigin(), volumes.volume_node_to_sitk(volume).GetOrigin(), atol=1e-4)
    with pytest.raises(ValueError, match="dataset folder"):
        segmenter.export_case(volume, node, "")


def test_structures_and_roi_reach_the_engine_and_only_they_become_segments(
    scene, study_volume, tiny_model_dir, temp_root
):
    """Issue #24: the checked structures and a markups ROI (RAS, under a transform) go to the engine."""
    volume, _ = study_volume
    runner = new_segmenter()
    # The clean-up off: inside a region it looks at the region only (the largest piece there).
    options = dict(
        modality="ct", model=str(tiny_model_dir), device="cpu", test_time_passes=1, keep_all_components=True
    )
    labels = [Label.from_dict(label) for label in card_task(tiny_model_dir)["labels"]]
    whole = runner.run(volume, **options, through_plane_sigma_mm=0, body_crop=False)
    full = sitk.GetArrayFromImage(volumes.segmentation_to_labelmap(whole.segmentation, volume, labels))

    # A ROI over voxels i 10..29, j 5..39, k 1..3 of the volume, placed in RAS under a transform.
    image = volumes.volume_node_to_sitk(volume)
    lo = np.array(image.TransformIndexToPhysicalPoint((10, 5, 1)))
    hi = np.array(image.TransformIndexToPhysicalPoint((29, 39, 3)))
    centre_ras = volumes.LPS_FROM_RAS @ ((lo + hi) / 2)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetSize(*(np.abs(hi - lo) + 1.0))  # half a voxel (5, 5, 4 mm) beyond the outer centres: < 1 voxel
    shift = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(shift)
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 30.0)
    shift.SetMatrixTransformToParent(matrix)
    roi.SetAndObserveTransformNodeID(shift.GetID())
    roi.SetCenter(*(centre_ras - [30.0, 0.0, 0.0]))  # the transform moves it back over the voxels
    result = runner.run(
        volume, **options, through_plane_sigma_mm=0, structures=["Liver", "kidney_right"], roi=roi
    )
    segments = result.segmentation.GetSegmentation()
    assert [segments.GetNthSegment(n).GetName() for n in range(segments.GetNumberOfSegments())] == [
        "liver",
        "right kidney",
    ]
    assert json.loads(result.segmentation.GetAttribute("M4oESegmentation.Structures")) == [
        "liver",
        "right kidney",
    ]
    region = json.loads(result.segmentation.GetAttribute("M4oESegmentation.Region"))
    assert region["start_ijk"][2] >= 1 and region["stop_ijk"][2] <= 4 and region["roi"]
    part = sitk.GetArrayFromImage(volumes.segmentation_to_labelmap(result.segmentation, volume, labels))
    i0, j0, k0 = region["start_ijk"]
    i1, j1, k1 = region["stop_ijk"]
    inside = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
    expected = np.where(np.isin(full[inside], [1, 3]), full[inside], 0)
    np.testing.assert_array_equal(part[inside], expected)
    part[inside] = 0
    assert not part.any()
    with pytest.raises(ValueError, match="unknown structure 'lungs'"):
        runner.start(volume, structures=["lungs"], **options)
    empty = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    with pytest.raises(ValueError, match="the ROI has no size"):
        runner.start(volume, roi=empty, **options)
    assert not runner.running
    assert list(temp_root.iterdir()) == []
