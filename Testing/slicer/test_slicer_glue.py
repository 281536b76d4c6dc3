"""M4oESegmentationLib on a real MRML scene (slicer-core): node conversion, gate views, export, runner."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

try:
    import slicer
except ImportError as error:  # not installed, or its libraries do not load here
    pytest.skip(
        f"slicer-core cannot be imported ({error}); pip install slicer-core==5.13.31053.0",
        allow_module_level=True,
    )
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

import psutil
import vtk
from M4oESegmentationLib import feedback, gate_review, models, process, volumes

from m4oe.demo import synthetic_ct
from m4oe.errors import InputError, OutputError
from m4oe.io import write_image
from m4oe.labels import Label
from m4oe.phantom import PHANTOM_LABELS, generate_case, phantom_labels, write_dataset
from m4oe.terminology import standard_label

TINY_TASK = [standard_label(k, i + 1) for i, k in enumerate(("liver", "spleen", "kidney_right"))]
POLL_TIMEOUT_S = 300


def oblique_image(dtype=np.int16, seed: int = 0) -> sitk.Image:
    """A small image with a rotated direction, anisotropic spacing and an odd origin (LPS)."""
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.integers(-1000, 1000, (7, 9, 11)).astype(dtype))  # (z, y, x)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((12.3456789, -45.6, 78.9))
    image.SetDirection(sitk.VersorTransform((0.3, 0.5, 0.8), 0.4).GetMatrix())
    return image


def flipped_image() -> sitk.Image:
    """A CT-like image stored with direction diag(-1, -1, 1), as most CT NIfTI files are."""
    return synthetic_ct((6, 20, 24), (1.5, 1.25, 3.0), seed=1)


def assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-6) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tol)


def with_labels(image: sitk.Image) -> sitk.Image:
    """A label map on ``image``'s grid: liver and right kidney present, spleen absent."""
    labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)  # (z, y, x)
    labels[1:4, 2:6, 3:8] = 1
    labels[4:6, 1:3, 1:3] = 3
    labelmap = sitk.GetImageFromArray(labels)
    labelmap.CopyInformation(image)
    return labelmap


def add_translation(scene, node, offset_ras=(10.0, -5.0, 2.0)):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    matrix = vtk.vtkMatrix4x4()
    for axis, value in enumerate(offset_ras):
        matrix.SetElement(axis, 3, value)
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    return transform


# --- volumes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [oblique_image, flipped_image], ids=["oblique", "flipped"])
def test_volume_round_trip_keeps_geometry_and_voxels(scene, make):
    image = make()
    node = volumes.sitk_to_volume_node(image, "input")
    assert node.GetScene() is scene and node.IsA("vtkMRMLScalarVolumeNode")
    back = volumes.volume_node_to_sitk(node)
    assert_same_geometry(back, image, tol=1e-12)
    assert back.GetPixelID() == image.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


def test_volume_node_is_in_ras(scene):
    """Voxel (i, j, k) lies at the same patient point in Slicer (RAS) and SimpleITK (LPS)."""
    image = oblique_image()
    node = volumes.sitk_to_volume_node(image, "input")
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    for index in [(0, 0, 0), (3, 5, 2), (10, 8, 6)]:
        ras = ijk_to_ras.MultiplyPoint((*index, 1.0))[:3]
        lps = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(ras, (-lps[0], -lps[1], lps[2]), atol=1e-9)


def test_sitk_to_volume_node_updates_a_label_map_node(scene):
    labelmap = with_labels(oblique_image())
    node = volumes.sitk_to_volume_node(labelmap, "labels", labelmap=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode") and node.GetDisplayNode() is not None
    again = volumes.sitk_to_volume_node(flipped_image(), "replaced", node=node)
    assert again is node and node.GetName() == "replaced"
    assert volumes.volume_node_to_sitk(node).GetSize() == flipped_image().GetSize()
    with pytest.raises(ValueError, match="integer"):
        volumes.sitk_to_volume_node(sitk.Cast(labelmap, sitk.sitkFloat32), "bad", labelmap=True)
    with pytest.raises(ValueError, match="3D scalar"):
        volumes.sitk_to_volume_node(sitk.Compose(labelmap, labelmap), "vector")


def test_labelmap_segmentation_round_trip_on_oblique_transformed_volume(scene):
    image = oblique_image()
    volume = volumes.sitk_to_volume_node(image, "input")
    transform = add_translation(scene, volume)
    labelmap = with_labels(image)
    labels = phantom_labels()[:4]

    segmentation_node = volumes.labelmap_to_segmentation(labelmap, labels, volume)

    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(labels)  # the absent spleen is an empty segment
    for n, label in enumerate(labels):
        segment_id = segmentation.GetNthSegmentID(n)
        segment = segmentation.GetSegment(segment_id)
        assert segment_id == f"Segment_{label.value}"
        assert segment.GetName() == label.name
        np.testing.assert_allclose(segment.GetColor(), label.color)
        assert segment.HasTag("TerminologyEntry")
        assert segment.GetTerminology() == label.terminology_entry()
    assert segmentation.GetNumberOfLayers() == 1
    assert segmentation_node.GetTransformNodeID() == transform.GetID()
    assert (
        segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
        is volume
    )

    # The segments lie on the volume's grid in its local frame.
    internal = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation("Segment_1", internal)
    image_to_world, ijk_to_ras = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    internal.GetImageToWorldMatrix(image_to_world)
    volume.GetIJKToRASMatrix(ijk_to_ras)
    for r in range(4):
        for c in range(4):
            assert image_to_world.GetElement(r, c) == pytest.approx(ijk_to_ras.GetElement(r, c), abs=1e-9)

    back = volumes.segmentation_to_labelmap(segmentation_node, volume, labels)
    assert_same_geometry(back, image, tol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(labelmap))
    assert back.GetPixelID() == sitk.sitkUInt8


def test_labelmap_to_segmentation_replaces_segments_and_allows_gaps(scene):
    image = flipped_image()
    volume = volumes.sitk_to_volume_node(image, "input")
    first = volumes.labelmap_to_segmentation(with_labels(image), TINY_TASK, volume, name="result")
    gapped = [TINY_TASK[0], Label(7, "lesion", (1.0, 0.0, 0.0), TINY_TASK[0].category, TINY_TASK[0].type)]
    values = sitk.GetArrayFromImage(with_labels(image))
    values[values == 3] = 7
    labelmap = sitk.GetImageFromArray(values)
    labelmap.CopyInformation(image)

    again = volumes.labelmap_to_segmentation(labelmap, gapped, volume, segmentation_node=first)

    assert again is first and again.GetName() == "result"
    segmentation = again.GetSegmentation()
    assert [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())] == [
        "Segment_1",
        "Segment_7",
    ]
    back = volumes.segmentation_to_labelmap(again, volume, gapped)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), values)


def test_segmentation_to_labelmap_finds_renamed_segments_and_skips_others(scene):
    image = flipped_image()
    volume = volumes.sitk_to_volume_node(image, "input")
    node = volumes.labelmap_to_segmentation(with_labels(image), TINY_TASK, volume)
    segmentation = node.GetSegmentation()
    segmentation.GetSegment("Segment_1").SetName("liver (edited)")  # found by ID
    segmentation.AddEmptySegment("tumour", "tumour")  # no label: left out
    back = volumes.segmentation_to_labelmap(node, volume, TINY_TASK)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(back), sitk.GetArrayFromImage(with_labels(image))
    )
    only_kidney = volumes.segmentation_to_labelmap(node, volume, TINY_TASK[2:])
    assert set(np.unique(sitk.GetArrayViewFromImage(only_kidney)).tolist()) == {0, 3}


def test_labelmap_to_segmentation_refuses_wrong_grid_and_values(scene):
    image = flipped_image()
    volume = volumes.sitk_to_volume_node(image, "input")
    shifted = with_labels(image)
    shifted.SetOrigin([v + 1.0 for v in image.GetOrigin()])
    with pytest.raises(ValueError, match="grid"):
        volumes.labelmap_to_segmentation(shifted, TINY_TASK, volume)
    with pytest.raises(ValueError, match=r"values \[3\]"):
        volumes.labelmap_to_segmentation(with_labels(image), TINY_TASK[:2], volume)


def test_place_in_study_uses_the_volume_study_and_transform(scene):
    volume = volumes.sitk_to_volume_node(flipped_image(), "input")
    result = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    assert not volumes.place_in_study(result, volume)  # the volume has no subject hierarchy item
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    study = hierarchy.CreateStudyItem(patient, "study")
    hierarchy.CreateItem(study, volume)
    transform = add_translation(scene, volume)
    assert volumes.place_in_study(result, volume)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(result)) == study
    assert result.GetTransformNodeID() == transform.GetID()


# --- gate review --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gate_run(tiny_model_dir, tmp_path_factory):
    """A real gate summary and gate map: the engine CLI run in-process on a small synthetic CT."""
    from m4oe.cli import main

    folder = tmp_path_factory.mktemp("gates")
    volume = folder / "ct.nrrd"
    sitk.WriteImage(synthetic_ct((6, 48, 48), (5.0, 5.0, 4.0), seed=0), str(volume))
    args = ["segment", str(volume), "-o", str(folder / "labels.nrrd"), "--model", str(tiny_model_dir)]
    code = main([*args, "--modality", "ct", "--gates", str(folder / "gates"), "--progress", "none"])
    assert code == 0
    summary = json.loads((folder / "gates" / "gate_summary.json").read_text())
    return summary, folder / "gates"


def test_expert_table_rows_are_segments_columns_experts(scene, gate_run):
    summary, _ = gate_run
    experts = [e["name"] for e in summary["experts"]]
    assert experts == ["ct", "mr", "mr-t2"]
    node = gate_review.expert_table(summary)
    table = node.GetTable()
    segments = sorted(summary["per_segment"], key=lambda name: summary["per_segment"][name]["label"])
    assert segments, "the tiny model predicted no organ"
    assert table.GetNumberOfRows() == len(segments)
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert columns == ["segment", "dominant expert", *experts, "entropy"]
    for row, name in enumerate(segments):
        entry = summary["per_segment"][name]
        assert table.GetValue(row, 0).ToString() == name
        assert table.GetValue(row, 1).ToString() == entry["dominant_expert"]
        for c, expert in enumerate(experts):
            assert table.GetValue(row, 2 + c).ToDouble() == pytest.approx(entry["mean_weights"][expert])
        assert table.GetValue(row, 2 + len(experts)).ToDouble() == pytest.approx(entry["entropy"])
    assert gate_review.expert_table(summary, node=node) is node
    assert node.GetTable().GetNumberOfColumns() == len(columns)  # refilled, not appended


def test_expert_plot_series_and_slice_marker(scene, gate_run):
    summary, _ = gate_run
    chart = gate_review.expert_plot(summary)
    E = len(summary["experts"])
    assert chart.GetNumberOfPlotSeriesNodes() == E + 1
    series = [chart.GetNthPlotSeriesNode(n) for n in range(E + 1)]
    assert [s.GetName() for s in series[:E]] == ["ct (CT)", "mr (MR)", "mr-t2 (MR)"]
    data = series[0].GetTableNode().GetTable()
    assert data.GetNumberOfRows() == len(summary["per_slice"])
    for n, s in enumerate(series[:E]):
        assert s.GetYColumnName() == summary["experts"][n]["name"]
        weights = [
            data.GetValueByName(r, s.GetYColumnName()).ToDouble() for r in range(data.GetNumberOfRows())
        ]
        expected = [entry["mean_weights"][s.GetYColumnName()] for entry in summary["per_slice"]]
        np.testing.assert_allclose(weights, expected)
    marker = gate_review.marker_series(chart)
    assert marker is series[E]
    positions = [entry["position_mm"] for entry in summary["per_slice"]]
    marker_table = marker.GetTableNode().GetTable()
    for target in (positions[-1], positions[len(positions) // 2] + 0.4, positions[0] - 100.0):
        index = gate_review.update_slice_marker(chart, summary, target)
        nearest = int(np.argmin(np.abs(np.array(positions) - target)))
        assert index == summary["per_slice"][nearest]["index"]
        assert marker_table.GetValue(0, 0).ToDouble() == pytest.approx(positions[nearest])
        assert marker_table.GetValue(1, 0).ToDouble() == pytest.approx(positions[nearest])
    gate_review.remove_gate_nodes(chart)
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0


def test_gate_overlay_legend_and_voxels(scene, gate_run):
    summary, gates_dir = gate_run
    gate_map = sitk.ReadImage(str(gates_dir / "gate_map.nrrd"))
    volume, colors = gate_review.gate_overlay(gate_map, summary)
    assert volume.IsA("vtkMRMLLabelMapVolumeNode")
    assert volume.GetDisplayNode().GetColorNodeID() == colors.GetID()
    names = [colors.GetColorName(n) for n in range(colors.GetNumberOfColors())]
    assert names == ["background", "ct (CT)", "mr (MR)", "mr-t2 (MR)"]
    dominant = volumes.volume_node_to_sitk(volume)
    engine_dominant = sitk.ReadImage(str(gates_dir / "dominant_expert.nrrd"))
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(dominant), sitk.GetArrayViewFromImage(engine_dominant)
    )
    assert_same_geometry(dominant, gate_map, tol=1e-9)
    with pytest.raises(ValueError, match="components"):
        gate_review.gate_overlay(sitk.VectorIndexSelectionCast(gate_map, 0), summary)


def test_routing_warning_and_nearest_slice(gate_run):
    summary, _ = gate_run
    message = gate_review.routing_warning(summary)
    if summary["warnings"].get("routing"):
        assert summary["warnings"]["routing"] in message
    scan = gate_review.routing_warning(dict(summary, warnings={"scan": "no vertebrae were found"}))
    assert scan is None or "vertebrae" not in scan, "the scan warning is not a routing warning"
    older = {k: v for k, v in summary.items() if k != "warnings"}  # written before "warnings"
    message = gate_review.routing_warning(dict(older, warning="the gate sent most weight"))
    assert "gate sent most weight" in message
    confident = dict(summary, warnings={}, overall=dict(summary["overall"], routing_confidence=0.8))
    assert gate_review.routing_warning(confident) is None
    unsure = dict(confident, overall=dict(summary["overall"], routing_confidence=0.02))
    assert "routing confidence is very low (0.02)" in gate_review.routing_warning(unsure)
    assert gate_review.routing_warning(dict(unsure, forced_expert="ct")) is None
    slices = {"per_slice": [{"index": 0, "position_mm": 10.0}, {"index": 1, "position_mm": 5.0}]}
    assert gate_review.nearest_slice(slices, 7.5) == 0  # a tie goes to the first listed
    assert gate_review.nearest_slice(slices, 6.0) == 1
    with pytest.raises(ValueError, match="finite"):
        gate_review.nearest_slice(slices, math.nan)


def test_legend_and_slice_readout_from_a_real_summary(gate_run):
    summary, _ = gate_run
    legend = gate_review.legend_html(summary)
    for n, text in enumerate(["ct (CT)", "mr (MR)", "mr-t2 (MR)"]):
        r, g, b = (round(255 * c) for c in gate_review.expert_color(n))
        assert f'rgb({r},{g},{b});">&#9632;</span>&nbsp;{text}' in legend
    assert gate_review.legend_html(None) == ""
    entry = summary["per_slice"][-1]
    line = gate_review.slice_weights_text(summary, int(entry["index"]))
    assert line.startswith(f"Slice {entry['index']} (S {float(entry['position_mm']):.1f} mm): ct ")
    for expert, weight in entry["mean_weights"].items():
        assert f"{expert} {weight:.2f}" in line
    with pytest.raises(ValueError, match="no slice 999"):
        gate_review.slice_weights_text(summary, 999)


# --- export ---------------------------------------------------------------------------------------


def test_export_creates_then_extends_a_training_dataset(scene, tmp_path):
    from m4oe_training.data import DatasetInfo
    from m4oe_training.export import dataset_labels
    from m4oe_training.nnunet import verify_dataset

    labels = phantom_labels()
    dataset = tmp_path / "Dataset501_Feedback"
    names = []
    for seed in (0, 1):
        image, truth = generate_case("ct", seed, max_size=24)
        # The GUI's path: input volume node, segmentation after editing, back to a label map.
        volume = volumes.sitk_to_volume_node(image, f"case {seed}")
        segmentation = volumes.labelmap_to_segmentation(truth, labels, volume)
        corrected = volumes.segmentation_to_labelmap(segmentation, volume, labels)
        names.append(
            feedback.export_case(
                volumes.volume_node_to_sitk(volume), corrected, labels, dataset, modality="ct"
            )
        )
    assert names == ["Dataset501_Feedback_001", "Dataset501_Feedback_002"]
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["channel_names"] == {"0": "CT"} and meta["modality"] == "ct"
    # The keys of m4oe.terminology.TERMS, found from the segments' codes: the phantoms' label table.
    assert meta["labels"] == {"background": 0, **PHANTOM_LABELS}
    assert meta["terminology"] == {key: key for key in PHANTOM_LABELS}
    info = DatasetInfo.read(dataset)
    assert info.cases == tuple(names) and info.modality == "ct"
    assert [(lab.value, lab.name) for lab in dataset_labels(info)] == [
        (lab.value, lab.name) for lab in labels
    ]
    summary = verify_dataset(dataset)
    assert summary.cases == tuple(names)
    written = sitk.ReadImage(str(dataset / "labelsTr" / f"{names[1]}.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(truth))


@pytest.mark.slow
def test_corrections_exported_for_training_fine_tune_the_embedded_model(scene, tmp_path):
    """The feedback loop: one CT case, its segmentation edited in the scene, exported as a
    correction, then ``m4oe train`` with ``init = "m4oe-phantom"`` (the embedded model, by name) and
    phantom CT data replayed beside it. The exported labels are the phantoms', so both data sets
    share the task's label table and each organ trains the head channel the model gave it. The run
    keeps all three experts (only the CT one has data), the model's intensity normalisation and
    clean-up, and with no validation case exports its last epoch."""
    from m4oe.checkpoint import load_checkpoint, read_model_card
    from m4oe.hub import resolve_model
    from m4oe_training.config import load_config
    from m4oe_training.train import run

    card = read_model_card(resolve_model("m4oe-phantom"))
    labels = card.task("abdomen").labels
    dataset = tmp_path / "Dataset502_Corrections"
    image, truth = generate_case("ct", 0, max_size=32)
    volume = volumes.sitk_to_volume_node(image, "case")
    segmentation = volumes.labelmap_to_segmentation(truth, labels, volume)
    corrected = volumes.segmentation_to_labelmap(segmentation, volume, labels)
    feedback.export_case(volumes.volume_node_to_sitk(volume), corrected, labels, dataset, modality="ct")
    assert json.loads((dataset / "dataset.json").read_text())["labels"] == {"background": 0, **PHANTOM_LABELS}
    write_dataset(tmp_path / "replay_ct", "ct", 1, seed=3, max_size=32)
    config = tmp_path / "finetune.toml"
    config.write_text(
        "\n".join(
            [
                'name = "m4oe-phantom-finetuned"',
                'init = "m4oe-phantom"',
                "batch_size = 2",
                "iterations_per_epoch = 1",
                'optimizer = "adamw"',
                "threads = 1",
                'output_dir = "run"',
                *(
                    f'[[datasets]]\npath = "{path}"\nexpert = "ct"\ntask = "abdomen"\nval_cases = 0'
                    for path in ("Dataset502_Corrections", "replay_ct")
                ),
                "[[stages]]",
                'kind = "joint"',
                "epochs = 1",
                "lr = 1e-5",
                "shared_lr_scale = 0.1",
            ]
        )
        + "\n"
    )
    cfg, _ = load_config(config)
    _, tuned = load_checkpoint(run(cfg, base_dir=tmp_path, command=["test"]) / "model")
    assert tuned.architecture == card.architecture  # experts, heads and shapes all kept
    assert [(e.name, e.modality) for e in tuned.experts] == [(e.name, e.modality) for e in card.experts]
    assert tuned.task("abdomen") == card.task("abdomen")  # labels, codes, colours and clean-up
    assert tuned.preprocessing.intensity == card.preprocessing.intensity
    assert tuned.provenance["init_weights_sha256"] == card.weights_sha256
    assert tuned.provenance["config"]["expert_order"] == ["ct", "mr-t1", "mr-t2"]
    assert tuned.metrics["validation"] is None


def test_export_refuses_a_dataset_of_another_kind(tmp_path):
    labels = phantom_labels()
    image, truth = generate_case("ct", 0, max_size=16)
    dataset = tmp_path / "ct_dataset"
    feedback.export_case(image, truth, labels, dataset, modality="ct", case_name="first")
    with pytest.raises(InputError, match="channel_names"):
        feedback.export_case(image, truth, labels, dataset, modality="mr")
    relabelled = [*labels[:-1], standard_label("duodenum", 9)]
    with pytest.raises(InputError, match="labels"):
        feedback.export_case(image, truth, relabelled, dataset, modality="ct")
    with pytest.raises(OutputError, match="exists already"):
        feedback.export_case(image, truth, labels, dataset, modality="ct", case_name="first")
    moved = sitk.Image(truth)
    moved.SetOrigin([v + 2.0 for v in truth.GetOrigin()])
    with pytest.raises(ValueError, match="grid"):
        feedback.export_case(image, moved, labels, dataset, modality="ct")
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 1
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == ["first_0000.nii.gz"]


# --- process runner ---------------------------------------------------------------------------------


def test_build_command_and_parse_line():
    request = process.InferenceRequest(
        "in.nrrd", "out.nrrd", model="tiny", modality="ct", task="liver", gates_dir="g", force_expert=1
    )
    assert process.build_command(request, "py") == [
        "py", "-m", "m4oe.cli", "segment", "in.nrrd", "-o", "out.nrrd", "--progress", "json",
        "--modality", "ct", "--device", "auto", "--model", "tiny", "--task", "liver",
        "--gates", "g", "--force-expert", "1",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="modality"):
        process.InferenceRequest("a", "b", modality="CT")
    fast = process.InferenceRequest(
        "in.nrrd", "out.nrrd", test_time_passes=1, extra_args=("--batch-size", "2")
    )
    assert process.build_command(fast, "py")[-4:] == ["--tta", "1", "--batch-size", "2"]
    assert "--tta" not in process.build_command(process.InferenceRequest("a", "b"), "py")
    for bad in (0, 6, True, "3", 2.0):
        with pytest.raises(ValueError, match="test_time_passes must be an integer 1-5"):
            process.InferenceRequest("a", "b", test_time_passes=bad)
    tuned = process.InferenceRequest(
        "in.nrrd", "out.nrrd", through_plane_sigma_mm=0, keep_all_components=True, backend="onnx"
    )
    assert process.build_command(tuned, "py")[-5:] == [
        "--through-plane-sigma", "0.0", "--no-cleanup", "--backend", "onnx",
    ]  # fmt: skip
    plain = process.build_command(process.InferenceRequest("a", "b"), "py")
    assert not {"--through-plane-sigma", "--no-cleanup", "--backend"} & set(plain)
    for bad in (-1.0, float("nan"), float("inf"), True, "3"):
        with pytest.raises(ValueError, match="through_plane_sigma_mm must be a number >= 0"):
            process.InferenceRequest("a", "b", through_plane_sigma_mm=bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        process.InferenceRequest("a", "b", backend="tensorrt")
    assert process.parse_line('{"stage": "inference", "fraction": 0.5}\n')["fraction"] == 0.5
    assert process.parse_line("plain text\n") == {"stage": "log", "message": "plain text"}
    assert process.parse_line("[1, 2]") == {"stage": "log", "message": "[1, 2]"}


def poll_until_done(runner: process.InferenceProcess, timeout_s: float = POLL_TIMEOUT_S) -> list[dict]:
    """What the GUI's timer does: poll until the runner is no longer running."""
    records, deadline = [], time.monotonic() + timeout_s
    while True:
        records += runner.poll()
        if not runner.running:
            return records
        assert time.monotonic() < deadline, f"no end after {timeout_s} s: {records[-3:]}"
        time.sleep(0.05)


@pytest.mark.slow
def test_runner_reports_progress_and_result(scene, tiny_model_dir):
    volume = volumes.sitk_to_volume_node(synthetic_ct((6, 48, 48), (5.0, 5.0, 4.0), seed=2), "input")
    with process.TemporaryWorkspace() as workspace:
        write_image(volumes.volume_node_to_sitk(volume), workspace.input_path)
        request = process.InferenceRequest(
            workspace.input_path,
            workspace.output_path,
            model=tiny_model_dir,
            modality="ct",
            device="cpu",
            gates_dir=workspace.gates_dir,
            extra_args=("--batch-size", "2"),
        )
        runner = process.InferenceProcess()
        runner.start(process.build_command(request, sys.executable))
        records = poll_until_done(runner)

        assert runner.returncode == 0 and runner.error is None, runner.stderr
        stages = [r["stage"] for r in records if r["stage"] != "log"]
        assert stages[0] == "load" and stages[-1] == "done"
        assert stages.index("preprocess") < stages.index("inference") < stages.index("postprocess")
        fractions = [r["fraction"] for r in records if r["stage"] == "inference"]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) == 3
        assert runner.result is records[-1] and runner.progress["stage"] == "postprocess"
        outputs = runner.result["outputs"]
        assert set(outputs) == {"segmentation", "gate_map", "dominant_expert", "gate_summary"}
        assert all(Path(path).is_file() for path in outputs.values())

        labelmap = sitk.ReadImage(outputs["segmentation"])
        node = volumes.labelmap_to_segmentation(labelmap, TINY_TASK, volume)
        assert node.GetSegmentation().GetNumberOfSegments() == 3
        summary = json.loads(Path(outputs["gate_summary"]).read_text())
        assert gate_review.expert_table(summary).GetTable().GetNumberOfRows() == len(summary["per_segment"])
        folder = workspace.path
    assert not folder.exists()


@pytest.mark.slow
def test_runner_reports_the_engine_error(tmp_path):
    missing = tmp_path / "missing.nrrd"
    request = process.InferenceRequest(missing, tmp_path / "out.nrrd")
    runner = process.InferenceProcess()
    runner.start(process.build_command(request, sys.executable))
    records = poll_until_done(runner)
    assert runner.returncode == 2
    assert runner.error == f"{missing}: no such file or folder"
    assert records[-1]["stage"] == "error" and runner.result is None
    assert "m4oe: error:" in runner.stderr
    assert not (tmp_path / "out.nrrd").exists()


@pytest.mark.slow
def test_cancel_kills_the_whole_process_tree(tiny_model_dir):
    # Like PythonSlicer, a launcher process runs the engine as its child.
    launcher = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"]
    with process.TemporaryWorkspace() as workspace:
        write_image(synthetic_ct((64, 128, 128), (2.0, 2.0, 2.5), seed=3), workspace.input_path)
        request = process.InferenceRequest(
            workspace.input_path,
            workspace.output_path,
            model=tiny_model_dir,
            modality="ct",
            device="cpu",
            extra_args=("--batch-size", "1"),
        )
        runner = process.InferenceProcess()
        runner.start(launcher + process.build_command(request, sys.executable))
        deadline = time.monotonic() + POLL_TIMEOUT_S
        while not any("fraction" in record for record in runner.poll()):
            assert runner.running and time.monotonic() < deadline, runner.stderr
            time.sleep(0.05)
        tree = [psutil.Process(runner.pid), *psutil.Process(runner.pid).children(recursive=True)]
        assert len(tree) >= 2, "the launcher's child (the engine) was not found"

        runner.cancel()

        poll_until_done(runner, timeout_s=30)
        assert runner.cancelled and runner.returncode is not None and runner.returncode < 0
        assert runner.error is None
        # Gone, not zombies: our child is reaped by cancel, the engine by init once orphaned.
        assert [proc.pid for proc in tree if psutil.pid_exists(proc.pid)] == []
        assert not workspace.output_path.exists()
        folder = workspace.path
    assert not folder.exists()


def test_roi_bounds_in_lps_for_plain_rotated_and_transformed_rois(scene):
    """Issue #24 point 2: a markups ROI (RAS) as the engine's LPS box, in the volume's local frame."""
    assert volumes.lps_bounds_of_ras_points([[1, 2, 3], [-4, 5, -6]]) == (-1, -5, -6, 4, -2, 3)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(10, 20, 30)
    roi.SetSize(4, 6, 8)
    np.testing.assert_allclose(volumes.roi_lps_bounds(roi), (-12, -23, 26, -8, -17, 34))
    # Rotated 90 degrees about S: x and y sizes swap. 45 degrees: the axis-aligned box around it.
    rotation = vtk.vtkTransform()
    rotation.Translate(10, 20, 30)
    rotation.RotateZ(90)
    roi.SetAndObserveObjectToNodeMatrix(rotation.GetMatrix())
    np.testing.assert_allclose(volumes.roi_lps_bounds(roi), (-13, -22, 26, -7, -18, 34), atol=1e-9)
    rotation = vtk.vtkTransform()
    rotation.RotateZ(45)
    roi.SetAndObserveObjectToNodeMatrix(rotation.GetMatrix())
    half = (4 + 6) / 2 / np.sqrt(2)
    np.testing.assert_allclose(volumes.roi_lps_bounds(roi), (-half, -half, -4, half, half, 4), atol=1e-9)
    # A volume moved 100 mm to the right (RAS x): the ROI in the volume's frame is 100 mm left of it.
    volume = volumes.sitk_to_volume_node(sitk.Image([4, 4, 4], sitk.sitkInt16), "v")
    moved = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(moved)
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 100.0)
    moved.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(moved.GetID())
    np.testing.assert_allclose(
        volumes.roi_lps_bounds(roi, volume), (100 - half, -half, -4, 100 + half, half, 4), atol=1e-9
    )
    with pytest.raises(ValueError, match="no size"):
        volumes.roi_lps_bounds(scene.AddNewNodeByClass("vtkMRMLMarkupsROINode"))


def test_structure_list_helpers_and_the_command_line(tiny_model_dir):
    """Issue #24 point 1: the checkable list's keys, its parameter text, and the engine arguments."""
    card = models.model_card(str(tiny_model_dir))
    keys = ["liver", "spleen", "kidney_right"]
    assert models.structure_choices(card, None) == [
        ("liver", "liver"),
        ("spleen", "spleen"),
        ("kidney_right", "right kidney"),
    ]
    assert models.skipped_text(keys, ["liver", "kidney_right"]) == "spleen"
    assert models.checked_structures(keys, "spleen") == ["liver", "kidney_right"]
    assert models.checked_structures(keys, "") is None  # all: no --structures at all
    assert models.checked_structures(keys, "gone_from_the_model") is None
    request = process.InferenceRequest(
        "in.nrrd",
        "out.seg.nrrd",
        structures=["liver", "kidney_right"],
        roi_mm=(-1, 2, 3, 4, 5, 6),
        body_crop=False,
    )
    command = process.build_command(request, "python")
    assert command[command.index("--structures") + 1] == "liver,kidney_right"
    assert "--roi-mm=-1.0,2.0,3.0,4.0,5.0,6.0" in command and "--no-body-crop" in command
    plain = process.build_command(process.InferenceRequest("in.nrrd", "out.seg.nrrd"), "python")
    assert not any(a.startswith(("--structures", "--roi", "--no-body-crop")) for a in plain)
    for bad in (dict(structures="liver"), dict(structures=[]), dict(roi_mm=(1, 2, 3))):
        with pytest.raises(ValueError):
            process.InferenceRequest("in.nrrd", "out.nrrd", **bad)
