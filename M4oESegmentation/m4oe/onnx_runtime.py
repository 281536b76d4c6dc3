"""ONNX Runtime backend for the network forward pass on the CPU.

Measured on the project's 2-core CPU (``benchmarks/README.md``): ONNX Runtime runs the network
forward alone 6-34 % faster than PyTorch eager, but ``m4oe segment`` end to end on 512 x 512 x
100-300 CT volumes is no faster (0.97-1.05x the time) and holds more memory, so PyTorch stays the
default and this backend is a choice (``--backend onnx`` or ``auto``). The network is exported once
per model, task and forced expert with ``torch.onnx.export`` (the dynamo exporter) and the graph is
cached by the weights' SHA-256 under ``<model cache>/.onnx``; exporting takes tens of seconds, so
the ``auto`` backend uses a graph only once it is cached (``--backend onnx`` or :func:`prepare`
writes it) and PyTorch otherwise.

What the exported graph computes: input ``slices`` (B, C, S, S) float32, the model's input in its
own normalised intensities (B is dynamic); outputs ``logits`` (B, K, S, S) of one task head and,
for mixture-of-experts models, ``gate:<layer>`` (B, E, H_l, W_l) expert weights per MoE layer,
the same tensors ``SwinUNet.forward(..., return_gates=True)`` returns. Top-k routing sends a
data-dependent number of tokens to each expert, which an exported graph cannot express, so top-k
models always run in PyTorch. Every export is checked against PyTorch on random input before it is
cached; a graph that disagrees is refused, never used.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from m4oe import __version__
from m4oe.errors import ModelError
from m4oe.hub import cache_dir
from m4oe.model import SwinUNet

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
INPUT_NAME = "slices"
GATE_PREFIX = "gate:"
# Largest difference from PyTorch accepted when an export is checked (logits of a random input;
# float32 exports differ by about 1e-5 from reordered sums).
EXPORT_TOLERANCE = 1e-3
_REQUIRED = ("onnxruntime", "onnx", "onnxscript")


def missing_packages() -> list[str]:
    """The packages the ONNX backend needs that are not installed (empty when it can run)."""
    return [name for name in _REQUIRED if importlib.util.find_spec(name) is None]


def onnx_cache_dir() -> Path:
    """Where exported graphs are kept: ``.onnx`` inside the model cache (:func:`m4oe.hub.cache_dir`)."""
    return cache_dir() / ".onnx"


def unsupported_reason(model: SwinUNet, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``model`` cannot run on ONNX Runtime here, or None when it can."""
    if device.type != "cpu":
        return f"the ONNX backend runs on the CPU only, not {device.type}"
    if dtype != torch.float32:
        return "the ONNX backend runs in float32 only"
    if model.cfg.arch == "mome":
        return "MoME models run in PyTorch only (their class queries are chosen per call)"
    if model.cfg.is_moe and model.cfg.top_k is not None:
        return f"top-{model.cfg.top_k} routing has data-dependent expert batches that a graph cannot hold"
    missing = missing_packages()
    if missing:
        return f"not installed: {', '.join(missing)} (pip install onnxruntime onnx onnxscript)"
    return None


def graph_path(weights_sha256: str, task: str, expert: int | None) -> Path | None:
    """The cache file of one exported graph; None for weights without a recorded SHA-256."""
    if not weights_sha256:
        return None
    routing = "gate" if expert is None else f"expert{expert}"
    name = f"{weights_sha256[:32]}-{task}-{routing}-m4oe{__version__}-torch{torch.__version__}.onnx"
    return onnx_cache_dir() / name.replace("+", "_")


@contextlib.contextmanager
def _unfused_attention(model: nn.Module):
    """Window attention as explicit matrix products while exporting.

    The exporter of torch 2.14 cannot decompose ``scaled_dot_product_attention`` followed by
    timm's reshape of its output; the explicit products are the same arithmetic, and ONNX
    Runtime fuses them again.
    """
    modules = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    for m in modules:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in modules:
            m.fused_attn = True


class _Export(nn.Module):
    """The network with a fixed task and routing, returning plain tensors (logits, *gates)."""

    def __init__(self, model: SwinUNet, task: str, expert: int | None, layers: list[str]):
        super().__init__()
        self.model, self.task, self.expert, self.layers = model, task, expert, layers

    def forward(self, x: torch.Tensor):
        logits, gates = self.model(x, task=self.task, force_expert=self.expert, return_gates=True)
        return (logits, *(gates[name] for name in self.layers))


def export(model: SwinUNet, path: str | Path, task: str, expert: int | None = None) -> Path:
    """Export ``model`` (one task head, gate or forced ``expert``) to an ONNX file and check it.

    The file appears at ``path`` only once it is complete and matches PyTorch within
    :data:`EXPORT_TOLERANCE` on a random batch. Raises :class:`ModelError` otherwise.
    """
    import onnxruntime as ort

    path = Path(path)
    cfg = model.cfg
    model = model.eval()
    torch.manual_seed(0)
    example = torch.randn(2, cfg.input_channels, cfg.img_size, cfg.img_size)
    with torch.inference_mode():
        reference, gates = model(example, task=task, force_expert=expert, return_gates=True)
    layers = list(gates)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp.onnx")
    try:
        with _unfused_attention(model), torch.no_grad():
            torch.onnx.export(
                _Export(model, task, expert, layers).eval(),
                (example,),
                str(temporary),
                dynamo=True,
                external_data=False,
                input_names=[INPUT_NAME],
                output_names=["logits", *(GATE_PREFIX + name for name in layers)],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
        session = ort.InferenceSession(str(temporary), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {INPUT_NAME: example.numpy()})
        error = float(np.abs(outputs[0] - reference.numpy()).max())
        if error > EXPORT_TOLERANCE:
            raise ModelError(f"the exported graph differs from PyTorch by {error:.3g} (logits)", path)
        os.replace(temporary, path)
    except ModelError:
        raise
    except Exception as error:  # the exporter raises many kinds; all mean "no graph"
        raise ModelError(
            f"ONNX export failed: {type(error).__name__}: {error}".splitlines()[0], path
        ) from error
    finally:
        temporary.unlink(missing_ok=True)
    return path


class OnnxNetwork:
    """An exported graph behind the call the predictor makes of a :class:`SwinUNet`.

    Args:
        path: the ``.onnx`` file from :func:`export`.
        threads: intra-op threads (the predictor passes PyTorch's thread count).
    """

    def __init__(self, path: str | Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Without the memory arena: peak resident memory of `m4oe segment` on 512x512x100 voxels
        # 2.09 GB instead of 3.00 (dense Swin-UNet; PyTorch 1.80), same time. Spinning threads
        # stay on: turned off, the network stage took 30.5 s instead of 26.4.
        options.enable_cpu_mem_arena = False
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # a truncated or foreign file: onnxruntime raises its own types
            raise ModelError(f"not a usable ONNX graph: {str(error).splitlines()[0]}", path) from None
        self.outputs = [o.name for o in self.session.get_outputs()]
        if self.outputs[:1] != ["logits"] or self.session.get_inputs()[0].name != INPUT_NAME:
            raise ModelError("not a graph exported by m4oe (unexpected input or output names)", path)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x`` (B, C, S, S) float32 on the CPU -> (logits (B, K, S, S), {layer: (B, E, H_l, W_l)})."""
        values = self.session.run(None, {INPUT_NAME: x.detach().contiguous().numpy()})
        gates = {
            name[len(GATE_PREFIX) :]: torch.from_numpy(v)
            for name, v in zip(self.outputs[1:], values[1:], strict=True)
        }
        return torch.from_numpy(values[0]), gates


def prepare(
    model: SwinUNet,
    weights_sha256: str,
    task: str,
    expert: int | None = None,
    report: Callable[[str, int, int], None] | None = None,
) -> Path:
    """The cached graph of this model, task and routing, exported first when not cached yet.

    Weights without a recorded SHA-256 cannot be cached safely: their graph goes to a temporary
    folder for this process. An export is announced as ``report("export", 0, 1)`` and
    ``report("export", 1, 1)``. Raises :class:`ModelError` when the export fails.
    """
    path = graph_path(weights_sha256, task, expert)
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="m4oe-onnx-")) / f"{task}-{expert}.onnx"
    if not path.is_file():
        log.info("exporting the network to ONNX (once per model): %s", path)
        if report is not None:
            report("export", 0, 1)
        export(model, path, task, expert)
        if report is not None:
            report("export", 1, 1)
    return path
