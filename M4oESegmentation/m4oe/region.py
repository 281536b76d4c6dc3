"""The part of a volume a segmentation covers: a region of interest and the automatic body crop.

Frames. A :class:`VoxelBox` holds voxel indices of the input image in SimpleITK's axis order
(i, j, k) = (x, y, z), half-open (``start <= index < stop``), as Python slices; numpy arrays of the
image are (k, j, i). A region given in millimetres is an axis-aligned box in the LPS physical frame
of SimpleITK and DICOM (Slicer's RAS coordinates negate the first two: the module converts); it
covers the voxels whose centres lie inside it (for an oblique image, the voxel box around those).
The predictor works on the axial stack (:mod:`m4oe.geometry`): :func:`stack_slices` and
:func:`box_from_stack_slices` convert a box between the image's voxel axes and the stack's
(slices, rows, columns), which may be permuted and flipped.

The body crop (:func:`body_box`) finds the patient: CT voxels above -500 HU, MR voxels above an
Otsu threshold of the intensities' square roots (:func:`mr_body_threshold`), opened in plane to
drop noise, the table and thin tubing, kept where they form a large connected piece, and boxed
with a margin. Air around the patient then costs nothing in the full-resolution steps of
inference (see :class:`m4oe.predictor.Predictor`), and a field of view too wide for the model
input is framed on the body (:func:`body_rows_columns`), at training and inference alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import AxialStack

BODY_CT_THRESHOLD_HU = -500.0
BODY_MARGIN_MM = 10.0
"""Margin around the body box, in mm, on every side (clamped to the image)."""
BODY_MASK_SIDE = 128
"""In-plane pixels per side of the subsampled mask the body is found on (plus the margin)."""
BODY_PIECE_FRACTION = 0.1
"""Connected pieces of at least this fraction of the largest one count as body (arms, a split torso)."""
TOLERANCE = 1e-3  # voxels: a box face within this of a voxel centre (mm rounded in text) includes it


@dataclass(frozen=True)
class VoxelBox:
    """Voxels ``start[n] <= index < stop[n]`` along image axis n, in (i, j, k) = (x, y, z) order."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @classmethod
    def full(cls, image: sitk.Image) -> VoxelBox:
        return cls((0, 0, 0), tuple(int(s) for s in image.GetSize()))

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(max(0, b - a) for a, b in zip(self.start, self.stop, strict=True))

    @property
    def empty(self) -> bool:
        return min(self.size) == 0

    def intersect(self, other: VoxelBox) -> VoxelBox:
        return VoxelBox(
            tuple(max(a, b) for a, b in zip(self.start, other.start, strict=True)),
            tuple(min(a, b) for a, b in zip(self.stop, other.stop, strict=True)),
        )

    def to_dict(self) -> dict:
        return {"start_ijk": list(self.start), "stop_ijk": list(self.stop)}


def parse_bounds(text: str, integer: bool) -> tuple:
    """``"a0,b0,c0,a1,b1,c1"`` as six numbers (ints when ``integer``); ValueError names the text."""
    parts = [p.strip() for p in str(text).split(",")]
    kind = "integers" if integer else "numbers"
    try:
        values = tuple(int(p) if integer else float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        names = "i0,j0,k0,i1,j1,k1" if integer else "x0,y0,z0,x1,y1,z1"
        raise ValueError(f"expected six comma-separated {kind} {names}, got {text!r}")
    return values


def box_from_ijk(bounds: Sequence[int], image: sitk.Image, where: str | Path | None = None) -> VoxelBox:
    """The voxels ``i0 <= i < i1``, ``j0 <= j < j1``, ``k0 <= k < k1`` of ``image``, clamped to it.

    ``bounds``: (i0, j0, k0, i1, j1, k1), voxel indices in SimpleITK / Slicer IJK order, start
    inclusive, stop exclusive. Raises InputError (naming ``where``) when nothing is left.
    """
    start, stop = _ordered(bounds)
    box = VoxelBox(tuple(int(v) for v in start), tuple(int(v) for v in stop)).intersect(VoxelBox.full(image))
    if box.empty:
        raise InputError(
            f"the region {list(bounds)} (voxels, start inclusive, stop exclusive) holds no voxel of this "
            f"{'x'.join(map(str, image.GetSize()))} image",
            where,
        )
    return box


def box_from_lps_mm(bounds: Sequence[float], image: sitk.Image, where: str | Path | None = None) -> VoxelBox:
    """The voxels of ``image`` whose centres lie in an axis-aligned box of the LPS frame.

    ``bounds``: (x0, y0, z0, x1, y1, z1) in mm, LPS (x towards the patient's left, y posterior, z
    superior), either corner first. For an image whose axes are oblique to LPS this is the voxel
    box around the region (its index bounding box). Clamped to the image; InputError when empty.
    """
    lo, hi = _ordered(bounds)
    corners = [(x, y, z) for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    index = np.array([image.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    start = np.ceil(index.min(axis=0) - TOLERANCE).astype(int)
    stop = np.floor(index.max(axis=0) + TOLERANCE).astype(int) + 1
    box = VoxelBox(tuple(start.tolist()), tuple(stop.tolist())).intersect(VoxelBox.full(image))
    if box.empty:
        raise InputError(f"the region {list(bounds)} (mm, LPS) holds no voxel centre of this image", where)
    return box


def _ordered(bounds: Sequence[float]) -> tuple[tuple, tuple]:
    if len(bounds) != 6:
        raise ValueError(f"a region needs six numbers (x0, y0, z0, x1, y1, z1), got {list(bounds)}")
    a, b = bounds[:3], bounds[3:]
    return tuple(map(min, a, b)), tuple(map(max, a, b))


def stack_slices(box: VoxelBox, stack: AxialStack) -> tuple[slice, slice, slice]:
    """The box as (slices, rows, columns) of ``stack.array`` (Z, Y, X)."""
    size = stack.reference.GetSize()
    out = []
    for n in (2, 1, 0):  # stack numpy axis 2 - n is stack axis n, image axis permute_order[n]
        axis = stack.permute_order[n]
        a, b = box.start[axis], box.stop[axis]
        if stack.flip_axes[n]:
            a, b = size[axis] - b, size[axis] - a
        out.append(slice(a, b))
    return tuple(out)


def body_rows_columns(stack: AxialStack, modality: str) -> tuple[slice, slice] | None:
    """The (rows, columns) of ``stack``'s slices around the body (:func:`body_box`), or None.

    The in-plane framing of training and inference alike (:func:`m4oe.inplane.make_grid`).
    """
    box = body_box(stack, modality)
    return None if box is None else stack_slices(box, stack)[1:]


def box_from_stack_slices(slices: Sequence[slice], stack: AxialStack) -> VoxelBox:
    """Inverse of :func:`stack_slices`: (slices, rows, columns) of the stack as an image box."""
    size = stack.reference.GetSize()
    start, stop = [0, 0, 0], [0, 0, 0]
    for n in range(3):
        axis = stack.permute_order[n]
        s = slices[2 - n]
        a, b = s.start, s.stop
        if stack.flip_axes[n]:
            a, b = size[axis] - b, size[axis] - a
        start[axis], stop[axis] = a, b
    return VoxelBox(tuple(start), tuple(stop))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape): the split that maximises the between-class variance."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * centres)
    total, total_mean = weight[-1], mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * weight - total * mean) ** 2 / (weight * (total - weight))
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def mr_body_threshold(values: np.ndarray) -> float:
    """The MR body threshold of ``values`` (any shape, the scanner's units): Otsu's threshold of
    their square roots (above the minimum), squared back.

    On the intensities themselves Otsu can split bright fluid from everything else: on a
    fat-suppressed T2 (CHAOS T2-SPIR) the gallbladder, stomach fluid and spleen are several times
    brighter than the liver and muscle, and the "body" then was a few fluid-filled organs (a box
    holding 2 % of one patient's liver, kidneys and spleen). The square root, which makes the
    spread of noisy magnitude signals about equal across intensities, pulls the split down between
    the background and the soft tissue; on the other MR scans checked (CHAOS, the shared MRI, the
    phantoms) every labelled organ stays inside the box.
    """
    values = np.asarray(values, dtype=np.float64)
    low = float(values.min()) if values.size else 0.0
    return otsu_threshold(np.sqrt(values - low)) ** 2 + low


def body_box(stack: AxialStack, modality: str, margin_mm: float = BODY_MARGIN_MM) -> VoxelBox | None:
    """The box of the patient's body in ``stack``'s image, with ``margin_mm`` on every side.

    ``modality``: "ct" (values in HU: body = above -500 HU) or "mr" (body = above
    :func:`mr_body_threshold` of the volume). The mask is found on slices subsampled to about
    :data:`BODY_MASK_SIDE` pixels per side, opened in plane (3x3 pixels) and labelled in 3D; pieces
    of at least :data:`BODY_PIECE_FRACTION` of the largest count. Returns None when nothing is found
    (the caller keeps the whole image).
    """
    from scipy import ndimage  # as in the clean-up: only when used

    values = stack.array
    Z, Y, X = values.shape
    step = max(1, math.ceil(max(Y, X) / BODY_MASK_SIDE))
    sub = values[:, ::step, ::step]
    threshold = BODY_CT_THRESHOLD_HU if modality == "ct" else mr_body_threshold(sub)
    mask = sub > threshold
    mask = ndimage.binary_opening(mask, structure=np.ones((1, 3, 3), bool))
    pieces, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)
    sizes[0] = 0
    body = sizes >= BODY_PIECE_FRACTION * sizes.max()
    found = np.nonzero(body[pieces])
    sz, sy, sx = stack.spacing
    bounds = []
    for where, factor, spacing, n in zip(found, (1, step, step), (sz, sy, sx), (Z, Y, X), strict=True):
        margin = math.ceil(margin_mm / spacing)
        lo = int(where.min()) * factor - margin
        hi = (int(where.max()) + 1) * factor + margin
        bounds.append(slice(max(0, lo), min(n, hi)))
    return box_from_stack_slices(bounds, stack)
