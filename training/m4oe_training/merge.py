"""``m4oe merge-experts``: one model from experts trained in separate runs on one base model.

A run with ``trainable = "experts"`` changes only the feed-forward experts of its datasets'
modalities and keeps every other weight of its init model bit for bit. Runs from the same init
model, one per modality, can therefore be put together: the base model's weights with each named
expert taken from the run that trained it. The result is what those runs trained, without one run
sharing its samples between the modalities. A source whose weights outside the experts differ
from the base's (its expert learnt on other shared layers) is refused: its expert would not fit.

The card's statements about the weights (:data:`STATEMENTS`: licence, training data, ...) are the
base's where every source says the same; where a source says otherwise (an expert trained on data
under another licence, say), the merged model would misstate what it is, so the caller must state
them (``facts``; ``--license``, ``--training-data``, ... on the command line).
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import torch

from m4oe.checkpoint import load_checkpoint, save_checkpoint
from m4oe.errors import ModelError

from .config import ConfigError
from .optim import is_expert_parameter

# Model card statements that describe the weights and the data they learnt from.
STATEMENTS = ("description", "notes", "license", "intended_use", "training_data")


def merge_experts(
    base: str | Path,
    sources: dict[str, str | Path],
    out: str | Path,
    *,
    name: str | None = None,
    dtype: torch.dtype | None = torch.float16,
    overwrite: bool = False,
    facts: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> Path:
    """Write to ``out`` the ``base`` model with each expert of ``sources`` (expert name -> model
    folder or file) taken from that model; returns ``out``.

    Every source must have the base's architecture, experts and weight names, and the base's
    weights outside the experts exactly (as a ``trainable = "experts"`` run from ``base`` keeps
    them). The card is the base's, renamed to ``name`` if given, with ``provenance.merged_experts``
    recording each expert's source, weights hash and what its run learnt from (command, datasets,
    iterations); its ``metrics`` are dropped (they measured the base model, not this one).
    ``facts``: card statements (:data:`STATEMENTS`) to set; each one a source states differently
    from the base must be among them. ``command``: the command line, recorded in
    ``provenance.merged_experts`` so the card says how to make the model again. Raises ConfigError
    naming the file and what does not fit; nothing is written then.
    """
    facts = dict(facts or {})
    unknown = sorted(set(facts) - set(STATEMENTS))
    if unknown:
        raise ConfigError(f"card statements are among {', '.join(STATEMENTS)}, got {', '.join(unknown)}")
    if not sources:
        raise ConfigError("name at least one expert to take from another model")
    try:
        model, card = load_checkpoint(base)
    except ModelError as error:
        raise ConfigError(f"base: {error}") from None
    if not model.cfg.is_moe:
        raise ConfigError(f"base {base}: a dense model has no experts to merge")
    names = [e.name for e in card.experts]
    every_expert = set(range(len(names)))
    start = model.state_dict()
    merged = dict(start)
    record = {}
    unstated: dict[str, list[str]] = {}  # statement -> the sources that say otherwise than the base
    by_model: dict[str, list[str]] = {}  # each source read and checked once, whatever it gives
    for expert, path in sources.items():
        if expert not in names:
            raise ConfigError(f"{path}: expert {expert!r} is not one of the base model's {names}")
        by_model.setdefault(str(path), []).append(expert)
    for path, experts in by_model.items():
        try:
            source, source_card = load_checkpoint(path)
        except ModelError as error:
            raise ConfigError(str(error)) from None
        if source.cfg != model.cfg:
            raise ConfigError(f"{path}: another architecture than the base model {base}")
        state = source.state_dict()
        if set(state) != set(start):
            raise ConfigError(f"{path}: other weight names than the base model {base}")
        moved = [
            key
            for key in start
            if not is_expert_parameter(key, every_expert) and not torch.equal(state[key], start[key])
        ]
        if moved:
            raise ConfigError(
                f"{path}: {len(moved)} weights outside the experts differ from the base model's "
                f"(first {moved[0]}); its experts learnt on other shared layers and do not fit them"
            )
        for key in STATEMENTS:
            if key not in facts and getattr(source_card, key) != getattr(card, key):
                unstated.setdefault(key, []).append(path)
        taken = {names.index(expert) for expert in experts}
        merged.update({key: value for key, value in state.items() if is_expert_parameter(key, taken)})
        run = source_card.provenance
        for expert in experts:
            record[expert] = {
                "model": path,
                "name": source_card.name,
                "weights_sha256": source_card.weights_sha256,
                # What that run learnt from, for the card's summary (m4oe.card_summary).
                "run": {
                    "command": run.get("command"),
                    "data": run.get("data") or {},
                    "config": {
                        key: run["config"][key]
                        for key in ("iterations_per_epoch", "batch_size", "stages")
                        if key in (run.get("config") or {})
                    },
                    "training_seconds": run.get("training_seconds"),
                },
            }
    if unstated:
        key, paths = next(iter(unstated.items()))
        raise ConfigError(
            f"{paths[0]}: its card's {key} is not the base model's; state the merged model's "
            + ", ".join(f"--{k.replace('_', '-')}" for k in unstated)
            + " (its experts learnt from what their own cards say)"
        )
    model.load_state_dict(merged)
    provenance = dict(
        card.provenance,
        merged_experts={
            "command": shlex.join(command or ["m4oe", "merge-experts", "(called from Python)"]),
            "base": str(base),
            "base_weights_sha256": card.weights_sha256,
            **record,
        },
    )
    card = dataclasses.replace(card, name=name or card.name, provenance=provenance, metrics={}, **facts)
    return save_checkpoint(model, card, out, overwrite=overwrite, dtype=dtype)
