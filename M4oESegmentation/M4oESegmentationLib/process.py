"""The engine's command line run in a separate process, read without blocking the GUI.

Slicer's GUI thread must never wait on inference, so the module runs ``m4oe segment`` in its own
process (``PythonSlicer -m m4oe.cli segment ... --progress json``). A reader thread puts each line
the engine prints on stdout into a queue; the GUI's ``qt.QTimer`` calls :meth:`InferenceProcess.poll`
to drain it. With ``--progress json`` every stdout line is one JSON object: progress records
``{"stage", "done", "total", "fraction", "elapsed_s", "eta_s"}``, a final ``{"stage": "done",
"outputs": {...}, ...}`` or ``{"stage": "error", "message", "exit_code"}``. Cancel kills the whole
process tree (``PythonSlicer`` is a launcher whose child runs Python: killing only the launcher
would leave inference running).

This module imports neither Slicer nor Qt, so it is tested with real subprocesses outside Slicer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

try:  # Slicer bundles psutil; without it cancel falls back to killing the process group
    import psutil
except ImportError:  # pragma: no cover - psutil is a pinned dependency of the project
    psutil = None

logger = logging.getLogger(__name__)

MODALITIES = ("auto", "ct", "mr")
BACKENDS = ("torch", "onnx", "auto")
STDERR_LINES_KEPT = 500
KILL_WAIT_S = 10.0


@dataclass
class InferenceRequest:
    """One ``m4oe segment`` run.

    ``input_path``: the volume file (NRRD keeps the geometry exact; NIfTI rounds it to float32).
    ``output_path``: label map (``.nrrd``, ``.nii.gz``) or ``.seg.nrrd``. ``model``: a model name or
    folder (None: the embedded default). ``modality``: "auto", "ct" or "mr". ``task``: the label
    set (None: the model's first). ``device``: "auto", "cpu", "cuda", "cuda:N". ``gates_dir``: write
    the gate map, dominant-expert map and gate summary there. ``force_expert``: route every token
    to this expert (name or index). ``probabilities``: also write uint8 probabilities.
    ``test_time_passes``: forward passes averaged per slice, 1-5 (None: the model card's; 1 is the
    fastest). ``through_plane_sigma_mm``: sigma in mm of the Gaussian that averages class
    probabilities over neighbouring slices (0: off; None: the model card's). ``keep_all_components``:
    keep every connected component of each organ instead of the model card's clean-up. ``backend``:
    "torch", "onnx" or "auto" (see ``m4oe segment --backend``). ``structures``: segment only these
    structures of the task (keys or names; None: all). ``roi_mm``: segment only this box,
    (x0, y0, z0, x1, y1, z1) in mm in the LPS frame (None: everywhere). ``body_crop``: segment only
    the box around the body (the engine's default). ``extra_args``: further command-line
    arguments, passed as they are.
    """

    input_path: str | Path
    output_path: str | Path
    model: str | Path | None = None
    modality: str = "auto"
    task: str | None = None
    device: str = "auto"
    gates_dir: str | Path | None = None
    force_expert: str | int | None = None
    probabilities: bool = False
    test_time_passes: int | None = None
    through_plane_sigma_mm: float | None = None
    keep_all_components: bool = False
    backend: str = "torch"
    structures: Sequence[str] | None = None
    roi_mm: Sequence[float] | None = None
    body_crop: bool = True
    extra_args: Sequence[str] = ()

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        passes = self.test_time_passes
        if passes is not None and (
            isinstance(passes, bool) or not isinstance(passes, int) or not 1 <= passes <= 5
        ):
            raise ValueError(f"test_time_passes must be an integer 1-5 or None, got {passes!r}")
        sigma = self.through_plane_sigma_mm
        if sigma is not None and (
            isinstance(sigma, bool)
            or not isinstance(sigma, (int, float))
            or not math.isfinite(sigma)
            or sigma < 0
        ):
            raise ValueError(f"through_plane_sigma_mm must be a number >= 0 or None, got {sigma!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.structures is not None and (
            isinstance(self.structures, str)
            or not self.structures
            or any("," in str(n) for n in self.structures)
        ):
            raise ValueError(f"structures must be a non-empty list of names, got {self.structures!r}")
        if self.roi_mm is not None and (
            len(self.roi_mm) != 6 or not all(math.isfinite(float(v)) for v in self.roi_mm)
        ):
            raise ValueError(f"roi_mm must be six finite numbers x0,y0,z0,x1,y1,z1, got {self.roi_mm!r}")
        if isinstance(self.extra_args, str):
            raise ValueError(
                f"extra_args must be a sequence of arguments, got the string {self.extra_args!r}"
            )


def build_command(request: InferenceRequest, python_executable: str | Path) -> list[str]:
    """The command line that runs ``request``: ``[python, "-m", "m4oe.cli", "segment", ...]``.

    ``python_executable``: in Slicer, ``shutil.which("PythonSlicer")``; elsewhere ``sys.executable``.
    The ``m4oe`` package must be importable by that interpreter (see :func:`engine_environment`).
    """
    return [str(python_executable), "-m", "m4oe.cli", "segment", *segment_arguments(request)]


def segment_arguments(request: InferenceRequest) -> list[str]:
    """The ``m4oe segment`` arguments of ``request`` (what follows ``segment`` on its command line;
    also what a request to the warm engine, ``m4oe serve``, carries)."""
    command = [str(request.input_path), "-o", str(request.output_path), "--progress", "json"]
    command += ["--modality", request.modality, "--device", request.device]
    if request.model is not None:
        command += ["--model", str(request.model)]
    if request.task is not None:
        command += ["--task", str(request.task)]
    if request.gates_dir is not None:
        command += ["--gates", str(request.gates_dir)]
    if request.force_expert is not None:
        command += ["--force-expert", str(request.force_expert)]
    if request.probabilities:
        command.append("--probabilities")
    if request.test_time_passes is not None:
        command += ["--tta", str(request.test_time_passes)]
    if request.through_plane_sigma_mm is not None:
        command += ["--through-plane-sigma", repr(float(request.through_plane_sigma_mm))]
    if request.keep_all_components:
        command.append("--no-cleanup")
    if request.backend != "torch":
        command += ["--backend", request.backend]
    if request.structures is not None:
        command += ["--structures", ",".join(str(n) for n in request.structures)]
    if request.roi_mm is not None:  # "=": the first number may be negative
        command.append("--roi-mm=" + ",".join(repr(float(v)) for v in request.roi_mm))
    if not request.body_crop:
        command.append("--no-body-crop")
    command += [str(arg) for arg in request.extra_args]
    return command


def engine_environment(engine_parent: str | Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment in which ``python -m m4oe.cli`` finds the bundled engine.

    ``engine_parent``: the folder holding the ``m4oe`` package (the module's folder), put first on
    ``PYTHONPATH``. ``base``: the environment to extend (default ``os.environ``). In Slicer the
    running application's environment is the right base, as ``slicer.util`` uses it when it runs
    ``PythonSlicer -m`` (``launchConsoleProcess(..., useStartupEnvironment=False)``): the launcher
    prepends its paths to ``PYTHONPATH``, so the engine folder stays on it, and ``M4OE_*``
    settings made in the session reach the engine. Output is made unbuffered so progress lines
    arrive as they are printed.
    """
    env = dict(os.environ if base is None else base)
    paths = [str(engine_parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def parse_line(line: str) -> dict:
    """One stdout line as a record: the engine's JSON object, else ``{"stage": "log", "message"}``."""
    text = line.rstrip("\r\n")
    if text.startswith("{"):
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("stage"), str):
            return record
    return {"stage": "log", "message": text}


class InferenceProcess:
    """A running engine process whose output the GUI polls.

    Typical use from a ``qt.QTimer`` callback::

        for record in process.poll():
            ...  # progress bar from record["fraction"], log lines from "log" records
        if not process.running:
            ...  # finished: process.returncode, process.result (the "done" record), process.error

    ``running`` stays True until the process has exited *and* :meth:`poll` has returned every line
    it printed, so checking it right after a poll never loses the final record.
    """

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._reset()

    def _reset(self) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._stderr: deque[str] = deque(maxlen=STDERR_LINES_KEPT)
        self._lock = threading.Lock()
        self.cancelled = False
        self.result: dict | None = None
        self.progress: dict | None = None
        self._error_record: str | None = None
        self.start_time: float | None = None

    def start(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        """Start ``command`` (see :func:`build_command`) with stdout and stderr read by threads.

        The process gets its own process group (session on POSIX) so that cancel can reach every
        process it starts. Raises RuntimeError when a process of this object is still running,
        and OSError (e.g. FileNotFoundError) when the executable cannot be started.
        """
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("an inference process is already running; cancel it or wait for it")
        self._reset()
        options = new_session_options()
        logger.debug("starting %s", subprocess.list2cmdline([str(c) for c in command]))
        self._proc = subprocess.Popen(
            [str(c) for c in command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=None if env is None else dict(env),
            cwd=None if cwd is None else str(cwd),
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **options,
        )
        self.start_time = time.monotonic()
        self._readers = [
            threading.Thread(target=self._read, args=(self._proc.stdout, self._queue.put), daemon=True),
            threading.Thread(target=self._read, args=(self._proc.stderr, self._keep_stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, sink) -> None:
        with stream:
            for line in stream:
                sink(line)

    def _keep_stderr(self, line: str) -> None:
        with self._lock:
            self._stderr.append(line.rstrip("\r\n"))

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has ended (negative: killed by that signal), else None."""
        return None if self._proc is None else self._proc.poll()

    @property
    def running(self) -> bool:
        """Whether output may still come: the process runs, or lines remain for :meth:`poll`."""
        if self._proc is None:
            return False
        if self._proc.poll() is None or any(reader.is_alive() for reader in self._readers):
            return True
        return not self._queue.empty()

    @property
    def stderr(self) -> str:
        """The last :data:`STDERR_LINES_KEPT` lines the process wrote on stderr."""
        with self._lock:
            return "\n".join(self._stderr)

    @property
    def error(self) -> str | None:
        """Why the run failed: the engine's one-line error message, else the last stderr line.

        None while running, after success, and after :meth:`cancel`.
        """
        if self._error_record is not None:
            return self._error_record
        code = self.returncode
        if code in (None, 0) or self.cancelled:
            return None
        with self._lock:
            lines = [line for line in self._stderr if line.strip()]
        return lines[-1].strip() if lines else f"the engine stopped with exit code {code}"

    def poll(self) -> list[dict]:
        """Every record printed since the last poll, in order (never blocks).

        Updates :attr:`progress` (the last record with a ``fraction``), :attr:`result` (the
        ``done`` record) and :attr:`error` (the ``error`` record's message).
        """
        records = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            record = parse_line(line)
            if record["stage"] == "done":
                self.result = record
            elif record["stage"] == "error":
                self._error_record = str(record.get("message", "unknown error"))
            if "fraction" in record and record["stage"] not in ("done", "error"):
                self.progress = {
                    key: record.get(key)
                    for key in ("stage", "fraction", "done", "total", "elapsed_s", "eta_s")
                }
            records.append(record)
        return records

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` s for the process to end and its output to be read; return its code.

        Returns None on timeout. Lines stay queued for :meth:`poll`.
        """
        if self._proc is None:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for reader in self._readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                return None
        return self._proc.returncode

    def cancel(self) -> None:
        """Kill the process and every process it started; wait for them (no zombie is left).

        Every descendant (found with psutil) is killed before the process itself, so none is left
        running as an orphan; on POSIX the process group is killed too, which catches a child
        started in between. Our own child is reaped, descendants are waited for. A process that
        already ended is left alone. :attr:`cancelled` becomes True and :attr:`error` stays None.
        """
        if self._proc is None or self._proc.poll() is not None:
            return
        self.cancelled = True
        kill_process_tree(self._proc)
        for reader in self._readers:
            reader.join(KILL_WAIT_S)
        logger.info("cancelled the inference process %d", self._proc.pid)


def new_session_options() -> dict:
    """``subprocess.Popen`` options that start a process in its own session (POSIX) or process
    group without a console window (Windows), so :func:`kill_process_tree` reaches all it starts."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def kill_process_tree(proc: subprocess.Popen) -> None:
    """Kill ``proc`` (started in its own session or process group) and every process it started.

    Every descendant (found with psutil) is killed before the process itself, so none is left
    running as an orphan; on POSIX the process group is killed too, which catches a child started
    in between. ``proc`` is reaped, descendants are waited for (no zombie is left).
    """
    victims = []
    if psutil is not None:
        try:
            parent = psutil.Process(proc.pid)
            victims = [*parent.children(recursive=True), parent]
        except psutil.NoSuchProcess:
            victims = []
        for victim in victims:
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                pass
    else:
        proc.kill()
    if os.name != "nt":
        # The process group catches anything started between the listing and the kills.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(KILL_WAIT_S)  # reaps our child: no zombie
    except subprocess.TimeoutExpired:  # e.g. stuck in the GPU driver; returncode stays None
        logger.warning("process %d did not end within %g s of being killed", proc.pid, KILL_WAIT_S)
    if psutil is not None and victims:
        psutil.wait_procs(victims[:-1], timeout=KILL_WAIT_S)


class TemporaryWorkspace:
    """A private temporary folder for one run's input and output files, removed on exit.

    Use as a context manager, or call :meth:`cleanup` when the asynchronous run has ended (after
    :meth:`InferenceProcess.cancel` too). ``path`` is the folder; :attr:`input_path`,
    :attr:`output_path` and :attr:`gates_dir` name the files a run uses in it (NRRD, which keeps
    the volume's geometry exact in double precision; the result is a Slicer ``.seg.nrrd``).
    """

    def __init__(self, prefix: str = "m4oe-", parent: str | Path | None = None):
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=None if parent is None else str(parent)))

    @property
    def input_path(self) -> Path:
        return self.path / "input.nrrd"

    @property
    def output_path(self) -> Path:
        return self.path / "segmentation.seg.nrrd"

    @property
    def gates_dir(self) -> Path:
        return self.path / "gates"

    def cleanup(self) -> None:
        """Remove the folder and everything in it (retried briefly: a killed process may hold files)."""
        for attempt in range(5):
            if not self.path.exists():
                return
            try:
                shutil.rmtree(self.path)
                return
            except OSError as error:
                if attempt == 4:
                    logger.warning("could not remove the temporary folder %s: %s", self.path, error)
                    return
                time.sleep(0.2)

    def __enter__(self) -> TemporaryWorkspace:
        return self

    def __exit__(self, *exc_info) -> None:
        self.cleanup()
