"""``m4oe serve``: a warm engine that segments one request after another, the model loaded once.

Starting ``m4oe segment`` costs seconds before the first slice (importing PyTorch and timm, loading
the model; see ``benchmarks/README.md``). The Slicer module keeps one ``m4oe serve`` process alive
instead and sends it each run as a request. The protocol is JSON lines:

stdin, one object per line:

- ``{"id": ID, "args": [...]}``: a run of ``m4oe segment`` with these arguments (the input, ``-o``
  and every option; ``--progress`` is always ``json``). ``ID`` is a string or an integer the
  client chooses. Requests run one at a time, in order.
- ``{"cancel": ID}``: stop that request (running: between two slice batches, no output written;
  queued: it ends at once). SIGINT cancels the running request too, and the server goes on.
- ``{"quit": true}``, or the end of stdin: no more requests; those already sent are answered,
  then the server exits with code 0.

stdout, one object per line: ``{"stage": "ready", "pid", "version"}`` once PyTorch is imported,
then for each request the records ``m4oe segment --progress json`` prints, each with the
request's ``"id"``, ending with its ``done`` record or an ``error`` record (``message``,
``exit_code``: the exit code ``m4oe segment`` would have ended with). The ``load`` record has
``"model_reused": true`` when the model of an earlier request served again. A line that is not a
valid request gets an ``error`` record (with its id, or ``"id": null``) and the server goes on;
nothing a request does ends the server. Everything else (warnings, tracebacks with ``--debug``)
goes to stderr.

The server keeps the last model it loaded (a :class:`PredictorCache`): a request with the same
model file, checksum, device, dtype, threads, batch size and backend reuses it; another loads its
own in its place. ``--idle-timeout`` ends the server after that many seconds without a request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator

from . import __version__, cli
from .errors import InputError, M4oEError

logger = logging.getLogger(__name__)

CACHE_KEY = ("sha256", "device", "dtype", "threads", "batch_size", "backend")
"""``segment`` arguments besides the model file that a cached predictor must match."""


def add_serve_parser(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="segment the requests read as JSON lines on stdin, the model loaded once (for programs)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        metavar="S",
        default=None,
        help="exit after S seconds without a request (default: wait for requests until stdin ends)",
    )
    serve.set_defaults(handler=run_serve)


def model_identity(model: str | None) -> tuple:
    """What tells one model file from another: its resolved path, and the name, size and
    modification time of the card and weight files (a model replaced on disk is loaded again)."""
    from .hub import resolve_model

    path = resolve_model(model)
    files = [path] if path.is_file() else sorted(path.iterdir())
    stamps = tuple(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in files
        if f.suffix in (".json", ".safetensors") and f.is_file()
    )
    return str(path.resolve()), stamps


class PredictorCache:
    """The last loaded predictor, served again while requests ask for the same model and settings.

    Called as ``cache(args)`` with parsed ``segment`` arguments, returns ``(predictor, reused)``.
    Only one model is kept: a request for another one drops the cached model before loading its
    own, so memory holds one model at a time. :attr:`loads` counts the models loaded.
    """

    def __init__(self, load=cli.load_predictor):
        self._load = load
        self._key: tuple | None = None
        self._predictor = None
        self.loads = 0

    def __call__(self, args):
        key = (model_identity(args.model), *(getattr(args, name) for name in CACHE_KEY))
        if key == self._key:
            return self._predictor, True
        self._key = self._predictor = None
        predictor = self._load(args)
        self._key, self._predictor = key, predictor
        self.loads += 1
        return predictor, False


class Server:
    """Reads requests from ``stdin`` in a thread and runs them, one at a time, in :meth:`run`.

    ``stdout``: where the JSON records go (nothing else is written there). ``idle_timeout_s``:
    :meth:`run` returns after that many seconds without a request (None: never).
    """

    def __init__(self, stdin, stdout, *, idle_timeout_s: float | None = None, predictors=None):
        self._stdin = stdin
        self._stdout = stdout
        self.idle_timeout_s = idle_timeout_s
        self.predictors = PredictorCache() if predictors is None else predictors
        self._parser = cli.build_parser()
        self._requests: queue.Queue[dict | None] = queue.Queue()
        self._lock = threading.Lock()
        self._queued: set = set()  # ids sent and not started yet
        self._cancelled: set = set()  # queued ids cancelled before they started
        self._current = None
        self._cancel = threading.Event()

    def send(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        with self._lock:
            self._stdout.write(line)
            self._stdout.flush()

    def error(self, request_id, message: str, exit_code: int) -> None:
        message = " ".join(message.split())
        self.send({"id": request_id, "stage": "error", "message": message, "exit_code": exit_code})

    def cancel(self, request_id=None) -> None:
        """Cancel a request: the running one (None: whichever runs), or a queued one."""
        with self._lock:
            if request_id is None or request_id == self._current:
                self._cancel.set()
            elif _valid_id(request_id) and request_id in self._queued:
                self._cancelled.add(request_id)

    def interrupt(self) -> None:
        """Cancel the running request, from a signal handler: the handler runs in the main thread,
        between two of its steps, possibly inside :meth:`send` with the lock held, so it sets the
        cancel event without the lock (taking it there would deadlock). With no request running it
        does nothing: :meth:`handle` clears the event when the next request starts."""
        self._cancel.set()

    def _read(self) -> None:
        """The reader thread: requests into the queue, cancels acted on at once; None at the end."""
        try:
            for line in self._stdin:
                text = line.strip()
                if not text:
                    continue
                try:
                    message = json.loads(text)
                except json.JSONDecodeError:
                    message = None
                if not isinstance(message, dict):
                    self.error(None, f"not a JSON object: {text[:100]!r}", 2)
                elif "cancel" in message:
                    self.cancel(message["cancel"])
                elif message.get("quit"):
                    break
                else:
                    if _valid_id(message.get("id")):
                        with self._lock:
                            self._queued.add(message["id"])
                    self._requests.put(message)
        except (OSError, ValueError) as error:  # stdin closed under us
            logger.warning("m4oe serve: reading requests stopped: %s", error)
        finally:
            self._requests.put(None)

    def run(self) -> int:
        """Answer requests until stdin ends, ``quit`` or the idle timeout; returns exit code 0."""
        self.send({"stage": "ready", "pid": os.getpid(), "version": __version__})
        threading.Thread(target=self._read, name="m4oe-serve-reader", daemon=True).start()
        while True:
            try:
                message = self._requests.get(timeout=self.idle_timeout_s)
            except queue.Empty:
                logger.info("m4oe serve: no request for %g s, exiting", self.idle_timeout_s)
                break
            if message is None:
                break
            self.handle(message)
        return 0

    def handle(self, message: dict) -> None:
        """Run one request; every outcome ends in its ``done`` or ``error`` record."""
        request_id = message.get("id")
        if not _valid_id(request_id):
            self.error(None, f'a request needs an "id", a string or an integer; got {request_id!r}', 2)
            return
        arguments = message.get("args")
        with self._lock:
            self._queued.discard(request_id)
            cancelled = request_id in self._cancelled
            self._cancelled.discard(request_id)
            if not cancelled:
                self._current = request_id
                self._cancel.clear()
        if cancelled:
            self.error(request_id, "cancelled by the user", 130)
            return
        try:
            if not isinstance(arguments, list) or not all(isinstance(a, str) for a in arguments):
                raise cli.UsageError(f'"args" must be a list of m4oe segment arguments, got {arguments!r}')
            printer = cli.ProgressPrinter("json", sink=lambda record: self.send({"id": request_id, **record}))
            # Nothing but protocol records on stdout: a stray print goes to stderr.
            with contextlib.redirect_stdout(sys.stderr):
                args = self._parser.parse_args(["segment", *arguments])
                args.progress = "json"
                cli.run_segment(args, printer, predictors=self.predictors, cancel=self._cancel.is_set)
        except cli.UsageError as error:
            self.error(request_id, error.message, 2)
        except SystemExit as error:  # --help or --version among the arguments
            self.error(request_id, f"not a segmentation run (argparse exit {error.code})", 2)
        except M4oEError as error:
            self.error(request_id, str(error), error.exit_code)
        except cli.Terminated:
            self.error(request_id, "terminated (SIGTERM)", cli.TERMINATED_EXIT_CODE)
            raise
        except Exception as error:  # one request's failure never ends the server
            logger.debug("request %r failed", request_id, exc_info=True)
            self.error(request_id, f"internal error: {type(error).__name__}: {error}", 1)
        finally:
            with self._lock:
                self._current = None


def _valid_id(value) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


@contextlib.contextmanager
def _sigint_cancels(server: Server) -> Iterator[None]:
    """Inside the block SIGINT cancels the running request instead of ending the process."""
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: server.interrupt())
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_serve(args) -> int:
    from . import predictor  # noqa: F401  PyTorch and the model code, imported before "ready"

    if args.idle_timeout is not None and args.idle_timeout <= 0:
        raise InputError(f"--idle-timeout must be more than 0 seconds, got {args.idle_timeout:g}")
    server = Server(sys.stdin, sys.stdout, idle_timeout_s=args.idle_timeout)
    with _sigint_cancels(server):
        return server.run()
