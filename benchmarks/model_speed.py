"""Default `m4oe segment` of a large CT with one model against another, interleaved in one run.

The budget of issue #22: a new embedded model may cost at most 1.5x the time of the model it
replaces on the default `m4oe segment` of a 512x512x300 CT on the project's 2-core machine. Both
models segment the same synthetic volume (a phantom CT upsampled in plane to 512x512 pixels, int16
HU, 0.8 x 0.8 x 1.5 mm), each run a fresh `m4oe segment` process with default settings (the card's
test-time passes, smoothing and clean-up), alternating A, B, A, B... so that load from other
processes hits both alike. Reported: each run's wall time, the median per model, and the ratio of
the medians (model / baseline).

Run: ``python benchmarks/model_speed.py --model NEW --baseline OLD [--slices 300] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_volume(path: Path, size: int, slices: int) -> None:
    """A phantom CT resampled to (size, size, slices) voxels, int16 HU, LPS geometry of the phantom."""
    import SimpleITK as sitk

    from m4oe.phantom import generate_case

    image, _ = generate_case("ct", 1)
    spacing = (0.8, 0.8, 1.5)
    reference = sitk.Image([size, size, slices], sitk.sitkInt16)
    reference.SetSpacing(spacing)
    reference.SetDirection(image.GetDirection())
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    half = [(n - 1) / 2 * s for n, s in zip(reference.GetSize(), spacing, strict=True)]
    direction = reference.GetDirection()
    origin = [centre[r] - sum(direction[3 * r + c] * half[c] for c in range(3)) for r in range(3)]
    reference.SetOrigin(origin)
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1000, sitk.sitkInt16)
    sitk.WriteImage(resampled, str(path))


def segment_seconds(model: str, volume: Path, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "m4oe.cli",
            "segment",
            str(volume),
            "-o",
            str(out),
            "--model",
            model,
            "--modality",
            "ct",
            "--overwrite",
            "--progress",
            "none",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the model to time (name or folder)")
    p.add_argument("--baseline", required=True, help="the model it is compared with (name or folder)")
    p.add_argument("--size", type=int, default=512, help="in-plane pixels (default 512)")
    p.add_argument("--slices", type=int, default=300, help="axial slices (default 300)")
    p.add_argument("--repeats", type=int, default=2, help="runs per model (default 2)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        volume = Path(tmp) / "ct.nii.gz"
        write_volume(volume, args.size, args.slices)
        times: dict[str, list[float]] = {"model": [], "baseline": []}
        for _ in range(args.repeats):
            for key in times:
                name = args.model if key == "model" else args.baseline
                times[key].append(round(segment_seconds(name, volume, Path(tmp) / f"{key}.nii.gz"), 1))
    result = {
        "volume": [args.size, args.size, args.slices],
        "model": args.model,
        "baseline": args.baseline,
        "seconds": times,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
    }
    result["ratio"] = round(result["median_s"]["model"] / result["median_s"]["baseline"], 3)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        model, baseline = times["model"], times["baseline"]
        print(f"{args.model}: {model} s; {args.baseline}: {baseline} s; ratio {result['ratio']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
