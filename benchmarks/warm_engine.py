"""Latency of the warm engine (``m4oe serve``) against one ``m4oe segment`` process per run.

Issue #24 point 4: every Apply used to start a new process that imports PyTorch and timm and
loads the model before the first slice. This measures, on one small real volume with the same
arguments each time, the wall time from sending the run to its first progress line and to its
``done`` line, for:

- ``cold segment``: a new ``python -m m4oe.cli segment --progress json`` process per run (the
  time includes starting Python);
- ``server, 1st request``: a fresh ``m4oe serve`` process started at time 0 and sent the request
  at once (it imports PyTorch and loads the model: the first Apply after the module starts);
- ``server, 2nd-Nth``: later requests to the same server (the model loaded; every later Apply).

Each scenario is repeated ``--repeats`` times (a new server each time for the first two); the
table shows the median and the range. Outputs go to a temporary folder.

    PYTHONPATH=M4oESegmentation python benchmarks/warm_engine.py [--input FILE] [--repeats 3]
        [--requests 5] [--threads 1] [--tta 1] [--model NAME] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "totalsegmentator" / "example_ct_sm.nii.gz"


def environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "M4oESegmentation"), env.get("PYTHONPATH")) if p
    )
    return env


def segment_args(source: Path, output: Path, args) -> list[str]:
    extra = ["--model", args.model] if args.model else []
    return [str(source), "-o", str(output), "--threads", str(args.threads), "--tta", str(args.tta), *extra]


def cold_segment(source: Path, output: Path, args) -> tuple[float, float]:
    """(first progress line, done line) in seconds after starting ``m4oe segment``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "m4oe.cli",
            "segment",
            *segment_args(source, output, args),
            "--progress",
            "json",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    first = None
    for line in proc.stdout:
        record = json.loads(line)
        first = first or time.perf_counter() - t0
        if record["stage"] in ("done", "error"):
            assert record["stage"] == "done", record
            done = time.perf_counter() - t0
    proc.wait()
    return first, done


class Server:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "m4oe.cli", "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=environment(),
        )

    def request(
        self, request_id: int, arguments: list[str], since: float | None = None
    ) -> tuple[float, float]:
        """(first progress line of the request, its done line) in seconds after ``since`` (now)."""
        t0 = time.perf_counter() if since is None else since
        self.proc.stdin.write(json.dumps({"id": request_id, "args": arguments}) + "\n")
        self.proc.stdin.flush()
        first = None
        for line in self.proc.stdout:
            record = json.loads(line)
            if record.get("id") != request_id:
                continue
            first = first or time.perf_counter() - t0
            if record["stage"] in ("done", "error"):
                assert record["stage"] == "done", record
                return first, time.perf_counter() - t0
        raise RuntimeError("the server ended early")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=5, help="requests per server (first + later)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tta", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not args.input.is_file():
        sys.exit(f"{args.input}: no such file (give --input)")

    times: dict[str, list[tuple[float, float]]] = {
        "cold segment": [],
        "server, 1st request": [],
        "server, later": [],
    }
    with tempfile.TemporaryDirectory(prefix="m4oe-bench-") as folder:
        n = 0
        for _ in range(args.repeats):
            n += 1
            times["cold segment"].append(cold_segment(args.input, Path(folder) / f"{n}.nrrd", args))
            server = Server()
            for k in range(args.requests):
                n += 1
                arguments = segment_args(args.input, Path(folder) / f"{n}.nrrd", args)
                if k == 0:  # sent at once: the clock starts with the server process
                    times["server, 1st request"].append(server.request(n, arguments, since=server.t0))
                else:
                    times["server, later"].append(server.request(n, arguments))
            server.close()

    print(
        f"input {args.input.name}, model {args.model or 'embedded'}, threads {args.threads}, tta {args.tta}"
    )
    print(f"{'scenario':<22} {'runs':>4}  {'first progress line, s':>24}  {'done, s':>20}")
    for name, pairs in times.items():
        firsts, dones = [p[0] for p in pairs], [p[1] for p in pairs]
        print(f"{name:<22} {len(pairs):>4}  {summary(firsts):>24}  {summary(dones):>20}")
    if args.json:
        args.json.write_text(json.dumps({k: [list(p) for p in v] for k, v in times.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
