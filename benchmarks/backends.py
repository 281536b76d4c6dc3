"""Network forward on PyTorch against ONNX Runtime, interleaved in one process.

For each model: the graph is exported first (untimed, into a temporary cache), then batches of
random slices run alternately on the two runtimes, so that load from other processes hits both
alike. Reported per runtime: best and median ms per slice, and the ratio ONNX Runtime / PyTorch
of the medians (below 1: ONNX Runtime faster). Models: the embedded demonstration model (128-pixel
input, embed 32, dense mixture of 3 experts) and random-weight full-size networks of the peers
benchmark (224-pixel input, embed 96): the dense Swin-UNet and the dense 3-expert M4oE.

Run: ``PYTHONPATH=M4oESegmentation python benchmarks/backends.py [--threads 1,2] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "M4oESegmentation"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def models(workdir: Path) -> dict[str, Path]:
    import peers

    from m4oe.hub import resolve_model

    return {
        "m4oe-phantom (embedded)": resolve_model(None),
        "swin-unet": peers.save_model(workdir, "swin-unet"),
        "m4oe-dense": peers.save_model(workdir, "m4oe-dense"),
    }


def compare(folder: Path, threads: int, batch: int, repeats: int) -> dict:
    import torch

    from m4oe import onnx_runtime
    from m4oe.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    model, card = load_checkpoint(folder)
    cfg = model.cfg
    graph = onnx_runtime.prepare(model, card.weights_sha256, cfg.task_names[0])
    ort = onnx_runtime.OnnxNetwork(graph, threads)
    torch.manual_seed(0)
    x = torch.randn(batch, cfg.input_channels, cfg.img_size, cfg.img_size)
    runs = {"torch": lambda: model(x, return_gates=True), "onnx": lambda: ort(x)}
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()  # warm-up
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / batch * 1e3)
    out = {name: (min(t), statistics.median(t)) for name, t in times.items()}
    out["ratio"] = out["onnx"][1] / out["torch"][1]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--batch", type=int, default=8, help="slices per forward (the predictor's CPU batch)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="m4oe-backends-") as tmp:
        os.environ["M4OE_CACHE_DIR"] = str(Path(tmp) / "cache")
        print(
            "| model | threads | PyTorch ms/slice best / median | ONNX Runtime best / median | ORT / torch |"
        )
        print("|---|--:|--:|--:|--:|")
        for name, folder in models(Path(tmp)).items():
            for threads in (int(t) for t in args.threads.split(",")):
                r = compare(folder, threads, args.batch, args.repeats)
                print(
                    f"| {name} | {threads} | {r['torch'][0]:.1f} / {r['torch'][1]:.1f} "
                    f"| {r['onnx'][0]:.1f} / {r['onnx'][1]:.1f} | {r['ratio']:.2f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
