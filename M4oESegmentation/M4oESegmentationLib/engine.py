"""The warm engine: one ``m4oe serve`` process kept alive while the module is in use.

Every run of ``m4oe segment`` in its own process pays for importing PyTorch and timm and loading
the model before the first slice (seconds; see ``benchmarks/README.md``, ``warm_engine.py``).
:class:`WarmEngine` starts ``PythonSlicer -m m4oe.cli serve`` once and sends each run to it as a
request (:mod:`m4oe.serve` describes the protocol); the server keeps the model loaded between
runs. Each run is an :class:`EngineRun`, which the caller polls exactly as an
:class:`~.process.InferenceProcess` (same attributes), so :class:`~.segmenter.Segmenter` uses one
or the other.

The server is started on the first run (or by :meth:`WarmEngine.start`, to warm it up before),
started again when it has died (the run it was working on reports the error, the next run gets a
new server), ends by itself after ``idle_timeout_s`` without a request, and is stopped by
:meth:`WarmEngine.stop` (the module calls it when Slicer quits or the module is reloaded). Cancel
sends the server a ``cancel`` message: it stops between two slice batches and goes on serving;
a server that has not ended the run :data:`CANCEL_GRACE_S` later is killed.

Imports neither Slicer nor Qt: tested with a real server subprocess outside Slicer.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import process

logger = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 600.0
"""Default time without a request after which the server ends (and frees the model's memory)."""
IDLE_MARGIN_S = 5.0
"""A server this close to its idle timeout is replaced before a request, not sent one it may miss."""
CANCEL_GRACE_S = 10.0
"""Time a cancelled run is given to end in the server before the server is killed."""
STOP_WAIT_S = 5.0
PROGRESS_KEYS = ("stage", "fraction", "done", "total", "elapsed_s", "eta_s")


class EngineRun:
    """One request to the warm engine, polled like :class:`~.process.InferenceProcess`.

    ``running`` stays True until the run's ``done`` or ``error`` record has been returned by
    :meth:`poll`. ``returncode``: the ``exit_code`` the run ended with (0 on success), else None.
    """

    def __init__(self, engine: WarmEngine, request_id: int, server: subprocess.Popen):
        self._engine = engine
        self.request_id = request_id
        self._server = server  # the server process it was sent to
        self._end_code: int | None = None
        self._queue: queue.Queue[dict] = queue.Queue()
        self._ended = threading.Event()  # its last record is queued
        self._reported = False  # its last record was returned by poll
        self.cancelled = False
        self._cancel_time: float | None = None
        self.result: dict | None = None
        self.progress: dict | None = None
        self._error: str | None = None
        self._code: int | None = None
        self.start_time = time.monotonic()

    def _deliver(self, record: dict) -> None:
        """From the engine's reader thread: a record of this run."""
        self._queue.put(record)
        if record.get("stage") in ("done", "error"):
            self._end_code = 0 if record["stage"] == "done" else int(record.get("exit_code") or 1)
            self._ended.set()

    @property
    def pid(self) -> int | None:
        return self._engine.pid

    @property
    def returncode(self) -> int | None:
        return self._code if self._reported else None

    @property
    def running(self) -> bool:
        if (
            self._cancel_time is not None
            and not self._ended.is_set()
            and time.monotonic() - self._cancel_time > CANCEL_GRACE_S
        ):
            logger.warning("engine run %d not stopped in %g s: killing it", self.request_id, CANCEL_GRACE_S)
            self._engine.kill()
        return not self._reported

    @property
    def stderr(self) -> str:
        return self._engine.stderr

    @property
    def error(self) -> str | None:
        """The run's one-line error message; None while running, after success and after cancel."""
        return None if self.cancelled or not self._reported else self._error

    def poll(self) -> list[dict]:
        """Every record of this run since the last poll, in order (never blocks); see
        :meth:`.process.InferenceProcess.poll`."""
        records = []
        while True:
            try:
                record = self._queue.get_nowait()
            except queue.Empty:
                break
            stage = record.get("stage")
            if stage == "done":
                self.result, self._code, self._reported = record, 0, True
            elif stage == "error":
                self._error = str(record.get("message", "unknown error"))
                self._code, self._reported = int(record.get("exit_code") or 1), True
            elif "fraction" in record:
                self.progress = {key: record.get(key) for key in PROGRESS_KEYS}
            records.append(record)
        return records

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` s for the run's last record (it stays queued for :meth:`poll`)."""
        return self._end_code if self._ended.wait(timeout) else None

    def cancel(self) -> None:
        """Ask the server to stop this run (no output is written); returns at once. The run ends
        with the server's ``error`` record (:attr:`error` stays None); the next :meth:`poll`s get it."""
        if self._ended.is_set() or self.cancelled:
            return
        self.cancelled = True
        self._cancel_time = time.monotonic()
        self._engine.send({"cancel": self.request_id})


class WarmEngine:
    """One ``m4oe serve`` process, started when needed, serving :class:`EngineRun` s one at a time.

    Args:
        python_executable: ``PythonSlicer`` in Slicer, ``sys.executable`` elsewhere.
        engine_dir: the folder holding the ``m4oe`` package (the module's folder).
        environment: the environment to start the server in (default ``os.environ``).
        idle_timeout_s: the server ends after this many seconds without a request.
    """

    def __init__(
        self,
        python_executable: str | Path,
        engine_dir: str | Path,
        environment: Mapping[str, str] | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ):
        if not idle_timeout_s > IDLE_MARGIN_S:
            raise ValueError(f"idle_timeout_s must be more than {IDLE_MARGIN_S:g} s, got {idle_timeout_s!r}")
        self.python_executable = str(python_executable)
        self.engine_dir = Path(engine_dir)
        self.environment = environment
        self.idle_timeout_s = float(idle_timeout_s)
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._runs: dict[int, EngineRun] = {}
        self._ids = itertools.count(1)
        self._stderr: deque[str] = deque(maxlen=process.STDERR_LINES_KEPT)
        self._last_request = 0.0
        self.starts = 0
        """How many server processes this engine has started."""

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def stderr(self) -> str:
        with self._lock:
            return "\n".join(self._stderr)

    def command(self) -> list[str]:
        return [
            self.python_executable,
            *("-m", "m4oe.cli", "serve", "--idle-timeout", repr(self.idle_timeout_s)),
        ]

    def start(self) -> None:
        """Start the server unless it runs (it imports PyTorch in the background: a warm-up)."""
        if self.alive:
            return
        self._stderr.clear()
        proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=process.engine_environment(self.engine_dir, self.environment),
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **process.new_session_options(),
        )
        self._proc = proc
        self._last_request = time.monotonic()
        self.starts += 1
        threading.Thread(target=self._read_stdout, args=(proc,), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(proc,), daemon=True).start()
        logger.info("started the M4oE engine server %d", proc.pid)

    def submit(self, arguments: Sequence[str]) -> EngineRun:
        """Send one run (``m4oe segment`` arguments, see :func:`.process.segment_arguments`).

        Starts the server when none runs or when it is about to end for being idle. Raises
        OSError when the server cannot be started.
        """
        if self.alive and time.monotonic() - self._last_request > self.idle_timeout_s - IDLE_MARGIN_S:
            self.stop()
        self.start()
        run = EngineRun(self, next(self._ids), self._proc)
        with self._lock:
            self._runs[run.request_id] = run
        self.send({"id": run.request_id, "args": [str(a) for a in arguments]})
        return run

    def send(self, message: dict) -> None:
        """Write one message to the server (a dead server is noticed by its reader thread)."""
        self._last_request = time.monotonic()
        proc = self._proc
        if proc is None:
            return
        try:
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
        except (OSError, ValueError) as error:  # broken pipe: the server has died
            logger.warning("the M4oE engine server is gone: %s", error)

    def stop(self) -> None:
        """End the server: ``quit``, then kill it if it is not gone within :data:`STOP_WAIT_S`.
        Runs it had not finished end with an error."""
        proc = self._proc
        if proc is None:
            return
        for run in self._pending():
            run.cancel()
        self.send({"quit": True})
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill_process_tree(proc)
        logger.info("stopped the M4oE engine server %d", proc.pid)

    def kill(self) -> None:
        """Kill the server and everything it started; its unfinished runs end with an error."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            process.kill_process_tree(proc)

    def _pending(self) -> list[EngineRun]:
        with self._lock:
            return [run for run in self._runs.values() if not run._ended.is_set()]

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        with proc.stdout:
            for line in proc.stdout:
                record = process.parse_line(line)
                with self._lock:
                    run = self._runs.get(record.get("id"))
                if run is None:
                    if record["stage"] == "log":
                        logger.info("m4oe serve: %s", record["message"])
                    elif record["stage"] == "error":
                        logger.warning("m4oe serve: %s", record.get("message"))
                    continue
                run._deliver(record)
                if run._ended.is_set():
                    self._last_request = time.monotonic()  # the server's idle time starts now
                    with self._lock:
                        self._runs.pop(run.request_id, None)
        # The server has ended: the runs it left unanswered fail.
        try:
            code = proc.wait(process.KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            code = None
        with self._lock:
            runs, lines = [r for r in self._runs.values() if r._server is proc], list(self._stderr)
            for run in runs:
                self._runs.pop(run.request_id, None)
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        message = f"the engine stopped unexpectedly (exit code {code})" + (f": {last}" if last else "")
        for run in runs:
            run._deliver({"id": run.request_id, "stage": "error", "message": message, "exit_code": code or 1})

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        with proc.stderr:
            for line in proc.stderr:
                with self._lock:
                    self._stderr.append(line.rstrip("\r\n"))
