"""From an axial stack to model input: the one preprocessing path of training and inference.

:class:`SlicePlan` fixes, once per volume, the intensity normalisation (CT: the model's dataset
statistics; MR: this volume's robust statistics) and the in-plane mapping onto the model grid.
Its :meth:`SlicePlan.model_input` then turns any batch of the volume's slices into model input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .geometry import AxialStack
from .inplane import InPlaneGrid, make_grid, to_model_grid
from .preprocessing import IntensityParams, VolumeStatistics, mr_volume_statistics, normalize_slices


@dataclass(frozen=True)
class SlicePlan:
    """How the slices of one volume become model input (B, 1, S, S)."""

    modality: str
    params: IntensityParams
    volume_stats: VolumeStatistics | None
    grid: InPlaneGrid
    pad_value: float

    @classmethod
    def for_stack(
        cls,
        stack: AxialStack,
        modality: str,
        params: IntensityParams,
        size: int,
        in_plane: str = "resize",
        target_spacing_mm: tuple[float, float] | None = None,
        body: tuple[slice, slice] | None = None,
    ) -> SlicePlan:
        """Plan a volume.

        Args:
            stack: the volume as axial slices (Z, Y, X), spacing (sz, sy, sx) mm.
            modality: "ct" or "mr".
            params: the intensity parameters of that modality (from the model card).
            size: S, the model's input side in pixels.
            in_plane, target_spacing_mm: the model card's in-plane resampling.
            body: (rows, columns) of the stack's slices around the patient's body
                (:func:`m4oe.region.body_rows_columns`), framed instead of the whole slice when that does not
                fit the model input at the target spacing (:func:`m4oe.inplane.make_grid`).
        """
        values = stack.array
        stats = mr_volume_statistics(values, params) if modality == "mr" else None
        # Outside the field of view is the volume's lowest value (air), normalised.
        pad = float(normalize_slices(np.float32(values.min()), modality, params, stats))
        grid = make_grid(values.shape[1:], stack.spacing[1:], size, in_plane, target_spacing_mm, body)
        return cls(modality, params, stats, grid, pad)

    def model_input(
        self, slices: np.ndarray | torch.Tensor, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Normalise and resample slices (B, Y, X) of the planned volume to (B, 1, S, S) float32.

        ``slices``: any real dtype (an axial stack keeps the file's pixel type), any strides. A numpy
        array is copied to float32 here, so a caller that passes one batch at a time never holds a
        float copy of the whole volume.
        """
        if isinstance(slices, np.ndarray):
            slices = np.array(slices, dtype=np.float32)  # also frees it from a read-only stack view
        t = torch.as_tensor(slices)
        if torch.device(device).type == "cuda" and t.device.type == "cpu":
            # From page-locked memory the copy is queued behind the running batch, not waited for.
            t = t.pin_memory().to(device, non_blocking=True)
        t = t.to(device)[:, None]
        return to_model_grid(
            normalize_slices(t, self.modality, self.params, self.volume_stats), self.grid, self.pad_value
        )

    def neighbour_input(
        self,
        values: np.ndarray | torch.Tensor,
        start: int,
        stop: int,
        neighbour_slices: int,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Input (B, 2k + 1, S, S) for slices start..stop-1 of the whole volume ``values`` (Z, Y, X)
        to a model with ``neighbour_slices`` k: channel j of slice z is slice z - k + j, clamped to
        0..Z-1 (the end slices repeated), each normalised and resampled as :meth:`model_input`
        does (B = stop - start)."""
        k, depth = neighbour_slices, values.shape[0]
        low, high = max(start - k, 0), min(stop + k, depth)
        slices = self.model_input(values[low:high], device)[:, 0]  # each needed slice once
        index = neighbour_index(start, stop, k, depth) - low
        return slices[torch.from_numpy(index).to(slices.device)]


def neighbour_index(start: int, stop: int, k: int, depth: int) -> np.ndarray:
    """(stop - start, 2k + 1) int64: the slices z - k..z + k of each z in start..stop-1, clamped to
    0..depth-1 (the ends of a volume of ``depth`` slices repeated)."""
    offsets = np.arange(-k, k + 1)
    return np.clip(np.arange(start, stop)[:, None] + offsets[None], 0, depth - 1).astype(np.int64)
