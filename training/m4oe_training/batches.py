"""Training batches by step, drawn in the training process or ahead of it by worker processes.

A batch is a pure function of its step: the step's seed (``step_seed(seed, rank, step)``) drives the
slice draw (``SliceData.sample``, which renders synthetic slices where a dataset asks for them), the
augmentation and the masked-image-modelling mask. Drawing batches in forked workers therefore gives
exactly the batches the training process would draw itself, only sooner. On a GPU the draw, not
the network, bounds the step time of the small models (synthetic rendering with deformation costs
tens of milliseconds a slice on one core), so ``loader_workers`` CPU processes draw the next steps'
batches while the GPU trains on this one.

Batches are (images (B, 1, S, S) float32 normalised slices, labels (B, S, S) int64 class values,
dataset indices (B,) int64, mask (B, 1, S, S) float32 of hidden pixels or None).
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .augment import Augmentation, augment_batch
from .data import SliceData

MIM_BLOCK = 16  # side of the square blocks hidden in masked-image modelling, in pixels


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def hidden_blocks(rng: np.random.Generator, batch: int, size: int, ratio: float) -> torch.Tensor:
    """A (B, 1, S, S) mask hiding ``ratio`` of the MIM_BLOCK x MIM_BLOCK blocks of each slice."""
    n = size // MIM_BLOCK
    hidden = np.zeros((batch, n * n), np.float32)
    for b in range(batch):
        hidden[b, rng.permutation(n * n)[: round(ratio * n * n)]] = 1.0
    mask = torch.from_numpy(hidden.reshape(batch, 1, n, n))
    return F.interpolate(mask, scale_factor=MIM_BLOCK, mode="nearest")


@dataclass(frozen=True)
class BatchPlan:
    """What a batch depends on besides its step."""

    data: SliceData
    augmentation: Augmentation | None
    batch_size: int
    foreground_fraction: float
    seed: int
    rank: int
    foreground_sampling: str = "slice"

    @classmethod
    def from_config(cls, cfg, data: SliceData, augmentation: Augmentation | None, rank: int) -> BatchPlan:
        """The plan of a run's config (a :class:`.config.TrainConfig`) for process ``rank``."""
        sizes = (cfg.batch_size, cfg.foreground_fraction)
        return cls(data, augmentation, *sizes, cfg.seed, rank, cfg.foreground_sampling)


def draw_batch(plan: BatchPlan, step: int, kind: str, mask_ratio: float):
    """The batch of global step ``step`` in a stage of ``kind`` ("mim" adds the hidden-block mask)."""
    seed = step_seed(plan.seed, plan.rank, step)
    rng = np.random.default_rng(seed)
    images, targets, datasets = plan.data.sample(
        rng, plan.batch_size, plan.foreground_fraction, plan.foreground_sampling
    )
    if plan.augmentation is not None:
        images, targets = augment_batch(plan.augmentation, images, targets, seed)
    mask = hidden_blocks(rng, images.shape[0], images.shape[-1], mask_ratio) if kind == "mim" else None
    return images, targets, datasets, mask


_PLAN: BatchPlan | None = None  # the plan a forked worker inherited from the training process


def _worker_init() -> None:
    torch.set_num_threads(1)  # each worker one core; the training process keeps its own threads
    # A forked worker inherits the training process's signal handlers: the CLI's SIGTERM handler
    # raises, so the SIGTERM with which the pool ends its workers printed a worker's traceback when
    # it came during a draw. The training process ends the pool: SIGTERM ends a worker at once, and
    # Ctrl-C (sent to the whole process group) is the training process's to handle.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_draw(step: int, kind: str, mask_ratio: float):
    return draw_batch(_PLAN, step, kind, mask_ratio)


class BatchSource:
    """Batches in step order, from ``workers`` forked processes drawing up to ``2 * workers`` ahead.

    ``workers = 0`` draws each batch in the calling process when it is asked for. Workers are
    forked (they share the prepared cases without copying them; POSIX only) and never touch CUDA.
    Asking for a step other than the next one expected (a new stage, a resumed run) drops what was
    drawn ahead and starts again from that step. Use as a context manager, or call ``close``.
    """

    def __init__(self, plan: BatchPlan, workers: int = 0):
        self.plan = plan
        self.workers = workers
        self.ahead = 2 * workers
        self.pending: deque = deque()  # (step, kind, mask_ratio, AsyncResult)
        self.pool = None
        if workers > 0:
            global _PLAN
            _PLAN = plan
            self.pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init)

    def get(self, step: int, kind: str, mask_ratio: float, last_step: int):
        """The batch of ``step``; steps up to ``last_step`` (exclusive) of the same stage are drawn ahead."""
        if self.pool is None:
            return draw_batch(self.plan, step, kind, mask_ratio)
        if self.pending and self.pending[0][:3] != (step, kind, mask_ratio):
            self.pending.clear()  # results of dropped requests are left to the pool
        next_step = self.pending[-1][0] + 1 if self.pending else step
        while len(self.pending) < self.ahead and next_step < last_step:
            result = self.pool.apply_async(_worker_draw, (next_step, kind, mask_ratio))
            self.pending.append((next_step, kind, mask_ratio, result))
            next_step += 1
        if not self.pending:  # step at or past last_step: draw it here
            return draw_batch(self.plan, step, kind, mask_ratio)
        return self.pending.popleft()[3].get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
        self.pending.clear()

    def __enter__(self) -> BatchSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
