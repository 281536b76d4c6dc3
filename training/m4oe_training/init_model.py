"""Starting a run from a trained model (``init``): which model, which settings it keeps, its weights.

A fine-tuning run keeps its parent's architecture (dropout rates aside), in-plane preprocessing and
intensity normalisation, so that the model sees its inputs as it did in training; its weights are
copied from the exported model (safetensors, never a pickle) after checking that they fit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from m4oe.checkpoint import load_checkpoint, read_model_card
from m4oe.errors import ModelError
from m4oe.hub import resolve_model
from m4oe.model import SwinUNet
from m4oe.model_card import ModelCard
from m4oe.preprocessing import DEFAULT_PARAMS, IntensityParams

from .config import ConfigError, TrainConfig
from .optim import is_context_parameter


def init_overrides(cfg: TrainConfig, card) -> dict:
    """``model_overrides`` for a run that starts from ``init``: the architecture is the init model's,
    so only the dropout rates may change, and ``gate_context`` may be added (its weights start at
    zero, so the run starts from the init model's outputs); any other key must repeat the init
    model's value. ``neighbour_slices`` may be given to a model that reads one slice: the adjacent
    slices' projection starts at zero, so the run too starts from the init model's outputs."""
    free = {"drop_rate", "attn_drop_rate", "drop_path_rate", "gate_context", "neighbour_slices"}
    architecture = card.architecture
    trained_with = architecture.gate_context
    for key, value in cfg.model_overrides.items():
        if key == "gate_context" and trained_with != "none" and value != trained_with:
            raise ConfigError(
                f"model_overrides.gate_context = {value!r}: the init model's gates are trained with a "
                f"{trained_with!r} context, which a run cannot take away"
            )
        if (
            key == "neighbour_slices"
            and architecture.neighbour_slices
            and value != architecture.neighbour_slices
        ):
            raise ConfigError(
                f"model_overrides.neighbour_slices = {value!r}: the init model reads "
                f"{architecture.neighbour_slices} adjacent slices per side; a run can give adjacent "
                "slices to a one-slice model, not change how many a model reads"
            )
        if key in free:
            continue
        theirs = getattr(architecture, key, None)
        if isinstance(theirs, tuple) and isinstance(value, list):
            value = tuple(value)
        if theirs != value:
            raise ConfigError(
                f"model_overrides.{key} = {value!r}: with init the architecture is the init model's "
                f"({key} = {theirs!r}); only dropout rates may change"
            )
    return {k: v for k, v in cfg.model_overrides.items() if k in free}


def resolve_init(init: str) -> Path:
    """The model ``init`` names: a folder, card or weights file, or a model name (embedded,
    registered and downloaded, or cached) resolved as ``m4oe segment --model`` resolves it."""
    try:
        return resolve_model(init)
    except ModelError as error:
        raise ConfigError(f"init: {error}") from None


def read_init(init: str) -> tuple[Path, ModelCard]:
    """The model ``init`` names (:func:`resolve_init`) and its card, its weights unread; ConfigError
    naming what is wrong with either."""
    path = resolve_init(init)
    try:
        return path, read_model_card(path)
    except ModelError as error:
        raise ConfigError(f"init: {error}") from None


def inherit_preprocessing(cfg: TrainConfig, init_card: ModelCard | None) -> TrainConfig:
    """``cfg`` with its in-plane preprocessing settled: the init model's (a fine-tuned model must see
    its inputs prepared as its parent did), else the config's (``in_plane`` "resize" when left out).

    Raises ConfigError when the config sets an ``in_plane`` or ``target_spacing_mm`` other than the
    init model's.
    """
    if init_card is None or not cfg.keep_init_in_plane:
        return dataclasses.replace(cfg, in_plane=cfg.in_plane or "resize")
    theirs = init_card.preprocessing
    for key, value, inherited in (
        ("in_plane", cfg.in_plane, theirs.in_plane),
        ("target_spacing_mm", cfg.target_spacing_mm, theirs.target_spacing_mm),
    ):
        if value is not None and value != inherited:
            raise ConfigError(
                f"{key} = {value!r}: the init model {init_card.name!r} was trained with {key} = "
                f"{inherited!r}, which a fine-tuning run keeps; leave {key} out"
            )
    return dataclasses.replace(cfg, in_plane=theirs.in_plane, target_spacing_mm=theirs.target_spacing_mm)


def init_intensity(init_card: ModelCard) -> dict[str, IntensityParams]:
    """The init model's intensity normalisation per modality (the engine's default for a modality
    its card lacks), which a fine-tuning run keeps instead of measuring its own data."""
    params = dict(DEFAULT_PARAMS)
    for modality, values in init_card.preprocessing.intensity.items():
        params[modality] = IntensityParams.from_dict(values)
    return params


def initial_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The exported model's weights by name (float32, CPU), as :func:`load_initial_weights` copies
    them into a run: the anchor of a stage's ``anchor_weight``, read again on ``--resume``."""
    try:
        source, _ = load_checkpoint(path)
    except ModelError as error:
        raise ConfigError(f"init: {error}") from None
    return {k: v.detach().float() for k, v in source.state_dict().items()}


def mome_grows(source: SwinUNet, model: SwinUNet) -> bool:
    """Whether ``model`` is the MoME ``source`` with classes added after its own (same names first)."""
    theirs, ours = source.cfg.class_names, model.cfg.class_names  # () for models other than MoME
    return bool(theirs) and len(ours) > len(theirs) and ours[: len(theirs)] == theirs


def load_initial_weights(model: SwinUNet, path: str | Path, labels: dict[str, list]) -> str:
    """Copy an exported model's weights into ``model`` (fine-tuning); returns their SHA-256.

    The exported model (a folder, card or ``.safetensors`` file in the engine's format; never a
    pickle) must have the same experts in the same order, the same label names per task, and
    weights of the same names and shapes (same width, depths, window and patch size). Dropout rates
    and ``top_k`` may differ; a run may add a slice context to the gates of a model without one
    (those weights keep their initialisation, which leaves the outputs unchanged); a MoME run may
    have classes after the model's own (their class-name embeddings are the run's). Raises
    ConfigError naming the file and what differs.
    """
    try:
        source, card = load_checkpoint(path)
    except ModelError as error:
        raise ConfigError(f"init: {error}") from None
    # A MoME fine-tune may add classes after the model's own (:func:`.mome.build_mome_from`): their
    # class-name embeddings are the run's, the model's own rows and every other weight the model's.
    added_classes = None
    if mome_grows(source, model):
        added_classes = model.class_embeddings[source.class_embeddings.shape[0] :].detach().clone()
    problems = []
    if list(source.cfg.experts) != list(model.cfg.experts):
        problems.append(f"experts {list(source.cfg.experts)}, the run has {list(model.cfg.experts)}")
    for task in card.tasks:
        theirs = [label.name for label in task.labels]
        ours = [label.name for label in labels.get(task.name, [])]
        if task.name not in labels:
            problems.append(f"task {task.name!r}, which the run does not train")
        elif theirs != (ours[: len(theirs)] if added_classes is not None else ours):
            problems.append(f"task {task.name!r} labels {theirs}, the run's datasets have {ours}")
    missing = [t for t in labels if t not in source.cfg.task_names]
    if missing:
        problems.append(f"no head for the run's tasks {missing}")
    state, expected = source.state_dict(), model.state_dict()
    if added_classes is not None:
        own = state["class_embeddings"]
        state["class_embeddings"] = torch.cat([own, added_classes.to(own)])
    if not problems:
        wrong = [
            f"{k} {tuple(state[k].shape)} (run: {tuple(v.shape)})"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        added = {k for k in expected if is_context_parameter(k) and k not in state}
        if model.cfg.neighbour_slices and not source.cfg.neighbour_slices:
            added.add("neighbour_embed.weight")  # the adjacent slices' projection starts at zero
        absent = sorted((set(expected) - added) ^ set(state))
        if wrong or absent:
            shown = (wrong + absent)[:3]
            problems.append(f"{len(wrong) + len(absent)} weights differ in name or shape: {', '.join(shown)}")
    if problems:
        raise ConfigError(f"init {path}: the model does not fit this run: {'; '.join(problems)}")
    with torch.no_grad():
        model.load_state_dict(
            {**{k: expected[k] for k in added}, **{k: v.to(expected[k].dtype) for k, v in state.items()}},
            strict=True,
        )
    return card.weights_sha256
