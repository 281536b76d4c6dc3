"""Issue #26 point 4: the Slicer module runs MoME models. The structure list comes from a MoME
card (its class names), and the gate review shows the router's expert weights one decoder scale
at a time: per-segment table, per-slice chart and dominant-expert map, on a real MRML scene
(slicer-core) with the engine run in a real subprocess on a tiny untrained MoME model."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

try:
    import slicer
except ImportError as error:
    pytest.skip(f"slicer-core cannot be imported ({error})", allow_module_level=True)
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

import torch
from M4oESegmentationLib import gate_review, models, segmenter, volumes

from m4oe.checkpoint import save_checkpoint
from m4oe.model import build_model
from m4oe.model_card import ExpertInfo, ModelCard, Preprocessing, TaskInfo
from m4oe.phantom import generate_case, phantom_labels
from m4oe.preprocessing import DEFAULT_PARAMS
from m4oe.terminology import structure_key

MODULE_DIR = Path(__file__).resolve().parents[2] / "M4oESegmentation"
LAYERS = ["router.0", "router.1", "router.2"]


@pytest.fixture(scope="module")
def mome_dir(tmp_path_factory) -> Path:
    """A tiny untrained MoME model (3 decoder scales, experts ct and mr) saved as a model folder."""
    torch.manual_seed(0)
    model = build_model("mome-tiny")
    model.set_class_embeddings(torch.nn.functional.normalize(torch.randn(9, 384), dim=1))
    card = ModelCard(
        name="tiny-mome",
        architecture=model.cfg,
        experts=[ExpertInfo("ct", "ct"), ExpertInfo("mr", "mr")],
        tasks=[TaskInfo("organs", phantom_labels())],
        preprocessing=Preprocessing(intensity={m: DEFAULT_PARAMS[m].to_dict() for m in ("ct", "mr")}),
    )
    return save_checkpoint(model.eval(), card, tmp_path_factory.mktemp("mome") / "model")


@pytest.fixture(scope="module")
def mome_gates(mome_dir, tmp_path_factory):
    """The gate summary and folder of ``m4oe segment --gates`` on a phantom CT, three structures."""
    from m4oe.cli import main

    folder = tmp_path_factory.mktemp("mome_gates")
    image, _ = generate_case("ct", 8, max_size=64)
    sitk.WriteImage(image, str(folder / "ct.nrrd"))
    argv = ["segment", str(folder / "ct.nrrd"), "-o", str(folder / "labels.nrrd"), "--model", str(mome_dir)]
    argv += ["--structures", "liver,spleen,aorta", "--gates", str(folder / "gates"), "--progress", "none"]
    assert main([*argv, "--threads", "1", "--tta", "1", "--no-body-crop"]) == 0
    return json.loads((folder / "gates" / "gate_summary.json").read_text()), folder / "gates"


def test_structure_list_comes_from_the_mome_card(mome_dir):
    card = models.model_card(str(mome_dir))
    names = card["architecture"]["class_names"]
    assert models.structure_choices(card, None) == [
        (structure_key(label), label.name) for label in phantom_labels()
    ]
    assert [name for _, name in models.structure_choices(card, None)] == names
    assert models.is_mome(card)
    assert "<b>MoME:</b> 9 structures asked for by name" in models.model_facts(card)
    assert "3 decoder scales" in models.mome_text(card)
    plain = dict(card, architecture={k: v for k, v in card["architecture"].items() if k != "arch"})
    assert not models.is_mome(plain) and models.mome_text(plain) == ""
    assert "MoME" not in models.model_facts(plain)


def test_layer_choices_table_and_chart_per_decoder_scale(scene, mome_gates):
    summary, _ = mome_gates
    choices = gate_review.layer_choices(summary)
    assert choices == [
        ("", "mean over the 3 decoder scales"),
        ("router.0", "decoder scale 1 of 3 (deepest, 4x4 tokens)"),
        ("router.1", "decoder scale 2 of 3 (middle, 8x8 tokens)"),
        ("router.2", "decoder scale 3 of 3 (finest, 16x16 tokens)"),
    ]
    assert gate_review.layer_choices({"experts": [{"name": "ct"}]}) == []
    segments = sorted(summary["per_segment"], key=lambda name: summary["per_segment"][name]["label"])
    assert segments, "the tiny model predicted no structure"
    table = gate_review.expert_table(summary, layer="router.1")
    chart = gate_review.expert_plot(summary, layer="router.1")
    assert gate_review.shown_layer(chart) == "router.1"
    assert "decoder scale 2 of 3" in chart.GetTitle()
    data = chart.GetNthPlotSeriesNode(0).GetTableNode().GetTable()
    marker = gate_review.marker_series(chart)

    def check(layer: str) -> None:
        for row, name in enumerate(segments):
            entry = summary["per_segment"][name]
            shown = entry["per_layer"][layer] if layer else entry
            assert table.GetTable().GetValue(row, 0).ToString() == name
            assert table.GetTable().GetValue(row, 1).ToString() == shown["dominant_expert"]
            for c, expert in enumerate(("ct", "mr")):
                assert table.GetTable().GetValue(row, 2 + c).ToDouble() == pytest.approx(
                    shown["mean_weights"][expert]
                )
        for expert in ("ct", "mr"):
            weights = [data.GetValueByName(r, expert).ToDouble() for r in range(data.GetNumberOfRows())]
            expected = [
                (s["per_layer"][layer] if layer else s)["mean_weights"][expert] for s in summary["per_slice"]
            ]
            np.testing.assert_allclose(weights, expected)

    check("router.1")
    # A segment's figures at a scale are its own query's, which differ between scales and classes.
    per_scale = {k: summary["per_segment"][segments[0]]["per_layer"][k]["mean_weights"]["ct"] for k in LAYERS}
    assert len(set(per_scale.values())) == 3
    for layer in ("router.0", "", "router.2"):
        gate_review.show_layer(summary, chart, table, layer)
        check(layer)
        assert gate_review.shown_layer(chart) == layer
        assert gate_review.marker_series(chart) is marker and chart.GetNumberOfPlotSeriesNodes() == 3
    assert chart.GetTitle() == "Gate weight per slice, decoder scale 3 of 3 (finest, 16x16 tokens)"
    with pytest.raises(ValueError, match=r"no layer 'encoder\.0\.0' to show"):
        gate_review.show_layer(summary, chart, table, "encoder.0.0")
    entry = summary["per_slice"][2]
    line = gate_review.slice_weights_text(summary, int(entry["index"]), "router.0")
    assert line.endswith(f"ct {entry['per_layer']['router.0']['mean_weights']['ct']:.2f}, "
                         f"mr {entry['per_layer']['router.0']['mean_weights']['mr']:.2f}")  # fmt: skip
    with pytest.raises(ValueError, match=r"no layer 'router\.7'"):
        gate_review.slice_weights_text(summary, int(entry["index"]), "router.7")


def test_segmenter_loads_a_map_per_decoder_scale(scene, mome_dir, temp_root):
    image, _ = generate_case("ct", 9, max_size=64)
    volume = volumes.sitk_to_volume_node(image, "phantom CT")
    runner = segmenter.Segmenter(sys.executable, MODULE_DIR)
    started = time.monotonic()
    result = runner.run(volume, modality="CT", model=str(mome_dir), device="cpu", test_time_passes=1,
                        structures=["liver", "spleen"])  # fmt: skip
    assert time.monotonic() - started < 300
    node = result.segmentation
    assert [node.GetSegmentation().GetNthSegment(n).GetName() for n in range(2)] == ["liver", "spleen"]
    review = segmenter.gate_review_of(node)
    assert [layer for layer, _ in review.layers] == ["", *LAYERS]
    assert review.summary["router"]["queries"] == ["liver", "spleen"]
    for layer, tokens in zip(LAYERS, (4, 8, 16), strict=True):
        overlay = review.show_layer(layer)
        assert overlay is review.scale_overlays[layer] and overlay is not review.overlay
        assert overlay.IsA("vtkMRMLLabelMapVolumeNode")
        assert overlay.GetImageData().GetDimensions()[:2] == (tokens, tokens)
        assert overlay.GetDisplayNode().GetColorNodeID() == review.colors.GetID()  # one legend
        values = set(np.unique(slicer.util.arrayFromVolume(overlay)).tolist())
        assert values <= {1, 2}
        assert gate_review.shown_layer(review.chart) == layer
        expected = review.summary["per_segment"]["liver"]["per_layer"][layer]["mean_weights"]["ct"]
        assert review.table.GetTable().GetValue(0, 2).ToDouble() == pytest.approx(expected)
    assert review.show_layer("") is review.overlay
    # Found again from the node alone (a saved scene), and removed with the result's gate views.
    assert segmenter.gate_review_of(node).scale_overlays == review.scale_overlays
    count = scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode")
    assert count == 4
    segmenter.remove_gate_views(node)
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    assert segmenter.gate_review_of(node) is None
    assert list(temp_root.iterdir()) == []
