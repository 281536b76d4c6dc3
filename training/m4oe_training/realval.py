"""Honest validation on real scans: the two real volumes no model of this project trains on.

``example_ct_dicom/`` (contrast CT, a DICOM series of 512x512x20 voxels, 0.98 x 0.98 x 2 mm) and
``example_mr_sm.nii.gz`` (abdominal MRI, 117x91x20 voxels, 3 mm), from TotalSegmentator's test
files (``../shared/data/totalsegmentator``, see its SOURCES.md). Their reference labels are
TotalSegmentator outputs (pseudo-labels: TotalSegmentator's own models agree on them at Dice about
0.98 for liver and spleen, 0.96-0.97 for the kidneys, 0.92 for the aorta and 0.81 for the
pancreas, the ceiling a model can reach here), mapped onto this project's organs by
:mod:`.totalsegmentator`. The CT reference is stored with another y axis and origin than the DICOM
series reads with, so it is resampled onto the series grid through physical coordinates (LPS, mm;
nearest neighbour, identity transform), never matched by array index.

A model is scored as a user runs it: the model card's default settings (test-time passes,
smoothing across slices, clean-up), the modality given. The model's classes are matched to the
reference's organs by their standard codes (:data:`m4oe.terminology.TERMS`), not by label value,
so a model numbering its organs differently is scored correctly; organs are reported by their
TERMS key ("kidney_right"). Per organ present in the reference: Dice and HD95 (mm,
:func:`m4oe.evaluate.evaluate`); the mean Dice over the organs present (a missed organ counts 0);
the mean HD95 over the organs the model found (a missed organ has no HD95, so it is left out of
that mean); and the mean gate weight of each expert over the volume (all tokens, mean of the MoE
layers, from the prediction's gate summary).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m4oe.errors import InputError
from m4oe.evaluate import evaluate
from m4oe.evaluate_released import released_scores
from m4oe.io import read_image, write_atomic
from m4oe.model_card import ModelCard
from m4oe.terminology import organ_keys

from .data import DatasetInfo, split_cases
from .export import renumber
from .nnunet import read_dataset_json
from .totalsegmentator import TOTALSEGMENTATOR_IDS, map_labels


@dataclass(frozen=True)
class RealScan:
    """One real validation scan: image (file or DICOM folder), its TotalSegmentator labels, task, modality."""

    name: str
    image: str
    reference: str
    ts_task: str
    modality: str


REAL_SCANS = (
    RealScan("example_ct_dicom", "example_ct_dicom", "example_seg_dicom.nii.gz", "total", "ct"),
    RealScan("example_mr_sm", "example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "total_mr", "mr"),
)
"""The real validation set. Never train on these images or their label maps."""


def load_scan(
    data_dir: str | Path, scan: RealScan, labels: dict[str, int] | None = None
) -> tuple[sitk.Image, sitk.Image]:
    """The scan's image and its reference on the image's grid, as label values of a model (uint8).

    Args:
        data_dir: the folder holding TotalSegmentator's test files.
        scan: one of :data:`REAL_SCANS`.
        labels: organ key -> label value to write; default the project's nine organs
            (:data:`m4oe.phantom.PHANTOM_LABELS`). Keys TotalSegmentator does not label are ignored.

    Returns:
        (image, reference): the image as the engine reads it (LPS, mm; HU for CT) and a uint8 label
        map of the same size, spacing, origin and direction, resampled through physical space
        (nearest neighbour, identity transform; voxels outside the stored label map are 0).
    """
    data_dir = Path(data_dir)
    for part in (scan.image, scan.reference):
        if not (data_dir / part).exists():
            raise InputError(f"real validation file {part} not found", data_dir / part)
    image = read_image(data_dir / scan.image).image
    reference = sitk.ReadImage(str(data_dir / scan.reference))
    mapped = sitk.GetImageFromArray(map_labels(sitk.GetArrayViewFromImage(reference), scan.ts_task, labels))
    mapped.CopyInformation(reference)
    on_grid = sitk.Resample(mapped, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return image, on_grid


def score(
    labelmap: sitk.Image, reference: sitk.Image, names: dict[int, str], protocol: str = "native"
) -> dict:
    """Dice and HD95 (mm) per organ present in ``reference`` and their means.

    Args:
        labelmap, reference: label maps on one grid (project label values).
        names: label value -> organ name.
        protocol: "native", or "released" to add the released M4oE code's scores
            (:mod:`m4oe.evaluate_released`, on this grid) over every organ of ``names``, as its test
            counts every class: "released_dice", "released_hd95_voxels" {name: value},
            "released_mean_dice", "released_mean_hd95_voxels".

    Returns:
        {"dice": {name: Dice}, "hd95_mm": {name: mm or None}, "mean_dice", "mean_hd95_mm",
        "organs": present organ names}; an organ the model misses scores Dice 0 and no HD95.
    """
    values = np.flatnonzero(np.bincount(sitk.GetArrayViewFromImage(reference).reshape(-1)))
    present = [int(v) for v in values if v in names]
    result = evaluate(labelmap, reference, labels=present, names=names)
    rows = result["labels"]
    scores = {
        "organs": [names[r["label"]] for r in rows],
        "dice": {names[r["label"]]: round(float(r["dice"]), 4) for r in rows},
        "hd95_mm": {
            names[r["label"]]: None if r["hd95_mm"] is None else round(float(r["hd95_mm"]), 2) for r in rows
        },
        "mean_dice": None if result["mean_dice"] is None else round(result["mean_dice"], 4),
        "mean_hd95_mm": None if result["mean_hd95_mm"] is None else round(result["mean_hd95_mm"], 2),
    }
    if protocol == "released":
        spacing_zyx = tuple(reversed(reference.GetSpacing()))
        released = released_scores(
            sitk.GetArrayViewFromImage(labelmap),
            sitk.GetArrayViewFromImage(reference),
            spacing_zyx,
            sorted(names),
            names=names,
        )
        rows = released["labels"]
        scores["released_dice"] = {names[r["label"]]: round(r["dice"], 4) for r in rows}
        scores["released_hd95_voxels"] = {names[r["label"]]: round(r["hd95_voxels"], 2) for r in rows}
        scores["released_mean_dice"] = round(released["mean_dice"], 4)
        scores["released_mean_hd95_voxels"] = round(released["mean_hd95_voxels"], 2)
    return scores


def benchmark(
    predictor, data_dir: str | Path, test_time_passes: int | None = None, protocol: str = "native"
) -> dict:
    """Score a :class:`m4oe.predictor.Predictor` on every scan of :data:`REAL_SCANS`.

    The predictor's first task is scored; its classes are matched to the references' organs by
    :func:`organ_keys`. ``test_time_passes`` None keeps the card's default. ``protocol``
    "released" adds the released M4oE code's scores (see :func:`score`).

    Returns:
        {scan name: {"modality", **:func:`score` (organs by TERMS key), "gate_mean_weights":
        {expert: mean weight} or None for a dense model, "routing_confidence"}}.

    Raises:
        InputError: the model's task has none of the organs the references label, or a file is missing.
    """
    card = predictor.card
    names = {
        value: key
        for value, key in organ_keys(card.tasks[0].labels).items()
        if key in TOTALSEGMENTATOR_IDS["total"]
    }
    if not names:
        raise InputError(
            f"task {card.tasks[0].name!r} of model {card.name!r} has none of the organs the references "
            f"label ({', '.join(TOTALSEGMENTATOR_IDS['total'])})"
        )
    values = {key: value for value, key in names.items()}
    results = {}
    for scan in REAL_SCANS:
        image, reference = load_scan(data_dir, scan, values)
        results[scan.name] = predict_and_score(
            predictor, image, reference, scan.modality, names, test_time_passes, protocol
        )
    return results


def predict_and_score(
    predictor,
    image: sitk.Image,
    reference: sitk.Image,
    modality: str,
    names: dict[int, str],
    test_time_passes: int | None = None,
    protocol: str = "native",
) -> dict:
    """Run ``predictor`` on ``image`` as ``m4oe segment``, ``m4oe batch`` and the Slicer module run
    it (the body crop on) and :func:`score` it against ``reference`` (the model's label values on
    the image's grid). Returns ``{"modality", **score, "gate_mean_weights": {expert: weight} or
    None, "routing_confidence": float or None}``."""
    prediction = predictor.predict(
        image,
        modality=modality,
        gates=predictor.card.architecture.is_moe,
        test_time_passes=test_time_passes,
        body_crop=True,
    )
    entry = {"modality": modality, **score(prediction.labelmap, reference, names, protocol)}
    summary = prediction.gate_summary
    entry["gate_mean_weights"] = (
        {k: round(float(v), 4) for k, v in summary["overall"]["mean_weights"].items()} if summary else None
    )
    entry["routing_confidence"] = summary["overall"]["routing_confidence"] if summary else None
    return entry


def benchmark_held_out(
    predictor, folder: str | Path, cases: int = 4, test_time_passes: int | None = None
) -> dict:
    """Score a :class:`m4oe.predictor.Predictor` on the held-out cases of a labelled dataset.

    The cases are the last ``cases`` of the nnU-Net dataset folder in sorted order: those a
    training run with ``val_cases = cases`` holds out of every use of that dataset (images and
    renders of its anatomy alike). The model's classes are matched to the dataset's structures by
    their terminology keys (:func:`organ_keys`), so a dataset that labels a few organs (CHAOS:
    liver, spleen, kidneys) is scored on those only. Each case runs as ``m4oe segment`` runs it,
    the modality the dataset's.

    Returns:
        {"dataset": its name, "source": where its dataset.json says it came from (dataset,
        reference, license) or None, "modality", "cases": [case ids], "organs", "dice" /
        "hd95_mm": {organ: mean over the cases holding it}, "mean_dice": mean over the organs,
        "mean_hd95_mm", "per_case": {case: its mean Dice}, "gate_mean_weights" (mean over the
        cases) or None, "routing_confidence": None}.

    Raises:
        InputError: the folder is not a dataset, has too few cases, or shares no organ with the model.
    """
    info = DatasetInfo.read(folder)
    if not 0 < cases < len(info.cases) + 1:
        raise InputError(f"has {len(info.cases)} cases; cannot hold out {cases}", info.root)
    model_values = {key: value for value, key in organ_keys(predictor.card.tasks[0].labels).items()}
    lookup = np.zeros(256, dtype=np.uint8)
    names = {}
    for name, value in info.labels.items():
        key = info.terminology.get(name, name)
        if value and key in model_values:
            lookup[value] = model_values[key]
            names[model_values[key]] = key
    if not names:
        raise InputError(
            f"labels none of the organs of model {predictor.card.name!r}", info.root / "dataset.json"
        )
    held_out = split_cases(info, cases)["val"]
    per_organ: dict[str, list] = {}
    per_case, routing = {}, []
    for case in held_out:
        image = read_image(info.image_path(case)).image
        reference = renumber(read_image(info.label_path(case)).image, lookup)
        scores = predict_and_score(predictor, image, reference, info.modality, names, test_time_passes)
        per_case[case] = scores["mean_dice"]
        for organ in scores["organs"]:
            per_organ.setdefault(organ, []).append((scores["dice"][organ], scores["hd95_mm"][organ]))
        if scores["gate_mean_weights"]:
            routing.append(scores["gate_mean_weights"])
    dice = {organ: round(float(np.mean([d for d, _ in rows])), 4) for organ, rows in per_organ.items()}
    hd95 = {
        organ: round(float(np.mean(found)), 2) if (found := [h for _, h in rows if h is not None]) else None
        for organ, rows in per_organ.items()
    }
    found = [h for h in hd95.values() if h is not None]
    source = read_dataset_json(info.root).get("source")
    return {
        "dataset": info.name,
        "source": {k: source[k] for k in ("dataset", "reference", "license") if k in source}
        if isinstance(source, dict)
        else None,
        "modality": info.modality,
        "cases": held_out,
        "organs": list(dice),
        "dice": dice,
        "hd95_mm": hd95,
        "mean_dice": round(float(np.mean(list(dice.values()))), 4),
        "mean_hd95_mm": round(float(np.mean(found)), 2) if found else None,
        "per_case": per_case,
        "gate_mean_weights": {k: round(float(np.mean([r[k] for r in routing])), 4) for k in routing[0]}
        if routing
        else None,
        "routing_confidence": None,
    }


def record(card_path: str | Path, results: dict, command: str, held_out: dict | None = None) -> None:
    """Write ``results`` into the card's ``metrics.real_validation`` (with the date and command).

    ``held_out``: {name: :func:`benchmark_held_out` entry} of labelled datasets whose last cases the
    model's training held out, written as ``metrics.held_out_validation`` (date, command, and what
    the labels are: each dataset's own reference labels). None or empty leaves that entry as it is.
    """
    card = ModelCard.read(card_path)
    today = datetime.date.today().isoformat()
    entry = {"scans": results, "date": today, "command": command}
    entry["labels"] = "TotalSegmentator outputs (pseudo-labels), mapped to this model's organs"
    metrics = {**card.metrics, "real_validation": entry}
    if held_out:
        metrics["held_out_validation"] = {
            "datasets": held_out,
            "date": today,
            "command": command,
            "labels": "each dataset's own reference labels; its last cases, held out of every training use",
        }
    write_atomic(Path(card_path), dataclasses.replace(card, metrics=metrics).to_json, overwrite=True)


def format_table(results: dict) -> str:
    """A plain-text table: one row per scan and organ present, then the scan's mean."""
    released = any("released_dice" in entry for entry in results.values())
    head = f"{'scan':<24} {'organ':<20} {'Dice':>6} {'HD95 mm':>8}"
    lines = [head + (f" {'rel. Dice':>9} {'rel. HD95 vox':>13}" if released else "")]
    for name, entry in results.items():
        organs = list(entry.get("released_dice", {})) or entry["organs"]
        for organ in organs:
            dice, hd = entry["dice"].get(organ), entry["hd95_mm"].get(organ)
            line = (
                f"{name:<24} {organ:<20} {'-' if dice is None else f'{dice:.3f}':>6} "
                f"{'-' if hd is None else f'{hd:.1f}':>8}"
            )
            if released:
                hd_voxels = entry["released_hd95_voxels"][organ]
                line += f" {entry['released_dice'][organ]:>9.3f} {hd_voxels:>13.1f}"
            lines.append(line)
        mean = f"{name:<24} {'mean':<20} {entry['mean_dice']:>6.3f}"
        if released:
            hd_voxels = entry["released_mean_hd95_voxels"]
            mean += f" {'':>8} {entry['released_mean_dice']:>9.3f} {hd_voxels:>13.1f}"
        lines.append(mean)
        if entry["gate_mean_weights"]:
            lines.append(f"{name:<24} routing {json.dumps(entry['gate_mean_weights'])}")
    return "\n".join(lines)
