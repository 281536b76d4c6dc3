"""The loss of one training step of an M4oE or dense Swin-UNet model, for every kind of stage.

:class:`StageLoss` wraps the network so that DDP sees every parameter that takes part: masked-image
reconstruction ("mim"), segmentation with forced experts ("experts") or the gate on ("joint", with
the optional load-balancing and routing losses), and the slice context's read-out ("context").
MoME models have their own, :class:`.mome.MoMELoss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from m4oe.model import SwinUNet, load_balancing_loss

from .deep_supervision import AuxiliaryHeads, labels_at, scale_weights, stage_dims


class StageLoss(nn.Module):
    """The network plus what training needs around it; ``forward`` returns one stage's loss.

    Holding the loss computation inside the module lets DDP see every parameter that takes part.
    """

    def __init__(
        self,
        model: SwinUNet,
        dataset_expert: list[int],
        dataset_task: list[str],
        ce: float,
        dice: float,
        dataset_classes: list[tuple[int, ...] | None] | None = None,
        deep_supervision: bool = False,
    ):
        """``dataset_classes``: per dataset, the class values it labels when fewer than its task's
        (:func:`.export.labelled_classes`), else None. Such a dataset's loss is the marginal loss
        (Shi et al., "Marginal loss and exclusion loss for partially supervised multi-organ
        segmentation", MedIA 2021): the probabilities of the classes it does not label are summed
        into the background, so an unlabelled liver on its slices is not taught as background.
        ``deep_supervision``: segmentation losses at the decoder's lower resolutions too, through
        training-only heads (:mod:`.deep_supervision`)."""
        super().__init__()
        self.model = model
        self.reconstruct = nn.Conv2d(model.cfg.embed_dim, model.cfg.input_channels, 1)
        # With a slice context, a linear read-out (training only) asks the context itself which
        # expert the slice belongs to: the whole loss of a "context" stage, and a second part of the
        # routing loss in joint stages. Through the gates alone the signal reaches the context only
        # via projections that start at zero; for the embedded model it never left chance that way.
        self.context_probe = (
            nn.Linear(model.cfg.embed_dim, model.cfg.num_experts) if model.slice_context is not None else None
        )
        self.register_buffer("dataset_expert", torch.tensor(dataset_expert), persistent=False)
        self.dataset_task = dataset_task
        self.dataset_classes = dataset_classes or [None] * len(dataset_task)
        self.aux_heads = None
        self.weights = [1.0]  # of the full-resolution loss, then the supervised decoder stages
        if deep_supervision:
            self.aux_heads = AuxiliaryHeads(stage_dims(model), model.cfg.tasks)
            self.weights = scale_weights(len(model.layers_up))
        # Dice over the whole batch (per task): an organ absent from one slice does not give that
        # slice a Dice loss of 1 for any stray probability, which stalls training from scratch.
        self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=ce, lambda_dice=dice, batch=True)

    def forward(
        self, kind: str, images, labels, datasets, mask=None, load_balance: float = 0.0, routing: float = 0.0
    ):
        """Loss of a batch.

        Args:
            kind: "mim", "experts", "joint" or "context".
            images: (B, C, S, S) normalised slices; labels: (B, S, S) int64; datasets: (B,) indices.
            mask: (B, 1, S, S) 1 where pixels are hidden ("mim" only).
        Returns (loss, {name: float}).
        """
        if kind == "context":
            if self.context_probe is None:
                raise ValueError("a context stage needs a model with a slice context (gate_context)")
            context = self.model.slice_context(images)
            probe = F.cross_entropy(self.context_probe(context).float(), self.dataset_expert[datasets])
            return probe, {"context": float(probe.detach())}
        force = self.dataset_expert[datasets] if (kind != "joint" and self.model.cfg.is_moe) else None
        if kind == "mim":
            features, _ = self.model.forward_features(images * (1 - mask), force)
            error = (self.reconstruct(features) - images) ** 2 * mask
            loss = error.sum() / mask.sum().clamp_min(1) / images.shape[1]
            return loss, {"mim": float(loss.detach())}
        scales = [] if self.aux_heads is not None else None
        features, gates = self.model.forward_features(images, force, scales)
        loss = features.new_zeros(())
        groups = list(zip(self.dataset_task, self.dataset_classes, strict=True))
        batch = [groups[d] for d in datasets.tolist()]
        for task, classes in dict.fromkeys(groups):  # in dataset order, as the sum always was
            rows = torch.tensor([g == (task, classes) for g in batch], device=images.device)
            if not rows.any():
                continue
            outputs = [self.model.heads[task](features[rows])]
            if self.aux_heads is not None:
                outputs += self.aux_heads(task, scales, rows)
            for weight, logits in zip(self.weights, outputs, strict=True):
                logits, target = logits.float(), labels_at(labels[rows], logits.shape[-2:])
                if classes is not None:
                    logits, target = marginal(logits, target, classes)
                loss = loss + weight * self.seg_loss(logits, target[:, None]) * rows.float().mean()
        stats = {"seg": float(loss.detach())}
        if kind == "joint" and gates and load_balance > 0:
            balance = load_balancing_loss(gates)
            loss = loss + load_balance * balance
            stats["balance"] = float(balance.detach())
        if kind == "joint" and gates and routing > 0:
            expert = self.dataset_expert[datasets]
            # Per token: -log of the probability the gate gives the sample's own modality expert.
            nll = [
                -(
                    g.gather(1, expert[:, None, None, None].expand(-1, 1, *g.shape[2:])).clamp_min(1e-6).log()
                ).mean()
                for g in gates.values()
            ]
            routing_loss = torch.stack(nll).mean()
            loss = loss + routing * routing_loss
            stats["routing"] = float(routing_loss.detach())
            if self.context_probe is not None:
                probe = F.cross_entropy(self.context_probe(self.model.slice_context(images)).float(), expert)
                loss = loss + routing * probe
                stats["context"] = float(probe.detach())
        return loss, stats


def marginal(logits: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...]):
    """Logits and labels of a dataset that labels only ``classes`` of its task's K classes.

    Args:
        logits: (B, K, H, W) the task head's logits; labels: (B, H, W) int64, values in
            ``classes`` or 0.
        classes: the class values the dataset labels (ascending, > 0).
    Returns:
        (B, 1 + len(classes), H, W) logits whose softmax is the head's, with the probabilities of
        the unlabelled classes summed into the background (a log-sum-exp of their logits), and
        the labels renumbered 0, 1 .. len(classes) in the same order.
    """
    others = [0] + [k for k in range(1, logits.shape[1]) if k not in classes]
    background = torch.logsumexp(logits[:, others], dim=1, keepdim=True)
    merged = torch.cat([background, logits[:, list(classes)]], dim=1)
    lookup = torch.zeros(logits.shape[1], dtype=labels.dtype, device=labels.device)
    lookup[list(classes)] = torch.arange(1, len(classes) + 1, dtype=labels.dtype, device=labels.device)
    return merged, lookup[labels]
