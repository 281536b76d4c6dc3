"""Cohort throughput measured: scans per hour of one ``m4oe segment`` process per scan, of
``m4oe batch`` (the model loaded once, reading and writing overlapped with the network) and of
``m4oe batch --workers N`` (a local Dask cluster of N processes).

The scans are real-size CTs made from the shared ``example_ct.nii.gz`` (abdomen and pelvis, 3 mm
voxels, 122 x 101 x 112): each is resampled (linear) to 0.8 x 0.8 x 1.5 mm voxels, about 457 x
379 x 224, shifted by up to +-10 mm in each direction and cropped by up to 10 % of its extent per
side in plane and 15 % head-feet (seeded: scan ``i`` uses seed ``--seed + i``), and written as
int16 NIfTI into a temporary folder (never the repository). Every mode segments the same scans
with the same settings into its own folder and must write every label map; the wall time of the
whole mode, process start-ups included, gives the scans per hour. The label maps of ``batch`` are
compared with the per-scan CLI's (voxels that differ, over all scans). Each mode's time per scan
is also split into stages (:func:`cli_stages`, :func:`batch_stages`), from the commands' own
``--progress json`` records and ``summary.json``.

Run: ``python benchmarks/batch.py [--cases 20] [--cli-cases N] [--tta 1] [--threads T] [--device
cpu] [--workers 2] [--modes cli,batch,workers] [--seed 0] [--json FILE]``; ``--cli-cases`` times the
per-scan CLI on the first N scans only (a rate per scan, for a short run). Exit code 2 when the shared
data is missing, 1 when a mode fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "totalsegmentator"
SPACING_MM = (0.8, 0.8, 1.5)  # x, y, z
MODES = ("cli", "batch", "workers")


def make_scan(source: sitk.Image, seed: int) -> sitk.Image:
    """One real-size CT from ``source``: resampled to :data:`SPACING_MM`, shifted and cropped.

    The output grid keeps ``source``'s direction; its origin moves by a random shift (uniform
    +-10 mm per LPS axis, via the resampling transform: the anatomy moves against the grid) and its
    extent loses a random 0-10 % per side in x and y, 0-15 % in z. Outside the source: -1024 HU.
    Returns an int16 image (HU).
    """
    rng = np.random.default_rng(seed)
    size = np.array(source.GetSize()) * np.array(source.GetSpacing()) / np.array(SPACING_MM)
    low = np.floor(size * rng.uniform(0, [0.10, 0.10, 0.15])).astype(int)
    high = np.floor(size * (1 - rng.uniform(0, [0.10, 0.10, 0.15]))).astype(int)
    direction = np.array(source.GetDirection()).reshape(3, 3)
    origin = np.array(source.GetOrigin()) + direction @ (low * np.array(SPACING_MM))
    shift = sitk.TranslationTransform(3, rng.uniform(-10, 10, 3).tolist())
    scan = sitk.Resample(
        source,
        (high - low).tolist(),
        shift,
        sitk.sitkLinear,
        origin.tolist(),
        SPACING_MM,
        source.GetDirection(),
        -1024,
        sitk.sitkInt16,
    )
    return scan


def run(command: list[str], env: dict) -> tuple[float, list[dict]]:
    """Run ``command`` (with ``--progress json``); return its wall time in seconds and its JSON
    progress records. Raises on a non-zero exit."""
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return seconds, [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def cli_stages(wall: float, records: list[dict]) -> dict[str, float]:
    """Where one ``m4oe segment`` process's wall time went, in seconds: ``startup`` (interpreter
    and command-line imports, before the command's clock starts), ``load`` (reading the scan,
    importing PyTorch, loading the model), ``preprocess``, ``inference``, ``postprocess`` (as
    :meth:`m4oe.predictor.Predictor.predict` times them) and ``write`` (the rest: the label map)."""
    seconds = next(r for r in records if r.get("stage") == "done")["seconds"]
    timed = ("load", "preprocess", "inference", "postprocess")
    stages = {"startup": wall - seconds["total"], **{k: seconds[k] for k in timed}}
    stages["write"] = seconds["total"] - sum(seconds[k] for k in timed)
    return stages


def batch_stages(wall: float, records: list[dict], out: Path) -> dict[str, float]:
    """Where an ``m4oe batch`` run's wall time went, in seconds: ``startup`` (the interpreter,
    imports, the model load or the Dask cluster's start, and the exit: the wall time less the time
    from the model loaded to the last case done, as the progress records give it), ``cases`` (that
    time), and the sums over the cases of ``read``, ``predict`` and ``write`` (each case's
    ``stage_seconds`` in ``summary.json``; in ``m4oe batch`` the three overlap, in threads, and on
    Dask the cases run side by side, so these sums may exceed ``cases``)."""
    cases = max(r["elapsed_s"] for r in records if r.get("stage") == "case")
    stages = {"startup": wall - cases, "cases": cases, "read": 0.0, "predict": 0.0, "write": 0.0}
    for row in json.loads((out / "summary.json").read_text())["cases"]:
        for stage in ("read", "predict", "write"):
            stages[stage] += row["stage_seconds"][stage]
    return stages


def labels_differ(a: Path, b: Path) -> int:
    """Voxels whose labels differ between two label maps of one grid (arrays copied: a view would
    not keep its image alive)."""
    return int(
        np.count_nonzero(
            sitk.GetArrayFromImage(sitk.ReadImage(str(a))) != sitk.GetArrayFromImage(sitk.ReadImage(str(b)))
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument(
        "--cli-cases",
        type=int,
        default=None,
        help="run the per-scan CLI on only the first N scans (its rate per scan; default: all)",
    )
    parser.add_argument("--tta", type=int, default=1, help="test-time passes for every mode (default: 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="--threads of cli and batch (default: theirs)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: {args.modes!r} is not a list of {', '.join(MODES)}")
    source_path = args.data / "example_ct.nii.gz"
    if not source_path.is_file():
        print(f"benchmarks/batch.py: {source_path}: not found (the shared data)", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "M4oESegmentation"), str(ROOT / "training"), env.get("PYTHONPATH", "")]
    )
    common = ["--tta", str(args.tta), "--device", args.device, "--progress", "json"]
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    m4oe = [sys.executable, "-m", "m4oe.cli"]
    results: dict = {"cases": args.cases, "tta": args.tta, "threads": args.threads, "device": args.device}
    with tempfile.TemporaryDirectory(prefix="m4oe-batch-bench-") as tmp:
        scans = Path(tmp) / "scans"
        scans.mkdir()
        t0 = time.perf_counter()
        source = sitk.ReadImage(str(source_path))
        sizes = []
        for i in range(args.cases):
            scan = make_scan(source, args.seed + i)
            sizes.append(scan.GetSize())
            sitk.WriteImage(scan, str(scans / f"ct{i:02d}.nii.gz"), useCompression=True)
        voxels = [int(np.prod(s)) for s in sizes]
        results["scan_sizes"] = [list(s) for s in sizes]
        print(
            f"{args.cases} scans of {min(voxels) / 1e6:.1f}-{max(voxels) / 1e6:.1f} M voxels "
            f"(e.g. {'x'.join(map(str, sizes[0]))}) made in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        timings, stages = {}, {}
        for mode in modes:
            out = Path(tmp) / mode
            out.mkdir()
            if mode == "cli":
                seconds, stages[mode] = 0.0, {}
                for scan in sorted(scans.iterdir())[: args.cli_cases]:
                    name = scan.name.replace(".nii.gz", ".seg.nrrd")
                    wall, records = run(
                        [*m4oe, "segment", str(scan), "-o", str(out / name), *common, *threads], env
                    )
                    seconds += wall
                    for stage, value in cli_stages(wall, records).items():
                        stages[mode][stage] = stages[mode].get(stage, 0.0) + value
            else:
                where = threads if mode == "batch" else ["--workers", str(args.workers)]
                seconds, records = run([*m4oe, "batch", str(scans), "-o", str(out), *common, *where], env)
                stages[mode] = batch_stages(seconds, records, out)
            count = min(args.cases, args.cli_cases or args.cases) if mode == "cli" else args.cases
            written = sorted(p.name for p in out.glob("ct*.seg.nrrd"))
            if len(written) != count:
                print(f"{mode}: wrote {len(written)} of {count} label maps", file=sys.stderr)
                return 1
            timings[mode] = (seconds, count)
            print(
                f"{mode:<8} {count:3d} scans {seconds:8.1f} s  {seconds / count:6.1f} s/scan  "
                f"{3600 * count / seconds:6.1f} scans/hour",
                flush=True,
            )
            print(
                "         per scan: " + ", ".join(f"{k} {v / count:.2f} s" for k, v in stages[mode].items()),
                flush=True,
            )
        if {"cli", "batch"} <= set(timings):
            differ = sum(
                labels_differ(Path(tmp) / "cli" / p.name, Path(tmp) / "batch" / p.name)
                for p in (Path(tmp) / "cli").glob("ct*.seg.nrrd")
            )
            results["voxels_differing_cli_vs_batch"] = differ
            compared = sum(voxels[: timings["cli"][1]])
            print(f"label maps of batch vs cli: {differ} of {compared} voxels differ")
    results["modes"] = {
        mode: {
            "scans": n,
            "seconds": round(s, 1),
            "seconds_per_scan": round(s / n, 2),
            "scans_per_hour": round(3600 * n / s, 1),
            "stage_seconds_per_scan": {k: round(v / n, 3) for k, v in stages[mode].items()},
        }
        for mode, (s, n) in timings.items()
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
