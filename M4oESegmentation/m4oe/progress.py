"""Progress reporting shared by every long job (inference, dataset conversion, training).

A job calls ``progress(ProgressEvent(...))`` after each unit of work and ``cancel()`` between
units; the command line turns events into a bar or JSON lines, the Slicer module into its progress
bar. This module imports nothing heavy, so light tools can use it without loading PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    """Where a job stands: ``stage`` name, ``done`` of ``total`` units, seconds elapsed and left.

    ``item`` optionally names the unit just finished (a case, a file).
    """

    stage: str
    done: int
    total: int
    elapsed_s: float
    eta_s: float | None = None
    item: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    def to_dict(self) -> dict:
        record = {
            "stage": self.stage,
            "done": self.done,
            "total": self.total,
            "fraction": round(self.fraction, 4),
            "elapsed_s": round(self.elapsed_s, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 3),
        }
        if self.item:
            record["item"] = self.item
        return record


ProgressCallback = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], bool]
