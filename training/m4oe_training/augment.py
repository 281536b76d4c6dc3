"""Data augmentation of model-grid slices (MONAI dictionary transforms).

Geometric: rotation (+-15 degrees), isotropic-ish scaling (+-15 %), elastic deformation; intensity:
scale, shift, gamma, Gaussian noise. No left-right flip: it would swap the patient's sides, and
left and right organs (kidneys, adrenal glands) have their own labels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import (
    Compose,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)


def build_augmentation() -> Compose:
    """Transforms of {"image": (1, S, S) float, "label": (1, S, S) float} samples."""
    keys = ("image", "label")
    modes = ("bilinear", "nearest")
    return Compose(
        [
            RandAffined(
                keys,
                prob=0.5,
                rotate_range=(math.pi / 12,),
                scale_range=(0.15, 0.15),
                mode=modes,
                padding_mode="border",
            ),
            Rand2DElasticd(
                keys,
                prob=0.2,
                spacing=(32, 32),
                magnitude_range=(1.0, 3.0),
                mode=modes,
                padding_mode="border",
            ),
            RandScaleIntensityd("image", factors=0.1, prob=0.3),
            RandShiftIntensityd("image", offsets=0.1, prob=0.3),
            RandAdjustContrastd("image", prob=0.15, gamma=(0.8, 1.25)),
            RandGaussianNoised("image", prob=0.2, std=0.05),
        ]
    )


def augment_batch(
    transform: Compose, images: torch.Tensor, labels: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch sample by sample, reproducibly from ``seed``.

    Args:
        images: (B, 1, S, S) float32; labels: (B, S, S) int64. Returns tensors of the same shapes.
    """
    out_images, out_labels = [], []
    seeds = np.random.SeedSequence(seed).generate_state(images.shape[0])
    for i in range(images.shape[0]):
        transform.set_random_state(seed=int(seeds[i]))
        sample = transform({"image": images[i], "label": labels[i][None].float()})
        out_images.append(torch.as_tensor(sample["image"]).float())
        out_labels.append(torch.as_tensor(sample["label"])[0].round().long())
    return torch.stack(out_images), torch.stack(out_labels)
