"""Training pieces for MoME (issue #26): the partial-label loss and partially labelled phantom data.

Datasets label different organs. MoME's classes have independent logits (one sigmoid each, see
:mod:`m4oe.model.mome`), so a dataset's loss reads only the classes it labels: a pixel it calls
background may be an organ it does not label, and is then no evidence against that organ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from m4oe.errors import InputError, OutputError
from m4oe.phantom import PHANTOM_LABELS, write_dataset


def partial_label_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    values: list[int],
    labelled: torch.Tensor,
    bce: float = 1.0,
    dice: float = 1.0,
) -> torch.Tensor:
    """Per-class BCE + soft Dice over the classes each sample's dataset labels.

    Args:
        logits: (B, Q, S, S) class logits (MoME's ``class_logits`` for label values ``values``).
        labels: (B, S, S) int64 label values in the model's label space (0 background).
        values: the label value of each of the Q logit maps.
        labelled: (B, Q) bool, whether sample b's dataset labels class q; unlabelled pairs add
            nothing to the loss and get no gradient.
    Returns the mean over labelled (sample, class) pairs of the BCE, plus the mean over classes
    labelled anywhere in the batch of one soft Dice loss per class over the samples that label it
    (Dice over the batch: an organ absent from one slice does not make its Dice 1). 0 if nothing
    in the batch is labelled.
    """
    B, Q = logits.shape[:2]
    if labelled.shape != (B, Q) or len(values) != Q:
        raise ValueError(f"labelled must be (B, Q) = {(B, Q)} and values Q long; got {tuple(labelled.shape)}")
    target = (labels[:, None] == torch.tensor(values, device=labels.device)[None, :, None, None]).float()
    weight = labelled.float()[:, :, None, None]
    pairs = labelled.sum()
    if pairs == 0:
        return logits.sum() * 0.0
    pixels = logits.shape[-1] * logits.shape[-2]
    loss_bce = (F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none") * weight).sum()
    loss_bce = loss_bce / (pairs * pixels)
    p = torch.sigmoid(logits.float()) * weight
    t = target * weight
    intersection, total = (p * t).sum(dim=(0, 2, 3)), (p + t).sum(dim=(0, 2, 3))
    present = labelled.any(dim=0)
    soft_dice = 1 - (2 * intersection + 1e-5) / (total + 1e-5)
    return bce * loss_bce + dice * soft_dice[present].mean()


def write_partial_phantoms(
    out_dir: str | Path,
    modality: str,
    cases: int,
    seed: int,
    structures: list[str],
    *,
    max_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """A phantom data set (:func:`m4oe.phantom.write_dataset`) that labels only ``structures``.

    The other organs become background 0 in its label maps, the kept ones are renumbered 1..n in
    the order given, and ``dataset.json`` lists only them (with ``partial_labels`` naming what was
    dropped), so training reads it as a data set whose label set is ``structures``.
    """
    unknown = [s for s in structures if s not in PHANTOM_LABELS]
    if unknown or not structures or len(set(structures)) != len(structures):
        raise InputError(
            f"structures must be distinct phantom structures {list(PHANTOM_LABELS)}, got {structures}"
        )
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputError("already exists; pass overwrite=True to replace it", out)
    staging = out.with_name(out.name + ".partial-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    write_dataset(staging, modality, cases, seed, max_size=max_size, dataset_name=out.name.replace("-", "_"))
    lookup = np.zeros(max(PHANTOM_LABELS.values()) + 1, np.uint8)
    for new, key in enumerate(structures, start=1):
        lookup[PHANTOM_LABELS[key]] = new
    for path in sorted((staging / "labelsTr").glob("*.nii.gz")):
        image = sitk.ReadImage(str(path))
        relabelled = sitk.GetImageFromArray(lookup[sitk.GetArrayFromImage(image)])
        relabelled.CopyInformation(image)
        sitk.WriteImage(relabelled, str(path), useCompression=True)
    meta = json.loads((staging / "dataset.json").read_text())
    meta["labels"] = {"background": 0, **{key: i for i, key in enumerate(structures, start=1)}}
    meta["partial_labels"] = {"dropped": [k for k in PHANTOM_LABELS if k not in structures]}
    (staging / "dataset.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out
