"""The ONNX Runtime backend: export checked against PyTorch, the graph cache, and the predictor on it.

Exports here are of the tiny untrained model (64-pixel input, 3 experts), a few seconds each; the
cache folder is a temporary M4OE_CACHE_DIR per test.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from m4oe import cli, onnx_runtime
from m4oe.checkpoint import load_checkpoint
from m4oe.demo import synthetic_ct
from m4oe.errors import InputError, ModelError
from m4oe.model import build_model
from m4oe.predictor import Predictor

pytestmark = pytest.mark.skipif(
    bool(onnx_runtime.missing_packages()), reason=f"not installed: {onnx_runtime.missing_packages()}"
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty model cache; exported graphs go to its ``.onnx`` folder."""
    monkeypatch.setenv("M4OE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / ".onnx"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_checkpoint(tiny_model_dir)


@pytest.fixture(scope="module")
def ct() -> sitk.Image:
    """A small synthetic CT: 6 slices of 40x48 pixels, 6x6x8 mm, identity direction (LPS)."""
    return synthetic_ct((6, 40, 48), (6.0, 6.0, 8.0))


@pytest.mark.slow
@pytest.mark.parametrize("expert", [None, 2])
def test_exported_graph_returns_the_logits_and_gates_of_pytorch(loaded, tmp_path, expert):
    model, _ = loaded
    path = onnx_runtime.export(model, tmp_path / "net.onnx", "liver", expert)
    network = onnx_runtime.OnnxNetwork(path, threads=1)
    torch.manual_seed(3)
    x = torch.randn(5, 1, 64, 64)  # another batch size than the export's example: B is dynamic
    with torch.inference_mode():
        reference, reference_gates = model(x, task="liver", force_expert=expert, return_gates=True)
    logits, gates = network(x)
    assert logits.shape == reference.shape == (5, 2, 64, 64)
    assert torch.allclose(logits, reference, atol=1e-4), float((logits - reference).abs().max())
    assert list(gates) == list(reference_gates)  # every MoE layer, in the model's order
    for name, g in gates.items():
        assert torch.allclose(g, reference_gates[name], atol=1e-5), name
    if expert is not None:  # forced routing: every token's weight on that expert
        assert all(bool((g[:, expert] == 1).all()) for g in gates.values())
    # the attention modules are fused again after the export
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))


@pytest.mark.slow
def test_exported_graph_keeps_the_slice_context_of_the_gates(tmp_path):
    """A model whose gates see the slice (``gate_context = "slice"``): the context is computed per
    sample inside the graph, so a batch of different slices routes as PyTorch does."""
    torch.manual_seed(0)
    model = build_model("m4oe-tiny", gate_context="slice").eval()
    with torch.no_grad():
        for layer in model.modules():
            if getattr(layer, "context", None) is not None:
                layer.context.weight.normal_(0.0, 1.0)
    path = onnx_runtime.export(model, tmp_path / "net.onnx", "abdomen")
    network = onnx_runtime.OnnxNetwork(path, threads=1)
    levels = torch.tensor([0.5, 1.0, 2.0])[:, None, None, None]
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(4)) * levels
    with torch.inference_mode():
        reference, reference_gates = model(x, return_gates=True)
    logits, gates = network(x)
    assert torch.allclose(logits, reference, atol=1e-4), float((logits - reference).abs().max())
    for name, g in gates.items():
        assert torch.allclose(g, reference_gates[name], atol=1e-5), name


@pytest.mark.slow
def test_predictor_on_onnx_runtime_matches_pytorch_and_caches_the_graph(loaded, ct, cache, monkeypatch):
    on_torch = Predictor(*loaded, device="cpu", backend="torch").predict(
        ct, gates=True, probabilities="float16"
    )
    assert on_torch.backend == "torch"
    assert not cache.exists()

    predictor = Predictor(*loaded, device="cpu", backend="onnx")
    events = []
    on_onnx = predictor.predict(ct, gates=True, probabilities="float16", progress=events.append)
    assert on_onnx.backend == "onnx"
    stages = [(e.stage, e.done) for e in events]
    assert stages.index(("export", 0)) + 1 == stages.index(("export", 1)) < stages.index(("inference", 1))
    graphs = sorted(cache.glob("*.onnx"))
    assert [g.name.split("-")[:3] for g in graphs] == [[loaded[1].weights_sha256[:32], "abdomen", "gate"]]

    a, b = (sitk.GetArrayFromImage(p.labelmap) for p in (on_torch, on_onnx))
    assert (a == b).mean() >= 0.999
    pa, pb = (sitk.GetArrayFromImage(p.probabilities).astype(np.float32) for p in (on_torch, on_onnx))
    assert np.abs(pa - pb).max() < 2e-3
    ga, gb = (sitk.GetArrayFromImage(p.gate_map) for p in (on_torch, on_onnx))
    assert np.abs(ga - gb).max() < 1e-4
    assert on_onnx.gate_map.GetOrigin() == on_torch.gate_map.GetOrigin()

    # "auto" takes the cached graph and exports nothing; a forced expert has no graph yet -> PyTorch
    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_runtime, "export", no_export)
    auto = Predictor(*loaded, device="cpu", backend="auto")
    assert auto.predict(ct).backend == "onnx"
    assert auto.predict(ct, force_expert="ct").backend == "torch"


def test_auto_without_a_cached_graph_runs_pytorch_and_writes_nothing(loaded, ct, cache):
    assert Predictor(*loaded, device="cpu", backend="auto").predict(ct).backend == "torch"
    assert not cache.exists()


def test_onnx_backend_refuses_what_it_cannot_run(loaded):
    model, card = loaded
    top1 = build_model("m4oe-tiny", top_k=1)
    with pytest.raises(InputError, match="top-1 routing"):
        Predictor(top1, card, device="cpu", backend="onnx")
    with pytest.raises(InputError, match="float32 only"):
        Predictor(model, card, device="cpu", dtype="bfloat16", backend="onnx")
    with pytest.raises(InputError, match="backend 'tensorrt' is not one of auto, torch, onnx"):
        Predictor(model, card, device="cpu", backend="tensorrt")


def test_a_damaged_cached_graph_is_skipped_by_auto_and_refused_by_onnx(loaded, ct, cache, caplog):
    _, card = loaded
    path = onnx_runtime.graph_path(card.weights_sha256, "abdomen", None)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a graph")
    with caplog.at_level(logging.WARNING, logger="m4oe.predictor"):
        assert Predictor(*loaded, device="cpu", backend="auto").predict(ct).backend == "torch"
    assert "not a usable ONNX graph" in caplog.text and path.name in caplog.text
    with pytest.raises(ModelError, match="not a usable ONNX graph"):
        Predictor(*loaded, device="cpu", backend="onnx").predict(ct)


@pytest.mark.slow
def test_an_export_that_disagrees_with_pytorch_is_refused_and_not_cached(loaded, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_runtime, "EXPORT_TOLERANCE", -1.0)  # any difference, even 0, fails
    target = tmp_path / "net.onnx"
    with pytest.raises(ModelError, match="differs from PyTorch"):
        onnx_runtime.export(loaded[0], target, "abdomen")
    assert list(tmp_path.iterdir()) == []  # neither the graph nor its temporary file


@pytest.mark.slow
def test_cli_backend_onnx(tiny_model_dir, ct, tmp_path, cache, capsys):
    image = tmp_path / "ct.nrrd"
    sitk.WriteImage(ct, str(image))
    argv = ["segment", str(image), "-o", str(tmp_path / "seg.nii.gz"), "--model", str(tiny_model_dir)]
    assert cli.main([*argv, "--backend", "onnx", "--progress", "json"]) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["stage"] == "done" and done["backend"] == "onnx"
    assert cli.main([*argv, "--overwrite", "--backend", "auto"]) == 0  # the graph is cached now
    assert "network on ONNX Runtime" in capsys.readouterr().out
    assert cli.main([*argv, "--overwrite"]) == 0  # the default: PyTorch
    assert "network on PyTorch" in capsys.readouterr().out
