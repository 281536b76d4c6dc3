"""Several volumes in one go: each segmented in turn, with one progress and one cancel.

:class:`BatchSegmentation` runs a :class:`~.segmenter.Segmenter` on a list of volume nodes one
after another (with the warm engine, the model is loaded once for all of them). Each result is a
new segmentation node named after its volume and placed in its volume's study, as a single run
makes it. Progress records carry ``case`` and ``cases`` (1-based index and count) and ``volume``
(its name), so :func:`.status.overall_fraction` gives the fraction of the whole batch and
:func:`.status.progress_text` names the volume. A volume that fails is reported and the rest go
on; cancel stops the current volume and skips the rest.

Needs a MRML scene (Slicer, or ``slicer-core``) but no application, Qt or widget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .segmenter import POLL_INTERVAL_S, SegmentationResult, Segmenter
from .status import CANCELLED

logger = logging.getLogger(__name__)


@dataclass
class VolumeOutcome:
    """What became of one volume of a batch: its result, or why there is none (:data:`CANCELLED`
    for a volume cancelled or skipped after cancel)."""

    volume: object
    result: SegmentationResult | None
    error: str | None


class BatchSegmentation:
    """Segment ``volumes`` one after another with ``segmenter``.

    Args:
        segmenter: runs each volume (one run at a time; it must not be running).
        volumes: scalar volume nodes, in the order to segment them (a volume listed twice is
            segmented once).
        options: :meth:`.Segmenter.start` options for every volume (modality, model, task,
            device, test_time_passes...); results are always new segmentation nodes.
        on_progress(record): each engine progress record, with ``case``, ``cases`` and ``volume``.
        on_volume_finished(outcome): once per volume, in order, with its :class:`VolumeOutcome`.
        on_finished(outcomes): once, after the last volume (or after cancel), with every outcome.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        volumes: Sequence,
        *,
        on_progress: Callable[[dict], None] | None = None,
        on_volume_finished: Callable[[VolumeOutcome], None] | None = None,
        on_finished: Callable[[list[VolumeOutcome]], None] | None = None,
        **options,
    ):
        unique = list(dict.fromkeys(volumes))
        if not unique:
            raise ValueError("select at least one volume to segment")
        for reserved in ("output_segmentation", "replace_existing", "compared_with", "force_expert"):
            if options.get(reserved):
                raise ValueError(f"{reserved} is for single runs, not for several volumes")
        self.segmenter = segmenter
        self.volumes = unique
        self.options = options
        self.on_progress = on_progress
        self.on_volume_finished = on_volume_finished
        self.on_finished = on_finished
        self.outcomes: list[VolumeOutcome] = []
        self.cancel_requested = False
        self._started = False
        self._finished = False

    @property
    def running(self) -> bool:
        return self._started and not self._finished

    def start(self) -> BatchSegmentation:
        """Start the first volume (later ones start from :meth:`poll`). Returns self."""
        if self.segmenter.running:
            raise RuntimeError("a segmentation is already running; cancel it or wait for it")
        self._started = True
        self._start_next()
        return self

    def poll(self) -> bool:
        """Forward progress, load finished results, start the next volume; returns whether the
        batch still runs. Call every :data:`~.segmenter.POLL_INTERVAL_S` or so."""
        if not self.running:
            return False
        if self.segmenter.poll():
            return True
        self._start_next()
        return self.running

    def cancel(self, wait: bool = False) -> None:
        """Stop the current volume (nothing of it reaches the scene) and skip the rest."""
        if not self.running:
            return
        self.cancel_requested = True
        self.segmenter.cancel(wait=wait)
        while wait and self.poll():
            time.sleep(0.05)

    def run(self, process_events: Callable[[], None] | None = None) -> list[VolumeOutcome]:
        """Start and wait for every volume; returns the outcomes (errors are in them, not raised)."""
        self.start()
        while self.poll():
            if process_events is not None:
                process_events()
            time.sleep(POLL_INTERVAL_S)
        return self.outcomes

    # ------------------------------------------------------------------ internals

    def _start_next(self) -> None:
        """Start the next volume that can start; report those that cannot; finish after the last."""
        while len(self.outcomes) < len(self.volumes):
            index = len(self.outcomes)
            volume = self.volumes[index]
            if self.cancel_requested:
                self._report(VolumeOutcome(volume, None, CANCELLED))
                continue
            try:
                self.segmenter.start(
                    volume,
                    on_progress=lambda record, i=index, v=volume: self._progress(record, i, v),
                    on_finished=lambda result, error, v=volume: self._report(VolumeOutcome(v, result, error)),
                    **self.options,
                )
                return
            except (ValueError, OSError, RuntimeError) as error:
                logger.warning("M4oE: %s could not be segmented: %s", _name(volume), error)
                self._report(VolumeOutcome(volume, None, str(error)))
        if not self._finished:
            self._finished = True
            if self.on_finished is not None:
                self.on_finished(list(self.outcomes))

    def _progress(self, record: dict, index: int, volume) -> None:
        if self.on_progress is not None:
            self.on_progress(dict(record, case=index + 1, cases=len(self.volumes), volume=_name(volume)))

    def _report(self, outcome: VolumeOutcome) -> None:
        self.outcomes.append(outcome)
        if self.on_volume_finished is not None:
            self.on_volume_finished(outcome)


def _name(volume) -> str:
    return volume.GetName() if volume is not None else "(no volume)"
