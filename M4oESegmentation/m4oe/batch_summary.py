"""The summary of a batch run: one row per case, kept as ``summary.json`` and ``summary.csv`` in the
output folder and rewritten (atomically) after each case; and the progress lines of a run.

A row (JSON): ``case_id``, ``status`` (ok, failed, skipped, pending), ``seconds`` (the case's read +
network + write time; ``stage_seconds`` splits it), ``input`` (absolute path), ``output``,
``modality`` and ``modality_source``, ``task``, ``volumes_ml`` (mL per label of the task),
``routing`` (the gate's ``mean_weights`` per expert over the volume, ``dominant_expert``,
``routing_confidence``; None for a dense model), ``warnings`` (what is particular to the case: the
reader's notes, the routing and scan-check warnings), ``accuracy_warning`` (the structures the
model's card reports weak or unmeasured on real scans of the case's modality: the same for every
case of a modality, so ``summary.json`` also holds it once per modality in ``model_warnings`` and
``summary.csv`` leaves it out), ``error`` (why a case failed), ``worker`` (the Dask worker that ran it),
``run_id`` (the run that segmented it).
"""

from __future__ import annotations

import csv
import io as text_io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .cases import Case
from .errors import M4oEError
from .io import LoadedImage, write_atomic

SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"


def case_row(
    case: Case,
    status: str,
    seconds: dict,
    *,
    prediction=None,
    loaded: LoadedImage | None = None,
    output: Path | None = None,
    run_id: str | None = None,
) -> dict:
    """A summary row: the case, its status, its time and, from a prediction, what was found.

    ``volumes_ml``: per label of the task, voxels x voxel volume (spacing in mm) / 1000. ``routing``:
    the gate's mean weight per expert over the volume, its dominant expert and routing confidence
    (None for a dense model). ``warnings``: the reader's notes and the prediction's warnings but the
    accuracy warning, which is ``accuracy_warning`` (see the module docstring).
    """
    row = {
        "case_id": case.case_id,
        "status": status,
        "seconds": round(sum(seconds.values()), 3) if seconds else None,
        "input": os.path.abspath(case.input),
        "output": None,
        "modality": None,
        "modality_source": None,
        "task": None,
        "volumes_ml": {},
        "routing": None,
        "warnings": [],
        "accuracy_warning": None,
        "error": None,
        "worker": None,
        "run_id": None,
    }
    if prediction is not None:
        labelmap = prediction.labelmap
        counts = label_counts(sitk.GetArrayViewFromImage(labelmap))
        voxel_ml = float(np.prod(labelmap.GetSpacing())) / 1000.0
        overall = (prediction.gate_summary or {}).get("overall")
        row.update(
            output=str(output),
            modality=prediction.modality.modality,
            modality_source=prediction.modality.source,
            task=prediction.task,
            volumes_ml={
                label.name: round(
                    float(counts[label.value]) * voxel_ml if label.value < counts.size else 0.0, 3
                )
                for label in prediction.labels
            },
            routing=None
            if overall is None
            else {
                "dominant_expert": overall["dominant_expert"],
                "routing_confidence": overall["routing_confidence"],
                "mean_weights": overall["mean_weights"],
            },
            warnings=[
                *loaded.warnings,
                *(w for kind, w in prediction.warnings.items() if kind != "accuracy"),
            ],
            accuracy_warning=prediction.warnings.get("accuracy"),
            run_id=run_id,
        )
    return row


def label_counts(labels: np.ndarray) -> np.ndarray:
    """Voxels per label value of a label array ((z, y, x) or any shape with at least one axis;
    unsigned integers): ``counts[v]`` for v up to the largest value present, as
    ``np.bincount(labels.ravel())`` gives them.

    Counted one plane of the first axis at a time: a whole-volume ``np.bincount`` first casts the
    array to int64, a temporary 8 times its size (220 MB for a 27 M-voxel CT) whose fresh pages
    cost 1.3 s of page faults per case in a batch run, against 0.09 s plane by plane.
    """
    counts = np.zeros(1, np.int64)
    for plane in labels.reshape(labels.shape[0], -1):
        plane_counts = np.bincount(plane)
        if plane_counts.size > counts.size:
            counts = np.pad(counts, (0, plane_counts.size - counts.size))
        counts[: plane_counts.size] += plane_counts
    return counts


def failed_row(case: Case, error: BaseException, seconds: dict, worker: str | None = None) -> dict:
    row = case_row(case, "failed", seconds)
    row["worker"] = worker
    if isinstance(error, M4oEError):
        row["error"] = " ".join(str(error).split())
    elif isinstance(error, MemoryError):
        row["error"] = f"{case.input}: out of memory"
    else:
        row["error"] = f"{case.input}: internal error: {type(error).__name__}: {error}"
    return row


class Summary:
    """The summary of a run, one row per case in the order of the inputs, written as cases finish.

    ``summary.json``: ``{"run_id", "out_dir", "model", "elapsed_s", "counts": {status: n},
    "model_warnings": {modality: accuracy warning}, "cases": [row, ...]}``; ``summary.csv``: one
    line per row, ``volumes_ml`` as ``<label>_ml`` columns and the routing as ``dominant_expert``,
    ``routing_confidence`` and ``gate_<expert>`` columns, the accuracy warning left out.
    Statuses: ``ok`` (segmented by this run), ``skipped`` (finished by an earlier run; its row as
    recorded then), ``failed`` (``error`` says why; retried by the next run), ``pending`` (not
    reached: an interrupted run).
    """

    def __init__(
        self, cases: list[Case], out_dir: Path, run_id: str, model: str | None, write_share: float = 0.05
    ):
        self.out_dir, self.run_id, self.model = out_dir, run_id, model
        self.started = time.perf_counter()
        self.rows = {case.case_id: case_row(case, "pending", {}) for case in cases}
        # Each write rewrites every row, so its cost grows with the cohort (about 0.3 s at 5,000
        # rows): refresh() skips writes that would take more than this share of the writer's time.
        self.write_share = write_share
        self.last_write_s = 0.0
        self._next_write = 0.0

    def set(self, row: dict) -> None:
        self.rows[row["case_id"]] = row

    def model_warnings(self) -> dict[str, str]:
        """The accuracy warning of each modality segmented (``"ct"``, ``"mr"``), once: the rows'
        ``accuracy_warning``, the first of each modality in input order (every case of a modality
        gets the same one, the structures segmented being the run's)."""
        found: dict[str, str] = {}
        for row in self.rows.values():
            if row.get("accuracy_warning") and row["modality"] not in found:
                found[row["modality"]] = row["accuracy_warning"]
        return found

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("ok", "failed", "skipped", "pending"), 0)
        for row in self.rows.values():
            counts[row["status"]] += 1
        return counts

    def refresh(self) -> bool:
        """Write the summary if it is due (see :meth:`write`); returns whether it wrote.

        Due when the time since the last write is at least the last write's duration divided by
        ``write_share``: after every case while writing is cheap (a few ms for a few hundred rows),
        every few cases for cohorts of thousands, so rewriting never takes more than about 5 % of
        the run. The run ends with a :meth:`write`, and each finished case also has its own record.
        """
        if time.perf_counter() < self._next_write:
            return False
        self.write()
        return True

    def write(self) -> None:
        """Write ``summary.json`` and ``summary.csv`` now (atomically, replacing the previous ones)."""
        t0 = time.perf_counter()
        out = self.out_dir
        document = {
            "run_id": self.run_id,
            "out_dir": str(out),
            "model": self.model,
            "elapsed_s": round(time.perf_counter() - self.started, 3),
            "counts": self.counts(),
            "model_warnings": self.model_warnings(),
            "cases": list(self.rows.values()),
        }
        text = json.dumps(document, indent=1) + "\n"
        table = self.csv_text()
        write_atomic(out / SUMMARY_JSON, lambda tmp: tmp.write_text(text), overwrite=True)
        write_atomic(out / SUMMARY_CSV, lambda tmp: tmp.write_text(table, newline=""), overwrite=True)
        end = time.perf_counter()
        self.last_write_s = end - t0
        self._next_write = end + self.last_write_s / self.write_share

    def csv_text(self) -> str:
        rows = list(self.rows.values())
        experts = list(dict.fromkeys(e for r in rows if r["routing"] for e in r["routing"]["mean_weights"]))
        organs = list(dict.fromkeys(name for r in rows for name in r["volumes_ml"]))
        head = ["case_id", "status", "seconds", "modality", "modality_source", "task"]
        columns = [
            *head,
            "dominant_expert",
            "routing_confidence",
            *(f"gate_{e}" for e in experts),
            *(f"{o}_ml" for o in organs),
            "warnings",
            "error",
            "worker",
            "input",
            "output",
        ]
        stream = text_io.StringIO()
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            routing = r["routing"] or {}
            weights = routing.get("mean_weights", {})
            writer.writerow(
                [
                    *(r[k] for k in head),
                    routing.get("dominant_expert"),
                    routing.get("routing_confidence"),
                    *(weights.get(e) for e in experts),
                    *(r["volumes_ml"].get(o) for o in organs),
                    "; ".join(r["warnings"]),
                    r["error"],
                    r["worker"],
                    r["input"],
                    r["output"],
                ]
            )
        return stream.getvalue()


class BatchProgress:
    """One line per finished case on stderr (``bar``, a bar over cases and the time left) or one
    JSON object per line on stdout (``json``: ``stage`` ``case``, ``done``, ``total``, ``item`` the
    case id, ``status``, ``seconds``, ``eta_s``; then ``stage`` ``done`` with the counts)."""

    def __init__(self, mode: str, total: int, todo: int):
        self.mode = "bar" if mode == "auto" else mode
        self.total, self.todo, self.processed = total, todo, 0
        self.started = time.perf_counter()

    def start(self) -> None:
        """Time left is measured from here (the model loaded, the workers started)."""
        self.started = time.perf_counter()

    def emit(self, record: dict) -> None:
        if self.mode == "json":
            print(json.dumps(record), flush=True)

    def case(self, row: dict, summary: Summary) -> None:
        self.processed += 1
        elapsed = time.perf_counter() - self.started
        left = self.todo - self.processed
        eta = elapsed / self.processed * left
        counts = summary.counts()
        done = self.total - counts["pending"]
        if self.mode == "json":
            self.emit(
                {
                    "stage": "case",
                    "done": done,
                    "total": self.total,
                    "fraction": round(done / self.total, 4),
                    "elapsed_s": round(elapsed, 3),
                    "eta_s": round(eta, 3),
                    "item": row["case_id"],
                    "status": row["status"],
                    "seconds": row["seconds"],
                    "error": row["error"],
                }
            )
        elif self.mode == "bar":
            width = 20
            bar = "#" * int(width * done / self.total) + "-" * (width - int(width * done / self.total))
            what = row["error"] if row["status"] == "failed" else f"{row['seconds']:.1f} s, {row['modality']}"
            sys.stderr.write(
                f"[{bar}] {done}/{self.total} {row['case_id']}: {row['status']} ({what}); "
                f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped; "
                f"~{_duration(eta)} left\n"
            )
            sys.stderr.flush()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
