"""The model card: what a checkpoint says about itself, as strict JSON.

A card travels with the weights (``model.json`` next to ``model.safetensors``) and holds everything
needed to use them: the architecture, the modality of each expert, each task's labels with their
standard codes, the preprocessing, the training provenance and metrics, and the SHA-256 of the
weights. Reading is strict: an unknown key, a missing key or a wrong type is a ``ModelError`` that
names the file and the key (``tasks[0].labels[2].value``), never a silent default.

Example (abridged)::

    {
      "format_version": 1,
      "name": "m4oe-abdomen-demo",
      "description": "M4oE, CT and MR experts, 4 abdominal organs",
      "architecture": {"img_size": 224, "in_chans": 1, "experts": ["ct", "mr"],
                       "tasks": [["abdomen", 5]], ...every ModelConfig field...},
      "experts": [{"name": "ct", "modality": "ct", "description": ""},
                  {"name": "mr", "modality": "mr", "description": ""}],
      "tasks": [{"name": "abdomen", "largest_component": [1, 2], "through_plane_sigma_mm": 3.0,
                 "test_time_passes": 3,
                 "labels": [{"value": 1, "name": "liver", "color": [0.8667, 0.5098, 0.3961],
                             "category": {"scheme": "SCT", "value": "123037004",
                                          "meaning": "Anatomical Structure"},
                             "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"},
                             "modifier": null}, ...]}],
      "preprocessing": {"in_plane": "resize", "target_spacing_mm": null, "slice_batch": 16,
                        "intensity": {"ct": {...}, "mr": {...}}},
      "provenance": {"data": "...", "recipe": "...", "command": "...", "seeds": [0],
                     "date": "...", "code_version": "..."},
      "metrics": {"dice": {"liver": 0.95}},
      "notes": "demonstration model trained on synthetic phantoms; not for clinical use",
      "license": "Apache-2.0",
      "intended_use": "research and demonstration of ...; not for clinical use",
      "training_data": "synthetic phantoms (generated, no licence needed) and ... (CC-BY-4.0)",
      "weights_sha256": "3b0c...e9"
    }

``license`` (the weights' licence, an SPDX identifier), ``intended_use`` and ``training_data`` (a
summary of the data and its licences) came after format version 1 was fixed: optional, written only
when set, and a card without them reads as "not stated" (:mod:`m4oe.card_summary`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from m4oe import __version__
from m4oe.errors import InputError, ModelError
from m4oe.labels import Code, Label
from m4oe.modality import MODALITIES
from m4oe.model.config import MOME_FIELDS, ModelConfig

FORMAT_VERSION = 1
"""The card format this engine writes."""
READABLE_VERSIONS = (1,)
"""The card formats this engine reads."""
IN_PLANE_MODES = ("resize", "spacing")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ExpertInfo:
    """One expert of a mixture: its name (as in ``architecture.experts``) and the modality it serves."""

    name: str
    modality: str
    description: str = ""

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ModelError(
                f"expert {self.name!r}: modality must be one of {list(MODALITIES)}, got {self.modality!r}"
            )


MAX_TEST_TIME_PASSES = 5
"""The most forward passes per slice batch :attr:`TaskInfo.test_time_passes` may ask for."""


def valid_passes(value) -> bool:
    """Whether ``value`` is a number of test-time passes: an integer 1-MAX_TEST_TIME_PASSES (no bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_TEST_TIME_PASSES


def valid_sigma_mm(value) -> bool:
    """Whether ``value`` is a through-plane smoothing sigma: a finite number of mm >= 0 (no bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value < math.inf


@dataclass(frozen=True)
class TaskInfo:
    """One output head: its labels (values 1..K-1, background 0 is implicit) and clean-up rules.

    ``largest_component`` lists the label values reduced to their largest 3D connected component
    after inference (organs that occur once, such as the liver). ``through_plane_sigma_mm``: the
    Gaussian (standard deviation in mm along the slice axis) that averages the class probabilities
    of neighbouring slices before the argmax, 0 for none (see :mod:`m4oe.smoothing`).
    ``test_time_passes``: test-time augmentation, forward passes per slice batch, the first on the
    slices as they are and the others on them shifted or zoomed in plane (see
    :data:`m4oe.predictor.TEST_TIME_PASSES`), their class probabilities mapped back and averaged;
    1 for a single pass, at most :data:`MAX_TEST_TIME_PASSES`.
    """

    name: str
    labels: list[Label]
    largest_component: list[int] = field(default_factory=list)
    through_plane_sigma_mm: float = 0.0
    test_time_passes: int = 1

    def __post_init__(self):
        values = [label.value for label in self.labels]
        names = [label.name for label in self.labels]
        if len(set(names)) != len(names):
            raise ModelError(f"task {self.name!r}: label names must be unique, got {names}")
        unknown = sorted(set(self.largest_component) - set(values))
        if unknown or len(set(self.largest_component)) != len(self.largest_component):
            raise ModelError(
                f"task {self.name!r}: largest_component {self.largest_component} must list distinct label "
                f"values of this task {values}"
            )
        if not valid_sigma_mm(self.through_plane_sigma_mm):
            raise ModelError(
                f"task {self.name!r}: through_plane_sigma_mm must be a number of mm >= 0, "
                f"got {self.through_plane_sigma_mm!r}"
            )
        if not valid_passes(self.test_time_passes):
            raise ModelError(
                f"task {self.name!r}: test_time_passes must be an integer 1-{MAX_TEST_TIME_PASSES}, "
                f"got {self.test_time_passes!r}"
            )

    def label(self, value: int) -> Label:
        """The label of class ``value``."""
        for label in self.labels:
            if label.value == value:
                return label
        raise ModelError(
            f"task {self.name!r} has no label {value}; its labels are {[lb.value for lb in self.labels]}"
        )


@dataclass(frozen=True)
class Preprocessing:
    """How slices are prepared for the network.

    Attributes:
        in_plane: "resize" (each axial slice resized to img_size x img_size) or "spacing"
            (resampled to ``target_spacing_mm`` then padded or cropped to img_size).
        target_spacing_mm: (sy, sx) in-plane pixel spacing in mm, rows then columns; only with "spacing".
        intensity: normalisation parameters per modality ("ct", "mr"), as read by
            ``m4oe.preprocessing`` (this module keeps them as plain dicts).
        slice_batch: slices per forward pass at inference.
    """

    in_plane: str = "resize"
    target_spacing_mm: tuple[float, float] | None = None
    intensity: dict[str, dict] = field(default_factory=dict)
    slice_batch: int = 16

    def __post_init__(self):
        if self.in_plane not in IN_PLANE_MODES:
            raise ModelError(
                f"preprocessing.in_plane must be one of {list(IN_PLANE_MODES)}, got {self.in_plane!r}"
            )
        if self.target_spacing_mm is not None:
            spacing = tuple(float(s) for s in self.target_spacing_mm)
            if len(spacing) != 2 or not all(s > 0 for s in spacing):
                raise ModelError(
                    f"preprocessing.target_spacing_mm must be two positive numbers, got {spacing}"
                )
            object.__setattr__(self, "target_spacing_mm", spacing)
        if (self.in_plane == "spacing") != (self.target_spacing_mm is not None):
            raise ModelError(
                f"preprocessing: in_plane {self.in_plane!r} and target_spacing_mm {self.target_spacing_mm} "
                "disagree; 'spacing' needs a target spacing, 'resize' takes none"
            )
        unknown = sorted(set(self.intensity) - set(MODALITIES))
        if unknown:
            raise ModelError(
                f"preprocessing.intensity: unknown modalities {unknown}; expected {list(MODALITIES)}"
            )
        if self.slice_batch < 1:
            raise ModelError(f"preprocessing.slice_batch must be at least 1, got {self.slice_batch}")

    def to_dict(self) -> dict:
        return {
            "in_plane": self.in_plane,
            "target_spacing_mm": None if self.target_spacing_mm is None else list(self.target_spacing_mm),
            "intensity": {k: dict(v) for k, v in self.intensity.items()},
            "slice_batch": self.slice_batch,
        }


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """Everything a checkpoint says about itself; see the module docstring for the JSON form."""

    format_version: int = FORMAT_VERSION
    name: str
    description: str = ""
    architecture: ModelConfig
    experts: list[ExpertInfo] = field(default_factory=list)
    tasks: list[TaskInfo]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    notes: str = ""
    license: str = ""
    intended_use: str = ""
    training_data: str = ""
    weights_sha256: str = ""

    def __post_init__(self):
        if self.format_version not in READABLE_VERSIONS:
            raise ModelError(_version_problem(self.format_version))
        if not self.name:
            raise ModelError("model card name must not be empty")
        cfg = self.architecture
        if [e.name for e in self.experts] != list(cfg.experts):
            raise ModelError(
                f"experts {[e.name for e in self.experts]} do not match the architecture's experts "
                f"{list(cfg.experts)} (same names, same order; none for a dense model)"
            )
        if [t.name for t in self.tasks] != list(cfg.task_names):
            raise ModelError(
                f"tasks {[t.name for t in self.tasks]} do not match the architecture's heads "
                f"{list(cfg.task_names)}"
            )
        for task in self.tasks:
            classes = cfg.num_classes(task.name)
            values = sorted(label.value for label in task.labels)
            if values != list(range(1, classes)):
                raise ModelError(
                    f"task {task.name!r}: labels must have values 1..{classes - 1} once each (the head has "
                    f"{classes} classes, 0 is background), got {values}"
                )
        if cfg.arch == "mome":
            names = [label.name for label in sorted(self.tasks[0].labels, key=lambda label: label.value)]
            if names != list(cfg.class_names):
                raise ModelError(
                    f"task {self.tasks[0].name!r}: a MoME model's label names {names} must be its "
                    f"architecture's class_names {list(cfg.class_names)} (their text embeddings are its "
                    "queries)"
                )
        if self.weights_sha256 and not _SHA256.match(self.weights_sha256):
            raise ModelError(f"weights_sha256 must be 64 lower-case hex digits, got {self.weights_sha256!r}")

    def task(self, name: str | None = None) -> TaskInfo:
        """The task called ``name``; None gives the first (the model's default head).

        An unknown name is a bad argument (``--task``), so an :class:`InputError` (exit code 2)."""
        if name is None:
            return self.tasks[0]
        for task in self.tasks:
            if task.name == name:
                return task
        raise InputError(f"unknown task {name!r}; this model has {[t.name for t in self.tasks]}")

    def expert_index(self, modality: str) -> list[int]:
        """Indices of the experts serving ``modality`` ("ct" or "mr"); empty for a dense model."""
        if modality not in MODALITIES:
            raise ModelError(f"unknown modality {modality!r}; expected one of {list(MODALITIES)}")
        return [i for i, expert in enumerate(self.experts) if expert.modality == modality]

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "description": self.description,
            "architecture": self.architecture.to_dict(),
            "experts": [dataclasses.asdict(e) for e in self.experts],
            "tasks": [
                {
                    "name": t.name,
                    "labels": [_label_to_dict(label) for label in t.labels],
                    "largest_component": list(t.largest_component),
                    # written only when used, so cards without it stay readable by older engines
                    **(
                        {"through_plane_sigma_mm": t.through_plane_sigma_mm}
                        if t.through_plane_sigma_mm
                        else {}
                    ),
                    **({"test_time_passes": t.test_time_passes} if t.test_time_passes != 1 else {}),
                }
                for t in self.tasks
            ],
            "preprocessing": self.preprocessing.to_dict(),
            "provenance": self.provenance,
            "metrics": self.metrics,
            "notes": self.notes,
            # written only when stated, so cards without them stay readable by older engines
            **{key: getattr(self, key) for key in _CARD_FACTS if getattr(self, key)},
            "weights_sha256": self.weights_sha256,
        }

    @classmethod
    def from_dict(cls, data: dict, path: str | Path | None = None) -> ModelCard:
        """Inverse of :meth:`to_dict`; every problem is a ``ModelError`` naming ``path`` and the key."""
        _check(data, dict, "", path)
        if "format_version" not in data:
            raise ModelError("model card has no format_version", path)
        version = _check(data["format_version"], int, "format_version", path)
        if version not in READABLE_VERSIONS:
            raise ModelError(_version_problem(version), path)
        _keys(data, "", path, required=_CARD_REQUIRED, optional=_CARD_OPTIONAL)
        try:
            return cls(
                format_version=version,
                name=_check(data["name"], str, "name", path),
                description=_check(data.get("description", ""), str, "description", path),
                architecture=_architecture(data["architecture"], path),
                experts=[
                    _expert(e, f"experts[{i}]", path)
                    for i, e in enumerate(_check(data["experts"], list, "experts", path))
                ],
                tasks=[
                    _task(t, f"tasks[{i}]", path)
                    for i, t in enumerate(_check(data["tasks"], list, "tasks", path))
                ],
                preprocessing=_preprocessing(data.get("preprocessing", {}), path),
                provenance=_check(data.get("provenance", {}), dict, "provenance", path),
                metrics=_check(data.get("metrics", {}), dict, "metrics", path),
                notes=_check(data.get("notes", ""), str, "notes", path),
                **{key: _check(data.get(key, ""), str, key, path) for key in _CARD_FACTS},
                weights_sha256=_check(data.get("weights_sha256", ""), str, "weights_sha256", path),
            )
        except ModelError as error:
            if error.path is not None:
                raise
            raise ModelError(error.problem, path) from None

    def to_json(self, path: str | Path) -> None:
        """Write the card as indented UTF-8 JSON (not atomic: ``save_checkpoint`` handles that)."""
        try:
            text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        except (TypeError, ValueError) as error:
            raise ModelError(f"model card cannot be written as JSON: {error}", path) from None
        Path(path).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> ModelCard:
        """Read and validate a card file."""
        path = Path(path)
        if not path.is_file():
            raise ModelError("model card not found", path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ModelError(
                f"model card is not valid JSON: {error.msg} at line {error.lineno}", path
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise ModelError(f"model card cannot be read: {error}", path) from None
        return cls.from_dict(data, path)


_CARD_REQUIRED = ("format_version", "name", "architecture", "experts", "tasks")
_CARD_FACTS = ("license", "intended_use", "training_data")
"""Optional statements for a reviewer, added after format version 1 (see the module docstring)."""
_CARD_OPTIONAL = (
    "description",
    "preprocessing",
    "provenance",
    "metrics",
    "notes",
    *_CARD_FACTS,
    "weights_sha256",
)
_JSON_KIND = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "an object",
}


def _version_problem(version) -> str:
    return (
        f"model card format_version {version} is not supported; this engine (m4oe {__version__}) reads "
        f"format_version {', '.join(str(v) for v in READABLE_VERSIONS)}"
    )


def _check(value, kind: type, where: str, path):
    """``value`` if it has JSON type ``kind`` (an int is a number; a bool is no integer), else an error."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        got = "null" if value is None else _JSON_KIND.get(type(value), type(value).__name__)
        raise ModelError(
            f"model card key {where or '(top level)'!r} must be {_JSON_KIND[kind]}, got {got}", path
        )
    return float(value) if kind is float else value


def _keys(data: dict, where: str, path, required, optional=()) -> None:
    prefix = f"{where}." if where else ""
    unknown = [k for k in data if k not in required and k not in optional]
    if unknown:
        raise ModelError(
            f"unknown model card key {prefix + str(unknown[0])!r}; expected {sorted([*required, *optional])}",
            path,
        )
    missing = [k for k in required if k not in data]
    if missing:
        raise ModelError(f"model card misses key {prefix + missing[0]!r}", path)


def _object(value, where: str, path, required, optional=()) -> dict:
    _keys(_check(value, dict, where, path), where, path, required, optional)
    return value


def _architecture(value, path) -> ModelConfig:
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    # Keys added to the architecture after format version 1 was fixed: optional, so that cards
    # written before them still load (with the default, which is what those models were).
    later = ("gate_context", "neighbour_slices", *MOME_FIELDS)
    required = tuple(k for k in fields if k not in later)
    data = _object(value, "architecture", path, required=required, optional=later)
    for key, default in fields.items():
        where = f"architecture.{key}"
        if key not in data:
            continue
        if key == "top_k":
            if data[key] is not None:
                _check(data[key], int, where, path)
        elif key == "tasks":
            for i, pair in enumerate(_check(data[key], list, where, path)):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise ModelError(f"model card key '{where}[{i}]' must be a [name, classes] pair", path)
                _check(pair[0], str, f"{where}[{i}][0]", path)
                _check(pair[1], int, f"{where}[{i}][1]", path)
        elif isinstance(default, tuple):
            item_kind = str if key in ("experts", "class_names") else int
            for i, item in enumerate(_check(data[key], list, where, path)):
                _check(item, item_kind, f"{where}[{i}]", path)
        else:
            _check(data[key], type(default), where, path)
    try:
        return ModelConfig.from_dict(data)
    except ValueError as error:
        raise ModelError(f"model card key 'architecture': {error}", path) from None


def _expert(value, where: str, path) -> ExpertInfo:
    data = _object(value, where, path, required=("name", "modality"), optional=("description",))
    return ExpertInfo(
        name=_check(data["name"], str, f"{where}.name", path),
        modality=_check(data["modality"], str, f"{where}.modality", path),
        description=_check(data.get("description", ""), str, f"{where}.description", path),
    )


def _code(value, where: str, path) -> Code:
    data = _object(value, where, path, required=("scheme", "value", "meaning"))
    return Code(*(_check(data[k], str, f"{where}.{k}", path) for k in ("scheme", "value", "meaning")))


def _label(value, where: str, path) -> Label:
    data = _object(
        value, where, path, required=("value", "name", "color", "category", "type"), optional=("modifier",)
    )
    color = _check(data["color"], list, f"{where}.color", path)
    modifier = data.get("modifier")
    try:
        return Label(
            value=_check(data["value"], int, f"{where}.value", path),
            name=_check(data["name"], str, f"{where}.name", path),
            color=tuple(_check(c, float, f"{where}.color[{i}]", path) for i, c in enumerate(color)),
            category=_code(data["category"], f"{where}.category", path),
            type=_code(data["type"], f"{where}.type", path),
            modifier=None if modifier is None else _code(modifier, f"{where}.modifier", path),
        )
    except ValueError as error:
        if isinstance(error, ModelError):
            raise
        raise ModelError(f"model card key {where!r}: {error}", path) from None


def _label_to_dict(label: Label) -> dict:
    data = label.to_dict()
    data["color"] = list(label.color)
    return data


def _task(value, where: str, path) -> TaskInfo:
    data = _object(
        value,
        where,
        path,
        required=("name", "labels"),
        optional=("largest_component", "through_plane_sigma_mm", "test_time_passes"),
    )
    labels = _check(data["labels"], list, f"{where}.labels", path)
    largest = _check(data.get("largest_component", []), list, f"{where}.largest_component", path)
    return TaskInfo(
        name=_check(data["name"], str, f"{where}.name", path),
        labels=[_label(lb, f"{where}.labels[{i}]", path) for i, lb in enumerate(labels)],
        largest_component=[
            _check(v, int, f"{where}.largest_component[{i}]", path) for i, v in enumerate(largest)
        ],
        through_plane_sigma_mm=_check(
            data.get("through_plane_sigma_mm", 0.0), float, f"{where}.through_plane_sigma_mm", path
        ),
        test_time_passes=_check(data.get("test_time_passes", 1), int, f"{where}.test_time_passes", path),
    )


def _preprocessing(value, path) -> Preprocessing:
    where = "preprocessing"
    data = _object(
        value,
        where,
        path,
        required=(),
        optional=("in_plane", "target_spacing_mm", "intensity", "slice_batch"),
    )
    spacing = data.get("target_spacing_mm")
    if spacing is not None:
        spacing = tuple(
            _check(s, float, f"{where}.target_spacing_mm[{i}]", path)
            for i, s in enumerate(_check(spacing, list, f"{where}.target_spacing_mm", path))
        )
    intensity = _check(data.get("intensity", {}), dict, f"{where}.intensity", path)
    for modality, params in intensity.items():
        _check(params, dict, f"{where}.intensity.{modality}", path)
    return Preprocessing(
        in_plane=_check(data.get("in_plane", "resize"), str, f"{where}.in_plane", path),
        target_spacing_mm=spacing,
        intensity=intensity,
        slice_batch=_check(data.get("slice_batch", 16), int, f"{where}.slice_batch", path),
    )
