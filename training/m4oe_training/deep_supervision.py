"""Deep supervision: segmentation losses at the decoder's lower resolutions as well (``deep_supervision``).

As nnU-Net trains its U-Nets (Isensee et al., Nature Methods 2021): besides the full-resolution
output, the decoder's coarser stages each predict the segmentation at their own resolution against
the label map resampled there (nearest neighbour), and the losses are summed with weights halving
per resolution, the coarsest given none, normalised to sum to 1. The gradient then reaches the
deeper decoder stages directly, not only through every stage above them.

For a Swin-UNet (M4oE, dense) those predictions come from training-only heads on the decoder stages
(:class:`AuxiliaryHeads`, kept in the training state, never exported: the exported network and its
inference do not change). A MoME network needs none: its class logits are already a sum over the
decoder scales (:meth:`m4oe.model.MoME.class_logits`), and the partial sum of the scales down to one
resolution, with the class bias, is its prediction there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def scale_weights(decoder_scales: int) -> list[float]:
    """Loss weights of the full-resolution output and the decoder stages, finest first.

    ``decoder_scales``: the decoder stages that report features (a Swin-UNet of n encoder stages has
    n - 1). Output: ``decoder_scales`` weights, [full, finest stage, ..., second coarsest]: the
    coarsest stage has weight 0 in nnU-Net's scheme, so it is left out. Halving per entry,
    normalised to sum to 1; for the 4-stage networks here [4/7, 2/7, 1/7].
    """
    raw = [0.5**i for i in range(max(decoder_scales, 1))]
    total = sum(raw)
    return [w / total for w in raw]


def labels_at(labels: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Label map (B, S, S) int64 resampled to (B, *size) by nearest neighbour (pixel centres)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].long()


class AuxiliaryHeads(nn.Module):
    """Training-only segmentation heads on a Swin-UNet's decoder stages, one set per task.

    ``forward(task, scales)``: scales as :meth:`m4oe.model.SwinUNet.forward_features` reports them,
    (B, H_l, W_l, C_l) deepest first; returns the logits (B, K, H_l, W_l) of the supervised stages,
    finest first (every stage but the coarsest), each a LayerNorm and a linear map of the pixel's
    features (a 1x1 convolution).
    """

    def __init__(self, stage_dims: list[int], tasks: tuple[tuple[str, int], ...]):
        """``stage_dims``: the decoder stages' feature widths, deepest first; ``tasks``: (name, K)."""
        super().__init__()
        supervised = list(reversed(stage_dims))[: len(stage_dims) - 1]  # finest first, no coarsest
        self.heads = nn.ModuleDict(
            {
                name: nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, k)) for dim in supervised)
                for name, k in tasks
            }
        )

    def forward(self, task: str, scales: list[torch.Tensor], rows: torch.Tensor | None = None):
        finest_first = list(reversed(scales))[: len(self.heads[task])]
        return [
            head(feats if rows is None else feats[rows]).permute(0, 3, 1, 2)
            for head, feats in zip(self.heads[task], finest_first, strict=True)
        ]


def stage_dims(model) -> list[int]:
    """The widths of a Swin-UNet's decoder stages, deepest first (as ``scales`` reports them)."""
    return [stage.blocks[0].dim for stage in model.layers_up]
