"""Through-plane smoothing of per-slice class probabilities, computed while slices stream in.

A 2D model segments each axial slice on its own, so its probabilities can jump from one slice to
the next where the anatomy does not (a vessel missed on one slice, a fleck of pancreas on
another). A Gaussian average along the stack axis, with its width in millimetres, makes neighbouring
slices agree before the argmax. On the validation phantoms of the embedded model trained by
``phantom_refine.toml``, a 3 mm sigma raised the mean Dice from 0.754 to 0.776 (CT), 0.803 to 0.805
(T1) and 0.761 to 0.765 (T2).

:class:`SliceSmoother` gives exactly what ``scipy.ndimage.gaussian_filter1d(maps, sigma, axis=0,
mode="nearest", truncate=4.0)`` gives on the whole (Z, ...) stack, but holds only the
``2 * radius + batch`` slices it still needs, so memory does not grow with the slice count.
"""

from __future__ import annotations

import math

import numpy as np
import torch

TRUNCATE = 4.0
"""The kernel reaches this many sigmas either side, as scipy's default."""


def gaussian_weights(sigma: float) -> np.ndarray:
    """Normalised Gaussian weights over offsets -radius..radius, sigma in slices (> 0)."""
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a positive number of slices, got {sigma!r}")
    radius = int(TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


class SliceSmoother:
    """Gaussian average along the slice axis of maps that arrive in slice order, batch by batch.

    Args:
        sigma: the Gaussian's standard deviation in slices (the caller divides millimetres by the
            slice spacing).
        num_slices: Z, the stack's slice count. Slices beyond either end repeat the end slice.

    :meth:`push` takes the next batch of maps (B, ...) (any trailing shape, same for every batch)
    and returns ``(start, smoothed)``: the smoothed maps of the slices ``start ..
    start + len(smoothed) - 1`` that are now complete (possibly none). After the last slice has been
    pushed every slice has been returned.
    """

    def __init__(self, sigma: float, num_slices: int):
        if num_slices < 1:
            raise ValueError(f"num_slices must be at least 1, got {num_slices}")
        weights = gaussian_weights(sigma)
        self.radius = len(weights) // 2
        self.weights = weights
        self.num_slices = num_slices
        self._buffer: torch.Tensor | None = None  # the slices from _first on that have arrived
        self._first = 0
        self._emitted = 0

    def push(self, maps: torch.Tensor) -> tuple[int, torch.Tensor]:
        held = 0 if self._buffer is None else self._buffer.shape[0]
        received = self._first + held + maps.shape[0]
        if received > self.num_slices:
            raise ValueError(f"more than the {self.num_slices} slices announced were pushed")
        self._buffer = maps if self._buffer is None else torch.cat([self._buffer, maps])
        last = self.num_slices if received == self.num_slices else received - self.radius
        start = self._emitted
        if last <= start:
            return start, maps[:0]
        # The inputs of slices start..last-1: start-radius .. last-1+radius, the stack's end slices
        # repeated beyond its ends; then each output is a weighted sum of contiguous views.
        lo, hi = start - self.radius, last + self.radius
        a, b = max(lo, 0), min(hi, self.num_slices)
        padded = self._buffer[a - self._first : b - self._first]
        if a > lo or hi > b:
            padded = torch.cat(
                [
                    padded[:1].expand(a - lo, *padded.shape[1:]),
                    padded,
                    padded[-1:].expand(hi - b, *padded.shape[1:]),
                ]
            )
        n = last - start
        out = padded[:n] * float(self.weights[0])
        for j in range(1, len(self.weights)):
            out.add_(padded[j : j + n], alpha=float(self.weights[j]))
        self._emitted = last
        keep = max(0, last - self.radius - self._first)  # slices no later output needs
        self._buffer = self._buffer[keep:]
        self._first += keep
        return start, out
