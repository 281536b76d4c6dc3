"""Cohort segmentation: ``m4oe batch INPUTS... -o OUT_DIR``, the model loaded once for every case.

In one process, three threads overlap: a reader reads the next case's volume while the network
runs on the current one and a writer writes the one before (SimpleITK and PyTorch release the GIL
while they work; the queues between them hold one case each). With ``--workers N`` or
``--scheduler ADDRESS`` the cases run on Dask workers instead (:mod:`m4oe.cluster`).

Per case, in ``OUT_DIR``: ``<case_id>.seg.nrrd`` (or the ``--format`` chosen), with ``--gates``
``<case_id>_gate_map.nrrd``, ``<case_id>_dominant_expert.nrrd`` and ``<case_id>_gate_summary.json``,
and ``cases/<case_id>.json``, the case's summary row. They are written through temporary names and
renamed together, the label map last: a case is finished exactly when its label map and its record
exist, so a run killed at any point leaves no partial file, and the next run skips the finished
cases and redoes the rest (the files of an unfinished case are replaced). ``summary.csv`` and
``summary.json`` (every case: status, seconds, modality, routing, organ volumes in mL, warnings,
error) are rewritten, atomically, after each case. The model's accuracy warning for a modality
(the structures its card reports weak on real scans) is the same for every case of that modality:
``summary.json`` holds it once per modality, and the end of the run prints it once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .batch_summary import SUMMARY_CSV, SUMMARY_JSON, BatchProgress, Summary, case_row, failed_row
from .cases import Case, collect_cases
from .errors import InputError, OutputError
from .io import LoadedImage, all_or_nothing, read_image, write_atomic, write_image, write_segmentation
from .segment_command import write_gate_files

FORMATS = {"seg.nrrd": ".seg.nrrd", "nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha"}
RECORDS = "cases"  # OUT_DIR/cases/<case_id>.json: the row of each finished case
EXIT_SOME_FAILED = 1
_END = object()  # closes a pipeline queue


@dataclass(frozen=True)
class BatchSettings:
    """Everything a case needs besides its input: outputs, the model, and the default options.

    ``modality``, ``task``, ``force_expert``, ``tta`` and ``through_plane_sigma`` are the defaults a
    manifest row may override (:attr:`m4oe.cases.Case.options`); the model settings are those of
    :class:`m4oe.predictor.Predictor`. ``run_id`` tells this run's records from earlier runs'.
    """

    out_dir: Path
    out_format: str = "seg.nrrd"
    gates: bool = False
    overwrite: bool = False
    max_voxels: int | None = None
    model: str | None = None
    sha256: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = None
    batch_size: int | None = None
    backend: str = "torch"
    modality: str = "auto"
    task: str | None = None
    force_expert: str | None = None
    tta: int | None = None
    through_plane_sigma: float | None = None
    cleanup: bool = True
    structures: tuple[str, ...] | None = None  # the task's structures to keep (None: all)
    body_crop: bool = True  # segment only the box around the body, as `m4oe segment` does
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def load_predictor(self, device: str | None = None):
        """The :class:`~m4oe.predictor.Predictor` of these settings (``device`` overrides theirs)."""
        from .predictor import Predictor

        return Predictor.from_pretrained(
            self.model,
            sha256=self.sha256,
            device=device or self.device,
            dtype=self.dtype,
            threads=self.threads,
            batch_size=self.batch_size,
            backend=self.backend,
        )

    def options(self, case: Case) -> dict:
        """The per-case options of ``case``: these settings' defaults, overridden by its manifest row."""
        defaults = {
            "modality": self.modality,
            "task": self.task,
            "force_expert": self.force_expert,
            "tta": self.tta,
            "through_plane_sigma": self.through_plane_sigma,
        }
        return {**defaults, **case.options}


def case_outputs(case: Case, settings: BatchSettings) -> dict[str, Path]:
    """The files of a case, in the order they are renamed into place (the label map last)."""
    out = settings.out_dir
    outputs = {}
    if settings.gates:
        outputs["gate_map"] = out / f"{case.case_id}_gate_map.nrrd"
        outputs["dominant_expert"] = out / f"{case.case_id}_dominant_expert.nrrd"
        outputs["gate_summary"] = out / f"{case.case_id}_gate_summary.json"
    outputs["record"] = out / RECORDS / f"{case.case_id}.json"
    outputs["segmentation"] = out / f"{case.case_id}{FORMATS[settings.out_format]}"
    return outputs


def finished_record(case: Case, settings: BatchSettings) -> dict | None:
    """The record of ``case`` if it is finished and need not run again, else None.

    Finished: every output exists and the record names the same input. With ``overwrite``, only a
    case finished by this same run counts (a Dask task redone after its worker died).
    """
    outputs = case_outputs(case, settings)
    if not all(path.is_file() for path in outputs.values()):
        return None
    try:
        record = json.loads(outputs["record"].read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("input") != os.path.abspath(case.input):
        return None
    if settings.overwrite and record.get("run_id") != settings.run_id:
        return None
    return record


def check_outputs(case: Case, settings: BatchSettings) -> None:
    """Refuse, before any work, a case whose label map exists but is not this batch's finished output."""
    segmentation = case_outputs(case, settings)["segmentation"]
    if segmentation.exists() and not settings.overwrite and finished_record(case, settings) is None:
        raise OutputError(
            f"exists, but {RECORDS}/{case.case_id}.json does not record it as the output of "
            f"{case.input}; pass --overwrite to replace it",
            segmentation,
        )


def read_case(case: Case, settings: BatchSettings) -> LoadedImage:
    """Check the case's outputs, then read its volume (see :func:`m4oe.io.read_image`)."""
    check_outputs(case, settings)
    return read_image(case.input, max_voxels=settings.max_voxels)


def predict_case(predictor, case: Case, loaded: LoadedImage, settings: BatchSettings):
    """Segment a read case with its options; gates are recorded (for the routing figures) on
    mixture-of-experts models. Returns a :class:`~m4oe.predictor.Prediction`."""
    options = settings.options(case)
    return predictor.predict(
        loaded.image,
        modality=options["modality"],
        dicom_modality=loaded.dicom_modality,
        task=options["task"],
        force_expert=options["force_expert"],
        gates=predictor.model.cfg.is_moe,
        cleanup=settings.cleanup,
        through_plane_sigma_mm=options["through_plane_sigma"],
        test_time_passes=options["tta"],
        structures=settings.structures,
        body_crop=settings.body_crop,
        source=loaded.path,
    )


def write_case(
    case: Case, loaded: LoadedImage, prediction, settings: BatchSettings, seconds: dict, worker: str | None
) -> dict:
    """Write a case's outputs (all or none, the label map last) and return its summary row.

    Files of an unfinished earlier attempt (its label map absent) are replaced; the label map
    itself only with ``overwrite``.
    """
    t0 = time.perf_counter()
    outputs = case_outputs(case, settings)
    segmentation = outputs["segmentation"]
    replace = settings.overwrite or not segmentation.exists()
    row = case_row(
        case, "ok", seconds, prediction=prediction, loaded=loaded, output=segmentation, run_id=settings.run_id
    )
    row["worker"] = worker
    with all_or_nothing():
        if settings.gates and prediction.gate_map is not None:
            write_gate_files(prediction, outputs, loaded.path, replace)
        row["seconds"] = round(sum(seconds.values()) + time.perf_counter() - t0, 3)
        record = json.dumps(row, indent=1) + "\n"
        write_atomic(outputs["record"], lambda tmp: tmp.write_text(record), overwrite=replace)
        if settings.out_format == "seg.nrrd":
            write_segmentation(
                prediction.labelmap, prediction.labels, segmentation, overwrite=settings.overwrite
            )
        else:
            write_image(prediction.labelmap, segmentation, overwrite=settings.overwrite)
    seconds["write"] = round(time.perf_counter() - t0, 3)
    row["stage_seconds"] = dict(seconds)
    row["seconds"] = round(sum(seconds.values()), 3)
    return row


def run_case(predictor, case: Case, settings: BatchSettings, worker: str | None = None) -> dict:
    """Read, segment and write one case; return its row. A failure of the case (bad input, output
    in the way, out of memory) is its row's ``error``, not an exception; a finished case is
    returned as it was recorded, unwritten (a redone task)."""
    record = finished_record(case, settings)
    if record is not None:
        return record
    seconds: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        loaded = read_case(case, settings)
        seconds["read"] = round(time.perf_counter() - t0, 3)
        t1 = time.perf_counter()
        prediction = predict_case(predictor, case, loaded, settings)
        seconds["predict"] = round(time.perf_counter() - t1, 3)
        return write_case(case, loaded, prediction, settings, seconds, worker)
    except Exception as error:
        return failed_row(case, error, seconds, worker)


def run_local(cases: list[Case], settings: BatchSettings, summary: Summary, progress: BatchProgress) -> None:
    """Segment ``cases`` in this process: reader thread -> network (this thread) -> writer thread.

    Rows go to ``summary`` (written as they come: :meth:`Summary.refresh`) and ``progress`` from the
    writer thread only. On an interrupt (Ctrl-C, SIGTERM) the reader stops, the case in the network
    is dropped (its row stays ``pending``) and the writer finishes the case it holds before this
    returns by re-raising.
    """
    t0 = time.perf_counter()
    predictor = settings.load_predictor()
    progress.emit({"stage": "load", "fraction": 1.0, "elapsed_s": round(time.perf_counter() - t0, 3)})
    progress.start()
    to_network: queue.Queue = queue.Queue(maxsize=1)
    to_writer: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    failures: list[BaseException] = []

    def reader() -> None:
        for case in cases:
            t0 = time.perf_counter()
            try:
                item = (case, read_case(case, settings), None)
            except Exception as error:
                item = (case, None, error)
            if not _put(to_network, (*item, round(time.perf_counter() - t0, 3)), stop.is_set):
                return
        _put(to_network, _END, stop.is_set)

    def writer() -> None:
        try:
            while (item := to_writer.get()) is not _END:
                case, loaded, prediction, error, seconds = item
                if error is None:
                    try:
                        row = write_case(case, loaded, prediction, settings, seconds, None)
                    except Exception as write_error:
                        row = failed_row(case, write_error, seconds)
                else:
                    row = failed_row(case, error, seconds)
                summary.set(row)
                summary.refresh()
                progress.case(row, summary)
        except BaseException as error:  # the summary cannot be written: stop the run
            failures.append(error)
            stop.set()

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        while (item := _get(to_network, stop.is_set)) is not _END:
            case, loaded, error, read_s = item
            seconds, prediction = {"read": read_s}, None
            if error is None:
                t0 = time.perf_counter()
                try:
                    prediction = predict_case(predictor, case, loaded, settings)
                except Exception as predict_error:
                    error = predict_error
                seconds["predict"] = round(time.perf_counter() - t0, 3)
            _put(to_writer, (case, loaded, prediction, error, seconds), lambda: not threads[1].is_alive())
            del item, loaded, prediction  # one case in the network's hands at a time
    finally:
        stop.set()
        _put(to_writer, _END, lambda: not threads[1].is_alive())
        threads[1].join()
        # The reader too: a daemon thread still inside a read (SimpleITK, torch) when the
        # interpreter shuts down can abort the process (SIGABRT) instead of letting it exit with
        # its code. It stops at its next hand-over, after the read it is in.
        threads[0].join()
    if failures:
        raise failures[0]


def _get(source: queue.Queue, give_up: Callable[[], bool]):
    """The next item, or :data:`_END` once ``give_up()`` is true."""
    while not give_up():
        try:
            return source.get(timeout=0.1)
        except queue.Empty:
            continue
    return _END


def _put(target: queue.Queue, item, give_up: Callable[[], bool]) -> bool:
    """Put ``item`` when there is room; False (not put) once ``give_up()`` is true."""
    while not give_up():
        try:
            target.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def run_batch(
    inputs: list[str],
    settings: BatchSettings,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: str = "auto",
) -> Summary:
    """Segment every case of ``inputs`` (:func:`m4oe.cases.collect_cases`) into ``settings.out_dir``.

    Finished cases are skipped; the others run here (:func:`run_local`) or, given ``workers`` (a
    local Dask cluster of that many processes) or a ``scheduler`` address, on Dask
    (:func:`m4oe.cluster.run_on_dask`). Returns the summary, also written to the output folder.

    Raises InputError (no case, a bad manifest, two cases with one id), OutputError (the output
    folder cannot be made or written), ModelError (the model cannot be loaded); a failing case
    does not raise, it is recorded.
    """
    out = settings.out_dir
    if out.exists() and not out.is_dir():
        raise OutputError("is not a folder", out)
    cases = collect_cases(inputs, exclude=out)
    try:
        (out / RECORDS).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot be made ({error.strerror or error})", out) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError("folder is not writable", out)
    summary = Summary(cases, out, settings.run_id, settings.model)
    for case in cases:
        record = finished_record(case, settings)
        if record is not None:
            summary.set(dict(record, status="skipped"))
    todo = [case for case in cases if summary.rows[case.case_id]["status"] == "pending"]
    summary.write()
    printer = BatchProgress(progress, len(cases), len(todo))
    try:
        if todo and (workers or scheduler):
            try:
                from .cluster import run_on_dask  # Dask is an optional extra
            except ImportError as error:
                raise InputError(
                    f"--workers and --scheduler need Dask ({error}); install it: pip install 'm4oe[cluster]'"
                ) from None
            run_on_dask(todo, settings, summary, printer, workers=workers, scheduler=scheduler)
        elif todo:
            run_local(todo, settings, summary, printer)
    except BaseException:
        with contextlib.suppress(Exception):  # every row as it stands; the first error is the one reported
            summary.write()
        raise
    summary.write()
    printer.emit(
        {"stage": "done", "fraction": 1.0, "counts": summary.counts(), "summary": str(out / SUMMARY_JSON)}
    )
    return summary


def _checked_structures(args) -> tuple[str, ...] | None:
    """``--structures`` as names, checked against the model's task before any case is read (an
    unknown name would otherwise fail every case): InputError (exit 2) listing the known ones."""
    if args.structures is None:
        return None
    from .checkpoint import read_model_card
    from .hub import resolve_model
    from .terminology import select_labels

    names = [n for n in args.structures.split(",") if n.strip()]
    card = read_model_card(resolve_model(args.model))
    try:
        select_labels(card.task(args.task).labels, names)
    except ValueError as error:
        raise InputError(str(error), card.name) from None
    return tuple(names)


def add_batch_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``m4oe batch INPUTS... -o OUT_DIR`` (see the README's section on it)."""
    parser = subparsers.add_parser(
        "batch", help="segment a cohort: files, folders, globs or CSV manifests, the model loaded once"
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="volume, folder, glob or manifest.csv")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    parser.add_argument("--format", default="seg.nrrd", choices=tuple(FORMATS), help="default: seg.nrrd")
    parser.add_argument("--gates", action="store_true", help="also write each case's gate maps and summary")
    parser.add_argument("--modality", default="auto", choices=("auto", "ct", "mr"), help="default: detect")
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded model)")
    parser.add_argument("--sha256", default=None, help="expected SHA-256 of the model weights")
    parser.add_argument("--task", default=None, help="label set of the model (default: its first task)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per forward pass")
    parser.add_argument("--backend", default="torch", choices=("auto", "torch", "onnx"))
    parser.add_argument("--force-expert", default=None, help="route every token to this expert")
    parser.add_argument("--no-cleanup", action="store_true", help="keep every connected component")
    parser.add_argument("--through-plane-sigma", type=float, metavar="MM", default=None)
    parser.add_argument(
        "--structures",
        metavar="NAMES",
        default=None,
        help="segment only these structures of the task, comma-separated (as for segment); default: all",
    )
    parser.add_argument(
        "--body-crop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="segment only the box around the body, as segment does (default: on)",
    )
    parser.add_argument("--tta", type=int, metavar="N", default=None, help="test-time passes, 1-5")
    parser.add_argument("--max-voxels", type=int, metavar="N", default=None, help="refuse larger volumes")
    parser.add_argument("--overwrite", action="store_true", help="segment finished cases again")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--workers", type=int, metavar="N", default=None, help="a local Dask cluster of N processes"
    )
    where.add_argument(
        "--scheduler", metavar="ADDRESS", default=None, help="a Dask scheduler, tcp://host:8786"
    )
    parser.add_argument("--progress", choices=("auto", "bar", "json", "none"), default="auto")
    parser.set_defaults(handler=cmd_batch)
    return parser


def cmd_batch(args) -> int:
    """Run ``m4oe batch``; exit code 0 when no case failed, 1 when some did."""
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    settings = BatchSettings(
        out_dir=Path(args.output),
        out_format=args.format,
        gates=args.gates,
        overwrite=args.overwrite,
        max_voxels=args.max_voxels,
        model=args.model,
        sha256=args.sha256,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        batch_size=args.batch_size,
        backend=args.backend,
        modality=args.modality,
        task=args.task,
        force_expert=args.force_expert,
        tta=args.tta,
        through_plane_sigma=args.through_plane_sigma,
        cleanup=not args.no_cleanup,
        structures=_checked_structures(args),
        body_crop=args.body_crop,
    )
    summary = run_batch(
        args.inputs, settings, workers=args.workers, scheduler=args.scheduler, progress=args.progress
    )
    counts = summary.counts()
    if args.progress != "json":
        elapsed = time.perf_counter() - summary.started
        print(
            f"batch: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped "
            f"in {elapsed:.1f} s; summary: {settings.out_dir / SUMMARY_CSV}"
        )
        for modality, warning in summary.model_warnings().items():
            print(f"note, every {modality.upper()} case: {warning}", file=sys.stderr)
        for row in summary.rows.values():
            if row["status"] == "failed":
                print(f"failed: {row['case_id']}: {row['error']}", file=sys.stderr)
    return EXIT_SOME_FAILED if counts["failed"] else 0
