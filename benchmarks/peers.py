"""End-to-end speed and memory of M4oE on CPU against its dense baseline and two 3D peers.

One run measures, on synthetic CT volumes of 512 x 512 x Z voxels (0.8 x 0.8 x 1.5 mm, int16 HU,
written as .nii.gz):

- ``m4oe segment`` end to end (read, preprocess, forward, resample back, clean-up, write), one
  subprocess per case, for four random-initialised full-size models of the same width (embed 96,
  depths 2-2-2-2, 14 classes): ``swin-unet`` (dense, the baseline of every ratio) and M4oE with 3
  experts ("ct", "mr", "mr-t2") at ``top_k`` 1, 2 and None (dense mixture). Three experts, not two,
  so that top-2 differs from the dense mixture; the three M4oE cases share their weights. The
  ``-onnx`` cases are the dense Swin-UNet and the dense mixture again with the network forward on
  ONNX Runtime (``--backend onnx``; the graph is exported before timing, into a cache inside the
  work folder: an export happens once per model, not per volume).
- the 3D peers, in process in a subprocess each (network + sliding window + argmax only, no file
  I/O or resampling, random weights): MONAI SwinUNETR (feature size 48, 96^3 windows, overlap
  0.25) and an nnU-Net-style ``PlainConvUNet`` (6 stages, 32-320 features, 128^3 patches, overlap
  0.5, Gaussian weighting; no mirroring, which nnU-Net does by default and which would cost 8x).
  With ``--peer-slices N`` (and ``--peer-plane P``) a peer runs on a smaller volume and its time
  is scaled by the number of windows the full volume needs (its cost is per window).
- for our models: FLOPs per 224 x 224 slice (``FlopCounterMode``), the network forward alone at
  the predictor's batch size, and the cold start (interpreter + ``import m4oe.predictor`` + model
  load, in a fresh ``python -c`` process; the first forward is reported beside it).
- the float32 matrix-multiply peak: best of 5 ``torch.mm`` of 4096 x 4096 at the same threads,
  measured at the start and again at the end (the better of the two counts).

Wall time and peak resident memory (each child's own ``VmHWM``, which it reports on exit:
``measurement.own_peak_rss``) are per process. The machine's load average is recorded next to
every figure. Output: Markdown on stdout (ratios to the dense baseline, raw figures, the issue's
targets met or not) and ``--json FILE``.

Run: ``PYTHONPATH=M4oESegmentation python benchmarks/peers.py [--sizes 100,300]
[--only swin-unet,m4oe-top1,...] [--peer-slices N] [--quick] [--json out.json]``.

The measurement primitives (child processes, peak RSS, matmul peak, forward speed, cold start)
are in ``measurement.py`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # measurement.py, also when imported by path

from measurement import (
    ENGINE,
    GB,
    PEAK_MARK,
    cold_start,
    exec_cli,
    forward_speed,
    load,
    machine_info,
    matmul_peak,
    own_peak_rss,
    run_child,
)

PLANE = 512  # in-plane voxels of the test volumes
SPACING_XYZ = (0.8, 0.8, 1.5)  # mm
CLASSES = 14  # background + the 13 organs of FLARE22
ORGANS = (
    "liver",
    "kidney_right",
    "spleen",
    "pancreas",
    "aorta",
    "inferior_vena_cava",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "gallbladder",
    "esophagus",
    "stomach",
    "duodenum",
    "kidney_left",
)
EXPERTS = (("ct", "ct"), ("mr", "mr"), ("mr-t2", "mr"))  # (name, modality)
OURS = {
    "swin-unet": ("swin-unet", {}),
    "m4oe-top1": ("m4oe", {"top_k": 1}),
    "m4oe-top2": ("m4oe", {"top_k": 2}),
    "m4oe-dense": ("m4oe", {"top_k": None}),
    "swin-unet-onnx": ("swin-unet", {}),
    "m4oe-dense-onnx": ("m4oe", {"top_k": None}),
}
ONNX_SUFFIX = "-onnx"  # cases whose network runs on ONNX Runtime; the others on PyTorch
BASELINE = "swin-unet"
PEERS = {
    "swinunetr": {"roi": 96, "overlap": 0.25, "mode": "constant"},
    "nnunet": {"roi": 128, "overlap": 0.5, "mode": "gaussian"},
}
TARGETS = {
    "top1_vs_dense": 1.15,  # M4oE top-1 end to end at most this times the dense Swin-UNet
    "vs_swinunetr": 20.0,  # at least this many times faster than SwinUNETR
    "peak_gb_300": 2.5,  # peak resident memory (GB) for 512x512x300
    "cold_start_s": 3.0,
    "forward_of_peak": 0.5,  # network forward GFLOP/s over the matmul peak
}


# ---------------------------------------------------------------- inputs: volumes and models


def write_volume(folder: Path, slices: int) -> Path:
    """The synthetic CT (Z = ``slices``, 512 x 512, 0.8 x 0.8 x 1.5 mm) as .nii.gz; reused if present."""
    import SimpleITK as sitk

    from m4oe.demo import synthetic_ct

    path = folder / f"ct_{PLANE}x{PLANE}x{slices}.nii.gz"
    if not path.exists():
        image = synthetic_ct((slices, PLANE, PLANE), SPACING_XYZ, seed=slices)
        tmp = path.with_name(".tmp_" + path.name)
        sitk.WriteImage(image, str(tmp), useCompression=True)
        tmp.rename(path)
    return path


def save_model(folder: Path, case: str) -> Path:
    """A random-initialised model of ``case`` with a complete card (outputs are meaningless)."""
    import torch

    from m4oe.checkpoint import save_checkpoint
    from m4oe.model import build_model
    from m4oe.model_card import ExpertInfo, ModelCard, Preprocessing, TaskInfo
    from m4oe.preprocessing import DEFAULT_PARAMS
    from m4oe.terminology import standard_label

    variant, overrides = OURS[case]
    if variant == "m4oe":
        overrides = dict(overrides, experts=tuple(name for name, _ in EXPERTS))
    torch.manual_seed(0)  # the M4oE cases differ in top_k (or runtime) only, not in their weights
    model = build_model(variant, tasks=(("abdomen", CLASSES),), **overrides)
    labels = [standard_label(key, i + 1) for i, key in enumerate(ORGANS)]
    card = ModelCard(
        name=f"benchmark-{case}",
        description="random weights, for timing only",
        architecture=model.cfg,
        experts=[ExpertInfo(name, modality) for name, modality in EXPERTS] if variant == "m4oe" else [],
        # Every organ is one structure, so a trained model's card would clean them all up.
        tasks=[TaskInfo("abdomen", labels, largest_component=[lab.value for lab in labels])],
        preprocessing=Preprocessing(intensity={m: DEFAULT_PARAMS[m].to_dict() for m in ("ct", "mr")}),
        provenance={"training": "none: random initialisation", "seed": 0},
    )
    return save_checkpoint(model, card, folder / case, overwrite=True)


# ---------------------------------------------------------------- peers


def count_windows(shape: tuple[int, ...], roi: int, overlap: float) -> int:
    """Windows MONAI's sliding_window_inference tiles a volume with (a side below roi is padded)."""
    step = max(1, int(roi * (1 - overlap)))
    return math.prod(1 if n <= roi else math.ceil((n - roi) / step) + 1 for n in shape)


def build_peer(name: str):
    import torch

    if name == "swinunetr":
        from monai.networks.nets import SwinUNETR

        return SwinUNETR(in_channels=1, out_channels=CLASSES, feature_size=48)
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    # nnU-Net v2's default 3d_fullres topology for a 128^3 patch.
    return PlainConvUNet(
        input_channels=1,
        n_stages=6,
        features_per_stage=[32, 64, 128, 256, 320, 320],
        conv_op=torch.nn.Conv3d,
        kernel_sizes=3,
        strides=[1, 2, 2, 2, 2, 2],
        n_conv_per_stage=2,
        num_classes=CLASSES,
        n_conv_per_stage_decoder=2,
        conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )


def peer_worker(name: str, shape: tuple[int, int, int]) -> dict:
    """Sliding-window inference of a peer on a random volume (1, 1, Z, Y, X); run in a child."""
    import torch
    from monai.inferers import sliding_window_inference
    from torch.utils.flop_counter import FlopCounterMode

    spec = PEERS[name]
    roi = (spec["roi"],) * 3
    torch.manual_seed(0)
    net = build_peer(name).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net.to("meta")(torch.empty(1, 1, *roi, device="meta"))
    net = build_peer(name).eval()
    windows = 0

    def predictor(x):
        nonlocal windows
        windows += x.shape[0]
        return net(x)

    volume = torch.randn(1, 1, *shape)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(
            volume, roi, sw_batch_size=1, predictor=predictor, overlap=spec["overlap"], mode=spec["mode"]
        )
        logits.argmax(dim=1).to(torch.uint8)
    seconds = time.perf_counter() - start
    print(f"{PEAK_MARK}{own_peak_rss()}", file=sys.stderr)
    return {"seconds": seconds, "windows": windows, "gflop_per_window": counter.get_total_flops() / GB}


def run_peer(name: str, shape: tuple[int, int, int], workdir: Path, threads: int | None) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--shape",
        ",".join(map(str, shape)),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    child = run_child(cmd, workdir)
    result = json.loads(child["stdout"].strip().splitlines()[-1])
    spec = PEERS[name]
    expected = count_windows(shape, spec["roi"], spec["overlap"])
    if result["windows"] != expected:
        raise RuntimeError(f"{name}: MONAI ran {result['windows']} windows, expected {expected}")
    return result | {
        "shape": list(shape),
        "peak_rss_bytes": child["peak_rss_bytes"],
        "load_before": child["load_before"],
        "load_after": child["load_after"],
    }


def peer_case(name: str, measured: dict, slices: int) -> dict:
    """A peer's figures for a 512 x 512 x ``slices`` volume, scaled from its measured run by windows."""
    spec = PEERS[name]
    full = (slices, PLANE, PLANE)
    windows = count_windows(full, spec["roi"], spec["overlap"])
    extrapolated = tuple(measured["shape"]) != full
    seconds = measured["seconds"] * windows / measured["windows"]
    # The sliding window keeps float32 logits and a weight map of the whole (padded) volume: what a
    # smaller measured volume did not hold is added as an estimate.
    padded = [max(n, spec["roi"]) for n in full]
    padded_measured = [max(n, spec["roi"]) for n in measured["shape"]]
    extra = (math.prod(padded) - math.prod(padded_measured)) * (CLASSES + 2) * 4
    return {
        "wall_s": round(seconds, 1),
        "windows": windows,
        "seconds_per_window": round(measured["seconds"] / measured["windows"], 2),
        "gflop": round(measured["gflop_per_window"] * windows, 1),
        "effective_gflops": round(
            measured["gflop_per_window"] * measured["windows"] / measured["seconds"], 1
        ),
        "peak_rss_bytes": measured["peak_rss_bytes"] + max(0, extra),
        "peak_rss_measured_bytes": measured["peak_rss_bytes"],
        "extrapolated": extrapolated,
        "threads": measured["threads"],
        "measured_shape": measured["shape"],
        "measured_windows": measured["windows"],
        "load_before": measured["load_before"],
        "load_after": measured["load_after"],
    }


# ---------------------------------------------------------------- end to end


def segment(volume: Path, model_dir: Path, workdir: Path, threads: int, backend: str = "torch") -> dict:
    """``m4oe segment`` in a fresh process; wall, peak RSS and the CLI's own stage timings."""
    out = workdir / "labels.nii.gz"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--exec-cli", "segment", str(volume)]
    cmd += ["-o", str(out), "--model", str(model_dir), "--modality", "ct", "--device", "cpu"]
    cmd += ["--progress", "json", "--overwrite"]
    cmd += ["--threads", str(threads), "--backend", backend]
    child = run_child(cmd, workdir)
    done = [json.loads(line) for line in child["stdout"].splitlines() if line.startswith("{")][-1]
    out.unlink(missing_ok=True)
    return {
        "wall_s": child["wall_s"],
        "peak_rss_bytes": child["peak_rss_bytes"],
        "threads": threads,
        "stages_s": done["seconds"],
        "load_before": child["load_before"],
        "load_after": child["load_after"],
    }


# ---------------------------------------------------------------- report


def evaluate_targets(results: dict) -> list[dict]:
    rows = []
    for size, cases in results["end_to_end"].items():
        top1, dense, sunetr = cases.get("m4oe-top1"), cases.get(BASELINE), cases.get("swinunetr")
        if top1 and dense:
            ratio = top1["wall_s"] / dense["wall_s"]
            rows.append(
                dict(
                    target=f"M4oE top-1 end to end <= {TARGETS['top1_vs_dense']}x dense Swin-UNet ({size})",
                    figure=f"{ratio:.2f}x",
                    met=ratio <= TARGETS["top1_vs_dense"],
                )
            )
        if top1 and sunetr:
            speedup = sunetr["wall_s"] / top1["wall_s"]
            note = " (SwinUNETR extrapolated)" if sunetr["extrapolated"] else ""
            rows.append(
                dict(
                    target=f">= {TARGETS['vs_swinunetr']:.0f}x faster than SwinUNETR ({size})",
                    figure=f"{speedup:.1f}x{note}",
                    met=speedup >= TARGETS["vs_swinunetr"],
                )
            )
        if top1 and size.endswith("x300"):
            gb = top1["peak_rss_bytes"] / GB
            rows.append(
                dict(
                    target=f"peak memory <= {TARGETS['peak_gb_300']} GB, M4oE top-1 ({size})",
                    figure=f"{gb:.2f} GB",
                    met=gb <= TARGETS["peak_gb_300"],
                )
            )
    cold = results["cold_start"].get("m4oe-top1")
    if cold:
        rows.append(
            dict(
                target=f"cold start < {TARGETS['cold_start_s']:.0f} s (M4oE top-1)",
                figure=f"{cold['cold_start_s']:.2f} s",
                met=cold["cold_start_s"] < TARGETS["cold_start_s"],
            )
        )
    fwd = results["forward"].get("m4oe-top1")
    if fwd:
        peak = results["matmul_peak"][fwd["threads"]]["best_gflops"]
        share = fwd["of_peak"]
        rows.append(
            dict(
                target=f"network forward >= {TARGETS['forward_of_peak']:.0%} of the matmul peak (M4oE top-1)",
                figure=f"{share:.0%} ({fwd['best_gflops']} of {peak} GFLOP/s, {fwd['threads']} threads)",
                met=share >= TARGETS["forward_of_peak"],
            )
        )
    return rows


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']} (its default "
        f"{m['threads']} threads), timm {m['timm']}, monai {m['monai']}, dynamic-network-architectures "
        f"{m['dna']}; load average at start {m['load_start']}, at end {m['load_end']}.",
    ]
    for threads, peak in results["matmul_peak"].items():
        lines.append(
            f"float32 matmul peak ({peak['size']}^2, {threads} threads): best {peak['best_gflops']} GFLOP/s, "
            f"median {peak['median_gflops']} (load1 {peak['load']['load1']})."
        )
    lines.append("")
    for size, cases in results["end_to_end"].items():
        base = cases.get(BASELINE)
        slices = int(size.split("x")[-1])
        lines += [
            f"### End to end, {size} voxels (ratios to `{BASELINE}`)",
            "",
            "| case | wall s | x dense | peak RSS GB | x dense | slices/s | GFLOP | e2e GFLOP/s | threads "
            "| stages (read+load / pre / net / post) s | load1 before/after |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
        ]
        for case, r in cases.items():
            ratio = f"{r['wall_s'] / base['wall_s']:.2f}" if base else "-"
            mem_ratio = f"{r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}" if base else "-"
            if case in PEERS:
                gflop = r["gflop"]
                name = f"{case}{' *' if r['extrapolated'] else ''}"
                stages = f"{r['seconds_per_window']} s/window x {r['windows']} windows"
            else:
                gflop = (
                    results["forward"][case]["gflop_per_slice"] * slices if case in results["forward"] else 0
                )
                name = case
                s = r["stages_s"]
                stages = f"{s['load']} / {s['preprocess']} / {s['inference']} / {s['postprocess']}"
            lines.append(
                f"| {name} | {r['wall_s']:.1f} | {ratio} | {r['peak_rss_bytes'] / GB:.2f} | {mem_ratio} "
                f"| {slices / r['wall_s']:.2f} | {gflop:.0f} | {gflop / r['wall_s']:.1f} | {r['threads']} "
                f"| {stages} "
                f"| {r['load_before']['load1']} / {r['load_after']['load1']} |"
            )
        if any(c in PEERS and r["extrapolated"] for c, r in cases.items()):
            lines.append("")
            for case, r in cases.items():
                if case in PEERS and r["extrapolated"]:
                    shape = "x".join(map(str, r["measured_shape"][::-1]))
                    lines.append(
                        f"\\* {case}: measured on {shape} voxels ({r['measured_windows']} windows, peak RSS "
                        f"{r['peak_rss_measured_bytes'] / GB:.2f} GB), time scaled by window count to "
                        f"{r['windows']} windows; peak RSS adds the full volume's float32 logits and "
                        "weight map."
                    )
        lines.append("")
    if results["forward"]:
        lines += [
            f"### Network forward (in process, best / median of {results['settings']['forward_batches']} "
            "batches)",
            "",
            "| case | batch | threads | GFLOP/slice | ms/slice | GFLOP/s | % of matmul peak | load1 |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for case, r in results["forward"].items():
            lines.append(
                f"| {case} | {r['batch']} | {r['threads']} | {r['gflop_per_slice']} "
                f"| {r['best_ms_per_slice']} / {r['median_ms_per_slice']} "
                f"| {r['best_gflops']} / {r['median_gflops']} | "
                f"{r['of_peak']:.0%} | {r['load_before']['load1']} |"
            )
        lines.append("")
    if results["cold_start"]:
        lines += [
            "### Cold start (fresh process, median; first forward is one slice, after the cold start)",
            "",
            "| case | interpreter s | import s | model load s | cold start s | first forward s | load1 |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for case, r in results["cold_start"].items():
            lines.append(
                f"| {case} | {r['interpreter_s']} | {r['import_s']} | {r['load_s']} | {r['cold_start_s']} "
                f"| {r['first_forward_s']} | {r['load1']} |"
            )
        lines.append("")
    if results["targets"]:
        lines += ["### Targets", "", "| target | figure | met |", "|---|---|---|"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {t['figure']} | {'met' if t['met'] else 'NOT met'} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,300", help="slice counts of the 512x512 volumes (default 100,300)")
    p.add_argument(
        "--only", default=None, help=f"comma-separated cases of {', '.join([*OURS, *PEERS])} (default: all)"
    )
    p.add_argument(
        "--peer-slices", type=int, default=None, help="run the peers on this many slices, scale by windows"
    )
    p.add_argument("--peer-plane", type=int, default=PLANE, help="in-plane side of the peers' volume")
    p.add_argument(
        "--threads", type=int, default=None, help="threads of every case (default: the engine's at start)"
    )
    p.add_argument("--cold-repeats", type=int, default=3)
    p.add_argument("--forward-batches", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke run: 12 slices, peers on one window")
    p.add_argument("--workdir", type=Path, default=None, help="keep volumes and models here (reused)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--worker", choices=tuple(PEERS), help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.cold_repeats, args.forward_batches = "12", 1, 1
        args.peer_slices, args.peer_plane = args.peer_slices or 96, min(args.peer_plane, 96)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.cases = [*OURS, *PEERS] if args.only is None else args.only.split(",")
    unknown = sorted(set(args.cases) - {*OURS, *PEERS})
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {[*OURS, *PEERS]}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--exec-cli"]:
        return exec_cli(argv[1:])
    args = parse_args(argv)
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        shape = tuple(int(n) for n in args.shape.split(","))
        print(json.dumps(peer_worker(args.worker, shape)))
        return 0
    sys.path.insert(0, str(ENGINE))
    import torch

    from m4oe.cpu import default_threads

    cores_threads = torch.get_num_threads()  # PyTorch's own choice: one per core
    # One thread count for every case, so that the ratios compare like with like: the engine's
    # choice when the run starts (it adapts to the other processes' load), unless given.
    args.threads = args.threads or default_threads()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="m4oe-peers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # Exported ONNX graphs go to the work folder (inherited by the CLI children), not the user's cache.
    os.environ["M4OE_CACHE_DIR"] = str(workdir / "cache")
    ours = [c for c in args.cases if c in OURS]
    peers = [c for c in args.cases if c in PEERS]
    results = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(cores_threads),
        "matmul_peak": {},
        "end_to_end": {},
        "forward": {},
        "cold_start": {},
    }
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')} load {load()['load1']}] {msg}", file=sys.stderr)  # noqa: E731

    def peak(threads: int) -> dict:
        if threads not in results["matmul_peak"]:
            log(f"matmul peak, {threads} threads")
            results["matmul_peak"][threads] = matmul_peak(threads)
        return results["matmul_peak"][threads]

    try:
        peak(cores_threads)
        models = {case: save_model(workdir / "models", case) for case in ours}
        for case, folder in models.items():
            log(f"forward speed {case}")
            onnx = case.endswith(ONNX_SUFFIX)
            results["forward"][case] = fwd = forward_speed(folder, args.forward_batches, args.threads, onnx)
            peak(fwd["threads"])
        for case in ("m4oe-top1", BASELINE):
            if case in models:
                log(f"cold start {case}")
                results["cold_start"][case] = cold_start(models[case], args.cold_repeats, workdir)
        measured = {}
        for slices in args.sizes:
            key = f"{PLANE}x{PLANE}x{slices}"
            results["end_to_end"][key] = cases = {}
            log(f"writing volume {key}")
            volume = write_volume(workdir, slices)
            for case in ours:
                log(f"segment {case} {key}")
                backend = "onnx" if case.endswith(ONNX_SUFFIX) else "torch"
                cases[case] = segment(volume, models[case], workdir, args.threads, backend)
            for case in peers:
                side = min(args.peer_plane, PLANE)
                shape = (min(args.peer_slices or slices, slices), side, side)
                if (case, shape) not in measured:
                    log(f"peer {case} on {shape}")
                    measured[case, shape] = run_peer(case, shape, workdir, args.threads) | {
                        "threads": args.threads
                    }
                cases[case] = peer_case(case, measured[case, shape], slices)
        for threads, first in list(results["matmul_peak"].items()):
            # Measured again at the end, the best of both: a load spike must not lower the peak.
            again = matmul_peak(threads)
            if again["best_gflops"] > first["best_gflops"]:
                results["matmul_peak"][threads] = again
        for fwd in results["forward"].values():
            fwd["of_peak"] = round(fwd["best_gflops"] / peak(fwd["threads"])["best_gflops"], 3)
        results["machine"]["load_end"] = load()
        results["targets"] = evaluate_targets(results)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
