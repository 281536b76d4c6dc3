"""Test-time augmentation: the model's forward passes on shifted and zoomed slices, averaged.

Slices are model-input batches, tensors (B, C, S, S) on the network's device: B slices, C input
channels, S x S the model grid (rows, columns in pixels). Shifts are whole pixels, zooms about
the slice centre; each pass's class probabilities are mapped back to the unshifted, unzoomed grid
before they are averaged. Used by :class:`m4oe.predictor.Predictor`.
"""

from __future__ import annotations

import torch

from .model_card import MAX_TEST_TIME_PASSES

# Test-time augmentation: the forward passes a slice batch may get, in order, as (row offset,
# column offset, zoom): offsets in half patches, zoom about the slice centre (> 1 enlarges). Pass 1
# sees the slices as they are; 2 and 3 shifted diagonally by half a patch, which moves every token
# boundary and window edge of the Swin blocks; 4 and 5 zoomed out and in by 10 %, within the
# training augmentation's scale range. Each pass's probabilities are mapped back and averaged. (On
# phantoms, see benchmarks/README.md: 3 passes beat 1, and 5 beat 3.)
TEST_TIME_PASSES = ((0, 0, 1.0), (1, 1, 1.0), (-1, -1, 1.0), (0, 0, 0.9), (0, 0, 1.1))
assert len(TEST_TIME_PASSES) == MAX_TEST_TIME_PASSES


def shift_slices(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` (B, C, H, W) moved ``dy`` rows down and ``dx`` columns right, edge pixels repeated.

    ``out[..., i, j] = x[..., clip(i - dy), clip(j - dx)]``; shifting the result by (-dy, -dx)
    gives ``x`` back but for the ``|dy|``, ``|dx|`` edge rows and columns.
    """
    if dy == 0 and dx == 0:
        return x
    p = max(abs(dy), abs(dx))
    padded = torch.nn.functional.pad(x, (p, p, p, p), mode="replicate")
    H, W = x.shape[-2:]
    return padded[..., p - dy : p - dy + H, p - dx : p - dx + W]


def zoom_slices(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` (B, C, H, W) enlarged ``factor`` times about the slice centre (bilinear, edges repeated).

    Shape is kept: ``factor`` > 1 crops the border away, < 1 brings more of the border in (its
    outside filled with the edge values). Zooming by ``1 / factor`` maps the result back.
    """
    if factor == 1.0:
        return x
    theta = torch.tensor([[1 / factor, 0.0, 0.0], [0.0, 1 / factor, 0.0]], dtype=x.dtype, device=x.device)
    grid = torch.nn.functional.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def averaged_probabilities(network, x: torch.Tensor, passes: int, step: int, first=None) -> torch.Tensor:
    """Mean class probabilities (B, K, S, S) of the first ``passes`` of :data:`TEST_TIME_PASSES`.

    ``network(x)`` maps the model input (B, C, S, S) to ``(logits, gates)``; ``step`` is half a
    patch in model-grid pixels; ``first``: the logits of the unshifted pass if already computed.
    Each pass transforms the input, runs the network and maps its softmax back before averaging.
    """
    total = None
    for k, (dy, dx, zoom) in enumerate(TEST_TIME_PASSES[:passes]):
        if k == 0 and first is not None:
            logits = first
        else:
            logits, _ = network(zoom_slices(shift_slices(x, dy * step, dx * step), zoom))
        p = shift_slices(zoom_slices(logits.float().softmax(dim=1), 1 / zoom), -dy * step, -dx * step)
        total = p if total is None else total + p
    return total / passes
