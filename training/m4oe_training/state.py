"""Resumable training state without pickle: safetensors for tensors, JSON for everything else.

A state folder holds ``weights.safetensors`` (the trained module), ``optimizer.safetensors``
(optimiser buffers), ``ema.safetensors`` (the weights' moving average, when the run keeps one) and
``state.json`` (position in the recipe, best metric, RNG state, optimiser
hyper-parameters). It is written to a temporary folder and renamed into place, so a crash while
saving leaves the previous state intact. A run holds its folder's lock (:func:`folder_lock`) so
that a second run cannot write the same state at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from m4oe.errors import OutputError

if os.name == "nt":
    import msvcrt
else:
    import fcntl

LOCK_NAME = "train.lock"
LOCK_OFFSET = 1 << 20  # Windows locks a byte range and refuses reads in it: lock one far past the pid

STATE_VERSION = 3  # 3: three optimiser parameter groups (gates, rest, shared); 2: two (gates, rest)
READABLE_VERSIONS = (2, 3)


def save_state(
    folder: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict,
    ema: torch.nn.Module | None = None,
) -> None:
    """Atomically replace ``folder`` with the current training state (``ema``: the network holding
    the weights' moving average, if the run keeps one)."""
    folder = Path(folder)
    recover_state(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _save_tensors(module, tmp / "weights.safetensors")
    if ema is not None:
        _save_tensors(ema, tmp / "ema.safetensors")
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


def _save_tensors(module: torch.nn.Module, path: Path) -> None:
    """A module's state dict as safetensors (on the CPU, contiguous)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def recover_state(folder: Path) -> None:
    """Finish a :func:`save_state` that a kill interrupted between or after its renames.

    Between them the previous state is at ``folder.old`` and the new one, already complete, at
    ``folder.tmp``, with no ``folder``: the new one is put in place. After them a ``folder.old`` may
    be left over, which would stop the next save's rename: it is removed. A kill while ``.tmp`` is
    written leaves ``folder`` as it was (the next save replaces the partial ``.tmp``).
    """
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    if not old.exists():
        return
    if not folder.exists() and tmp.exists():
        os.replace(tmp, folder)
    if folder.exists():
        shutil.rmtree(old)


def load_state(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore module and optimiser from :func:`save_state` output; returns the metadata."""
    folder = Path(folder)
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{folder}: training state version {meta.get('version')}, expected one of {READABLE_VERSIONS}"
        )
    module.load_state_dict(load_file(str(folder / "weights.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    saved = _unflatten_optimizer(tensors, meta["optimizer"])
    if meta["version"] == 2:
        saved = _split_rest_group(saved, module, optimizer)
    # JSON has no tuples: give hyper-parameters back the type the optimiser uses (AdamW's betas).
    for group, current in zip(saved["param_groups"], optimizer.param_groups, strict=False):
        for key, value in group.items():
            if isinstance(value, list) and isinstance(current.get(key), tuple):
                group[key] = tuple(value)
    optimizer.load_state_dict(saved)
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    return meta


def load_ema(folder: Path, ema: torch.nn.Module) -> bool:
    """Load the moving average a :func:`save_state` folder holds into ``ema``; False (``ema`` left
    as it is) when the state has none, e.g. a run that kept no average before it was resumed."""
    path = Path(folder) / "ema.safetensors"
    if not path.exists():
        return False
    ema.load_state_dict(load_file(str(path)))
    return True


def _split_rest_group(saved: dict, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A version-2 optimiser state (groups "gates", "rest") in the layout of ``optimizer``'s groups
    ("gates", "rest", "shared"), whose "rest" and "shared" together are the old "rest".

    Parameter ids are positions in the groups' concatenated order; the old "rest" held every
    non-gate parameter in the module's order, so the old id of each parameter follows from it.
    """
    groups = optimizer.param_groups
    if [g["name"] for g in saved["param_groups"]] != ["gates", "rest"] or len(groups) != 3:
        raise ValueError("a version-2 training state must have the optimiser groups gates and rest")
    gates = {id(p) for p in groups[0]["params"]}
    old_order = list(groups[0]["params"]) + [p for p in module.parameters() if id(p) not in gates]
    new_id = {id(p): i for i, p in enumerate(p for g in groups for p in g["params"])}
    state = {new_id[id(old_order[i])]: entries for i, entries in saved["state"].items()}
    old_gates, old_rest = saved["param_groups"]
    param_groups, start = [], 0
    for group, hyper in zip(groups, (old_gates, old_rest, old_rest), strict=True):
        ids = list(range(start, start + len(group["params"])))
        param_groups.append(dict(hyper, params=ids, name=group["name"]))
        start += len(ids)
    return {"state": state, "param_groups": param_groups}


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


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold the run folder's lock (``folder/train.lock``, made with the folder if absent) while the
    block runs; a second run into the same folder meanwhile raises an OutputError
    "<folder>: folder in use by another training run (pid N)".

    The lock belongs to the open file (``flock``; a byte-range lock on Windows), so the operating
    system releases it when the process ends in any way: a killed run leaves no stale lock. The
    file holds the pid of the process holding it and stays in place, since removing it would let a
    run that opened the old file and a run that makes a new one hold two different locks.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_NAME, "a+")  # closed by the with block below
    except OSError as error:
        raise OutputError(f"cannot hold the run's lock file {LOCK_NAME} ({error.strerror})", folder) from None
    with handle:
        try:
            if os.name == "nt":
                handle.seek(LOCK_OFFSET)
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            pid = handle.read().strip() or "unknown"
            raise OutputError(f"folder in use by another training run (pid {pid})", folder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
