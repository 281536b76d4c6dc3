"""``m4oe serve``, the warm engine (issue #24 point 4): requests as JSON lines, the model loaded once.

The server runs as a real subprocess over real pipes (as the Slicer module starts it) with the tiny
test model, except where a test needs its model-load counter (then in this process, with text
streams). Nothing is mocked.
"""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from m4oe.demo import synthetic_ct
from m4oe.io import write_image
from m4oe.serve import PredictorCache, Server

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


def default_sigint() -> None:
    """Run in the child before it starts (``preexec_fn``): Ctrl-C's default action. A test run
    started in the background by a script (``cmd &``) has SIGINT ignored, children inherit that,
    and Python then installs no KeyboardInterrupt handler: the child would never see the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ServerProcess:
    """``python -m m4oe.cli serve`` with its stdout lines read by a thread into a queue."""

    def __init__(self, *options: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "M4oESegmentation"), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "m4oe.cli", "serve", *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=default_sigint,
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))  # every stdout line is JSON: fails the test otherwise

    def send(self, message) -> None:
        self.proc.stdin.write((message if isinstance(message, str) else json.dumps(message)) + "\n")
        self.proc.stdin.flush()

    def next(self) -> dict:
        try:
            return self.lines.get(timeout=TIMEOUT_S)
        except queue.Empty:
            self.proc.kill()  # stderr ends only with the server: reading it from a live one would hang
            raise AssertionError(
                f"no record within {TIMEOUT_S} s; stderr: {self.proc.stderr.read()}"
            ) from None

    def until_end(self, request_id) -> list[dict]:
        """The records of one request up to its done or error record (others must not interleave)."""
        records = []
        while not records or records[-1]["stage"] not in ("done", "error"):
            record = self.next()
            assert record["id"] == request_id, record
            records.append(record)
        return records

    def close(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(TIMEOUT_S)


@pytest.fixture
def volumes(tmp_path):
    """A small CT (6 slices) and a large one (48 slices, many batches of 1 slice) as NRRD files."""
    small, large = tmp_path / "small.nrrd", tmp_path / "large.nrrd"
    write_image(synthetic_ct((6, 48, 48), (5.0, 5.0, 4.0), seed=2), small)
    write_image(synthetic_ct((48, 128, 128), (2.0, 2.0, 2.5), seed=3), large)
    return small, large


def request_args(source: Path, output: Path, model: Path, *more: str) -> list[str]:
    return [
        str(source),
        "-o",
        str(output),
        "--model",
        str(model),
        "--device",
        "cpu",
        "--modality",
        "ct",
        *more,
    ]


@pytest.mark.slow
def test_server_reuses_the_model_and_survives_bad_requests(tiny_model_dir, volumes, tmp_path):
    small, _ = volumes
    server = ServerProcess()
    ready = server.next()
    assert ready["stage"] == "ready" and ready["pid"] == server.proc.pid

    server.send({"id": 1, "args": request_args(small, tmp_path / "one.nrrd", tiny_model_dir)})
    first = server.until_end(1)
    server.send("not json")
    server.send({"id": "no-args"})
    server.send(
        {"id": 2, "args": request_args(tmp_path / "missing.nrrd", tmp_path / "two.nrrd", tiny_model_dir)}
    )
    server.send({"id": 3, "args": [str(small), "-o", str(tmp_path / "3.nrrd"), "--no-such-option"]})
    server.send({"args": ["x"]})
    server.send({"id": 4, "args": request_args(small, tmp_path / "four.seg.nrrd", tiny_model_dir)})
    garbage, no_args, missing, usage, no_id = (server.next() for _ in range(5))
    fourth = server.until_end(4)

    assert first[0]["stage"] == "load" and first[-1]["stage"] == "done"
    assert "model_reused" not in first[0], "the first request loads the model"
    assert fourth[0]["stage"] == "load" and fourth[0]["model_reused"] is True
    assert fourth[-1]["outputs"] == {"segmentation": str(tmp_path / "four.seg.nrrd")}
    assert (tmp_path / "one.nrrd").is_file() and (tmp_path / "four.seg.nrrd").is_file()
    assert garbage == {
        "id": None,
        "stage": "error",
        "message": "not a JSON object: 'not json'",
        "exit_code": 2,
    }
    assert no_args["id"] == "no-args" and no_args["exit_code"] == 2 and '"args"' in no_args["message"]
    assert missing["id"] == 2 and missing["exit_code"] == 2
    assert missing["message"] == f"{tmp_path / 'missing.nrrd'}: no such file or folder"
    assert usage["id"] == 3 and usage["exit_code"] == 2 and "--no-such-option" in usage["message"]
    assert no_id["id"] is None and '"id"' in no_id["message"]
    assert not (tmp_path / "two.nrrd").exists()
    assert server.close() == 0, "the end of stdin ends the server"


@pytest.mark.slow
def test_cancel_and_sigint_stop_a_request_without_output_and_the_server_goes_on(
    tiny_model_dir, volumes, tmp_path
):
    small, large = volumes
    out = tmp_path / "out"
    out.mkdir()
    server = ServerProcess()
    assert server.next()["stage"] == "ready"
    slow = ("--batch-size", "1", "--gates", str(out / "gates"))

    def start_and_wait_for_inference(request_id) -> None:
        server.send(
            {"id": request_id, "args": request_args(large, out / f"{request_id}.nrrd", tiny_model_dir, *slow)}
        )
        while (record := server.next())["stage"] != "inference":
            assert record["id"] == request_id and record["stage"] not in ("done", "error"), record

    start_and_wait_for_inference("a")
    server.send({"id": "b", "args": request_args(small, out / "b.nrrd", tiny_model_dir)})
    server.send({"cancel": "b"})  # queued: ends without running
    server.send({"cancel": "a"})
    a_records = server.until_end("a")
    assert a_records[-1]["exit_code"] == 130 and "cancelled" in a_records[-1]["message"]
    assert server.until_end("b") == [
        {"id": "b", "stage": "error", "message": "cancelled by the user", "exit_code": 130}
    ]

    start_and_wait_for_inference("c")
    server.proc.send_signal(signal.SIGINT)
    assert server.until_end("c")[-1]["exit_code"] == 130
    assert list(out.iterdir()) == [], "no output, no temporary file, no gates folder"

    server.send({"id": "d", "args": request_args(small, out / "d.nrrd", tiny_model_dir)})
    done = server.until_end("d")[-1]
    assert done["stage"] == "done" and (out / "d.nrrd").is_file()
    server.send({"quit": True})
    assert server.proc.wait(TIMEOUT_S) == 0


@pytest.mark.slow
def test_idle_timeout_ends_the_server():
    server = ServerProcess("--idle-timeout", "0.5")
    assert server.next()["stage"] == "ready"
    started = time.monotonic()
    assert server.proc.wait(TIMEOUT_S) == 0, "ended with stdin still open"
    assert time.monotonic() - started < 30
    server.proc.stdin.close()


def test_predictor_cache_loads_once_per_model_and_settings(tiny_model_dir, volumes, tmp_path):
    small, _ = volumes
    cache = PredictorCache()
    lines = [
        {"id": 1, "args": request_args(small, tmp_path / "1.nrrd", tiny_model_dir)},
        {"id": 2, "args": request_args(small, tmp_path / "2.nrrd", tiny_model_dir)},
        {"id": 3, "args": request_args(small, tmp_path / "3.nrrd", tiny_model_dir, "--batch-size", "2")},
    ]
    stdout = io.StringIO()
    stdin = io.StringIO("".join(json.dumps(line) + "\n" for line in lines))
    assert Server(stdin, stdout, predictors=cache).run() == 0
    records = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [r["id"] for r in records if r["stage"] == "done"] == [1, 2, 3]
    assert cache.loads == 2, (
        "request 2 reused the model of request 1; the batch size of 3 is another predictor"
    )
    loads = [r for r in records if r["stage"] == "load"]
    assert [r.get("model_reused", False) for r in loads] == [False, True, False]

    # The model's files replaced on disk: loaded again, not the stale one.
    weights = tiny_model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        stdin = io.StringIO(
            json.dumps(
                {"id": 4, "args": [*lines[2]["args"][:2], str(tmp_path / "4.nrrd"), *lines[2]["args"][3:]]}
            )
            + "\n"
        )
        Server(stdin, io.StringIO(), predictors=cache).run()
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.loads == 3 and (tmp_path / "4.nrrd").is_file()


SIGINT_UNDER_LOCK = """
import io, os, signal
from m4oe import serve

server = serve.Server(io.StringIO(), io.StringIO())
with serve._sigint_cancels(server):
    with server._lock:  # the main thread inside send(), writing a progress record
        os.kill(os.getpid(), signal.SIGINT)
        total = sum(range(1000))  # the handler runs here, between two steps, the lock still held
print("cancel set" if server._cancel.is_set() else "cancel not set")
"""


def test_sigint_while_a_record_is_written_cancels_without_a_deadlock():
    """SIGINT's handler runs in the main thread, which holds the server's lock whenever it writes
    a record: the handler must not take that lock (it did, and the server hung for good)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "M4oESegmentation"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", SIGINT_UNDER_LOCK], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cancel set"
