"""In-plane resampling between an axial slice and the model's square input grid.

One :class:`InPlaneGrid` per volume says how a (Y, X) slice maps onto the model's (S, S) input:
a window of the slice (the whole slice, or the box around the body when the whole slice would not
fit at the model's spacing) scaled to (ry, rx) pixels, then placed at offset (oy, ox) in an S x S
canvas padded with the normalised air value. Training and inference both use these functions, so
a model never sees slices resampled differently. Pixel centres follow ``align_corners=False``:
model pixel u looks at window coordinate ``(u - o + 0.5) * (n / r) - 0.5`` along an axis with n
window pixels; the slice coordinate is that plus the window's start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IN_PLANE_MODES = ("resize", "spacing")


@dataclass(frozen=True)
class InPlaneGrid:
    """Mapping of a window of a slice, (Y, X) pixels with spacing (sy, sx) mm, onto an S x S model input.

    ``slice_shape`` is the window's shape and ``window_start`` its first (row, column) in the slice:
    (0, 0) and the whole slice unless :func:`make_grid` framed the body. Slice pixel indices given
    to or returned by the functions below are indices of the whole slice.
    """

    slice_shape: tuple[int, int]
    slice_spacing: tuple[float, float]
    size: int
    scaled_shape: tuple[int, int]
    offset: tuple[int, int]
    window_start: tuple[int, int] = (0, 0)

    @property
    def window(self) -> tuple[slice, slice]:
        """The (rows, columns) of the slice that the grid covers."""
        (y0, x0), (ny, nx) = self.window_start, self.slice_shape
        return slice(y0, y0 + ny), slice(x0, x0 + nx)

    @property
    def model_spacing(self) -> tuple[float, float]:
        """Spacing (mm) of a model-grid pixel along rows and columns."""
        (ny, nx), (ry, rx), (sy, sx) = self.slice_shape, self.scaled_shape, self.slice_spacing
        return sy * ny / ry, sx * nx / rx

    def token_index_origin(self, factor: int) -> tuple[float, float]:
        """Continuous slice index (row, col) of the centre of token (0, 0) on a grid of size // factor."""
        (ny, nx), (ry, rx), (oy, ox) = self.slice_shape, self.scaled_shape, self.offset
        y0, x0 = self.window_start
        return y0 + (0.5 * factor - oy) * ny / ry - 0.5, x0 + (0.5 * factor - ox) * nx / rx - 0.5


def make_grid(
    slice_shape: tuple[int, int],
    slice_spacing: tuple[float, float],
    size: int,
    mode: str = "resize",
    target_spacing: tuple[float, float] | None = None,
    body: tuple[slice, slice] | None = None,
) -> InPlaneGrid:
    """Plan the in-plane resampling of one volume's slices.

    Args:
        slice_shape: (Y, X) pixels of an axial slice (rows anterior->posterior, columns right->left).
        slice_spacing: (sy, sx) in mm.
        size: S, the model's input side in pixels.
        mode: "resize" stretches the whole slice to S x S (the published M4oE preprocessing);
            "spacing" resamples to ``target_spacing`` (sy, sx) mm keeping the aspect ratio. If the
            slice's field of view is then larger than S pixels and ``body`` is given, the grid covers
            only the body's rows and columns, centred on the canvas (air and the scanner table are
            cut, not the anatomy); if that is still larger than S pixels, it is scaled down to fit.
            The rest of the canvas is padding.
        body: (rows, columns) of the slice around the patient's body (e.g. from
            :func:`m4oe.region.body_box`), or None; used in "spacing" mode only, and only when the
            whole slice does not fit.
    """
    ny, nx = (int(v) for v in slice_shape)
    if mode == "resize":
        return InPlaneGrid((ny, nx), tuple(slice_spacing), size, (size, size), (0, 0))
    if mode != "spacing":
        raise ValueError(f"in-plane mode must be one of {IN_PLANE_MODES}, got {mode!r}")
    if target_spacing is None or min(target_spacing) <= 0:
        raise ValueError(f"in-plane mode 'spacing' needs a positive target spacing, got {target_spacing!r}")
    start = (0, 0)
    fits = max(ny * slice_spacing[0] / target_spacing[0], nx * slice_spacing[1] / target_spacing[1]) <= size
    if body is not None and not fits:
        rows, cols = (slice(max(0, w.start), min(n, w.stop)) for w, n in zip(body, (ny, nx), strict=True))
        if rows.stop > rows.start and cols.stop > cols.start:
            start, (ny, nx) = (rows.start, cols.start), (rows.stop - rows.start, cols.stop - cols.start)
    ry = ny * slice_spacing[0] / target_spacing[0]
    rx = nx * slice_spacing[1] / target_spacing[1]
    shrink = min(1.0, size / max(ry, rx))
    ry, rx = max(1, min(size, round(ry * shrink))), max(1, min(size, round(rx * shrink)))
    offset = ((size - ry) // 2, (size - rx) // 2)
    return InPlaneGrid((ny, nx), tuple(slice_spacing), size, (ry, rx), offset, start)


def to_model_grid(slices: torch.Tensor, grid: InPlaneGrid, pad_value: float) -> torch.Tensor:
    """Resample normalised slices (B, C, Y, X) to the model input (B, C, S, S), bilinear, antialiased.

    Only the grid's window of the slices is used (the whole slice unless the grid framed the body).
    """
    rows, cols = grid.window
    slices = slices[..., rows, cols]
    ry, rx = grid.scaled_shape
    out = F.interpolate(slices, size=(ry, rx), mode="bilinear", align_corners=False, antialias=True)
    if (ry, rx) == (grid.size, grid.size):
        return out
    oy, ox = grid.offset
    canvas = slices.new_full((*slices.shape[:2], grid.size, grid.size), pad_value)
    canvas[..., oy : oy + ry, ox : ox + rx] = out
    return canvas


def from_model_grid(
    maps: torch.Tensor, grid: InPlaneGrid, rows: slice | None = None, cols: slice | None = None
) -> torch.Tensor:
    """Resample model-grid maps (B, K, S, S) (logits or probabilities) back to slices (B, K, Y, X).

    Y, X: the grid's window (the whole slice unless the grid framed the body). ``rows``, ``cols``:
    only these pixels of it (slice pixel indices, step 1, inside the window), as
    (B, K, len(rows), len(cols)): the same values as the window of the whole resampling
    (bilinear, ``align_corners=False``), at the cost of the window only.
    """
    (ry, rx), (oy, ox) = grid.scaled_shape, grid.offset
    maps = maps[..., oy : oy + ry, ox : ox + rx]
    ny, nx = grid.slice_shape
    rows, cols = (
        _in_window(w, start, n) for w, start, n in zip((rows, cols), grid.window_start, (ny, nx), strict=True)
    )
    if (rows is None or (rows.start, rows.stop) == (0, ny)) and (
        cols is None or (cols.start, cols.stop) == (0, nx)
    ):
        return F.interpolate(maps, size=grid.slice_shape, mode="bilinear", align_corners=False)
    # One bilinear lookup per window pixel at the source coordinate the whole-slice resampling
    # uses (clamped as it clamps), in grid_sample's normalised coordinates: 3x faster than
    # resampling the whole slice, and the same values up to float rounding (1e-5 of the logits).
    gy = _source_coordinates(rows or slice(0, ny), ny, ry, maps)
    gx = _source_coordinates(cols or slice(0, nx), nx, rx, maps)
    coords = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)
    return F.grid_sample(
        maps,
        coords.expand(maps.shape[0], -1, -1, -1),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )


def _in_window(pixels: slice | None, start: int, n: int) -> slice | None:
    """Slice pixels ``pixels`` as indices of a window of n pixels that starts at ``start``."""
    if pixels is None:
        return None
    if pixels.start < start or pixels.stop > start + n:
        raise ValueError(
            f"pixels {pixels.start}..{pixels.stop} lie outside the grid's window {start}..{start + n}"
        )
    return slice(pixels.start - start, pixels.stop - start)


def _source_coordinates(window: slice, n: int, r: int, like: torch.Tensor) -> torch.Tensor:
    """For slice pixels ``window`` of an axis of n pixels resampled from r model pixels: the model-grid
    coordinate PyTorch's bilinear ``align_corners=False`` reads (clamped to the first and last pixel),
    as grid_sample's normalised coordinate in [-1, 1]."""
    dst = torch.arange(window.start, window.stop, dtype=torch.float32, device=like.device)
    src = ((dst + 0.5) * (r / n) - 0.5).clamp(0, r - 1)
    return ((2 * src + 1) / r - 1).to(like.dtype)


def model_window(grid: InPlaneGrid, rows: slice, cols: slice) -> tuple[slice, slice]:
    """The model-grid pixels (rows, columns of the S x S input) whose area overlaps slice pixels
    ``rows``, ``cols`` (slice pixel indices; the parts outside the grid's window overlap none)."""
    out = []
    sizes = zip(
        (rows, cols), grid.window_start, grid.slice_shape, grid.scaled_shape, grid.offset, strict=True
    )
    for window, start, n, r, o in sizes:
        lo = o + math.floor(max(window.start - start, 0) * r / n)
        hi = o + math.ceil(min(window.stop - start, n) * r / n)
        out.append(slice(max(lo, 0), min(hi, grid.size)))
    return tuple(out)


def labels_to_model_grid(labels: np.ndarray, grid: InPlaneGrid) -> torch.Tensor:
    """Resample integer label slices (B, Y, X) to the model grid (B, S, S), nearest neighbour, pad 0.

    Only the grid's window of the slices is used (the whole slice unless the grid framed the body).
    """
    rows, cols = grid.window
    t = torch.as_tensor(np.ascontiguousarray(labels[..., rows, cols])).float()[:, None]
    (ry, rx), (oy, ox) = grid.scaled_shape, grid.offset
    out = F.interpolate(t, size=(ry, rx), mode="nearest-exact")
    canvas = torch.zeros((t.shape[0], 1, grid.size, grid.size))
    canvas[..., oy : oy + ry, ox : ox + rx] = out
    return canvas[:, 0].round().long()
