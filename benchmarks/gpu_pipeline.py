"""`Predictor.predict` against the network's own time on a GPU, 512 x 512 x 300 CT (issue #25, point 3).

The target: on a GPU, ``Predictor.predict`` of a 512 x 512 x 300 CT within 2x the network's own
time (reading and writing the files apart); top-1 routing no slower than the dense mixture.

For the three random-weight full-size models of ``benchmarks/peers.py`` (``swin-unet``,
``m4oe-dense``, ``m4oe-top1``; 14 classes, every organ cleaned up to its largest piece, one
test-time pass, no smoothing) on one synthetic CT (``m4oe.demo.synthetic_ct``, in memory):

- ``network``: the forward passes alone over the 300 slices, at the predictor's batch size, on
  the model input the predictor makes (synchronised before the clock stops);
- ``predict``: ``Predictor.predict`` of the image, with its own stage times (``seconds``);
- the top-1 model twice: with ``MoEFeedForward.dispatch`` "sort" (tokens grouped by expert, one
  host synchronisation per layer) and "dense" (every expert on every token; "auto" on a GPU).

Each figure is the best of ``--repeats`` after one untimed warm-up on 32 slices. Random weights
label every organ in fragments all over the volume, the clean-up's worst case; the script also
checks that the clean-up on the GPU (CuPy, when installed) gives SciPy's labels, and prints
whether CuPy was found. Then it prints ``benchmarks/postprocess.py``'s stage table on the GPU.

Sized for under 5 minutes; not yet timed on a GPU. Run: ``PYTHONPATH=M4oESegmentation python
benchmarks/gpu_pipeline.py [--slices 300] [--repeats 2] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # the benchmark models of issue 6, from this folder
import postprocess

from m4oe.demo import synthetic_ct
from m4oe.geometry import to_axial_stack
from m4oe.model.moe import MoEFeedForward
from m4oe.predictor import Predictor, keep_largest_components, labels_to_host
from m4oe.prepare import SlicePlan

DEVICE = torch.device("cuda")
CASES = (("swin-unet", "auto"), ("m4oe-dense", "auto"), ("m4oe-top1", "sort"), ("m4oe-top1", "dense"))


def best_of(repeats: int, run) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        postprocess.sync(DEVICE)
        start = time.perf_counter()
        result = run()
        postprocess.sync(DEVICE)
        best = min(best, time.perf_counter() - start)
    return best, result


def network_seconds(predictor: Predictor, image, repeats: int) -> float:
    """The forward passes alone over every slice of ``image``, at the predictor's batch size."""
    stack = to_axial_stack(image)
    card, cfg = predictor.card, predictor.model.cfg
    intensity = predictor._intensity_params("ct")
    pre = card.preprocessing
    plan = SlicePlan.for_stack(stack, "ct", intensity, cfg.img_size, pre.in_plane, pre.target_spacing_mm)
    inputs = [
        plan.model_input(stack.array[s : s + predictor.batch_size], predictor.device)
        for s in range(0, stack.array.shape[0], predictor.batch_size)
    ]
    task = card.task(None).name

    def run():
        with torch.inference_mode():
            for x in inputs:
                predictor.model(x.expand(-1, cfg.input_channels, -1, -1), task=task, return_gates=True)

    return best_of(repeats, run)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N; cpu only to try the script out")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("gpu_pipeline.py: PyTorch sees no CUDA GPU", file=sys.stderr)
        return 2
    try:
        import cupy  # noqa: F401

        has_cupy = True
    except ImportError:
        has_cupy = False
    gpu = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"
    result = {"gpu": gpu, "torch": torch.__version__, "cupy": has_cupy, "cases": []}
    print(f"{result['gpu']}, torch {result['torch']}, CuPy {'found' if has_cupy else 'not installed'}")
    image = synthetic_ct((args.slices, peers.PLANE, peers.PLANE), peers.SPACING_XYZ, seed=args.slices)
    warm = synthetic_ct((min(32, args.slices), peers.PLANE, peers.PLANE), peers.SPACING_XYZ, seed=32)
    with tempfile.TemporaryDirectory() as tmp:
        for case, dispatch in CASES:
            MoEFeedForward.dispatch = dispatch
            predictor = Predictor.from_pretrained(peers.save_model(Path(tmp), case), device=str(DEVICE))
            # every slice, as network_seconds runs them (m4oe segment would crop to the body)
            predictor.predict(warm, modality="ct", body_crop=False)
            network = network_seconds(predictor, image, args.repeats)
            total, prediction = best_of(
                args.repeats, lambda p=predictor: p.predict(image, modality="ct", body_crop=False)
            )
            row = {
                "case": case,
                "dispatch": dispatch,
                "network_s": round(network, 3),
                "predict_s": round(total, 3),
                "ratio": round(total / network, 2),
                "stages_s": prediction.seconds,
            }
            result["cases"].append(row)
            print(row, flush=True)
        MoEFeedForward.dispatch = "auto"
    print("\n| model | dispatch | network s | predict s | predict / network (target <= 2) |")
    print("|---|---|--:|--:|--:|")
    for row in result["cases"]:
        cells = (row["case"], row["dispatch"], row["network_s"], row["predict_s"], row["ratio"])
        print("| " + " | ".join(str(c) for c in cells) + " |")
    times = {(r["case"], r["dispatch"]): r["network_s"] for r in result["cases"]}
    top1 = min(times[("m4oe-top1", "sort")], times[("m4oe-top1", "dense")])
    print(
        f"top-1 network: sort {times[('m4oe-top1', 'sort')]} s, dense {times[('m4oe-top1', 'dense')]} s; "
        f"dense mixture {times[('m4oe-dense', 'auto')]} s; swin-unet {times[('swin-unet', 'auto')]} s"
    )
    result["top1_best_vs_mixture"] = round(top1 / times[("m4oe-dense", "auto")], 2)

    # The GPU clean-up against SciPy's on fragmented labels (a random model's, the worst case).
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    labels = torch.randint(0, 14, (64, 512, 512), generator=gen, device=DEVICE, dtype=torch.uint8)
    values = list(range(1, 14))
    reference = keep_largest_components(labels.cpu().numpy().copy(), values)
    result["gpu_cleanup_equals_scipy"] = bool(
        np.array_equal(labels_to_host(labels.clone(), values), reference)
    )
    print(f"clean-up on the GPU equals SciPy's: {result['gpu_cleanup_equals_scipy']}")
    print()
    postprocess.main(["--device", str(DEVICE), "--slices", str(args.slices), "--repeats", "1"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
