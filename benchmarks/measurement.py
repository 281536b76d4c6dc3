"""Measurement primitives of ``benchmarks/peers.py``: child processes, peak memory, matmul peak,
network forward speed, cold start, and the machine they ran on.

``peers.py`` (the models, the 3D peers, the targets, the report and the command line) runs every
figure through these. Units: seconds, bytes (peak resident memory), GFLOP/s (``GB`` = 1e9 FLOP
per second); the machine's load average is recorded next to every figure. The M4oE engine is
imported from ``M4oESegmentation/`` (``child_env`` puts it on a child's ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "M4oESegmentation"
GB = 1e9


def load() -> dict:
    """The 1-minute load average and, where the kernel has it, CPU pressure (some avg10, %)."""
    info = {"load1": round(os.getloadavg()[0], 2)}
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        info["cpu_pressure"] = float(line.split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return info


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ENGINE), env.get("PYTHONPATH")) if p)
    return env


def own_peak_rss() -> int:
    """Peak resident memory (bytes) of this process since it started its program.

    ``VmHWM`` of the process's own address space: ``ru_maxrss`` would also count the copy of the
    parent's memory that the child held between fork and exec (the size of this big benchmark).
    """
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


PEAK_MARK = "peers.py peak_rss_bytes "


def run_child(cmd: list[str], workdir: Path) -> dict:
    """Run a command to completion; its wall time (s), peak RSS (bytes), exit code and output.

    The peak RSS is the one the child reports on its last stderr line (see :func:`own_peak_rss`).
    """
    out, err = workdir / "child.out", workdir / "child.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        before = load()
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=fo, stderr=fe, env=child_env(), cwd=ROOT)
        wall = time.perf_counter() - start
    stderr = err.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {stderr[-2000:]}")
    marks = [line for line in stderr.splitlines() if line.startswith(PEAK_MARK)]
    return {
        "wall_s": round(wall, 3),
        "peak_rss_bytes": int(marks[-1][len(PEAK_MARK) :]) if marks else None,
        "stdout": out.read_text(),
        "load_before": before,
        "load_after": load(),
    }


def exec_cli(argv: list[str]) -> int:
    """``m4oe <argv>`` in this process, then report its peak RSS on stderr (child side of segment)."""
    from m4oe.cli import main as cli_main

    rc = cli_main(argv)
    print(f"{PEAK_MARK}{own_peak_rss()}", file=sys.stderr)
    return rc


# ---------------------------------------------------------------- in-process measurements


def matmul_peak(threads: int, repeats: int = 5, n: int = 4096) -> dict:
    """Best and median float32 GFLOP/s of ``torch.mm`` of two n x n matrices on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    flops = 2 * n**3
    return {
        "threads": threads,
        "size": n,
        "best_gflops": round(flops / min(times) / GB, 1),
        "median_gflops": round(flops / statistics.median(times) / GB, 1),
        "load": load(),
    }


def slice_flops(model) -> int:
    """FLOPs of one forward pass on one slice, as the predictor calls it.

    Counted with attention on its explicit matrix products: the flop counter does not see the
    CPU kernel of ``scaled_dot_product_attention`` (the same arithmetic).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in attention]
    for m in attention:
        m.fused_attn = False
    cfg = model.cfg
    x = torch.randn(1, cfg.input_channels, cfg.img_size, cfg.img_size)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x, return_gates=True)
    finally:
        for m, fused in zip(attention, saved, strict=True):
            m.fused_attn = fused
    return int(counter.get_total_flops())


def forward_speed(model_dir: Path, batches: int, threads: int | None, onnx: bool = False) -> dict:
    """FLOPs per slice and the network forward speed at the predictor's batch size and threads.

    With ``onnx``, the forward runs on ONNX Runtime (the graph exported first, untimed).
    """
    import torch

    from m4oe import onnx_runtime
    from m4oe.predictor import Predictor

    predictor = Predictor.from_pretrained(model_dir, device="cpu", threads=threads, backend="torch")
    model, size = predictor.model, predictor.batch_size
    flops = slice_flops(model)
    cfg = model.cfg
    if onnx:
        graph = onnx_runtime.prepare(model, predictor.card.weights_sha256, cfg.task_names[0])
        network = onnx_runtime.OnnxNetwork(graph, torch.get_num_threads())
    else:
        network = lambda x: model(x, return_gates=True)  # noqa: E731
    torch.manual_seed(1)
    x = torch.randn(size, cfg.input_channels, cfg.img_size, cfg.img_size)
    times = []
    before = load()
    with torch.inference_mode():
        network(x)
        for _ in range(batches):
            start = time.perf_counter()
            network(x)
            times.append(time.perf_counter() - start)
    best, median = min(times), statistics.median(times)
    return {
        "batch": size,
        "threads": torch.get_num_threads(),
        "gflop_per_slice": round(flops / GB, 3),
        "best_ms_per_slice": round(best / size * 1e3, 1),
        "median_ms_per_slice": round(median / size * 1e3, 1),
        "best_gflops": round(flops * size / best / GB, 1),
        "median_gflops": round(flops * size / median / GB, 1),
        "load_before": before,
        "load_after": load(),
    }


COLD_START = """
import json, time
started = time.time()
from m4oe.predictor import Predictor
imported = time.time()
predictor = Predictor.from_pretrained({model!r}, device="cpu")
loaded = time.time()
import torch
cfg = predictor.model.cfg
with torch.inference_mode():
    predictor.model(torch.zeros(1, cfg.input_channels, cfg.img_size, cfg.img_size))
print(json.dumps(dict(started=started, imported=imported, loaded=loaded, forward=time.time())))
"""


def cold_start(model_dir: Path, repeats: int, workdir: Path) -> dict:
    """Interpreter start, import, model load and first forward of a fresh process (s, median)."""
    runs = []
    for _ in range(repeats):
        spawned = time.time()
        child = run_child([sys.executable, "-c", COLD_START.format(model=str(model_dir))], workdir)
        t = json.loads(child["stdout"].strip().splitlines()[-1])
        runs.append(
            {
                "interpreter_s": t["started"] - spawned,
                "import_s": t["imported"] - t["started"],
                "load_s": t["loaded"] - t["imported"],
                "cold_start_s": t["loaded"] - spawned,
                "first_forward_s": t["forward"] - t["loaded"],
                "load1": child["load_before"]["load1"],
            }
        )
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]} | {"repeats": repeats}


# ---------------------------------------------------------------- the machine


def machine_info(threads: int) -> dict:
    from importlib.metadata import version

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": version("torch"),
        "timm": version("timm"),
        "monai": version("monai"),
        "dna": version("dynamic-network-architectures"),
        "load_start": load(),
    }
