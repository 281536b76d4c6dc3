"""Data augmentation of model-grid slices, on the whole batch at once.

Geometric: rotation (+-15 degrees), scaling (+-15 %, the config's ``augment_scale``) and a small
shift, applied with MONAI's batched ``AffineTransform`` (bilinear for images, nearest for labels,
border padding), then, with probability ``p_elastic`` (a config key, 0 by default as in nnU-Net's
default augmentation), an elastic deformation: a smooth random displacement field (Gaussian noise
on a coarse grid, interpolated bicubically, up to ``elastic_max_shift`` pixels). Intensity: scale,
shift and Gaussian noise. No left-right flip: it would swap the patient's sides, and left and right
organs (kidneys, adrenal glands) have their own labels. Batched rather than per sample (MONAI
dictionary transforms) because per-sample transforms cost as much as the training step
itself on a 2-core CPU; every random draw comes from one generator seeded per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.layers import AffineTransform


@dataclass(frozen=True)
class Augmentation:
    """Probabilities and ranges of each augmentation."""

    p_affine: float = 0.6
    max_rotation_deg: float = 15.0
    max_scale: float = 0.15
    max_shift: float = 0.05
    p_scale_intensity: float = 0.3
    max_scale_intensity: float = 0.1
    p_shift_intensity: float = 0.3
    max_shift_intensity: float = 0.1
    p_noise: float = 0.2
    noise_std: float = 0.05
    p_elastic: float = 0.0
    elastic_grid: int = 6
    elastic_max_shift: float = 4.0


def build_augmentation(p_elastic: float = 0.0, max_scale: float = 0.15) -> Augmentation:
    """The run's augmentation: ``p_elastic`` its elastic share, ``max_scale`` its largest relative zoom."""
    return Augmentation(p_elastic=p_elastic, max_scale=max_scale)


def augment_batch(
    aug: Augmentation, images: torch.Tensor, labels: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch reproducibly from ``seed``.

    Args:
        images: (B, C, S, S) float32 normalised slices (C > 1: adjacent slices, moved alike);
            labels: (B, S, S) int64.
    Returns:
        Tensors of the same shapes and types.
    """
    B = images.shape[0]
    g = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(B, generator=g)

    def chosen(p: float) -> torch.Tensor:
        return (torch.rand(B, generator=g) < p).float()

    on = chosen(aug.p_affine)
    angle = uniform(-1, 1) * math.radians(aug.max_rotation_deg) * on
    scale = 1 + uniform(-aug.max_scale, aug.max_scale) * on
    shift = torch.stack([uniform(-aug.max_shift, aug.max_shift), uniform(-aug.max_shift, aug.max_shift)], 1)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = scale * torch.cos(angle)
    theta[:, 0, 1] = -scale * torch.sin(angle)
    theta[:, 1, 0] = scale * torch.sin(angle)
    theta[:, 1, 1] = scale * torch.cos(angle)
    theta[:, :, 2] = shift * on[:, None]
    size = images.shape[-2:]
    warp_image = AffineTransform(size, normalized=True, mode="bilinear", padding_mode="border")
    warp_label = AffineTransform(size, normalized=True, mode="nearest", padding_mode="border")
    images = warp_image(images, theta)
    labels = warp_label(labels[:, None].float(), theta)[:, 0].round().long()
    factor = 1 + uniform(-aug.max_scale_intensity, aug.max_scale_intensity) * chosen(aug.p_scale_intensity)
    offset = uniform(-aug.max_shift_intensity, aug.max_shift_intensity) * chosen(aug.p_shift_intensity)
    images = images * factor[:, None, None, None] + offset[:, None, None, None]
    noise = torch.randn(images.shape, generator=g) * aug.noise_std
    images = images + noise * chosen(aug.p_noise)[:, None, None, None]
    if aug.p_elastic > 0:  # drawn last, so that runs without it keep their earlier random draws
        picked = chosen(aug.p_elastic).bool()
        if picked.any():
            images, labels = images.clone(), labels.clone()
            images[picked], labels[picked] = _elastic(aug, images[picked], labels[picked], g)
    return images, labels


def _elastic(
    aug: Augmentation, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp (N, C, S, S) images and (N, S, S) labels by one smooth random displacement field each.

    The field is standard normal noise on an ``elastic_grid`` x ``elastic_grid`` grid, scaled so
    that its largest value is ``elastic_max_shift`` pixels, and interpolated bicubically to S x S.
    """
    n, size = images.shape[0], images.shape[-1]
    coarse = torch.randn(n, 2, aug.elastic_grid, aug.elastic_grid, generator=g)
    coarse = coarse / coarse.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    field = F.interpolate(coarse, size=images.shape[-2:], mode="bicubic", align_corners=True)
    field = field * (aug.elastic_max_shift * 2 / size)  # pixels -> normalised [-1, 1] coordinates
    identity = torch.eye(2, 3).expand(n, 2, 3)
    grid = F.affine_grid(identity, list(images.shape), align_corners=False) + field.permute(0, 2, 3, 1)
    sample = {"padding_mode": "border", "align_corners": False}
    warped = F.grid_sample(images, grid, mode="bilinear", **sample)
    moved = F.grid_sample(labels[:, None].float(), grid, mode="nearest", **sample)
    return warped, moved[:, 0].round().long()
