"""The models the panel offers, their cards, tasks and experts.

A model is named (embedded, downloaded or registered, as ``m4oe models`` lists them) or given as a
path to its folder or ``model.json`` card. Its card (a JSON dict, see ``m4oe.model_card``) lists
the ``tasks`` (label sets, each with ``labels``: value, name, colour and standard codes) and the
``experts`` ({name, modality}) a forced-expert comparison can choose from.

Uses only the torch-free, pip-free part of the engine (``m4oe.hub``, ``m4oe.labels``,
``m4oe.errors``, ``m4oe.card_summary``), so the module file may import it when Slicer loads the module.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from m4oe import card_summary, hub
from m4oe.errors import ModelError
from m4oe.labels import Label
from m4oe.terminology import select_labels, structure_key

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core and plain Python have no translations: English text

    def _(text: str) -> str:
        return text


def default_model() -> str:
    """The name of the embedded model used when none is chosen."""
    return hub.DEFAULT_MODEL


def available_models() -> list[hub.ModelEntry]:
    """Every embedded, downloaded and registered model (``m4oe models``).

    Raises ValueError (``m4oe.errors.ModelError``) for an unreadable model registry.
    """
    return hub.list_models()


def _not_downloaded(name: str) -> bool:
    return any(entry.name == name and not entry.downloaded for entry in available_models())


def model_card(model: str | None) -> dict | None:
    """The card (``model.json``) of a model name or path as a dict.

    ``model``: a model name, a model folder, its ``model.json`` or ``model.safetensors``; None or
    "" is :func:`default_model`. Returns None for a registered model that is not downloaded yet.
    Raises ValueError naming the model or file when it is unknown or its card is unreadable.
    """
    name = model or default_model()
    if _not_downloaded(name):
        return None
    try:
        path = Path(hub.resolve_model(model or None))
    except ModelError as error:
        raise ValueError(str(error)) from None
    card_path = _card_path(path)
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{card_path}: cannot read the model card ({error})") from None
    if not isinstance(card, dict):
        raise ValueError(f"{card_path}: a model card is a JSON object")
    return card


def _card_path(path: Path) -> Path:
    """The card of a model folder, card or weights file, found as the engine finds it."""
    if path.is_dir():
        return path / "model.json"
    if path.suffix == ".json":
        return path
    same_stem = path.with_suffix(".json")  # weights "x.safetensors" with card "x.json"
    return same_stem if same_stem.is_file() else path.parent / "model.json"


def ensure_model(model: str | None, progress: Callable[[int, int | None], None] | None = None) -> None:
    """Download and verify a registered model that is not downloaded yet (blocking).

    ``progress(bytes done, bytes total or None)`` is called as data arrives.
    """
    name = model or default_model()
    if _not_downloaded(name):
        hub.download_model(name, progress=progress)


def task_labels(card: dict, task: str | None) -> tuple[str, list[Label]]:
    """(task name, its labels in display order) from a model card; None or "" is the first task.

    Raises ValueError when the card has no tasks or no task of that name (the message lists them).
    """
    tasks = card.get("tasks") or []
    if not tasks:
        raise ValueError(f"model {card.get('name')!r} lists no tasks")
    chosen = tasks[0] if not task else next((t for t in tasks if t.get("name") == task), None)
    if chosen is None:
        names = ", ".join(str(t.get("name", "?")) for t in tasks)
        raise ValueError(f"model {card.get('name')!r} has no task {task!r}; it has: {names}")
    return chosen["name"], [Label.from_dict(label) for label in chosen["labels"]]


def expert_names(card: dict) -> list[str]:
    """Names of the model's experts, in expert order."""
    return [str(expert["name"]) for expert in card.get("experts", [])]


def model_choices(entries: Sequence[hub.ModelEntry], current: str = "") -> list[tuple[str, str]]:
    """(item data, item text) of the model list: every model, and ``current`` when it is a path.

    A model that is registered but not downloaded says so; a model given as a path is shown by its
    folder name (the folder of a ``model.json``).
    """
    items = [
        (e.name, e.name if e.downloaded else _("{name} (downloads when used)").format(name=e.name))
        for e in entries
    ]
    if current and current not in [data for data, _text in items]:
        path = Path(current)
        items.append((current, (path.parent.name if path.suffix == ".json" else path.name) or current))
    return items


def task_choices(card: dict | None) -> list[tuple[str, str]]:
    """(item data, item text) of the task list of a card (empty without a card)."""
    return [(t["name"], t["name"]) for t in (card or {}).get("tasks", [])]


def expert_choices(card: dict | None) -> list[tuple[str, str]]:
    """(item data, item text) of the forced-expert list: ``("mr-t2", "mr-t2 (MR)")``."""
    return [
        (e["name"], f"{e['name']} ({str(e['modality']).upper()})") for e in (card or {}).get("experts", [])
    ]


def model_info(card: dict | None, error: str | None = None) -> str:
    """Rich text under the model list: the card's description and notes, then the facts a reviewer
    needs (:func:`model_facts`); or why there is no card."""
    if card is None:
        return error or _("The model is downloaded and verified when you click Apply.")
    info = html.escape(str(card.get("description", "")))
    if card.get("notes"):
        info += f"<br><b>{html.escape(str(card['notes']))}</b>"
    return info + "<br>" + model_facts(card)


def model_facts(card: dict) -> str:
    """Rich text: the card's licence and intended use, its training data (statement, datasets,
    cases, iterations, time), its figures on real scans and the structures they say to check
    closely (:mod:`m4oe.card_summary`)."""
    mome = mome_text(card)
    lines = [mome] if mome else []
    lines += [
        _("<b>Licence:</b> {licence}").format(licence=html.escape(card_summary.licence_text(card))),
        _("<b>Intended use:</b> {use}").format(use=html.escape(card_summary.intended_use_text(card))),
        _("<b>Training data:</b> {data}").format(data=html.escape(card_summary.training_data_text(card))),
    ]
    real = card_summary.real_validation_lines(card)
    if real:
        lines.append(_("<b>Real-scan validation:</b>"))
        lines += [html.escape(line) for line in real]
    else:
        lines.append(_("<b>Real-scan validation:</b> none recorded"))
    held = card_summary.held_out_validation_lines(card)
    if held:
        lines.append(_("<b>Held-out real scans of its training datasets:</b>"))
        lines += [html.escape(line) for line in held]
    closely = card_summary.check_closely_lines(card)
    if closely:
        lines.append(_("<b>Check closely on real scans:</b>"))
        lines += [html.escape(line) for line in closely]
    return "<br>".join(lines)


def is_mome(card: dict | None) -> bool:
    """Whether the card is a MoME model's (classes asked for by name, a router per decoder scale)."""
    return (card or {}).get("architecture", {}).get("arch") == "mome"


def mome_text(card: dict | None) -> str:
    """Rich text for a MoME model: its classes are asked for by name, so only the checked
    structures are computed, and the gate review shows its router per decoder scale; "" otherwise."""
    if not is_mome(card):
        return ""
    architecture = card["architecture"]
    return _(
        "<b>MoME:</b> {classes} structures asked for by name (only the checked ones are computed); "
        "text-routed experts at {scales} decoder scales, shown one at a time in the gate review."
    ).format(classes=len(architecture.get("class_names", [])), scales=len(architecture.get("depths", [])) - 1)


def structure_choices(card: dict | None, task: str | None) -> list[tuple[str, str]]:
    """(structure key, display name) of a task's classes, for the checkable structure list."""
    if card is None:
        return []
    return [(structure_key(label), label.name) for label in task_labels(card, task)[1]]


def chosen_labels(labels: list[Label], structures: Sequence[str] | None) -> list[Label]:
    """The labels ``structures`` choose (keys or names, see ``m4oe.terminology.select_labels``);
    None is all of them. Raises ValueError naming an unknown structure, or when none is chosen."""
    return list(labels) if structures is None else select_labels(labels, list(structures))


def skipped_text(keys: Sequence[str], checked: Sequence[str]) -> str:
    """The parameter-node text of a structure list: the unchecked keys, comma-separated (so a model's
    new structures start checked)."""
    return ",".join(k for k in keys if k not in set(checked))


def checked_structures(keys: Sequence[str], skipped: str) -> list[str] | None:
    """The keys left checked when ``skipped`` (comma-separated) are not; None when all are."""
    left_out = {k for k in skipped.split(",") if k}
    kept = [k for k in keys if k not in left_out]
    return None if len(kept) == len(keys) else kept
