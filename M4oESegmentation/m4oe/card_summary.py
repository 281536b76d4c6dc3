"""A model card in words: what a reviewer needs before using a model.

``m4oe info MODEL`` prints :func:`info_page`; the Slicer panel shows :func:`licence_text`,
:func:`training_data_text`, :func:`real_validation_lines` and :func:`held_out_validation_lines` under
the model list. Everything here
reads the card as the JSON dict of ``model.json`` (``ModelCard.to_dict()``), so the Slicer module,
which reads cards without the engine's packages, uses the same text; standard library only (and
the engine's label and terminology modules, which are standard library only too).

The facts come from the card's fields: ``license``, ``intended_use`` and ``training_data`` (say
"not stated" when a card lacks them), the training ``provenance`` (datasets and their training
cases, stages, iterations, time) and ``metrics`` (``validation`` on held-out phantom cases,
``real_validation`` on real scans with reference labels, ``held_out_validation`` on the held-out
real cases of its training datasets). :func:`real_accuracy_warning` turns the real-scan figures
into the warning a segmentation of a scan carries, :func:`check_closely_lines` into the model's
list of structures to check closely (``m4oe info`` and the panel's model facts).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .labels import Label
from .terminology import organ_keys

NOT_STATED = "not stated"


def licence_text(card: dict) -> str:
    """The weights' licence (an SPDX identifier such as ``"Apache-2.0"``), or "not stated"."""
    return str(card.get("license") or NOT_STATED)


def intended_use_text(card: dict) -> str:
    """What the model is meant for, or "not stated"."""
    return str(card.get("intended_use") or NOT_STATED)


def human_duration(seconds: float) -> str:
    """``4358.4`` -> ``"1 h 13 min"``; ``95`` -> ``"1 min 35 s"``."""
    seconds = round(float(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _datasets(provenance: dict) -> list[tuple[str, int, list[str]]]:
    """(path, training cases, modalities) of each distinct dataset folder of the provenance."""
    folders: dict[str, tuple[int, list[str]]] = {}
    for entry in (provenance.get("data") or {}).values():
        if not isinstance(entry, dict):
            continue
        path = str(entry.get("path", "?"))
        cases = len(entry.get("train_cases") or [])
        count, modalities = folders.get(path, (0, []))
        modality = str(entry.get("modality", "?")).upper()
        folders[path] = (max(count, cases), modalities + ([modality] if modality not in modalities else []))
    return [(path, count, modalities) for path, (count, modalities) in folders.items()]


def run_iterations(config: dict) -> tuple[int, int] | None:
    """(iterations, batch size) of a training config's stages, or None when it does not say."""
    per_epoch = config.get("iterations_per_epoch")
    stages = config.get("stages") or []
    if not isinstance(per_epoch, int) or not stages:
        return None
    epochs = sum(int(stage.get("epochs", 0)) for stage in stages if isinstance(stage, dict))
    return epochs * per_epoch, int(config.get("batch_size", 0))


def training_data_text(card: dict) -> str:
    """One paragraph: the card's ``training_data`` statement, then what the provenance records.

    Example: ``"Synthetic phantoms and one real CT (CC-BY-4.0). 5 datasets, 85 training cases:
    data/phantom/ct 20 (CT), ...; 5000 iterations of batch 8 in 1 h 12 min; continued from an
    earlier model."``
    """
    parts = [str(card.get("training_data") or "").strip() or f"Training data {NOT_STATED}."]
    provenance = card.get("provenance") or {}
    merged = _merged_text(provenance)
    datasets = _datasets_text(provenance)
    if merged:
        parts.append(merged)
    if merged and (datasets or provenance.get("config")):
        parts.append("The base model:")
    if datasets:
        parts.append(datasets + ".")
    run = []
    iterations = run_iterations(provenance.get("config") or {})
    if iterations:
        run.append(f"{iterations[0]} iterations of batch {iterations[1]}")
    if isinstance(provenance.get("training_seconds"), (int, float)):
        run.append(f"in {human_duration(provenance['training_seconds'])}")
    if run:
        text = " ".join(run)
        if provenance.get("init_weights_sha256"):
            text += ", continued from " + _lineage_text(provenance)
        parts.append(text[0].upper() + text[1:] + ".")
    return " ".join(parts)


def _datasets_text(run: dict) -> str:
    """``"2 datasets, 16 training cases: data/real/chaos_t2 16 (MR), ..."`` for a run's
    provenance, or ``""`` when it records no dataset."""
    datasets = _datasets(run)
    if not datasets:
        return ""
    total = sum(count for _path, count, _m in datasets)
    listed = ", ".join(f"{path} {count} ({'/'.join(mods)})" for path, count, mods in datasets)
    return f"{len(datasets)} datasets, {total} training cases: {listed}"


def _run_text(run: dict) -> str:
    """:func:`_datasets_text` and the iterations of a run's provenance, or ``""``."""
    pieces = list(filter(None, [_datasets_text(run)]))
    iterations = run_iterations(run.get("config") or {})
    if iterations:
        pieces.append(f"{iterations[0]} iterations")
    return "; ".join(pieces)


def _merged_text(provenance: dict) -> str:
    """For a model whose experts were taken from other runs (``m4oe merge-experts``:
    ``provenance.merged_experts``): which experts came from which model and what that run learnt
    from. ``""`` for any other model.

    Example: ``"Experts merged onto a base model (weights 95e25fcbf29e): ct from m4oe-phantom
    (weights 63234033d68e; 4 datasets, 45 training cases: ...; 3000 iterations); mr-t1/mr-t2 from
    ..."``
    """
    merged = provenance.get("merged_experts")
    if not isinstance(merged, dict):
        return ""
    sources: dict[str, tuple[str, list[str], dict]] = {}  # weights hash -> (name, experts, run)
    for expert, entry in merged.items():
        if isinstance(entry, dict):
            sha = str(entry.get("weights_sha256") or "?")
            name, experts, run = sources.get(sha, (str(entry.get("name", "?")), [], entry.get("run") or {}))
            sources[sha] = (name, [*experts, expert], run)
    pieces = []
    for sha, (name, experts, run) in sources.items():
        details = "; ".join(filter(None, [f"weights {sha[:12]}", _run_text(run)]))
        pieces.append(f"{'/'.join(experts)} from {name} ({details})")
    base = str(merged.get("base_weights_sha256") or "?")[:12]
    return f"Experts merged onto a base model (weights {base}): " + "; ".join(pieces) + "."


def _lineage_text(provenance: dict) -> str:
    """The earlier runs a fine-tuned model continues (``provenance.lineage``, newest first).

    Example: ``"m4oe-phantom (weights 95e25fcbf29e), the last of 2 earlier runs: 8000 iterations,
    data/phantom/t1, data/phantom/t2"``; ``"an earlier model"`` for a card without a lineage.
    """
    lineage = [entry for entry in provenance.get("lineage") or [] if isinstance(entry, dict)]
    if not lineage:
        return "an earlier model"
    parent = lineage[0]
    text = f"{parent.get('name', '?')} (weights {str(parent.get('weights_sha256') or '?')[:12]})"
    if len(lineage) > 1:
        text += f", the last of {len(lineage)} earlier runs"
    iterations = [entry.get("iterations") for entry in lineage]
    folders = list(dict.fromkeys(path for entry in lineage for path, _count, _m in _datasets(entry)))
    details = []
    if all(isinstance(n, int) for n in iterations):
        details.append(f"{sum(iterations)} iterations")
    details += folders
    return text + (": " + ", ".join(details) if details else "")


def _figure(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _score_line(name: str, qualifier: str, entry: dict) -> str:
    """``name (qualifier): mean Dice, mean HD95; the Dice of each organ`` of one scored entry."""
    dice = ", ".join(f"{organ} {_figure(value)}" for organ, value in (entry.get("dice") or {}).items())
    return (
        f"{name} ({qualifier}): mean Dice {_figure(entry.get('mean_dice'))}, "
        f"mean HD95 {_figure(entry.get('mean_hd95_mm'), 1)} mm; {dice}"
    )


def _with_labels_line(lines: list[str], section: dict) -> list[str]:
    """``lines`` and, if there are any, the section's statement of what its reference labels were."""
    if lines and section.get("labels"):
        date = f" ({section['date']})" if section.get("date") else ""
        lines = [*lines, f"reference labels: {section['labels']}{date}"]
    return lines


def real_validation_lines(card: dict) -> list[str]:
    """One line per real validation scan (``metrics.real_validation``): modality, mean Dice and
    HD95, then the Dice of each organ; a last line says what the reference labels were."""
    real = (card.get("metrics") or {}).get("real_validation") or {}
    lines = [
        _score_line(name, str(scan.get("modality", "?")).upper(), scan)
        for name, scan in (real.get("scans") or {}).items()
    ]
    return _with_labels_line(lines, real)


def held_out_validation_lines(card: dict) -> list[str]:
    """One line per labelled dataset whose held-out cases were scored
    (``metrics.held_out_validation``): modality, where it came from, cases, mean Dice and HD95,
    then the Dice of each organ; a last line says what the reference labels were."""
    held = (card.get("metrics") or {}).get("held_out_validation") or {}
    lines = []
    for name, entry in (held.get("datasets") or {}).items():
        source = entry.get("source") or {}
        origin = ", ".join(str(source[k]) for k in ("dataset", "license") if source.get(k))
        cases = f"{len(entry.get('cases') or [])} cases"
        qualifier = [str(entry.get("modality", "?")).upper(), origin, cases]
        lines.append(_score_line(name, "; ".join(part for part in qualifier if part), entry))
    return _with_labels_line(lines, held)


WEAK_DICE = 0.5
"""A structure whose Dice on a real scan of a modality was below this is named in the accuracy
warning of every segmentation of that modality (see :func:`real_accuracy_warning`)."""


def real_dice_by_structure(card: dict, modality: str) -> dict[str, list[float]]:
    """Structure key (``"kidney_right"``) -> the Dice of every real-scan figure the card holds for
    ``modality`` ("ct" or "mr"): the ``metrics.real_validation`` scans, then the
    ``metrics.held_out_validation`` datasets, in card order. Empty when the card has none."""
    metrics = card.get("metrics") or {}
    entries = [
        *((metrics.get("real_validation") or {}).get("scans") or {}).values(),
        *((metrics.get("held_out_validation") or {}).get("datasets") or {}).values(),
    ]
    found: dict[str, list[float]] = {}
    for entry in entries:
        if str(entry.get("modality", "")).lower() == modality.lower():
            for key, dice in (entry.get("dice") or {}).items():
                if dice is not None:
                    found.setdefault(key, []).append(float(dice))
    return found


def real_accuracy_warning(
    card: dict, modality: str, structures: dict[str, str], threshold: float = WEAK_DICE
) -> str | None:
    """What a reviewer of one segmentation should know from the card's real-scan figures, or None.

    ``modality``: the scan's, "ct" or "mr"; ``structures``: structure key -> display name of the
    classes segmented (classes without a standard key cannot be matched and are left out). Names
    the structures whose Dice on a real scan of this modality was below ``threshold`` (each with
    its figures, lowest first) and those no real scan of this modality measured. None when the card
    has no real-scan figure for the modality (nothing to go on) or every structure scored at least
    ``threshold``.
    """
    found = _weak_and_unmeasured(card, modality, structures, threshold)
    if found is None or not any(found):
        return None
    weak, unmeasured = found
    kind = modality.upper()
    parts = []
    if weak:
        below = f"Dice was below {threshold:.2f} for "
        parts.append(f"on the real {kind} scans its card reports, {below}" + ", ".join(weak))
    if unmeasured:
        parts.append(f"no real {kind} scan measured " + ", ".join(unmeasured))
    return "; ".join(parts) + ": check these structures closely (m4oe info MODEL lists the figures)"


def _weak_and_unmeasured(
    card: dict, modality: str, structures: dict[str, str], threshold: float
) -> tuple[list[str], list[str]] | None:
    """(structures below ``threshold`` on a real scan of ``modality``, as "name 0.37/0.67", the
    figures lowest first; structures without a figure), or None when the card has no figure."""
    figures = real_dice_by_structure(card, modality)
    if not figures:
        return None
    weak = [
        f"{name} {'/'.join(f'{dice:.2f}' for dice in sorted(figures[key]))}"
        for key, name in structures.items()
        if key in figures and min(figures[key]) < threshold
    ]
    return weak, [name for key, name in structures.items() if key not in figures]


def check_closely_lines(card: dict, threshold: float = WEAK_DICE) -> list[str]:
    """Per modality with real-scan figures in the card (CT, then MR), one line naming the task
    structures to check closely in any segmentation of that modality: those below ``threshold`` on
    a real scan (with the figures) and those no real scan measured. What
    :func:`real_accuracy_warning` says for a whole-task segmentation, before any is made."""
    lines = []
    for modality in ("ct", "mr"):
        for task in card.get("tasks") or []:
            labels = [Label.from_dict(label) for label in task.get("labels") or []]
            keys = organ_keys(labels)
            structures = {keys[label.value]: label.name for label in labels if label.value in keys}
            found = _weak_and_unmeasured(card, modality, structures, threshold)
            if found is None or not any(found):
                continue
            weak, unmeasured = found
            parts = []
            if weak:
                parts.append(f"Dice below {threshold:.2f} on a real scan: " + ", ".join(weak))
            if unmeasured:
                parts.append(f"not measured on a real {modality.upper()} scan: " + ", ".join(unmeasured))
            named = f" (task {task['name']})" if len(card["tasks"]) > 1 else ""
            lines.append(f"{modality.upper()}{named}: " + "; ".join(parts))
    return lines


def phantom_validation_lines(card: dict) -> list[str]:
    """One line per validation set with held-out cases (``metrics.validation``): mean Dice. A set
    that repeats an earlier one's volumes (``same_as``: the same folder listed again) is left out."""
    lines = []
    for name, result in ((card.get("metrics") or {}).get("validation") or {}).items():
        if isinstance(result, dict) and result.get("cases") and "same_as" not in result:
            lines.append(
                f"{name} ({str(result.get('modality', '?')).upper()}, {result['cases']} cases): "
                f"mean Dice {_figure(result.get('mean_dice'))}"
            )
    return lines


def _preprocessing_line(pre: dict, img_size) -> str:
    if pre.get("in_plane") == "spacing" and pre.get("target_spacing_mm"):
        sy, sx = pre["target_spacing_mm"]
        text = f"slices resampled to {sy:g} x {sx:g} mm and padded or cropped to {img_size} px"
    else:
        text = f"slices resized to {img_size} x {img_size} px"
    for modality, params in (pre.get("intensity") or {}).items():
        described = ", ".join(
            f"{key} {' to '.join(f'{v:g}' for v in value) if isinstance(value, list) else _number(value)}"
            for key, value in params.items()
            if key != "modality"
        )
        text += f"; {modality.upper()}: {described}"
    return text + f"; {pre.get('slice_batch', 16)} slices per batch"


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def weights_facts(weights: str | Path) -> str:
    """``"13.1 MB, 3.2 M parameters"`` from a safetensors file (its header only; no torch)."""
    path = Path(weights)
    size = path.stat().st_size
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    count = 0
    for name, tensor in header.items():
        if name != "__metadata__":
            elements = 1
            for dim in tensor["shape"]:
                elements *= dim
            count += elements
    return f"{size / 1e6:.1f} MB, {count / 1e6:.1f} M parameters"


def info_page(card: dict, weights: str | Path | None = None) -> str:
    """The readable page ``m4oe info`` prints: what the model is, does, was trained on and scores.

    ``card``: the card as a dict; ``weights``: its safetensors file, for size and parameter count.
    """
    arch = card["architecture"]
    experts = arch.get("experts") or []
    lines = [f"{card['name']}: {card.get('description', '')}"]
    if card.get("notes"):
        lines.append(f"NOTE: {card['notes']}")
    lines += [f"licence: {licence_text(card)}", f"intended use: {intended_use_text(card)}"]
    context = ", slice context" if arch.get("gate_context", "none") != "none" else ""
    if arch.get("arch") == "mome":  # a dense Swin-UNet trunk; the experts are in the decoder's routers
        encoder = str(arch.get("text_encoder", "")).split(" ")[0] or NOT_STATED
        kind = (
            f"MoME on a Swin-UNet {arch['img_size']}px, {len(experts)} experts routed per class query at "
            f"{len(arch['depths']) - 1} decoder scales, {len(arch.get('class_names', []))} classes asked "
            f"for by name (class names embedded by {encoder})"
        )
    elif experts:
        kind = (
            f"Swin-UNet {arch['img_size']}px, M4oE, {len(experts)} experts "
            f"({arch.get('gate')} gate{context}, top_k={arch.get('top_k')})"
        )
    else:
        kind = f"Swin-UNet {arch['img_size']}px, dense"
    size = f"; {weights_facts(weights)}" if weights is not None and Path(weights).is_file() else ""
    k = int(arch.get("neighbour_slices", 0))
    channels = f"{2 * k + 1} adjacent slices in ({k} each side)" if k else f"in_chans {arch['in_chans']}"
    lines.append(f"architecture: {kind}, {channels}{size}")
    for expert in card.get("experts") or []:
        lines.append(f"  expert {expert['name']}: {expert['modality']}")
    for task in card.get("tasks") or []:
        names = {label["value"]: label["name"] for label in task["labels"]}
        lines.append(f"task {task['name']}: " + ", ".join(f"{v} {n}" for v, n in names.items()))
        steps = []
        if task.get("test_time_passes", 1) > 1:
            steps.append(f"test-time augmentation, {task['test_time_passes']} passes averaged")
        if task.get("through_plane_sigma_mm"):
            steps.append(f"through-plane smoothing sigma {task['through_plane_sigma_mm']:g} mm")
        if task.get("largest_component"):
            steps.append("largest component of " + ", ".join(names[v] for v in task["largest_component"]))
        if steps:
            lines.append("  post-processing: " + "; ".join(steps))
    lines.append("preprocessing: " + _preprocessing_line(card.get("preprocessing") or {}, arch["img_size"]))
    lines.append("training data: " + training_data_text(card))
    phantom = phantom_validation_lines(card)
    real = real_validation_lines(card)
    held = held_out_validation_lines(card)
    lines.append("validation:" + ("" if phantom or real or held else f" {NOT_STATED}"))
    lines += [f"  held-out {line}" for line in phantom]
    lines += [f"  real scan {line}" if not line.startswith("reference") else f"  {line}" for line in real]
    lines += [f"  real held-out {line}" if not line.startswith("reference") else f"  {line}" for line in held]
    closely = check_closely_lines(card)
    if closely:
        lines.append("check closely on real scans:")
        lines += [f"  {line}" for line in closely]
    lines.append(f"weights sha256: {card.get('weights_sha256') or NOT_STATED}")
    lines.append("(the full model card: m4oe info MODEL --json)")
    return "\n".join(lines)
