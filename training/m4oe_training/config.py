"""One training run's configuration: a TOML file, overridable from the command line.

Every key is a field of a frozen dataclass below; an unknown key or a value of the wrong type is
an error naming the key, never a silent default. ``--set stage.lr=0.01``-style overrides go
through the same checks as the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from m4oe.errors import InputError
from m4oe.model_card import valid_passes, valid_sigma_mm

from .families import SYNTH_CHOICES

STAGE_KINDS = ("mim", "experts", "joint", "context")
TRAINABLE = ("all", "gates", "context", "experts")
OPTIMIZERS = ("sgd", "adamw")
AMP_MODES = ("auto", "off", "bf16")
# How a foreground slice is chosen: "slice", any slice holding a label; "class", a structure the case
# labels first (uniformly), then a slice holding it, so small structures are drawn as often as large
# ones (nnU-Net's foreground oversampling draws a class first the same way).
FOREGROUND_SAMPLING = ("slice", "class")


class ConfigError(InputError):
    """A configuration value that is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class DatasetConfig:
    """One nnU-Net-style dataset: which expert learns from it and which task head it trains.

    ``path`` is relative to the config file's folder when not absolute. ``val_cases`` cases (the
    last ones in sorted order) are held out for validation.

    ``synth``: "off" (the dataset's images), or a contrast family of :mod:`.synth` ("ct", "t1",
    "t2", "any"): training slices are then rendered from the cases' anatomy (organ labels plus
    tissue sub-classes derived from the image) with random intensities, for a fraction
    ``synth_fraction`` of the samples drawn from this dataset (the rest are its real images); or
    "ct-phase" (a CT dataset only): the dataset's own CT slices with a simulated contrast phase
    (:func:`.synth.enhance_slice`: the enhancing organs moved to a random phase's HU, the real
    texture kept), for the same fraction. A
    family of another modality than the images' (MR renders of a CT dataset) needs
    ``synth_fraction = 1`` and ``val_cases = 0``: the real images would be the wrong modality for
    the expert.

    ``weight``: how often a sample comes from this dataset relative to the others (default 1:
    every dataset equally often, whatever its number of cases). A config that adds many render
    datasets for one expert can weight them down so the other experts keep their share.

    ``foreground_fraction``: this dataset's share of samples drawn from slices holding a label
    (the rest from any slice), in place of the run's ``foreground_fraction``; None (the default)
    takes the run's. A dataset whose scans reach beyond the labelled organs (chest, pelvis) can
    draw more of those slices, so the model learns that what lies there is background.
    """

    path: str
    expert: str
    task: str
    val_cases: int = 2
    synth: str = "off"
    synth_fraction: float = 1.0
    weight: float = 1.0
    foreground_fraction: float | None = None


@dataclass(frozen=True)
class StageConfig:
    """One stage of the M4oE recipe.

    kind: "mim" (masked-image-modelling pretraining of each expert on its modality), "experts"
    (segmentation with every sample forced to its dataset's expert), "joint" (gate on, all
    parameters fine-tuned together) or "context" (a model with ``gate_context``: the slice context
    alone learns to tell each sample's expert, through the training-only read-out ``context_probe``;
    the network does not run, so a step costs a small fraction of a joint one).
    ``routing_weight`` (joint stage): weight of a cross-entropy between the gate's per-token expert
    probabilities and each sample's modality expert. It teaches the gate modality routing within a
    few hundred steps, which the segmentation loss alone does slowly; 0 (the paper's recipe) leaves
    the gate to the segmentation loss.
    ``trainable``: "all" parameters, or only the "gates" (joint stage: a gate warm-up on frozen
    experts, so that switching the gate on does not first undo what the experts learnt), or only the
    gates' slice "context" (joint stage, a model with ``gate_context``: the context learns to tell
    the modalities apart while everything else, token gates included, stays as it was), or only the
    "experts" the run's datasets name (joint stage of a mixture model: the feed-forward experts of
    those modalities learn, while the shared layers, the gates, the task heads and every other
    expert keep their weights exactly, so a run on MR data leaves the CT expert as it was and a CT
    token's output moves only by the small gate weight it gives the trained experts; AdamW would
    otherwise move a parameter by about ``lr`` per step even on the near-zero gradient of an expert
    the gate routes away from).
    ``warmup_iterations``: the learning rate rises linearly from 0 over the stage's first
    iterations, then follows the poly decay.
    ``gate_lr_scale``: the gates' learning rate relative to ``lr``. With AdamW a parameter moves
    about ``lr`` per step whatever its gradient, so a gate that must grow large weights to tell
    similar modalities apart (T1 from T2) learns it slowly at the experts' rate.
    ``shared_lr_scale``: the learning rate of the shared layers (everything but the experts, the
    gates and the task heads: patch embedding, attention, norms, up- and down-sampling) relative to
    ``lr``. Below 1 a fine-tuning run on a few corrected cases adapts experts and heads while the
    layers every modality depends on move less; 0 freezes them.
    ``anchor_weight`` (needs ``init``): L2-SP (Li, Grandvalet and Davoine, ICML 2018), a penalty
    ``anchor_weight / 2 * sum((w - w_init) ** 2)`` over every weight the init model gave, added to
    the loss (its gradient ``anchor_weight * (w - w_init)`` is added before clipping; the
    frozen parameters of ``trainable`` stay frozen). Where the new data's gradient is weak, a
    fine-tune then falls back towards what the init model knew instead of drifting; the decay
    towards 0 of ``weight_decay`` works as before beside it. 0 (the default) turns it off.
    """

    kind: str
    epochs: int
    lr: float
    load_balance_weight: float = 0.0
    routing_weight: float = 0.0
    mask_ratio: float = 0.75
    trainable: str = "all"
    warmup_iterations: int = 0
    gate_lr_scale: float = 1.0
    shared_lr_scale: float = 1.0
    anchor_weight: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """A whole run. Fields left out (None) that a model card also holds are inherited from the
    ``init`` model when one is given, so that a fine-tuned model sees its inputs exactly as its
    parent did and cleans up as it did: ``in_plane`` and ``target_spacing_mm`` (the init model's;
    setting a different value is an error, unless ``keep_init_in_plane = false``: a deliberate
    change of the in-plane geometry, which the network then has to learn anew),
    ``largest_component``, ``through_plane_sigma_mm`` and ``test_time_passes`` (the init model's
    per task unless set). Without ``init`` they default to "resize", none, (), 0.0 and 1.
    """

    name: str
    datasets: tuple[DatasetConfig, ...]
    stages: tuple[StageConfig, ...]
    model: str = "m4oe"
    model_overrides: dict = field(default_factory=dict)
    imagenet: str | None = None
    init: str | None = None
    expert_order: tuple[str, ...] = ()
    in_plane: str | None = None
    target_spacing_mm: tuple[float, float] | None = None
    keep_init_in_plane: bool = True
    batch_size: int = 16
    iterations_per_epoch: int = 250
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    grad_clip_norm: float = 12.0
    # An exponential moving average of the weights (timm's ModelEmaV3), updated after every
    # optimiser step: ema = decay * ema + (1 - decay) * weights, starting from the run's first
    # weights (the init model's, for a fine-tune). When on (> 0), validation scores and the export
    # holds the average, not the last step's weights; 0.999 averages over about the last 1,000 steps.
    ema_decay: float = 0.0
    ce_weight: float = 0.4
    dice_weight: float = 0.7
    # MoME only: weight, relative to the BCE, of the exclusion loss (Shi et al., MedIA 2021) over the
    # classes a dataset does not label, at the voxels it labels as one of its structures (organs do
    # not overlap: such a voxel is a negative for every other class). 1: those voxels count as the
    # dataset's own labelled negatives do; 0: the plain partial-label loss.
    exclusion_weight: float = 1.0
    # Segmentation losses at the decoder's lower resolutions too, weighted as nnU-Net weighs them
    # (m4oe_training.deep_supervision); the exported network is the same either way.
    deep_supervision: bool = False
    foreground_fraction: float = 0.67
    foreground_sampling: str = "slice"
    augment: bool = True
    elastic_probability: float = 0.0
    # The largest relative zoom of the batch augmentation's affine, either way (0.15: 0.85-1.15);
    # larger makes a model meet organs at more in-plane scales (pixel spacings, body sizes).
    augment_scale: float = 0.15
    # The share of label-map renders whose subcutaneous fat layer is grown or thinned
    # (m4oe_training.anatomy.change_fat_layer): organs of one size in bodies of another.
    synth_fat_layer: float = 0.0
    # The share of label-map renders whose kidneys and stomach show an interior (sinus fat, urine,
    # gas, fluid, food: m4oe_training.anatomy.add_organ_interiors), the organ labels unchanged.
    synth_organ_interior: float = 0.0
    # The share of "ct-to-mr" images drawn as opposed-phase T1: fat and tissue cancel at their
    # borders (m4oe_training.crossmodal.opposed_phase).
    synth_opposed_phase: float = 0.0
    amp: str = "auto"
    val_every: int = 1
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    # CPU processes drawing the next steps' batches while the network trains on this one (0: the
    # training process draws each batch itself). The batches are the same either way; on a GPU
    # the draw (synthetic rendering above all) bounds the step time of the small models.
    loader_workers: int = 0
    output_dir: str = "runs/{name}"
    largest_component: tuple[str, ...] | None = None
    through_plane_sigma_mm: float | None = None
    test_time_passes: int | None = None
    export_dtype: str = "float32"
    export_epoch: str = "best"
    description: str = ""
    notes: str = ""
    # The model card's statements for a reviewer (m4oe.model_card): the weights' licence (SPDX),
    # the intended use, and the training data with its licences.
    license: str = ""
    intended_use: str = ""
    training_data: str = ""

    def __post_init__(self):
        if not self.datasets:
            raise ConfigError("datasets: at least one dataset is needed")
        if not self.stages:
            raise ConfigError("stages: at least one stage is needed")
        for i, s in enumerate(self.stages):
            if s.kind not in STAGE_KINDS:
                raise ConfigError(f"stages[{i}].kind must be one of {STAGE_KINDS}, got {s.kind!r}")
            if s.epochs < 0 or s.lr <= 0:
                raise ConfigError(f"stages[{i}]: epochs must be >= 0 and lr > 0, got {s.epochs}, {s.lr}")
            if not 0.0 < s.mask_ratio < 1.0:
                raise ConfigError(f"stages[{i}].mask_ratio must be in (0, 1), got {s.mask_ratio}")
            if s.trainable not in TRAINABLE:
                raise ConfigError(f"stages[{i}].trainable must be one of {TRAINABLE}, got {s.trainable!r}")
            if s.trainable in ("gates", "context", "experts") and s.kind != "joint":
                raise ConfigError(
                    f"stages[{i}]: trainable = {s.trainable!r} needs kind 'joint' (the gate is off)"
                )
            if s.gate_lr_scale <= 0:
                raise ConfigError(f"stages[{i}].gate_lr_scale must be > 0, got {s.gate_lr_scale}")
            if s.shared_lr_scale < 0:
                raise ConfigError(f"stages[{i}].shared_lr_scale must be >= 0, got {s.shared_lr_scale}")
            if not (s.anchor_weight >= 0 and math.isfinite(s.anchor_weight)):
                raise ConfigError(f"stages[{i}].anchor_weight must be >= 0, got {s.anchor_weight}")
            if s.anchor_weight > 0 and self.init is None:
                raise ConfigError(
                    f"stages[{i}].anchor_weight pulls the weights towards the init model's; set init"
                )
            if s.warmup_iterations < 0:
                raise ConfigError(f"stages[{i}].warmup_iterations must be >= 0, got {s.warmup_iterations}")
        checks = {
            "optimizer": self.optimizer in OPTIMIZERS,
            "amp": self.amp in AMP_MODES,
            "in_plane": self.in_plane in (None, "resize", "spacing"),
            "export_dtype": self.export_dtype in ("float32", "float16"),
            "export_epoch": self.export_epoch in ("best", "last"),
            "batch_size": self.batch_size >= 1,
            "loader_workers": self.loader_workers >= 0,
            "iterations_per_epoch": self.iterations_per_epoch >= 1,
            "foreground_fraction": 0.0 <= self.foreground_fraction <= 1.0,
            "foreground_sampling": self.foreground_sampling in FOREGROUND_SAMPLING,
            "elastic_probability": 0.0 <= self.elastic_probability <= 1.0,
            "augment_scale": 0.0 <= self.augment_scale <= 0.5,
            "synth_fat_layer": 0.0 <= self.synth_fat_layer <= 1.0,
            "synth_organ_interior": 0.0 <= self.synth_organ_interior <= 1.0,
            "synth_opposed_phase": 0.0 <= self.synth_opposed_phase <= 1.0,
            "grad_clip_norm": self.grad_clip_norm >= 0,
            "ema_decay": 0.0 <= self.ema_decay < 1.0,
            "val_every": self.val_every >= 1,
            "ce_weight": self.ce_weight >= 0 and self.ce_weight + self.dice_weight > 0,
            "dice_weight": self.dice_weight >= 0,
            "exclusion_weight": self.exclusion_weight >= 0,
            "through_plane_sigma_mm": self.through_plane_sigma_mm is None
            or valid_sigma_mm(self.through_plane_sigma_mm),
            "test_time_passes": self.test_time_passes is None or valid_passes(self.test_time_passes),
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"{key}: invalid value {getattr(self, key)!r}")
        for i, d in enumerate(self.datasets):
            if d.val_cases < 0:
                raise ConfigError(f"datasets[{i}].val_cases must be >= 0, got {d.val_cases}")
            if d.synth not in SYNTH_CHOICES:
                raise ConfigError(f"datasets[{i}].synth must be one of {SYNTH_CHOICES}, got {d.synth!r}")
            if not 0.0 < d.synth_fraction <= 1.0:
                raise ConfigError(f"datasets[{i}].synth_fraction must be in (0, 1], got {d.synth_fraction}")
            if not (d.weight > 0 and math.isfinite(d.weight)):
                raise ConfigError(f"datasets[{i}].weight must be a finite number > 0, got {d.weight}")
            if d.foreground_fraction is not None and not 0.0 <= d.foreground_fraction <= 1.0:
                raise ConfigError(
                    f"datasets[{i}].foreground_fraction must be in [0, 1], got {d.foreground_fraction}"
                )
        if self.expert_order:
            if len(set(self.expert_order)) != len(self.expert_order):
                raise ConfigError(f"expert_order names an expert twice: {list(self.expert_order)}")
            unknown = sorted({d.expert for d in self.datasets} - set(self.expert_order))
            if unknown:
                order = list(self.expert_order)
                raise ConfigError(f"expert_order {order} lacks the datasets' experts {unknown}")

    @property
    def experts(self) -> tuple[str, ...]:
        """The model's experts: ``expert_order`` when given, else the datasets' experts in order of
        first appearance. With ``init`` and no ``expert_order``, the run takes the init model's."""
        return self.expert_order or tuple(dict.fromkeys(d.expert for d in self.datasets))

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d.task for d in self.datasets))

    def synth_settings(self):
        """The draws of this run's renders and image families (:class:`.synth.SynthSettings`)."""
        from .synth import SynthSettings

        return SynthSettings(
            p_fat_layer=self.synth_fat_layer,
            p_organ_interior=self.synth_organ_interior,
            p_ct_opposed_phase=self.synth_opposed_phase,
        )

    def resolved_output_dir(self, base: Path) -> Path:
        out = Path(self.output_dir.format(name=self.name))
        return out if out.is_absolute() else base / out

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _convert(value, hint, where: str):
    """Check ``value`` against a type hint, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(hint, value, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def _build(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; expected one of {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key {key}")
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{where + ': ' if where else ''}{error}") from None


def parse_override(text: str) -> tuple[list[str], object]:
    """``"a.b=3"`` -> (["a", "b"], 3); the value is read as TOML (strings may be bare)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def toml_value(value) -> str:
    """``value`` written as a TOML value: a bool, number or string, or a list or inline table of them
    (nested). Raises TypeError for anything else (None has no TOML form)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def load_config(path: str | Path, overrides: list[str] = ()) -> tuple[TrainConfig, dict]:
    """Read a TOML config, apply ``key.sub=value`` overrides, validate. Returns (config, raw dict).

    Dataset, ``imagenet`` and ``init`` paths are made absolute relative to the config file's folder;
    an ``init`` that is a bare name (no folder separator, nothing of that name in the config's
    folder) stays a model name, looked up at the start of the run as ``m4oe segment --model`` does.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    for text in overrides:
        try:
            _apply_override(data, *parse_override(text))
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    for d in data.get("datasets", []):
        if isinstance(d, dict) and isinstance(d.get("path"), str) and not Path(d["path"]).is_absolute():
            d["path"] = str((path.parent / d["path"]).resolve())
    for key in ("imagenet", "init"):
        value = data.get(key)
        if not isinstance(value, str) or Path(value).is_absolute():
            continue
        beside = path.parent / value
        if key == "init" and is_model_name(value) and not beside.exists():
            continue
        data[key] = str(beside.resolve())
    try:
        return _build(TrainConfig, data), data
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def is_model_name(value: str) -> bool:
    """Whether ``init`` reads as a model name (``m4oe-phantom``) rather than a path: one component,
    not a model file."""
    return bool(value) and Path(value).name == value and Path(value).suffix not in (".json", ".safetensors")


def _apply_override(data: dict, keys: list[str], value) -> None:
    """Set ``data[k0][k1]... = value``; a list is indexed by a number, a missing table is created."""
    full = ".".join(keys)
    target = data
    for depth, k in enumerate(keys):
        parent = ".".join(keys[:depth])
        if isinstance(target, list):
            if not k.isdigit() or int(k) >= len(target):
                raise ConfigError(f"override {full}: {parent} has {len(target)} entries, indexed 0, 1, ...")
            k = int(k)
        elif not isinstance(target, dict):
            raise ConfigError(f"override {full}: {parent} is not a table")
        if depth == len(keys) - 1:
            target[k] = value
        elif isinstance(target, dict):
            target = target.setdefault(k, {})
        else:
            target = target[k]
