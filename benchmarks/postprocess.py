"""Time each post-processing stage of `Predictor.predict` on a 512 x 512 x Z volume (issue #25, point 3).

The stages after the network, each timed on its own over the whole volume, on ``--device``:

- ``resample``: model-grid maps (B, K, 224, 224) back to the 512 x 512 slices
  (:func:`m4oe.inplane.from_model_grid`), 4 slices at a time as the predictor does;
- ``argmax``: ``maps.argmax(dim=1)`` (the code before this point) and
  :func:`m4oe.predictor.class_argmax` (after), on those resampled slices;
- ``smoothing``: the through-plane Gaussian (:class:`m4oe.smoothing.SliceSmoother`, 3 mm at
  1.5 mm slices) of the model-grid probabilities, pushed batch by batch;
- ``cleanup``: the largest-component clean-up of 13 labels (:func:`m4oe.predictor.labels_to_host`
  where the engine has it: on a CUDA device with CuPy, on the GPU; else the transfer and
  :func:`m4oe.predictor.keep_largest_components` with SciPy);
- ``scan_check``: :func:`m4oe.ood.check_scan`; ``to_image``: :func:`m4oe.geometry.from_axial_stack`.

Two kinds of maps (K = 14 classes, a fixed seed): ``noise``, what a random-weight network gives
(Gaussian noise on the model grid smoothed over 3 x 3 pixels, each slice on its own: every label
scattered over the whole volume in about 240,000 fragments at 300 slices, the worst case of the
clean-up), and ``organs`` (the labels of a phantom CT, resampled to the volume and the model
grid, as logits 4 x one-hot plus unit noise, smoothed as the noise: compact organs with ragged
edges, as a trained model gives). Each stage is timed ``--repeats`` times; the table shows the
best (the machine is shared).

The functions it times are looked up by name, so the same script times an older checkout of the
engine (``PYTHONPATH=<old>/M4oESegmentation``; stages it lacks are left out).

Run: ``PYTHONPATH=M4oESegmentation python benchmarks/postprocess.py [--slices 300] [--device cpu|cuda]
[--threads T] [--repeats 2] [--kinds noise,organs] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import SimpleITK as sitk
import torch

from m4oe import predictor as engine
from m4oe.geometry import from_axial_stack, to_axial_stack
from m4oe.inplane import from_model_grid, make_grid
from m4oe.ood import check_scan
from m4oe.smoothing import SliceSmoother
from m4oe.terminology import standard_label

PLANE, SIZE, K = 512, 224, 14
SPACING = (1.5, 0.8, 0.8)  # (sz, sy, sx) mm
BATCH = 8
ORGANS = ("liver", "kidney_right", "spleen", "pancreas", "aorta", "inferior_vena_cava", "adrenal_gland_right")
ORGANS += ("adrenal_gland_left", "gallbladder", "esophagus", "stomach", "duodenum", "kidney_left")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_grid_maps(kind: str, slices: int, device: torch.device) -> torch.Tensor:
    """Logits (Z, K, S, S) on the model grid, float32 on ``device``."""
    gen = torch.Generator().manual_seed(25)
    if kind == "noise":
        maps = torch.randn(slices, K, SIZE, SIZE, generator=gen)
        return torch.nn.functional.avg_pool2d(maps, 3, 1, 1).to(device)
    from m4oe.phantom import generate_case

    _, truth = generate_case("ct", 1)
    reference = sitk.Image([SIZE, SIZE, slices], sitk.sitkUInt8)
    size = truth.GetSize()
    reference.SetSpacing(
        [n * s / m for n, s, m in zip(size, truth.GetSpacing(), (SIZE, SIZE, slices), strict=True)]
    )
    reference.SetOrigin(truth.GetOrigin())
    reference.SetDirection(truth.GetDirection())
    labels = sitk.Resample(truth, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    labels = torch.from_numpy(sitk.GetArrayFromImage(labels).astype(np.int64)).clamp(max=K - 1)
    onehot = torch.nn.functional.one_hot(labels, K).permute(0, 3, 1, 2).float()
    logits = 4 * onehot + torch.randn(onehot.shape, generator=gen)
    return torch.nn.functional.avg_pool2d(logits, 3, 1, 1).to(device)


def best_of(repeats: int, device: torch.device, run) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = run()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def time_stages(kind: str, slices: int, device: torch.device, repeats: int) -> dict:
    maps = model_grid_maps(kind, slices, device)
    grid = make_grid((PLANE, PLANE), SPACING[1:], SIZE)
    seconds: dict[str, float] = {}

    def resample():
        for s in range(0, slices, 4):
            from_model_grid(maps[s : s + 4], grid)

    seconds["resample"], _ = best_of(repeats, device, resample)

    def labels_with(argmax):
        labels = torch.zeros((slices, PLANE, PLANE), dtype=torch.uint8, device=device)
        for s in range(0, slices, 4):
            labels[s : s + 4] = argmax(from_model_grid(maps[s : s + 4], grid))
        return labels

    # The resampling is inside each labelling; its own time is subtracted.
    total, labels = best_of(repeats, device, lambda: labels_with(lambda m: m.argmax(dim=1)))
    seconds["argmax (argmax)"] = total - seconds["resample"]
    if hasattr(engine, "class_argmax"):
        total, fast = best_of(repeats, device, lambda: labels_with(engine.class_argmax))
        seconds["argmax (class_argmax)"] = total - seconds["resample"]
        if not torch.equal(fast, labels):
            raise AssertionError("class_argmax and argmax disagree")

    def smooth():
        smoother = SliceSmoother(3.0 / SPACING[0], slices)
        for s in range(0, slices, BATCH):
            smoother.push(maps[s : s + BATCH].softmax(dim=1))

    seconds["smoothing"], _ = best_of(repeats, device, smooth)

    values = list(range(1, K))
    if hasattr(engine, "labels_to_host"):
        seconds["cleanup"], host = best_of(
            repeats, device, lambda: engine.labels_to_host(labels.clone(), values)
        )
    else:
        seconds["cleanup"], host = best_of(
            repeats, device, lambda: engine.keep_largest_components(labels.cpu().numpy().copy(), values)
        )
    if device.type == "cuda":  # the GPU clean-up must give the CPU one's labels
        reference = engine.keep_largest_components(labels.cpu().numpy().copy(), values)
        if not np.array_equal(host, reference):
            raise AssertionError("the clean-up on the GPU differs from SciPy's on the host")

    task_labels = [standard_label(name, v) for v, name in enumerate(ORGANS, start=1)]
    seconds["scan_check"], _ = best_of(repeats, device, lambda: check_scan(host, SPACING, task_labels))
    image = sitk.Image([PLANE, PLANE, slices], sitk.sitkInt16)
    image.SetSpacing(SPACING[::-1])
    stack = to_axial_stack(image)
    seconds["to_image"], _ = best_of(repeats, device, lambda: from_axial_stack(host, stack))
    return {k: round(v, 3) for k, v in seconds.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=300, help="axial slices Z (default 300)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=2, help="timings per stage, the best kept (default 2)")
    p.add_argument("--kinds", default="noise,organs", help="maps to time: noise, organs (default both)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {"slices": args.slices, "device": str(device), "threads": torch.get_num_threads(), "seconds": {}}
    with torch.inference_mode():
        for kind in args.kinds.split(","):
            result["seconds"][kind] = time_stages(kind, args.slices, device, args.repeats)
    print(
        f"512 x 512 x {args.slices}, {device}, {result['threads']} threads; seconds, best of {args.repeats}"
    )
    stages = list(next(iter(result["seconds"].values())))
    print("| stage | " + " | ".join(result["seconds"]) + " |")
    print("|---|" + "--:|" * len(result["seconds"]))
    for stage in stages:
        print(f"| {stage} | " + " | ".join(f"{s[stage]:.2f}" for s in result["seconds"].values()) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
