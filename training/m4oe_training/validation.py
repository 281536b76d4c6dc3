"""Validation during training: whole held-out volumes through the engine's Predictor.

Rank 0 calls :func:`validate` at a stage's validation epochs; its result goes into the run's log and
decides which epoch is exported.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np

from m4oe.evaluate import evaluate
from m4oe.io import read_image
from m4oe.model import SwinUNet
from m4oe.predictor import Predictor

from .config import TrainConfig
from .data import DatasetInfo, split_cases
from .export import dataset_values, label_lookups, renumber


def validate(
    model: SwinUNet, card, cfg: TrainConfig, infos: list[DatasetInfo], device, kind: str, space=None
) -> dict:
    """Dice and HD95 (mm) per organ on whole held-out volumes, and how the gate routed them.

    Each dataset's entry also lists under ``missed`` the structures its reference labels that the
    model predicted in none of its held-out cases (a class that died in training; see
    :func:`missed_warnings`).

    A MoME run (``space``: its :class:`.mome.LabelSpace`) asks for each dataset's own structures and
    scores them against the dataset's label maps mapped into the union space. A folder listed
    twice with the same held-out cases, task and route is predicted once, and both get the result, the
    later one with ``same_as``: the key of the first."""
    predictor = Predictor(model, card, device=str(device))
    results, done = {}, {}  # done: (folder, held-out cases, task, forced expert) -> its result
    # A task's datasets may number their structures differently: scored in the model's values.
    own = (dataset_values(cfg, infos), label_lookups(cfg, infos)) if space is None else None
    for d, (dcfg, info) in enumerate(zip(cfg.datasets, infos, strict=True)):
        expert = cfg.experts.index(dcfg.expert) if (kind != "joint" and model.cfg.is_moe) else None
        same = (str(Path(info.root).resolve()), dcfg.val_cases, dcfg.task, expert)
        if same in done:
            first, entry = done[same]
            results[f"{d}:{info.name}"] = {**copy.deepcopy(entry), "same_as": first}
            continue
        dice, hd95, routing = [], {}, []
        values, lookup = (space.values[d], None) if own is None else (own[0][d], own[1][d])
        names = {value: name for name, value in values.items()}
        per_label: dict[str, list[float]] = {}
        predicted: dict[str, int] = {}  # structure -> voxels predicted over the cases it is in
        for case in split_cases(info, dcfg.val_cases)["val"]:
            image = read_image(info.image_path(case)).image
            reference = read_image(info.label_path(case)).image
            structures = None
            if space is not None:
                reference, structures = space.to_union(d, reference), space.structures(d)
            elif lookup is not None:
                reference = renumber(reference, lookup)
            pred = predictor.predict(
                image,
                modality=info.modality,
                task=dcfg.task,
                force_expert=expert,
                gates=model.cfg.is_moe,
                structures=structures,
            )
            scores = evaluate(pred.labelmap, reference, labels=sorted(v for v in values.values() if v))
            for entry in scores["labels"]:
                if entry["dice"] is not None:
                    name = names[entry["label"]]
                    per_label.setdefault(name, []).append(entry["dice"])
                    if entry["ref_voxels"]:
                        predicted[name] = predicted.get(name, 0) + entry["pred_voxels"]
                    hd95.setdefault(name, []).append(entry["hd95_mm"])
            dice.append(scores["mean_dice"])
            if pred.gate_summary:
                routing.append(pred.gate_summary["overall"]["mean_weights"])
        results[f"{d}:{info.name}"] = {
            "modality": info.modality,
            "task": dcfg.task,
            "cases": len(dice),
            "mean_dice": float(np.mean(dice)) if dice else None,
            "dice": {k: round(float(np.mean(v)), 4) for k, v in per_label.items()},
            "hd95_mm": {
                k: round(float(np.mean([x for x in v if x is not None] or [math.nan])), 2)
                for k, v in hd95.items()
            },
            "gate_mean_weights": {k: round(float(np.mean([r[k] for r in routing])), 4) for k in routing[0]}
            if routing
            else None,
            "missed": sorted(name for name, voxels in predicted.items() if voxels == 0),
        }
        done[same] = (f"{d}:{info.name}", results[f"{d}:{info.name}"])
    return results


def log_view(results: dict) -> dict:
    """``validate``'s results as the training log prints them: a dataset with no held-out cases
    (a render of another set, real images of a set validated elsewhere) is left out, and one that
    repeats an earlier dataset's folder, cases, task and route (the same volumes predicted once)
    reads ``{"same_as": KEY}``. The full results stay in the run's state and the card."""
    return {
        key: {"same_as": entry["same_as"]} if "same_as" in entry else entry
        for key, entry in results.items()
        if entry.get("cases")
    }


def missed_warnings(results: dict) -> list[str]:
    """One line per validated dataset with structures it labels that the model predicted nowhere
    (``validate``'s ``missed``), for the training log.

    Such a class has usually died: its logit is below the others' everywhere, so its soft Dice gives
    no gradient and only its cross-entropy term, spread over every pixel, pulls it back (for a
    small organ, slowly). Measured on a MoME run whose pancreas died (benchmarks/README.md): 400
    more steps at the peak learning rate did not move it."""
    lines = []
    for key, entry in log_view(results).items():  # a repeated dataset is warned about once
        if entry.get("missed"):
            names = entry["missed"]
            lines.append(
                f"validation: {key} labels {', '.join(names)} in its {entry['cases']} held-out case(s), "
                f"and the model predicted {'it' if len(names) == 1 else 'them'} nowhere there: "
                f"{'the class' if len(names) == 1 else 'these classes'} may have died in training "
                "(see training/README.md, 'A class predicted nowhere')"
            )
    return lines
