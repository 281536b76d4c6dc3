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
