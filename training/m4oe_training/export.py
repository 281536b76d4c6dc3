"""From a training run to an engine checkpoint: the model card and its labels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from m4oe.card_summary import run_iterations
from m4oe.checkpoint import save_checkpoint
from m4oe.labels import Label
from m4oe.model import SwinUNet
from m4oe.model_card import ExpertInfo, ModelCard, Preprocessing, TaskInfo
from m4oe.preprocessing import IntensityParams
from m4oe.terminology import STANDARD_KEYS, generic_label, standard_label

from .config import ConfigError, TrainConfig
from .data import DatasetInfo, dataset_modality


def dataset_labels(info: DatasetInfo) -> list[Label]:
    """Labels 1..K-1 of a dataset with standard names, colours and codes.

    The terminology key of each label comes from ``dataset.json``'s ``terminology`` table, else
    from its name when that is a known key (``liver``, ``kidney_left``, ...). The card shows the
    standard name ("left kidney"), as the engine's other models and Slicer's terminology do. A
    label whose terminology entry is null (no single standard structure fits, e.g. AMOS's
    "prostate/uterus") gets the generic "Anatomical structure" code under its own name.
    """
    labels = []
    for name, value in sorted(info.labels.items(), key=lambda kv: kv[1]):
        if value == 0:
            continue
        key = info.terminology.get(name, name)
        if key is None:  # dataset.json says no single standard structure fits this label
            labels.append(generic_label(name, value))
            continue
        if key not in STANDARD_KEYS:
            raise ConfigError(
                f"{info.root / 'dataset.json'}: label {name!r} has no standard terminology; add "
                f'"terminology": {{"{name}": KEY}} with KEY one of {sorted(STANDARD_KEYS)}'
            )
        labels.append(standard_label(key, value))
    return labels


def task_values(cfg: TrainConfig, infos: list[DatasetInfo]) -> dict[str, dict[str, int]]:
    """Per task, label name -> class value over all its datasets: the union of their label tables.

    Datasets sharing a task may label different structures (partial labels: CHAOS labels the
    liver, kidneys and spleen of the nine organs) and number them differently (FLARE22's spleen is
    3, AMOS22's 1): structures are matched by name. The task takes the first dataset's numbering;
    a structure first labelled by a later dataset gets the next free value, in that dataset's
    order. A structure a dataset does not label is not background for it: the loss of its samples
    merges those classes with the background (:class:`.stage_loss.StageLoss`), and its labels are
    renumbered into the task's values (:func:`label_lookups`).
    """
    union: dict[str, dict[str, int]] = {}
    for d, info in zip(cfg.datasets, infos, strict=True):
        table = union.setdefault(d.task, {})
        for name, value in sorted(info.labels.items(), key=lambda kv: kv[1]):
            if value and name not in table:
                table[name] = len(table) + 1
    return union


def dataset_values(cfg: TrainConfig, infos: list[DatasetInfo]) -> list[dict[str, int]]:
    """Per dataset, its label names (background included) -> its task's class values."""
    union = task_values(cfg, infos)
    return [
        {name: union[d.task][name] if value else 0 for name, value in info.labels.items()}
        for d, info in zip(cfg.datasets, infos, strict=True)
    ]


def label_lookups(cfg: TrainConfig, infos: list[DatasetInfo]) -> list[np.ndarray | None]:
    """Per dataset, a 256-entry table from its label values to its task's (:func:`task_values`),
    or None where they are the same."""
    union = task_values(cfg, infos)
    lookups = []
    for d, info in zip(cfg.datasets, infos, strict=True):
        table = np.zeros(256, dtype=np.uint8)
        for name, value in info.labels.items():
            table[value] = union[d.task][name] if value else 0
        same = all(union[d.task][name] == value for name, value in info.labels.items() if value)
        lookups.append(None if same else table)
    return lookups


def renumber(labels: sitk.Image, lookup: np.ndarray) -> sitk.Image:
    """A label map (any grid; LPS geometry kept) with its values sent through ``lookup``, as uint8."""
    out = sitk.GetImageFromArray(lookup[sitk.GetArrayViewFromImage(labels).astype(np.int64)])
    out.CopyInformation(labels)
    return out


def task_labels(cfg: TrainConfig, infos: list[DatasetInfo]) -> dict[str, list[Label]]:
    """Labels per task, the union of its datasets' tables (:func:`task_values`), by class value."""
    union = task_values(cfg, infos)
    tasks: dict[str, dict[int, Label]] = {}
    for d, info in zip(cfg.datasets, infos, strict=True):
        names = {value: name for name, value in info.labels.items()}
        for label in dataset_labels(info):
            value = union[d.task][names[label.value]]
            tasks.setdefault(d.task, {}).setdefault(value, dataclasses.replace(label, value=value))
    unknown = [n for n in cfg.largest_component or () if not any(info.labels.get(n) for info in infos)]
    if unknown:
        raise ConfigError(f"largest_component: {unknown} are not foreground labels of any dataset")
    return {name: [labels[v] for v in sorted(labels)] for name, labels in tasks.items()}


def labelled_classes(cfg: TrainConfig, infos: list[DatasetInfo]) -> list[tuple[int, ...] | None]:
    """Per dataset, the task's class values it labels when that is fewer than its task's (partial
    labels), else None (every class of its task: the loss is the plain one)."""
    union = task_values(cfg, infos)
    result = []
    for d, info in zip(cfg.datasets, infos, strict=True):
        own = tuple(sorted(union[d.task][name] for name, value in info.labels.items() if value))
        result.append(None if len(own) == len(union[d.task]) else own)
    return result


def expert_modalities(
    cfg: TrainConfig, infos: list[DatasetInfo], init_card: ModelCard | None = None
) -> list[ExpertInfo]:
    """Each expert's modality, from the datasets assigned to it (all must agree) and, for experts
    the run has no data for, from ``init_card`` (the card of the run's ``init`` model)."""
    found: dict[str, str] = {}
    for d, info in zip(cfg.datasets, infos, strict=True):
        modality = dataset_modality(d, info)
        if found.setdefault(d.expert, modality) != modality:
            raise ConfigError(f"expert {d.expert!r} is given both {found[d.expert]} and {modality} datasets")
    if init_card is not None:  # experts the run has no data for keep the init model's modality
        for expert in init_card.experts:
            if found.setdefault(expert.name, expert.modality) != expert.modality:
                raise ConfigError(
                    f"expert {expert.name!r} is a {expert.modality} expert in the init model, "
                    f"but the run gives it {found[expert.name]} data"
                )
    missing = [name for name in cfg.experts if name not in found]
    if missing:
        raise ConfigError(f"experts {missing} have no dataset (nor an init model) to give their modality")
    return [ExpertInfo(name, found[name], f"trained on {name} data") for name in cfg.experts]


def task_postprocessing(
    cfg: TrainConfig,
    infos: list[DatasetInfo],
    init_card: ModelCard | None = None,
    values: dict[str, dict[str, int]] | None = None,
) -> dict[str, dict]:
    """Each task's clean-up for the exported card (and for validation, which uses that card):
    ``largest_component`` (label values), ``through_plane_sigma_mm`` (mm) and ``test_time_passes``.

    A value the config sets applies to every task; one it leaves out (None) is the ``init_card``
    task's of the same name, else the default (none, 0.0 mm, 1 pass). ``values``: per task, label
    name -> value in the model's label space (default: the task's datasets' own values; a MoME run
    passes its union's, :class:`.mome.LabelSpace`).
    """
    if values is None:
        values = task_values(cfg, infos)
    inherited = {task.name: task for task in init_card.tasks} if init_card is not None else {}
    result = {}
    for name in cfg.task_names:
        parent = inherited.get(name)
        if cfg.largest_component is not None:
            clean = [values[name][n] for n in cfg.largest_component if values[name].get(n)]
        else:
            clean = list(parent.largest_component) if parent is not None else []
        sigma, passes = cfg.through_plane_sigma_mm, cfg.test_time_passes
        if sigma is None:
            sigma = parent.through_plane_sigma_mm if parent is not None else 0.0
        if passes is None:
            passes = parent.test_time_passes if parent is not None else 1
        result[name] = dict(largest_component=clean, through_plane_sigma_mm=sigma, test_time_passes=passes)
    return result


def architecture_name(architecture) -> str:
    """What a model is, in two words, for its default description: "MoME", "M4oE" or "dense
    Swin-UNet" (``architecture``: a :class:`m4oe.model.ModelConfig`)."""
    if architecture.arch == "mome":
        return "MoME"
    return "M4oE" if architecture.is_moe else "dense Swin-UNet"


def lineage(init_card: ModelCard | None) -> list[dict]:
    """The runs behind a fine-tune's starting model, newest first: the init model's own run, then
    the lineage its card records. Empty for a run from scratch.

    Each entry is what that run's provenance recorded: ``name`` and ``weights_sha256`` (the model
    it exported), ``data`` (per data set: path, modality, training cases), ``iterations`` and
    ``batch_size`` (None when its config does not say), ``training_seconds``, ``seed``,
    ``command`` and ``init_weights_sha256`` (None for a run from scratch). A chain of fine-tunes so
    keeps the story of every run in the last card, which ``m4oe info`` tells.
    """
    if init_card is None:
        return []
    provenance = init_card.provenance or {}
    config = provenance.get("config") or {}
    iterations, batch_size = run_iterations(config) or (None, None)
    entry = {
        "name": init_card.name,
        "weights_sha256": init_card.weights_sha256,
        "data": provenance.get("data") or {},
        "iterations": iterations,
        "batch_size": batch_size,
        "training_seconds": provenance.get("training_seconds"),
        "seed": provenance.get("seed"),
        "command": provenance.get("command"),
        "init_weights_sha256": provenance.get("init_weights_sha256"),
    }
    return [entry, *(e for e in provenance.get("lineage") or [] if isinstance(e, dict))]


def build_card(
    cfg: TrainConfig,
    model: SwinUNet,
    infos: list[DatasetInfo],
    params: dict[str, IntensityParams],
    *,
    metrics: dict,
    provenance: dict,
    notes: str = "",
    init_card: ModelCard | None = None,
    labels: dict[str, list[Label]] | None = None,
    values: dict[str, dict[str, int]] | None = None,
) -> ModelCard:
    """The card of the run's model. ``cfg`` must have its preprocessing resolved (``in_plane`` set,
    as :func:`m4oe_training.init_model.inherit_preprocessing` leaves it); ``params`` are the intensity
    parameters the run normalised with; clean-up missing from ``cfg`` comes from ``init_card``
    (:func:`task_postprocessing`), and so do ``license``, ``intended_use`` and ``training_data``
    when ``cfg`` leaves them empty (the card's summary adds the run's own datasets). ``labels``
    (per task) and ``values`` (per task, label name -> value) replace the datasets' own: a MoME
    run's single task is the union of its datasets' structures (:class:`.mome.LabelSpace`)."""
    labels = task_labels(cfg, infos) if labels is None else labels
    clean_up = task_postprocessing(cfg, infos, init_card, values)
    tasks = [TaskInfo(name, labels[name], **clean_up[name]) for name in cfg.task_names]
    return ModelCard(
        name=cfg.name,
        description=cfg.description or f"{architecture_name(model.cfg)} trained with config {cfg.name!r}",
        architecture=model.cfg,
        experts=expert_modalities(cfg, infos, init_card) if model.cfg.is_moe else [],
        tasks=tasks,
        preprocessing=Preprocessing(
            in_plane=cfg.in_plane,
            target_spacing_mm=cfg.target_spacing_mm,
            intensity={m: p.to_dict() for m, p in params.items()},
            slice_batch=16,
        ),
        provenance=provenance,
        metrics=metrics,
        notes=notes or cfg.notes,
        # A fine-tune adapts its init model: the init card's statements about licence, use and
        # data carry over unless the config states its own (a share-alike licence must).
        license=cfg.license or (init_card.license if init_card else ""),
        intended_use=cfg.intended_use or (init_card.intended_use if init_card else ""),
        training_data=cfg.training_data or (init_card.training_data if init_card else ""),
    )


def export_model(model: SwinUNet, card: ModelCard, folder: Path, dtype: str = "float32") -> Path:
    """Write the engine checkpoint (safetensors + model card), replacing an earlier export.

    ``dtype="float16"`` halves the file (the embedded model must stay small); inference casts back.
    """
    return save_checkpoint(model, card, folder, overwrite=True, dtype=getattr(torch, dtype))
