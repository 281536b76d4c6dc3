"""Helpers of the training tests (``test_training.py``, ``test_fine_tuning.py`` and others):
config files written from dicts, small phantom data sets, a tiny stage loss, render settings without
deformation. Importable by name,
as ``tiny_models`` is (tests must not import from ``conftest``)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save

from m4oe.phantom import write_dataset
from m4oe_training.config import toml_value
from m4oe_training.synth import SynthSettings
from m4oe_training.train import StageLoss

UNDEFORMED = SynthSettings(
    max_rotation_deg=0.0, scale=(1.0, 1.0), max_shear=0.0, max_shift=0.0, p_elastic=0.0
)
"""Label-map render settings without deformation: each structure stays where its anatomy draws it
(``dataclasses.replace`` it to switch off more)."""


def training_phantoms(root: Path) -> dict[str, Path]:
    """Small phantom data sets: CT with 3 cases, T1 with 2 (one held out for validation each)."""
    return {
        "ct": write_dataset(root / "ct", "ct", 3, seed=0, max_size=48),
        "t1": write_dataset(root / "t1", "t1", 2, seed=0, max_size=48),
    }


def write_config(path: Path, datasets: list[dict], stages: list[dict], **top) -> Path:
    """Write a TrainConfig TOML file: top-level keys, then ``[[datasets]]`` and ``[[stages]]`` tables."""
    top = {"name": "run", "model": "m4oe-tiny", "threads": 1, **top}
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for table, rows in (("datasets", datasets), ("stages", stages)):
        for row in rows:
            lines += ["", f"[[{table}]]", *(f"{k} = {toml_value(v)}" for k, v in row.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def dataset(path, expert: str, val_cases: int = 1, task: str = "abdomen") -> dict:
    return {"path": str(path), "expert": expert, "task": task, "val_cases": val_cases}


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})).hexdigest()


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed JSON: tensor names, dtypes, shapes, offsets, metadata) and data."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def tiny_stage_loss(seed: int) -> StageLoss:
    from m4oe.model import build_model

    torch.manual_seed(seed)
    model = build_model("m4oe-tiny", experts=("ct", "mr"), tasks=(("abdomen", 3),))
    return StageLoss(model, [0, 1], ["abdomen", "abdomen"], ce=0.4, dice=0.7)


def train_steps(module: StageLoss, optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # drop-path draws from the global generator
    for _ in range(steps):
        images = torch.randn(2, 1, 64, 64, generator=gen)
        labels = torch.randint(0, 3, (2, 64, 64), generator=gen)
        loss, _ = module("joint", images, labels, torch.tensor([0, 1]), load_balance=0.01)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
