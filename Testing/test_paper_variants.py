"""The two published M4oE setups (issue #26, point 1): "as released" and "as described".

Each is a registered architecture with its own training config, they differ only where the
training README says they do, and a model whose gate cannot prefer an expert (the released
channel gate) says so in its gate summary, its report and the Slicer gate review.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny_models import save_tiny_model

from m4oe.model import MODEL_REGISTRY, build_model, get_config
from m4oe.model.moe import MoEFeedForward

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs"
TINY = dict(img_size=64, embed_dim=24, num_heads=(1, 2, 4, 8), window_size=4)


def test_released_and_described_variants_differ_only_in_experts_and_gate():
    released, described = get_config("m4oe-paper-released"), get_config("m4oe-paper-described")
    assert released.experts == ("flare22", "atlas2023", "amos22") and released.gate == "channel"
    assert described.experts == ("ct", "mr") and described.gate == "softmax"
    assert released.replace(experts=described.experts, gate="softmax") == described
    # The former name builds what it built before: the released setup.
    assert get_config("m4oe-paper") == released
    assert "m4oe-paper" not in MODEL_REGISTRY


@pytest.mark.parametrize("name", ["m4oe-paper-released", "m4oe-paper-described"])
def test_tiny_paper_variants_route_as_documented(name):
    torch.manual_seed(0)
    model = build_model(name, **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, gates = model(x, task="atlas2023", return_gates=True)
    assert logits.shape == (2, 3, 64, 64) and torch.isfinite(logits).all()
    weights = torch.cat([g.movedim(1, -1).reshape(-1, g.shape[1]) for g in gates.values()])
    if name == "m4oe-paper-released":
        # The channel gate: every expert weighs exactly 1/E on every token, whatever the input.
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / 3))
    else:
        assert weights.max() - weights.min() > 1e-3, "the softmax gate weighs experts differently"
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert layers and {m.gate_type for m in layers} == {get_config(name).gate}


@pytest.mark.parametrize(
    ("config", "model", "experts"),
    [
        ("m4oe_paper.toml", "m4oe-paper-described", ("ct", "mr")),
        ("m4oe_paper_released.toml", "m4oe-paper-released", ("flare22", "atlas2023", "amos22")),
    ],
)
def test_each_paper_config_trains_its_named_variant(config, model, experts):
    from m4oe_training.config import load_config

    cfg, _ = load_config(CONFIGS / config)
    assert cfg.model == model
    registered = get_config(model)
    # Training takes experts and task heads from the datasets: they must be the variant's own.
    assert cfg.experts == registered.experts == experts
    assert set(cfg.task_names) == set(registered.task_names)
    kinds = [s.kind for s in cfg.stages]
    if model == "m4oe-paper-released":
        # One joint stage, no load balancing: the channel gate has no expert weights to balance.
        assert kinds == ["joint"] and cfg.stages[0].load_balance_weight == 0
    else:
        assert kinds == ["mim", "experts", "joint"] and cfg.stages[-1].load_balance_weight > 0
    tiny = build_model(model, experts=cfg.experts, **TINY)
    assert tiny.cfg.gate == registered.gate


def _noise_ct(slices: int = 4) -> sitk.Image:
    voxels = np.random.default_rng(0).normal(0, 300, (slices, 48, 48)).astype(np.float32)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((1.5, 1.5, 3.0))
    return image


def _channel_prediction(tmp_path, forced: str | None = None):
    from m4oe.predictor import Predictor

    folder = save_tiny_model(tmp_path / "channel", gate="channel")
    image = _noise_ct()
    predictor = Predictor.from_pretrained(folder, device="cpu")
    return image, predictor.predict(image, modality="ct", gates=True, force_expert=forced)


def test_channel_gate_summary_report_and_gate_review_say_it_cannot_route(tmp_path):
    from m4oe.report import render_report

    image, pred = _channel_prediction(tmp_path)
    summary = pred.gate_summary
    assert summary["gate"] == "channel" and summary["gate_can_prefer_experts"] is False
    assert "weighs every expert equally (channel gate" in summary["warnings"]["routing"]
    assert "no routing" in summary["warning"]
    assert "disagrees" not in summary["warning"], "equal weights are no evidence of disagreement"

    figure = render_report(image, pred)
    texts = [t.get_text() for t in figure.texts]
    assert any("weighs every expert equally" in t for t in texts), texts
    curves = next(a for a in figure.axes if a.get_label() == "gate_curves")
    assert "no routing to show" in curves.get_title(loc="left")

    module_dir = ROOT / "M4oESegmentation"
    sys.path.insert(0, str(module_dir))
    try:
        slicer = pytest.importorskip("slicer")
        if not hasattr(slicer, "vtkMRMLScene"):
            pytest.skip("slicer-core is not installed")
        from M4oESegmentationLib import gate_review
    finally:
        sys.path.remove(str(module_dir))
    message = gate_review.routing_warning(summary)
    assert "weighs every expert equally" in message and "confidence" not in message
    older = {k: v for k, v in summary.items() if k not in ("warnings", "warning")}
    assert "the gate map shows no routing" in gate_review.routing_warning(older)


def test_softmax_gate_summary_can_prefer_experts_and_forced_channel_routing_is_not_flagged(tmp_path):
    from m4oe.predictor import Predictor

    image = _noise_ct(2)
    softmax = Predictor.from_pretrained(save_tiny_model(tmp_path / "softmax"), device="cpu")
    summary = softmax.predict(image, modality="ct", gates=True).gate_summary
    assert summary["gate"] == "softmax" and summary["gate_can_prefer_experts"] is True
    assert "weighs every expert equally" not in (summary["warning"] or "")
    _, forced = _channel_prediction(tmp_path, forced="mr")
    assert forced.gate_summary["gate_can_prefer_experts"] is False
    assert "weighs every expert equally" not in (forced.gate_summary["warning"] or "")
