"""``mome_partial.py continue``: configs that train a prepared folder's models further.

A schedule longer than one sitting runs as a chain: each link starts from the previous link's
exported model (``init``) on the same data sets. :func:`continue_runs` writes one link's configs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import tomllib


def continue_runs(
    source: Path,
    folder: Path,
    runs: Iterable[str],
    epochs: int,
    lr: float,
    warmup: int,
    seed: int,
    val_every: int,
) -> list[str]:
    """Write, in ``folder``, one config per run of ``runs`` whose ``source`` folder holds its trained
    model: that model trained further (``init``) on the same data sets, in one ``joint`` stage.

    ``source``: a folder ``mome_partial.py prepare`` (or this function) wrote, with
    ``runs/{run}/model``. Each new config is the source config with ``model`` (and
    ``model_overrides``: the network comes with ``init``) replaced by ``init =
    source/runs/{run}/model``, its data set paths pointing at ``source``'s data, ``output_dir`` under
    ``folder/runs``, the ``seed`` and ``val_every`` given, and its stages replaced by one ``joint``
    stage of ``epochs`` at peak rate ``lr`` after ``warmup`` steps. Overrides the source run was
    given with ``--set`` are not in its config: give them again. ``evaluate folder`` then scores the
    continued models. Returns the runs written; refuses, before writing, a ``source`` without a
    trained run and a ``folder`` equal to ``source``.
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
    for run in runs:
        text = (source / f"{run}.toml").read_text()
        head, _, _ = text.partition("\n[[stages]]")
        top, _, tables = head.partition("\n[[datasets]]")
        init = (source / "runs" / run / "model").resolve()
        values = {
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
        stage = ["[[stages]]", 'kind = "joint"', f"epochs = {epochs}", f"lr = {lr}"]
        stage += [f"warmup_iterations = {warmup}"]
        config = "\n".join(lines) + "\n\n" + tables.strip() + "\n\n" + "\n".join(stage) + "\n"
        tomllib.loads(config)  # well-formed before it is written
        (folder / f"{run}.toml").write_text(config)
    return runs
