"""``mome_partial.py continue``: configs that train a prepared folder's models further.

A schedule longer than one sitting runs as a chain: each link starts from the previous link's
exported model (``init``) on the same data sets. :func:`continue_runs` writes one link's configs,
with the settings the source run was given on the command line (``m4oe train --set``, top-level keys
and a data set's own, ``datasets.N.KEY``), which its config file does not hold, read back from its
model card (:func:`given_settings`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import tomllib

# Top-level keys a continuation sets itself, or that say how the source run was launched rather than
# what it trained (threads, device, loader processes): never carried over from the source run's card.
NOT_CARRIED = frozenset(
    {
        "name",
        "model",
        "model_overrides",
        "init",
        "imagenet",
        "expert_order",
        "output_dir",
        "seed",
        "val_every",
        "datasets",
        "stages",
        "threads",
        "device",
        "loader_workers",
    }
)


def given_settings(config_path: Path, card_path: Path) -> tuple[dict[str, str], list[str]]:
    """The top-level settings a run trained with that its config file does not give: what its model
    card (``provenance.config``, the resolved config) holds where it differs from the file's
    (``m4oe train --set``; with ``init``, also what the init model handed down, the same values the
    continuation inherits again). Keys of :data:`NOT_CARRIED` are left out.

    A data set's own keys (``--set datasets.N.KEY``, e.g. a sampling ``weight``) are returned as
    ``datasets.N.KEY``, N the data set's index in the config; its ``path`` is never carried.

    Returns ``({key: TOML value}, notes)``: the notes name what cannot be carried (a value without a
    TOML form).
    """
    from m4oe_training.config import load_config, toml_value

    # Through JSON, as the card was written, so that a tuple and the list it became compare equal.
    written = json.loads(json.dumps(load_config(config_path)[0].to_dict()))
    used = json.loads(card_path.read_text()).get("provenance", {}).get("config", {})
    settings, notes = {}, []
    for key, value in used.items():
        if key in NOT_CARRIED or key not in written or value == written[key]:
            continue
        try:
            settings[key] = toml_value(value)
        except TypeError:
            notes.append(f"{key} = {value!r} (no TOML form)")
    for i, (file_d, used_d) in enumerate(zip(written["datasets"], used.get("datasets", []), strict=False)):
        for key, value in used_d.items():
            if key != "path" and key in file_d and value != file_d[key]:
                try:
                    settings[f"datasets.{i}.{key}"] = toml_value(value)
                except TypeError:
                    notes.append(f"datasets.{i}.{key} = {value!r} (no TOML form)")
    return settings, notes


def with_keys(table: str, keys: dict[str, str]) -> str:
    """A ``[[datasets]]`` TOML table (its text) with each of ``keys`` (key: TOML value) set: the
    key's line replaced where the table has one, added at its end where not."""
    lines = table.strip().splitlines()
    for key, value in keys.items():
        at = [n for n, line in enumerate(lines) if line.split("=", 1)[0].strip() == key]
        if at:
            lines[at[0]] = f"{key} = {value}"
        else:
            lines.append(f"{key} = {value}")
    return "\n".join(lines)


def continue_runs(
    source: Path,
    folder: Path,
    runs: Iterable[str],
    epochs: int,
    lr: float,
    warmup: int,
    seed: int,
    val_every: int,
) -> dict[str, tuple[dict[str, str], list[str]]]:
    """Write, in ``folder``, one config per run of ``runs`` whose ``source`` folder holds its trained
    model: that model trained further (``init``) on the same data sets, in one ``joint`` stage.

    ``source``: a folder ``mome_partial.py prepare`` (or this function) wrote, with
    ``runs/{run}/model``. Each new config is the source config with ``model`` (and
    ``model_overrides``: the network comes with ``init``) replaced by ``init =
    source/runs/{run}/model``, its data set paths pointing at ``source``'s data, ``output_dir`` under
    ``folder/runs``, the ``seed`` and ``val_every`` given, and its stages replaced by one ``joint``
    stage of ``epochs`` at peak rate ``lr`` after ``warmup`` steps. The top-level settings the source
    run was given with ``--set`` (read from its model card, :func:`given_settings`) are written into
    the new config too, so a chain keeps e.g. ``foreground_sampling`` or ``ema_decay``, and so are a
    data set's own (``datasets.N.weight``), into that data set's table. ``evaluate folder`` then scores
    the continued models. Returns ``{run: (settings carried over, notes)}`` for the runs written;
    refuses, before writing, a ``source`` without a trained run and a ``folder`` equal to ``source``.
    """
    if folder.resolve() == source.resolve():
        raise ValueError(f"{folder}: continue into another folder than the source")
    runs = [run for run in runs if (source / "runs" / run / "model" / "model.json").is_file()]
    runs = [run for run in runs if (source / f"{run}.toml").is_file()]
    if not runs:
        raise ValueError(f"{source}: no run with a trained model and its config (runs/RUN/model, RUN.toml)")
    if epochs < 1 or warmup < 0 or not 0 < lr < 1 or val_every < 1:
        raise ValueError(
            "epochs >= 1, warmup >= 0, 0 < lr < 1 and val_every >= 1; "
            f"got {epochs}, {warmup}, {lr}, {val_every}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for run in runs:
        carried = given_settings(source / f"{run}.toml", source / "runs" / run / "model" / "model.json")
        text = (source / f"{run}.toml").read_text()
        head, _, _ = text.partition("\n[[stages]]")
        top, _, tables = head.partition("\n[[datasets]]")
        init = (source / "runs" / run / "model").resolve()
        own = {key: value for key, value in carried[0].items() if key.startswith("datasets.")}
        values = {
            **{key: value for key, value in carried[0].items() if key not in own},
            "init": f'"{init}"',
            "output_dir": f'"{(folder / "runs").resolve()}/{{name}}"',
            "seed": str(seed),
            "val_every": str(val_every),
        }
        lines = []
        for line in top.splitlines():
            key = line.split("=", 1)[0].strip()
            if key == "model":
                continue
            lines.append(f"{key} = {values.pop(key)}" if key in values else line)
        lines += [f"{key} = {value}" for key, value in values.items()]

        def moved(match: re.Match) -> str:
            target = (source / match.group(1)).resolve()
            return f'path = "{Path(os.path.relpath(target, folder.resolve())).as_posix()}"'

        tables = re.sub(r'^path = "([^"]+)"', moved, "[[datasets]]" + tables, flags=re.M)
        tables = "\n\n".join(
            with_keys(table, {k.split(".", 2)[2]: v for k, v in own.items() if k.split(".")[1] == str(i)})
            for i, table in enumerate(re.split(r"\n\s*(?=\[\[datasets\]\])", tables.strip()))
        )
        stage = ["[[stages]]", 'kind = "joint"', f"epochs = {epochs}", f"lr = {lr}"]
        stage += [f"warmup_iterations = {warmup}"]
        config = "\n".join(lines) + "\n\n" + tables.strip() + "\n\n" + "\n".join(stage) + "\n"
        tomllib.loads(config)  # well-formed before it is written
        (folder / f"{run}.toml").write_text(config)
        written[run] = carried
    return written
