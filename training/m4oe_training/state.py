"""Resumable training state without pickle: safetensors for tensors, JSON for everything else.

A state folder holds ``weights.safetensors`` (the trained module), ``optimizer.safetensors``
(optimiser buffers) and ``state.json`` (position in the recipe, best metric, RNG state, optimiser
hyper-parameters). It is written to a temporary folder and renamed into place, so a crash while
saving leaves the previous state intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_VERSION = 2  # 2: two optimiser parameter groups (gates, rest)


def save_state(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Atomically replace ``folder`` with the current training state."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(weights, str(tmp / "weights.safetensors"))
    tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    record = dict(meta, version=STATE_VERSION, optimizer=opt_meta)
    record["torch_rng"] = torch.get_rng_state().tolist()
    (tmp / "state.json").write_text(json.dumps(record, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)


def load_state(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore module and optimiser from :func:`save_state` output; returns the metadata."""
    folder = Path(folder)
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("version") != STATE_VERSION:
        raise ValueError(f"{folder}: training state version {meta.get('version')}, expected {STATE_VERSION}")
    module.load_state_dict(load_file(str(folder / "weights.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    saved = _unflatten_optimizer(tensors, meta["optimizer"])
    # JSON has no tuples: give hyper-parameters back the type the optimiser uses (AdamW's betas).
    for group, current in zip(saved["param_groups"], optimizer.param_groups, strict=False):
        for key, value in group.items():
            if isinstance(value, list) and isinstance(current.get(key), tuple):
                group[key] = tuple(value)
    optimizer.load_state_dict(saved)
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    return meta


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for param_id, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{param_id}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
