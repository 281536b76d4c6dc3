"""The training subpackage: config validation, resumable state, and whole runs on phantoms and real data.

Runs are tiny (the 64-pixel ``m4oe-tiny`` model, phantoms of at most 48 pixels a side, a few
iterations per epoch) but go through the real loop, the real engine export and, for DDP, two real
``torchrun`` processes on the gloo backend.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from m4oe.checkpoint import load_checkpoint, read_model_card
from m4oe.cli import main as m4oe_main
from m4oe.model import build_model
from m4oe.phantom import PHANTOM_LABELS, write_dataset
from m4oe.terminology import standard_label
from m4oe_training.config import ConfigError, DatasetConfig, StageConfig, TrainConfig, load_config
from m4oe_training.state import load_state, save_state
from m4oe_training.train import StageLoss, portable_config, portable_path, run

ROOT = Path(__file__).resolve().parents[1]
STAGES_3 = [
    {"kind": "mim", "epochs": 1, "lr": 1e-3},
    {"kind": "experts", "epochs": 1, "lr": 1e-3},
    {"kind": "joint", "epochs": 1, "lr": 5e-4, "load_balance_weight": 0.01},
]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


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


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    """Small phantom data sets: CT with 3 cases, T1 with 2 (one held out for validation each)."""
    root = tmp_path_factory.mktemp("phantoms")
    return {
        "ct": write_dataset(root / "ct", "ct", 3, seed=0, max_size=48),
        "t1": write_dataset(root / "t1", "t1", 2, seed=0, max_size=48),
    }


# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.fixture
def config_file(tmp_path) -> Path:
    return write_config(
        tmp_path / "cfg.toml",
        [dataset("/data/ct", "ct"), dataset("/data/t1", "mr", val_cases=2)],
        [{"kind": "experts", "epochs": 2, "lr": 1}, {"kind": "joint", "epochs": 1, "lr": 5e-4}],
        batch_size=4,
        optimizer="adamw",
        largest_component=["liver"],
        target_spacing_mm=[1.5, 1.5],
    )


def test_config_loads_a_valid_file(config_file):
    cfg, raw = load_config(config_file)
    assert isinstance(cfg, TrainConfig)
    assert cfg.batch_size == 4 and cfg.optimizer == "adamw" and cfg.model == "m4oe-tiny"
    assert cfg.datasets == (
        DatasetConfig("/data/ct", "ct", "abdomen", 1),
        DatasetConfig("/data/t1", "mr", "abdomen", 2),
    )
    assert cfg.stages[0] == StageConfig("experts", 2, 1.0)
    assert isinstance(cfg.stages[0].lr, float)  # an integer in TOML is accepted where a float is expected
    assert cfg.largest_component == ("liver",) and cfg.target_spacing_mm == (1.5, 1.5)
    assert cfg.experts == ("ct", "mr") and cfg.task_names == ("abdomen",)
    assert cfg.iterations_per_epoch == 250  # an absent key takes its documented default
    assert raw["batch_size"] == 4


@pytest.mark.parametrize(
    ("where", "key"),
    [("top", "batchsize"), ("datasets", "pth"), ("stages", "epoch")],
)
def test_config_unknown_key_is_an_error_naming_it(tmp_path, where, key):
    datasets = [dataset("/data/ct", "ct")]
    stages = [{"kind": "experts", "epochs": 1, "lr": 0.01}, {"kind": "joint", "epochs": 1, "lr": 0.01}]
    top = {}
    if where == "top":
        top[key] = 4
        expected = key
    elif where == "datasets":
        datasets[0][key] = "/data/ct"
        expected = f"datasets[0].{key}"
    else:
        stages[1][key] = 3
        expected = f"stages[1].{key}"
    path = write_config(tmp_path / "cfg.toml", datasets, stages, **top)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown key {expected};")):
        load_config(path)


@pytest.mark.parametrize(
    ("top", "stage", "named"),
    [
        ({"batch_size": "8"}, {}, "batch_size"),
        ({}, {"lr": True}, r"stages\[0\].lr"),
        ({"augment": 1}, {}, "augment"),
        ({"elastic_probability": 1.5}, {}, "elastic_probability"),
        ({"grad_clip_norm": -1.0}, {}, "grad_clip_norm"),
        ({"init": 3}, {}, "init"),
        ({"largest_component": "liver"}, {}, "largest_component"),
        ({"through_plane_sigma_mm": -0.5}, {}, "through_plane_sigma_mm"),
        ({"through_plane_sigma_mm": "3"}, {}, "through_plane_sigma_mm"),
        ({"test_time_passes": 0}, {}, "test_time_passes"),
        ({"test_time_passes": 6}, {}, "test_time_passes"),
        ({"test_time_passes": 2.0}, {}, "test_time_passes"),
        ({"target_spacing_mm": [1.0, 1.0, 1.0]}, {}, "target_spacing_mm"),
        ({"batch_size": 0}, {}, "batch_size"),
        ({"exclusion_weight": -0.5}, {}, "exclusion_weight"),
        ({"exclusion_weight": "1"}, {}, "exclusion_weight"),
        ({}, {"kind": "finetune"}, r"stages\[0\].kind"),
        ({}, {"mask_ratio": 1.0}, r"stages\[0\].mask_ratio"),
        ({}, {"trainable": "shared"}, r"stages\[0\].trainable must be one of"),
        ({}, {"trainable": "experts"}, r"stages\[0\]: trainable = 'experts' needs kind 'joint'"),
        ({}, {"trainable": "gates"}, r"stages\[0\]: trainable = 'gates' needs kind 'joint'"),
        ({}, {"trainable": "context"}, r"stages\[0\]: trainable = 'context' needs kind 'joint'"),
        ({}, {"warmup_iterations": -1}, r"stages\[0\].warmup_iterations"),
        ({}, {"gate_lr_scale": 0.0}, r"stages\[0\].gate_lr_scale"),
        ({}, {"warmup_iterations": 2.5}, r"stages\[0\].warmup_iterations"),
    ],
)
def test_config_wrong_type_or_value_is_an_error_naming_the_key(tmp_path, top, stage, named):
    stages = [{"kind": "experts", "epochs": 1, "lr": 0.01, **stage}]
    path = write_config(tmp_path / "cfg.toml", [dataset("/data/ct", "ct")], stages, **top)
    with pytest.raises(ConfigError, match=named):
        load_config(path)


@pytest.mark.parametrize("weight", [0, -1.0, "2", "inf"])
def test_dataset_weight_must_be_a_positive_finite_number(tmp_path, weight):
    weight = float(weight) if weight == "inf" else weight
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset("/data/ct", "ct"), {**dataset("/data/mr", "mr"), "weight": weight}],
        [{"kind": "experts", "epochs": 1, "lr": 0.01}],
    )
    with pytest.raises(ConfigError, match=r"weight"):
        load_config(path)


@pytest.mark.parametrize("path", sorted((ROOT / "training" / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_committed_configs_load(path):
    """Every config shipped in training/configs passes the strict reader (keys, types, values)."""
    cfg, _ = load_config(path)
    assert cfg.stages and cfg.datasets


def test_config_missing_required_key(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text('name = "x"\n[[stages]]\nkind = "experts"\nepochs = 1\nlr = 0.1\n')
    with pytest.raises(ConfigError, match="missing key datasets"):
        load_config(path)


def test_config_overrides_are_applied_and_type_checked(config_file):
    cfg, _ = load_config(
        config_file, ["batch_size=2", "stages.0.epochs=3", "optimizer=sgd", "datasets.1.val_cases=1"]
    )
    assert cfg.batch_size == 2 and cfg.optimizer == "sgd"  # a bare string is read as a string
    assert cfg.stages[0].epochs == 3 and cfg.stages[1].epochs == 1
    assert cfg.datasets[1].val_cases == 1
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(config_file, ["batch_size=two"])
    with pytest.raises(ConfigError, match=r"stages\[0\].epochs"):
        load_config(config_file, ["stages.0.epochs=1.5"])
    with pytest.raises(ConfigError, match="unknown key nosuchkey"):
        load_config(config_file, ["nosuchkey=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(config_file, ["batch_size"])


@pytest.mark.parametrize("override", ["stages.5.epochs=1", "batch_size.x=1", "stages.lr=0.1"])
def test_config_override_of_a_missing_place_is_a_config_error(config_file, override):
    """Not an IndexError or AttributeError: the CLI turns a ConfigError into a one-line message."""
    with pytest.raises(ConfigError, match=re.escape(f"override {override.split('=')[0]}:")):
        load_config(config_file, [override])


@pytest.mark.parametrize("override", ["batch_size=two", "stages.9.lr=1"])
def test_train_command_reports_a_config_error_in_one_line(config_file, override, capsys):
    code = m4oe_main(["train", str(config_file), "--set", override])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"m4oe: error: {config_file}: ") and err.count("\n") == 1
    assert override.split("=")[0].split(".")[0] in err


def test_config_relative_dataset_paths_are_resolved_against_the_config_folder(tmp_path, monkeypatch):
    path = write_config(
        tmp_path / "configs" / "cfg.toml",
        [dataset("../data/ct", "ct"), dataset("t1", "mr"), dataset(tmp_path / "abs", "mr")],
        [{"kind": "experts", "epochs": 1, "lr": 0.01}],
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg, _ = load_config(Path("..") / "configs" / "cfg.toml")
    assert [d.path for d in cfg.datasets] == [
        str((tmp_path / "data" / "ct").resolve()),
        str((tmp_path / "configs" / "t1").resolve()),
        str(tmp_path / "abs"),
    ]
    assert Path(cfg.datasets[0].path).is_absolute()
    assert path.exists()


def test_config_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


# ---------------------------------------------------------------------------------------------
# Resumable state


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


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_state_round_trip_restores_weights_and_optimizer_buffers(tmp_path, monkeypatch, kind):
    def make(module):
        if kind == "sgd":
            return torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        return torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=1e-4)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must not be used for training state")

    monkeypatch.setattr(torch, "load", refuse)
    module = tiny_stage_loss(seed=0)
    optimizer = make(module)
    train_steps(module, optimizer, steps=2, seed=1)
    torch.manual_seed(1234)
    save_state(tmp_path / "state", module, optimizer, {"stage": 1, "epoch": 2, "best": {"0": 0.5}})
    expected_rng = torch.get_rng_state()
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "optimizer.safetensors",
        "state.json",
        "weights.safetensors",
    ]
    assert not (tmp_path / "state.tmp").exists() and not (tmp_path / "state.old").exists()

    restored = tiny_stage_loss(seed=7)
    restored_opt = make(restored)
    assert not torch.equal(restored.model.heads["abdomen"].weight, module.model.heads["abdomen"].weight)
    torch.manual_seed(99)
    meta = load_state(tmp_path / "state", restored, restored_opt)
    assert meta["stage"] == 1 and meta["epoch"] == 2 and meta["best"] == {"0": 0.5}
    assert torch.equal(torch.get_rng_state(), expected_rng)

    for (name, a), (_, b) in zip(module.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    original_state = optimizer.state_dict()
    loaded_state = restored_opt.state_dict()
    assert original_state["param_groups"] == loaded_state["param_groups"]
    buffers = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq", "step")}[kind]
    assert set(original_state["state"]) == set(loaded_state["state"]) and original_state["state"]
    for pid, entries in original_state["state"].items():
        for name in buffers:
            assert torch.equal(
                torch.as_tensor(entries[name]), torch.as_tensor(loaded_state["state"][pid][name])
            )

    # Continuing from the restored state gives exactly what continuing the original gives.
    train_steps(module, optimizer, steps=1, seed=2)
    train_steps(restored, restored_opt, steps=1, seed=2)
    assert tensors_sha256(module.state_dict()) == tensors_sha256(restored.state_dict())


def test_state_of_another_version_is_refused(tmp_path):
    module = tiny_stage_loss(seed=0)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    save_state(tmp_path / "state", module, optimizer, {})
    record = json.loads((tmp_path / "state" / "state.json").read_text())
    (tmp_path / "state" / "state.json").write_text(json.dumps(dict(record, version=99)))
    with pytest.raises(ValueError, match="version 99"):
        load_state(tmp_path / "state", module, optimizer)


# ---------------------------------------------------------------------------------------------
# Whole runs on phantoms


def test_card_paths_are_relative_to_the_working_directory_when_under_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "ct").mkdir(parents=True)
    assert portable_path(tmp_path / "data" / "ct") == "data/ct"
    assert portable_path(str(tmp_path / "runs" / ".." / "data")) == "data"
    elsewhere = tmp_path.parent / "other" / "ct"
    assert portable_path(elsewhere) == str(elsewhere)
    config = {
        "datasets": [{"path": str(tmp_path / "data" / "ct"), "expert": "ct"}, {"path": str(elsewhere)}],
        "init": str(tmp_path / "runs" / "a" / "model"),
        "seed": 3,
    }
    portable = portable_config(config)
    assert portable == {
        "datasets": [{"path": "data/ct", "expert": "ct"}, {"path": str(elsewhere)}],
        "init": "runs/a/model",
        "seed": 3,
    }
    assert config["datasets"][0]["path"] == str(tmp_path / "data" / "ct")  # the input is left alone


@pytest.mark.slow
def test_end_to_end_run_exports_a_model_the_engine_uses(phantoms, tmp_path):
    """``m4oe train`` through all three stages, then ``m4oe segment`` with the exported model."""
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(phantoms["ct"], "ct"), dataset(phantoms["t1"], "mr")],
        STAGES_3,
        name="e2e",
        batch_size=2,
        iterations_per_epoch=3,
        optimizer="adamw",
        largest_component=["liver"],
        through_plane_sigma_mm=2.0,
        test_time_passes=2,
    )
    argv = ["train", path.name, "--set", "iterations_per_epoch=2", "--set", "stages.1.epochs=1"]
    result = subprocess.run(
        [sys.executable, "-m", "m4oe.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs" / "e2e"
    assert f"exported model: {out / 'model'}" in result.stdout
    for kind in ("mim", "experts", "joint"):  # progress is logged, one line per epoch
        assert f"({kind}) epoch 1/1" in result.stderr

    model, card = load_checkpoint(out / "model")
    assert [(e.name, e.modality) for e in card.experts] == [("ct", "ct"), ("mr", "mr")]
    assert model.cfg.experts == ("ct", "mr") and model.cfg.img_size == 64
    task = card.task("abdomen")
    assert model.cfg.num_classes("abdomen") == len(PHANTOM_LABELS) + 1
    assert [lab.value for lab in task.labels] == list(PHANTOM_LABELS.values())
    for label, key in zip(task.labels, PHANTOM_LABELS, strict=True):
        term = standard_label(key, label.value)
        assert (label.name, label.color) == (term.name, term.color)
        assert (label.category, label.type, label.modifier) == (term.category, term.type, term.modifier)
    assert task.largest_component == [PHANTOM_LABELS["liver"]]
    assert task.through_plane_sigma_mm == 2.0  # validation and the engine both smooth with it
    assert task.test_time_passes == 2  # and both average 2 passes
    assert card.task("abdomen").label(3).name == "right kidney"

    provenance = card.provenance
    assert provenance["command"] == "m4oe " + " ".join(argv)
    assert provenance["config"]["iterations_per_epoch"] == 2  # the override, not the file's 3
    assert [s["kind"] for s in provenance["config"]["stages"]] == ["mim", "experts", "joint"]
    assert provenance["world_size"] == 1
    assert provenance["data"]["ct"]["train_cases"] == ["phantomct_000", "phantomct_001"]
    # The data lie outside the working directory (tmp_path): their paths stay absolute.
    assert provenance["data"]["ct"]["path"] == str(phantoms["ct"].resolve())
    assert card.preprocessing.intensity["ct"] != card.preprocessing.intensity["mr"]
    validation = card.metrics["validation"]
    assert set(validation) == {"0:ct", "1:t1"}
    for entry in validation.values():
        assert entry["cases"] == 1
        assert set(entry["dice"]) == set(PHANTOM_LABELS)
        assert all(0.0 <= d <= 1.0 for d in entry["dice"].values())
        assert abs(sum(entry["gate_mean_weights"].values()) - 1.0) < 1e-3
    assert card.metrics["selected"]["stage"] == 2

    log = read_log(out)
    assert [(r["stage"], r["kind"], r["epoch"]) for r in log] == [
        ("0", "mim", "1"),
        ("1", "experts", "1"),
        ("2", "joint", "1"),
    ]
    assert [int(r["step"]) for r in log] == [2, 4, 6]
    assert log[0]["mim"] and not log[0]["val_mean_dice"]
    assert all(r["seg"] and r["val_mean_dice"] for r in log[1:]) and log[2]["balance"]

    volume = phantoms["t1"] / "imagesTr" / "phantomt1_001_0000.nii.gz"
    seg = tmp_path / "seg.nii.gz"
    code = m4oe_main(
        ["segment", str(volume), "-o", str(seg), "--model", str(out / "model"), "--progress", "none"]
    )
    assert code == 0
    image, labels = sitk.ReadImage(str(volume)), sitk.ReadImage(str(seg))
    assert labels.GetSize() == image.GetSize() and labels.GetSpacing() == image.GetSpacing()
    assert labels.GetDirection() == image.GetDirection() and labels.GetOrigin() == image.GetOrigin()
    assert set(np.unique(sitk.GetArrayFromImage(labels)).tolist()) <= {0, *PHANTOM_LABELS.values()}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "m4oe-tiny"}, "a mixture needs at least 2 experts"),
        ({"model": "m4oe-tiny", "t1_expert": "ct"}, "expert 'ct' is given both ct and mr datasets"),
        ({"model": "no-such-model"}, "unknown model 'no-such-model'"),
        ({"largest_component": ["liver", "heart"]}, r"largest_component: \['heart'\]"),
    ],
    ids=["one-expert-mixture", "expert-with-two-modalities", "unknown-model", "unknown-organ"],
)
def test_run_refuses_a_bad_setup_before_training(phantoms, tmp_path, change, message):
    """Errors that need the data sets are found when the run starts, not at the first validation."""
    change = dict(change)
    datasets = [dataset(phantoms["ct"], "ct")]
    if "t1_expert" in change:
        datasets.append(dataset(phantoms["t1"], change.pop("t1_expert")))
    top = {"model": "swin-unet-tiny", "output_dir": str(tmp_path / "run"), **change}
    path = write_config(
        tmp_path / "cfg.toml", datasets, [{"kind": "experts", "epochs": 1, "lr": 0.01}], **top
    )
    cfg, _ = load_config(path)
    with pytest.raises(ConfigError, match=message):
        run(cfg, base_dir=tmp_path)
    assert not (tmp_path / "run" / "train_log.csv").exists()


@pytest.mark.slow
def test_segmentation_loss_decreases(phantoms, tmp_path):
    """A dense tiny Swin-UNet on one CT data set (a mixture model needs at least two experts)."""
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(phantoms["ct"], "ct")],
        [{"kind": "experts", "epochs": 4, "lr": 1e-3}],
        model="swin-unet-tiny",
        batch_size=4,
        iterations_per_epoch=8,
        optimizer="adamw",
        augment=False,
        val_every=100,
        output_dir=str(tmp_path / "run"),
    )
    cfg, _ = load_config(path)
    out = run(cfg, base_dir=tmp_path, command=["test"])
    seg = [float(r["seg"]) for r in read_log(out)]
    assert len(seg) == 4
    assert seg[-1] < seg[0] - 0.2, seg


@pytest.mark.parametrize("export_epoch", ["best", "last"])
def test_export_epoch_ships_the_best_or_the_last_validated_epoch(phantoms, tmp_path, export_epoch):
    """With high-rate updates the validation score moves every epoch; "best" ships the highest,
    "last" the final epoch whatever its score."""
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(phantoms["ct"], "ct")],
        [{"kind": "experts", "epochs": 3, "lr": 3e-3}],
        model="swin-unet-tiny",
        batch_size=2,
        iterations_per_epoch=2,
        optimizer="adamw",
        augment=False,
        export_epoch=export_epoch,
        output_dir=str(tmp_path / "run"),
    )
    out = run(load_config(path)[0], base_dir=tmp_path, command=["test"])
    scores = [float(r["val_mean_dice"]) for r in read_log(out)]
    card = read_model_card(out / "model")
    chosen = 3 if export_epoch == "last" else 1 + int(np.argmax(scores))
    assert card.metrics["selected"]["epoch"] == chosen
    assert card.metrics["selected"]["mean_dice"] == pytest.approx(scores[chosen - 1], abs=1e-4)


@pytest.mark.slow
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(phantoms, tmp_path):
    """Interrupt after epoch 2 (mid-stage) and after epoch 3 (a stage boundary), with augmentation on."""

    def config(name: str) -> TrainConfig:
        path = write_config(
            tmp_path / f"{name}.toml",
            [dataset(phantoms["ct"], "ct"), dataset(phantoms["t1"], "mr")],
            [
                {"kind": "mim", "epochs": 1, "lr": 1e-3},
                {"kind": "experts", "epochs": 2, "lr": 1e-3},
                {"kind": "joint", "epochs": 1, "lr": 5e-4, "load_balance_weight": 0.01},
            ],
            name=name,
            batch_size=2,
            iterations_per_epoch=2,
            optimizer="adamw",
            augment=True,
            output_dir=str(tmp_path / name),
        )
        return load_config(path)[0]

    a = run(config("a"), base_dir=tmp_path, command=["test"])
    cfg_b = config("b")
    b = run(cfg_b, base_dir=tmp_path, stop_after_epochs=2, command=["test"])
    position = json.loads((b / "state" / "state.json").read_text())
    assert len(read_log(b)) == 2 and (position["stage"], position["epoch"]) == (1, 1)
    run(cfg_b, base_dir=tmp_path, resume=True, stop_after_epochs=1, command=["test"])
    assert len(read_log(b)) == 3
    run(cfg_b, base_dir=tmp_path, resume=True, command=["test"])

    seconds = [float(r["seconds"]) for r in read_log(b)]  # the whole run's time, across resumes
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert json.loads((b / "state" / "state.json").read_text())["seconds"] >= seconds[-1]
    losses = ("stage", "kind", "epoch", "step", "lr", "mim", "seg", "balance", "val_mean_dice")
    assert [[r[k] for k in losses] for r in read_log(a)] == [[r[k] for k in losses] for r in read_log(b)]
    for name in ("state/weights.safetensors", "state/optimizer.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert load_file(str(a / "state" / "weights.safetensors")).keys()  # not an empty file
    # The export's header carries metadata, which safetensors 0.8 writes in a random key order
    # (safetensors issue 584); everything else in the file must be the same bytes.
    header_a, data_a = safetensors_parts(a / "model" / "model.safetensors")
    header_b, data_b = safetensors_parts(b / "model" / "model.safetensors")
    assert header_a == header_b and data_a == data_b
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run(config("c"), base_dir=tmp_path, resume=True)


LAUNCHER = '''
"""Run m4oe_training.train.run under torchrun; each rank records its module's weights."""
import hashlib, sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save

from m4oe_training import train
from m4oe_training.config import load_config

modules, exports = [], []


def digest(module):
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return hashlib.sha256(save(tensors)).hexdigest()


class Recording(train.StageLoss):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial = digest(self)
        modules.append(self)


def recording_export(*args, **kwargs):
    exports.append(1)
    return export_model(*args, **kwargs)


export_model = train.export_model
train.StageLoss = Recording
train.export_model = recording_export
cfg, _ = load_config(sys.argv[1])
out = train.run(cfg, base_dir=Path(sys.argv[1]).parent, command=["launcher"])
rank = dist.get_rank()
(module,) = modules
(out / f"rank{rank}.txt").write_text(
    f"{dist.get_world_size()} {module.initial} {digest(module)} {len(exports)}"
)
dist.destroy_process_group()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_weights(phantoms, tmp_path):
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(phantoms["ct"], "ct"), dataset(phantoms["t1"], "mr")],
        [
            {"kind": "mim", "epochs": 1, "lr": 1e-3},
            {"kind": "experts", "epochs": 1, "lr": 1e-2},
            {"kind": "joint", "epochs": 1, "lr": 1e-2, "load_balance_weight": 0.01},
        ],
        name="ddp",
        batch_size=2,
        iterations_per_epoch=2,
        optimizer="sgd",
        augment=True,
        device="cpu",
    )
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(launcher), str(path)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    out = tmp_path / "runs" / "ddp"
    records = [(out / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    (world0, initial0, final0, exports0), (world1, initial1, final1, exports1) = records
    assert world0 == world1 == "2"
    assert initial0 == initial1
    assert final0 == final1, "ranks diverged"
    assert final0 != initial0, "no training happened"
    assert final0 == tensors_sha256(load_file(str(out / "state" / "weights.safetensors")))
    # Only rank 0 validates and exports (once per segmentation stage: each is its stage's best so far).
    assert (int(exports0), int(exports1)) == (2, 0)
    model, card = load_checkpoint(out / "model")
    assert card.provenance["world_size"] == 2
    assert tensors_sha256(model.state_dict()) == tensors_sha256(
        {
            k[len("model.") :]: v
            for k, v in load_file(str(out / "state" / "weights.safetensors")).items()
            if k.startswith("model.")
        }
    )
    assert len(read_log(out)) == 3


# ---------------------------------------------------------------------------------------------
# Real data

CT_LABELS = {5: "liver", 1: "spleen", 2: "kidney_right", 3: "kidney_left", 52: "aorta"}
CT_LABELS |= {63: "inferior_vena_cava", 7: "pancreas", 6: "stomach"}
MR_LABELS = {5: "liver", 1: "spleen", 2: "kidney_right", 3: "kidney_left", 23: "aorta"}
MR_LABELS |= {24: "inferior_vena_cava", 7: "pancreas", 6: "stomach"}
ORGANS = [
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "aorta",
    "inferior_vena_cava",
    "stomach",
    "pancreas",
]


def real_dataset(
    folder: Path, image_path: Path, label_path: Path, table: dict[int, str], channel: str
) -> Path:
    """An nnU-Net dataset of two identical cases, TotalSegmentator labels remapped to ORGANS (rest 0)."""
    image = sitk.ReadImage(str(image_path))
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    values = {"background": 0, **{name: i + 1 for i, name in enumerate(ORGANS)}}
    remapped = np.zeros(source.shape, np.uint8)
    for ts_value, name in table.items():
        remapped[source == ts_value] = values[name]
    labels = sitk.GetImageFromArray(remapped)
    labels.CopyInformation(image)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for case in ("case_000", "case_001"):
        sitk.WriteImage(image, str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(labels, str(folder / "labelsTr" / f"{case}.nii.gz"))
    meta = {"channel_names": {"0": channel}, "labels": values, "file_ending": ".nii.gz", "numTraining": 2}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.slow
@pytest.mark.realdata
def test_real_ct_and_mri_training_smoke(shared_data, tmp_path):
    ct = real_dataset(
        tmp_path / "realct",
        shared_data / "example_ct_sm.nii.gz",
        shared_data / "example_seg.nii.gz",
        CT_LABELS,
        "CT",
    )
    mr = real_dataset(
        tmp_path / "realmr",
        shared_data / "example_mr_sm.nii.gz",
        shared_data / "example_seg_mr.nii.gz",
        MR_LABELS,
        "MRI",
    )
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(ct, "ct"), dataset(mr, "mr")],
        [{"kind": "experts", "epochs": 3, "lr": 1e-3}],
        name="real",
        batch_size=4,
        iterations_per_epoch=6,
        optimizer="adamw",
        augment=False,
        val_every=100,
        output_dir=str(tmp_path / "run"),
    )
    cfg, _ = load_config(path)
    out = run(cfg, base_dir=tmp_path, command=["test"])
    seg = [float(r["seg"]) for r in read_log(out)]
    assert seg[-1] < seg[0] - 0.1, seg
    _, card = load_checkpoint(out / "model")
    assert [lab.name for lab in card.task("abdomen").labels][:3] == ["liver", "spleen", "right kidney"]
    validation = card.metrics["validation"]
    assert {v["modality"] for v in validation.values()} == {"ct", "mr"}
    assert all(set(v["dice"]) == set(ORGANS) for v in validation.values())


def test_routing_loss_teaches_the_gate_each_samples_expert():
    """With routing_weight > 0 the joint stage's loss includes -log p(own expert) per token: it starts
    near log(E) for a fresh gate and a few optimiser steps on it raise each sample's own-expert weight."""
    import torch

    from m4oe.model import build_model
    from m4oe_training.train import StageLoss

    torch.manual_seed(0)
    model = build_model("m4oe-tiny", tasks=(("abdomen", 4),), drop_path_rate=0.0)
    module = StageLoss(model, [0, 1, 2], ["abdomen"] * 3, 0.4, 0.7)
    images = torch.randn(3, 1, 64, 64)
    images[1] += 2.0  # give each "modality" its own intensity so the gate can tell them apart
    images[2] -= 2.0
    labels = torch.randint(0, 4, (3, 64, 64))
    datasets = torch.tensor([0, 1, 2])
    _, stats = module("joint", images, labels, datasets, routing=0.1)
    assert abs(stats["routing"] - torch.log(torch.tensor(3.0)).item()) < 0.1
    _, without = module("joint", images, labels, datasets, routing=0.0)
    assert "routing" not in without

    def own_weight() -> float:
        with torch.no_grad():
            _, gates = model(images, return_gates=True)
        return float(torch.stack([g[torch.arange(3), datasets].mean() for g in gates.values()]).mean())

    before = own_weight()
    gate_params = [
        p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight") or n.endswith("mlp.gate.bias")
    ]
    optimizer = torch.optim.Adam(gate_params, lr=0.05)
    for _ in range(20):
        loss, _ = module("joint", images, labels, datasets, routing=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert own_weight() > before + 0.2


def test_with_a_slice_context_the_routing_loss_also_reads_the_modality_from_the_context():
    """The routing loss of a model with ``gate_context`` has a second part, the cross-entropy of a
    linear read-out of the slice context (``context_probe``) against each sample's expert. It starts
    at log(E) and a few steps on the context alone make the read-out, and through it the gates, tell
    the modalities apart: here two that differ only in how much of the slice is bright."""
    from m4oe.model import build_model
    from m4oe_training.optim import is_context_parameter
    from m4oe_training.train import StageLoss

    torch.manual_seed(0)
    model = build_model("m4oe-tiny", experts=("a", "b"), tasks=(("abdomen", 3),), gate_context="slice")
    module = StageLoss(model, [0, 1], ["abdomen"] * 2, 0.4, 0.7)
    assert StageLoss(build_model("m4oe-tiny"), [0], ["abdomen"], 0.4, 0.7).context_probe is None

    def bands(gen):  # bright band on dark (dataset 0) or dark band on bright (1), 16 of 64 rows
        images = []
        for i in range(8):
            start = int(torch.randint(0, 64, (1,), generator=gen))
            band = (torch.arange(64) - start) % 64 < 16
            image = torch.where(band[:, None], 1.0, -1.0).expand(64, 64) * (1 if i % 2 == 0 else -1)
            images.append(image + 0.3 * torch.randn(64, 64, generator=gen))
        labels = torch.zeros(8, 64, 64, dtype=torch.long)
        return torch.stack(images)[:, None], labels, torch.tensor([0, 1] * 4)

    gen = torch.Generator().manual_seed(0)
    _, stats = module("joint", *bands(gen), routing=1.0)
    assert stats["context"] == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=0.1)
    assert "context" not in module("joint", *bands(gen), routing=0.0)[1]

    params = [p for n, p in module.named_parameters() if is_context_parameter(n)]
    assert any(p is module.context_probe.weight for p in params)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(15):
        loss, stats = module("joint", *bands(gen), routing=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert stats["context"] < 0.2
    images, _, datasets = bands(torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, gates = model(images, return_gates=True)
    own = [float(g[torch.arange(8), datasets].mean()) for g in gates.values()]
    assert min(own) > 0.7, own


def test_stage_learning_rate_warms_up_linearly_then_decays_to_zero():
    from m4oe_training.optim import stage_lr

    stage = StageConfig(kind="experts", epochs=1, lr=1.0, warmup_iterations=4)
    lrs = [stage_lr(stage, step, 100, 1.0) for step in range(100)]
    assert lrs[:4] == pytest.approx([0.25 * 1.0, 0.5 * 0.99, 0.75 * 0.98, 1.0 * 0.97])
    assert lrs[4:] == pytest.approx([1 - step / 100 for step in range(4, 100)])
    plain = StageConfig(kind="experts", epochs=1, lr=0.5)
    assert stage_lr(plain, 0, 10, 0.9) == 0.5 and stage_lr(plain, 5, 10, 0.9) == pytest.approx(0.5 * 0.5**0.9)


@pytest.mark.slow
def test_gate_warm_up_stage_trains_the_gates_only(phantoms, tmp_path):
    """A joint stage with ``trainable = "gates"`` changes every gate and nothing else."""
    from m4oe.model import get_config
    from m4oe_training.optim import is_gate_parameter

    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(phantoms["ct"], "ct"), dataset(phantoms["t1"], "mr")],
        [
            {"kind": "experts", "epochs": 1, "lr": 1e-3},
            {"kind": "joint", "epochs": 1, "lr": 1e-2, "trainable": "gates", "routing_weight": 1.0},
        ],
        batch_size=2,
        iterations_per_epoch=2,
        optimizer="adamw",
        val_every=100,
        output_dir=str(tmp_path / "run"),
    )
    cfg, _ = load_config(path)
    out = run(cfg, base_dir=tmp_path, stop_after_epochs=1, command=["test"])
    before = load_file(out / "state" / "weights.safetensors")
    run(cfg, base_dir=tmp_path, resume=True, command=["test"])
    after = load_file(out / "state" / "weights.safetensors")
    assert before.keys() == after.keys()
    gates = [k for k in before if is_gate_parameter(k)]
    depths = get_config("m4oe-tiny").depths
    # A gate (weight and bias) in every encoder block and every decoder block.
    assert len(gates) == 2 * (sum(depths) + sum(depths[:-1])) == 28
    for key in before:
        if key in gates:
            assert not torch.equal(before[key], after[key]), key
        else:
            assert torch.equal(before[key], after[key]), key
    assert [(r["stage"], r["kind"]) for r in read_log(out)] == [("0", "experts"), ("1", "joint")]


@pytest.mark.slow
def test_experts_stage_trains_only_the_experts_its_datasets_name(phantoms, tmp_path):
    """Fine-tuning a CT/MR model with ``trainable = "experts"`` on MR data only: the exported model's
    MR expert differs from the init model's in every block; the CT expert, the gates, the shared
    layers and the task head are the init model's bit for bit (AdamW leaves them alone, weight decay
    included)."""
    from m4oe.checkpoint import load_checkpoint
    from m4oe_training.optim import is_expert_parameter

    source = save_source_model(tmp_path / "source")
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(phantoms["t1"], "mr", val_cases=0)],
        [{"kind": "joint", "epochs": 2, "lr": 1e-2, "trainable": "experts"}],
        init=str(source),
        batch_size=2,
        iterations_per_epoch=2,
        optimizer="adamw",
        weight_decay=0.1,
        output_dir=str(tmp_path / "run"),
    )
    cfg, _ = load_config(path)
    out = run(cfg, base_dir=tmp_path, command=["test"])
    before, _ = load_checkpoint(source)
    after, card = load_checkpoint(out / "model")
    assert card.experts[0].name == "ct" and card.experts[1].name == "mr"
    before, after = before.state_dict(), after.state_dict()
    assert before.keys() == after.keys()
    mr = [k for k in before if is_expert_parameter(k, {1})]
    ct = [k for k in before if is_expert_parameter(k, {0})]
    assert len(mr) == len(ct) > 0
    for key in before:
        if key in mr:
            assert not torch.equal(before[key], after[key]), key
        else:
            assert torch.equal(before[key], after[key]), key


def test_experts_stage_on_a_dense_model_is_refused(phantoms, tmp_path):
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(phantoms["ct"], "ct")],
        [{"kind": "joint", "epochs": 1, "lr": 1e-2, "trainable": "experts"}],
        model="swin-unet-tiny",
        output_dir=str(tmp_path / "run"),
    )
    cfg, _ = load_config(path)
    with pytest.raises(ConfigError, match="trainable = 'experts' needs a mixture-of-experts model"):
        run(cfg, base_dir=tmp_path, command=["test"])
    assert not (tmp_path / "run" / "model").exists()


def test_expert_parameter_names():
    from m4oe_training.optim import is_expert_parameter

    assert is_expert_parameter("layers.0.blocks.1.mlp.experts.2.fc1.weight", {2})
    assert is_expert_parameter("model.layers_up.1.blocks.0.mlp.experts.0.fc2.bias", {0, 2})
    assert not is_expert_parameter("layers.0.blocks.1.mlp.experts.2.fc1.weight", {0, 1})
    assert not is_expert_parameter("layers.0.blocks.1.mlp.experts.12.fc1.weight", {1})
    assert not is_expert_parameter("layers.0.blocks.1.mlp.gate.weight", {0})
    assert not is_expert_parameter("routers.0.experts.0.fc1.weight", {0})  # MoME router experts


def test_dataset_labels_standard_generic_and_unknown_terminology(phantoms, tmp_path):
    """A null terminology entry (AMOS's "prostate/uterus") exports as a generic anatomical structure;
    a label with neither a standard name nor an entry is an error naming dataset.json and the label."""
    import shutil

    from m4oe.terminology import GENERIC_STRUCTURE
    from m4oe_training.data import DatasetInfo
    from m4oe_training.export import dataset_labels

    root = tmp_path / "amos_like"
    shutil.copytree(phantoms["ct"], root)
    meta = json.loads((root / "dataset.json").read_text())
    extra = len(meta["labels"])
    meta["labels"]["prostate_or_uterus"] = extra
    meta["terminology"] = {"prostate_or_uterus": None}
    (root / "dataset.json").write_text(json.dumps(meta))
    labels = dataset_labels(DatasetInfo.read(root))
    assert [lab.value for lab in labels] == list(range(1, extra + 1))
    liver = labels[PHANTOM_LABELS["liver"] - 1]
    assert (liver.name, liver.type.value) == ("liver", "10200004")
    generic = labels[-1]
    assert (generic.value, generic.name, generic.type) == (extra, "prostate or uterus", GENERIC_STRUCTURE)

    del meta["terminology"]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"dataset\.json: label 'prostate_or_uterus' has no standard"):
        dataset_labels(DatasetInfo.read(root))


def test_dataset_info_reports_a_bad_dataset_json_naming_the_file(phantoms, tmp_path):
    import shutil

    from m4oe.errors import InputError
    from m4oe_training.data import DatasetInfo

    root = tmp_path / "bad"
    shutil.copytree(phantoms["ct"], root)
    meta = json.loads((root / "dataset.json").read_text())
    del meta["numTraining"]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="numTraining") as caught:
        DatasetInfo.read(root)
    assert str(root / "dataset.json") in str(caught.value)
    (root / "dataset.json").unlink()
    with pytest.raises(InputError, match=r"dataset\.json"):
        DatasetInfo.read(root)


def test_ct_statistics_are_cached_and_not_read_again(phantoms, tmp_path, monkeypatch):
    import m4oe_training.data as data_module
    from m4oe_training.data import DatasetInfo, ct_intensity_params

    infos = [DatasetInfo.read(phantoms["ct"]), DatasetInfo.read(phantoms["t1"])]
    cases = [list(info.cases) for info in infos]
    uncached = ct_intensity_params(infos, cases)
    first = ct_intensity_params(infos, cases, tmp_path / "cache")
    assert first == uncached
    assert len(list((tmp_path / "cache").glob("ct_*_hu_*.npy"))) == len(cases[0])  # CT cases only

    def no_reading(path):
        raise AssertionError(f"read {path} again")

    monkeypatch.setattr(data_module, "read_image", no_reading)
    assert ct_intensity_params(infos, cases, tmp_path / "cache") == first
    monkeypatch.undo()
    label = phantoms["ct"] / "labelsTr" / f"{cases[0][0]}.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))  # "edited"
    monkeypatch.setattr(data_module, "read_image", no_reading)
    with pytest.raises(AssertionError, match=r"read .* again"):
        ct_intensity_params(infos, cases, tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# Fine-tuning from an exported model


@pytest.mark.slow
def test_run_initialised_from_an_exported_model_starts_from_its_weights(phantoms, tmp_path):
    """``init``: the second run starts from the first run's exported weights and records their hash."""
    datasets = [dataset(phantoms["ct"], "ct"), dataset(phantoms["t1"], "mr")]
    common = {"batch_size": 2, "iterations_per_epoch": 1, "optimizer": "adamw"}
    first = write_config(
        tmp_path / "first.toml",
        datasets,
        [{"kind": "experts", "epochs": 1, "lr": 1e-2}],
        output_dir="first",
        **common,
    )
    source = run(load_config(first)[0], base_dir=tmp_path, command=["test"]) / "model"
    source_weights = load_file(source / "model.safetensors")
    # A learning rate so small that the exported weights can only equal the source's if the
    # second run started from them; a run without ``init`` starts from a random initialisation.
    second = write_config(
        tmp_path / "configs" / "second.toml",
        datasets,
        [{"kind": "joint", "epochs": 1, "lr": 1e-12, "load_balance_weight": 0.01}],
        output_dir=str(tmp_path / "second"),
        init="../first/model",
        **common,
    )
    cfg, _ = load_config(second)
    assert cfg.init == str(source.resolve())  # relative to the config file's folder
    model, card = load_checkpoint(run(cfg, base_dir=tmp_path, command=["test"]) / "model")
    tuned = model.state_dict()
    assert tuned.keys() == source_weights.keys()
    for key, value in source_weights.items():
        torch.testing.assert_close(tuned[key], value, atol=1e-6, rtol=0, msg=key)
    assert (
        card.provenance["init_weights_sha256"]
        == hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    )

    fresh = write_config(
        tmp_path / "fresh.toml",
        datasets,
        [{"kind": "joint", "epochs": 1, "lr": 1e-12}],
        output_dir="fresh",
        **common,
    )
    random_start = load_file(run(load_config(fresh)[0], base_dir=tmp_path) / "model" / "model.safetensors")
    assert any(not torch.allclose(random_start[k], v) for k, v in source_weights.items())


def test_init_from_a_model_that_does_not_fit_the_run_is_a_config_error(tmp_path):
    """Experts, labels or weight shapes that differ, and a pickled file, are refused by name."""
    from m4oe.model import build_model
    from m4oe_training.init_model import load_initial_weights

    embedded = ROOT / "M4oESegmentation" / "m4oe" / "models" / "m4oe-phantom"
    source, card = load_checkpoint(embedded)
    labels = {"abdomen": card.task("abdomen").labels}
    shape = {k: getattr(source.cfg, k) for k in ("img_size", "embed_dim", "num_heads", "window_size")}

    def build(experts=source.cfg.experts, **change):
        change = {"gate_context": source.cfg.gate_context, **change}
        return build_model("m4oe", experts=experts, tasks=(("abdomen", 10),), **{**shape, **change})

    model = build()
    digest = load_initial_weights(model, str(embedded), labels)
    assert digest == card.weights_sha256
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value.float()), key

    renamed = {"abdomen": [dataclasses.replace(labels["abdomen"][0], name="hepar"), *labels["abdomen"][1:]]}
    cases = [
        (build(), renamed, r"task 'abdomen' labels \['liver'"),
        (build(experts=("ct", "mr-t2", "mr-t1")), labels, "experts"),
        (build(embed_dim=48), labels, "weights differ in name or shape"),
        (build(), {"organs": labels["abdomen"]}, "the run does not train"),
    ]
    for target, run_labels, message in cases:
        before = tensors_sha256(target.state_dict())
        with pytest.raises(ConfigError, match=message) as error:
            load_initial_weights(target, str(embedded), run_labels)
        assert str(embedded) in str(error.value)
        assert tensors_sha256(target.state_dict()) == before  # nothing half-loaded

    pickled = tmp_path / "model.pt"
    torch.save(source.state_dict(), pickled)
    (tmp_path / "model.json").write_text((embedded / "model.json").read_text())
    with pytest.raises(ConfigError, match=r"init: .*pickle"):
        load_initial_weights(build(), str(pickled), labels)


def test_init_may_add_a_slice_context_to_the_gates_but_not_take_it_away(tmp_path):
    """A run may give the init model's gates a slice context (starting at zero: same outputs); a
    model trained with one cannot lose it."""
    from m4oe.checkpoint import save_checkpoint
    from m4oe.model import build_model
    from m4oe_training.init_model import init_overrides, load_initial_weights
    from m4oe_training.optim import is_context_parameter

    embedded = ROOT / "M4oESegmentation" / "m4oe" / "models" / "m4oe-phantom"
    source, card = load_checkpoint(embedded)
    # The same network without a context, whichever the embedded model has.
    plain = build_model(source.cfg.replace(gate_context="none"))
    plain.load_state_dict({k: v for k, v in source.state_dict().items() if not is_context_parameter(k)})
    folder = save_checkpoint(plain.eval(), dataclasses.replace(card), tmp_path / "plain")
    labels = {"abdomen": card.task("abdomen").labels}

    torch.manual_seed(0)
    target = build_model(source.cfg.replace(gate_context="slice"))
    added = [k for k in target.state_dict() if is_context_parameter(k)]
    assert added and all(k not in plain.state_dict() for k in added)
    load_initial_weights(target, str(folder), labels)
    size = source.cfg.img_size
    x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, expected_gates = plain(x, return_gates=True)
        got, got_gates = target.eval()(x, return_gates=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert all(torch.allclose(got_gates[k], expected_gates[k], atol=1e-6) for k in expected_gates)

    def overrides(card_architecture, **model_overrides):
        run_cfg = SimpleNamespace(model_overrides=model_overrides)  # all that init_overrides reads
        return init_overrides(run_cfg, dataclasses.replace(card, architecture=card_architecture))

    assert overrides(plain.cfg, gate_context="slice") == {"gate_context": "slice"}
    assert overrides(target.cfg, gate_context="slice") == {"gate_context": "slice"}
    with pytest.raises(ConfigError, match="cannot take away"):
        overrides(target.cfg, gate_context="none")


# ---------------------------------------------------------------------------------------------
# Augmentation


def blob_batch(batch: int = 16, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels of a few rectangles per slice, and images equal to label / 10 (so one follows the other)."""
    rng = np.random.default_rng(0)
    labels = np.zeros((batch, size, size), np.int64)
    for b in range(batch):
        for value in (1, 2, 3):
            r, c = rng.integers(4, size - 20, 2)
            h, w = rng.integers(8, 16, 2)
            labels[b, r : r + h, c : c + w] = value
    labels = torch.from_numpy(labels)
    return labels[:, None].float() / 10, labels


def geometric_only(**change):
    from m4oe_training.augment import Augmentation

    return Augmentation(p_scale_intensity=0, p_shift_intensity=0, p_noise=0, **change)


@pytest.mark.parametrize("change", [{}, {"p_affine": 0.0, "p_elastic": 1.0}, {"p_elastic": 1.0}])
def test_augmentation_moves_images_and_labels_together(change):
    from m4oe_training.augment import augment_batch

    images, labels = blob_batch()
    out_images, out_labels = augment_batch(geometric_only(**change), images, labels, seed=3)
    assert out_images.shape == images.shape and out_labels.shape == labels.shape
    assert out_labels.dtype == torch.int64
    assert not torch.equal(out_labels, labels)  # something moved
    assert set(out_labels.unique().tolist()) <= {0, 1, 2, 3}
    agree = (torch.round(out_images[:, 0] * 10).long() == out_labels).float().mean()
    assert agree > 0.97, agree  # only interpolated edge pixels may differ
    again = augment_batch(geometric_only(**change), images, labels, seed=3)
    assert torch.equal(again[0], out_images) and torch.equal(again[1], out_labels)
    other = augment_batch(geometric_only(**change), images, labels, seed=4)
    assert not torch.equal(other[1], out_labels)


def test_elastic_deformation_is_local_and_leaves_unpicked_samples_as_before():
    from m4oe_training.augment import Augmentation, augment_batch

    images, labels = blob_batch()
    _, elastic = augment_batch(geometric_only(p_affine=0.0, p_elastic=1.0), images, labels, seed=5)
    changed = (elastic != labels).float().mean(dim=(1, 2))
    assert (changed > 0).all() and (changed < 0.15).all(), changed  # a few pixels, not a new layout
    # Labels move by at most elastic_max_shift (4) pixels: every foreground pixel's new label is
    # found within 5 pixels of the same place in the original.
    for value in (1, 2, 3):
        near = F.max_pool2d((labels == value).float()[:, None], 11, stride=1, padding=5)[:, 0] > 0
        assert near[elastic == value].all()

    plain = augment_batch(Augmentation(p_elastic=0.0), images, labels, seed=6)
    half = augment_batch(Augmentation(p_elastic=0.5), images, labels, seed=6)
    same = [torch.equal(plain[1][b], half[1][b]) and torch.equal(plain[0][b], half[0][b]) for b in range(16)]
    assert 0 < sum(same) < 16, same  # the other random draws do not shift when elastic is on


@pytest.mark.slow
def test_gradient_clipping_bounds_each_update_and_logs_the_norm(phantoms, tmp_path):
    """SGD without momentum or decay: each step moves the weights by at most lr * grad_clip_norm."""
    from m4oe.model import build_model

    def train(clip: float, name: str) -> tuple[dict, list[dict]]:
        path = write_config(
            tmp_path / f"{name}.toml",
            [dataset(phantoms["ct"], "ct"), dataset(phantoms["t1"], "mr")],
            [{"kind": "experts", "epochs": 1, "lr": 0.5}],
            batch_size=2,
            iterations_per_epoch=2,
            momentum=0.0,
            weight_decay=0.0,
            grad_clip_norm=clip,
            val_every=100,
            output_dir=str(tmp_path / name),
        )
        out = run(load_config(path)[0], base_dir=tmp_path, command=["test"])
        state = load_file(out / "state" / "weights.safetensors")
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        return weights, read_log(out)

    torch.manual_seed(0)  # the run's seed: the same initial weights
    initial = build_model("m4oe-tiny", experts=("ct", "mr"), tasks=(("abdomen", len(PHANTOM_LABELS) + 1),))
    initial = initial.state_dict()

    def distance(weights: dict) -> float:
        return float(torch.sqrt(sum(((weights[k] - v) ** 2).sum() for k, v in initial.items())))

    clipped, log = train(1e-3, "clipped")
    assert float(log[0]["grad_norm"]) > 1e-2  # the norm before clipping is what is logged
    assert distance(clipped) <= 2 * 0.5 * 1e-3 * 1.0001  # two steps of lr * clip at most
    free, free_log = train(0.0, "free")
    assert distance(free) > 10 * distance(clipped)
    assert free_log[0]["grad_norm"] == ""  # not computed without clipping


def test_datasets_sharing_a_folder_name_keep_their_own_cases(phantoms, tmp_path):
    """Two CT folders both named ``ct`` (two sites): statistics and provenance keep them apart."""
    from m4oe_training.data import DatasetInfo, ct_intensity_params
    from m4oe_training.train import data_keys

    other = DatasetInfo.read(write_dataset(tmp_path / "site2" / "ct", "ct", 1, seed=7, max_size=48))
    first = DatasetInfo.read(phantoms["ct"])
    assert first.name == other.name == "ct" and first.cases[0] == other.cases[0]
    only_other = ct_intensity_params([other], [list(other.cases)])
    assert ct_intensity_params([first, other], [[], list(other.cases)]) == only_other
    assert ct_intensity_params([first, other], [list(first.cases), []]) != only_other
    assert data_keys([first, other]) == ["0:ct", "1:ct"]
    assert data_keys([first, DatasetInfo.read(phantoms["t1"])]) == ["ct", "t1"]


@pytest.mark.parametrize(
    ("top", "dataset_expert", "message"),
    [
        ({"model_overrides": {"embed_dim": 48}}, "ct", "with init the architecture is the init model's"),
        ({}, "mr", r"init .*: the datasets' experts \['mr'\] are not among its \['ct', 'mr-t1', 'mr-t2'\]"),
        ({"init": "missing-model"}, "ct", "init: unknown model 'missing-model'; available: .*m4oe-phantom"),
        ({"init": "models/missing"}, "ct", "init: .*models/missing.*no such model folder or file"),
    ],
    ids=["other-width", "unknown-expert", "missing-name", "missing-path"],
)
def test_run_from_init_refuses_what_does_not_fit_before_training(
    phantoms, tmp_path, top, dataset_expert, message
):
    top = {"init": str(ROOT / "M4oESegmentation" / "m4oe" / "models" / "m4oe-phantom"), **top}
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(phantoms["ct"], dataset_expert)],
        [{"kind": "joint", "epochs": 1, "lr": 1e-3}],
        output_dir=str(tmp_path / "run"),
        **top,
    )
    cfg, _ = load_config(path)
    with pytest.raises(ConfigError, match=message):
        run(cfg, base_dir=tmp_path)
    assert not (tmp_path / "run" / "train_log.csv").exists()


def test_expert_order_must_hold_every_dataset_expert_once(tmp_path):
    stages = [{"kind": "experts", "epochs": 1, "lr": 0.01}]
    datasets = [dataset("/data/ct", "ct"), dataset("/data/t1", "mr")]
    path = write_config(tmp_path / "a.toml", datasets, stages, expert_order=["mr", "ct", "pet"])
    cfg, _ = load_config(path)
    assert cfg.experts == ("mr", "ct", "pet")
    with pytest.raises(ConfigError, match=r"lacks the datasets' experts \['mr'\]"):
        load_config(write_config(tmp_path / "b.toml", datasets, stages, expert_order=["ct"]))
    with pytest.raises(ConfigError, match="names an expert twice"):
        load_config(write_config(tmp_path / "c.toml", datasets, stages, expert_order=["ct", "mr", "ct"]))


def initial_tiny_weights() -> dict[str, torch.Tensor]:
    """The weights a run of the tiny two-expert model starts from (seed 0, as ``run`` seeds it)."""
    torch.manual_seed(0)
    tasks = (("abdomen", len(PHANTOM_LABELS) + 1),)
    return build_model("m4oe-tiny", experts=("ct", "mr"), tasks=tasks).state_dict()


def one_sgd_step(tmp_path: Path, name: str, datasets: list[dict], **stage) -> dict[str, torch.Tensor]:
    """The network's weights after one plain SGD step (no momentum, decay or clipping) of a joint stage."""
    path = write_config(
        tmp_path / f"{name}.toml",
        datasets,
        [{"kind": "joint", "epochs": 1, "lr": 0.01, **stage}],
        batch_size=2,
        iterations_per_epoch=1,
        momentum=0.0,
        weight_decay=0.0,
        grad_clip_norm=0.0,
        val_every=100,
        output_dir=str(tmp_path / name),
    )
    out = run(load_config(path)[0], base_dir=tmp_path, command=["test"])
    state = load_file(out / "state" / "weights.safetensors")
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


@pytest.mark.slow
def test_gate_learning_rate_scale_moves_only_the_gates_faster(phantoms, tmp_path):
    """Plain SGD, one step: gate updates are ``gate_lr_scale`` times larger, every other one equal."""
    from m4oe_training.optim import is_gate_parameter

    initial = initial_tiny_weights()
    datasets = [dataset(phantoms["ct"], "ct"), dataset(phantoms["t1"], "mr")]
    plain, fast = (one_sgd_step(tmp_path, f"scale{s}", datasets, gate_lr_scale=s) for s in (1.0, 8.0))
    gates = [k for k in initial if is_gate_parameter(k)]
    assert len(gates) == 28
    for key, start in initial.items():
        step, scaled = plain[key] - start, fast[key] - start
        if key in gates:
            assert step.abs().max() > 0, key
            torch.testing.assert_close(scaled, 8.0 * step, rtol=1e-3, atol=1e-7, msg=key)
        else:
            torch.testing.assert_close(scaled, step, rtol=1e-3, atol=1e-7, msg=key)


@pytest.mark.slow
def test_a_context_stage_trains_the_slice_context_alone(phantoms, tmp_path):
    """A ``context`` stage, then a joint stage with ``trainable = "context"``: the gates' slice
    context learns; every other weight, the token gates included, stays as it was. A model without
    a context cannot have such stages."""
    from m4oe.model import build_model
    from m4oe_training.optim import is_context_parameter

    def train(name: str, **top) -> Path:
        path = write_config(
            tmp_path / f"{name}.toml",
            [dataset(phantoms["ct"], "ct"), dataset(phantoms["t1"], "mr")],
            [
                {"kind": "context", "epochs": 1, "lr": 0.01},
                {"kind": "joint", "epochs": 1, "lr": 0.01, "trainable": "context", "routing_weight": 1.0},
            ],
            batch_size=2,
            iterations_per_epoch=2,
            val_every=1,
            output_dir=str(tmp_path / name),
            **top,
        )
        return run(load_config(path)[0], base_dir=tmp_path, command=["test"])

    out = train("context", model_overrides={"gate_context": "slice"})
    log = read_log(out)
    assert [row["kind"] for row in log] == ["context", "joint"]
    assert all(float(row["context"]) > 0 for row in log)
    assert log[0]["seg"] == "" and log[0]["val_mean_dice"] == ""  # no network pass, nothing to validate
    assert log[1]["val_mean_dice"] != ""
    state = load_file(out / "state" / "weights.safetensors")
    trained = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    torch.manual_seed(0)  # the run's seed: the same initial weights
    initial = build_model(
        "m4oe-tiny", experts=("ct", "mr"), tasks=(("abdomen", len(PHANTOM_LABELS) + 1),), gate_context="slice"
    ).state_dict()
    context = [k for k in initial if is_context_parameter(k)]
    assert len(context) == 2 * 14 + 8  # a weight and a bias per MoE layer; the encoder's 4 layers
    for key, start in initial.items():
        if key in context:
            assert not torch.equal(trained[key], start), key
        else:
            assert torch.equal(trained[key], start), key

    with pytest.raises(ConfigError, match="the model has none"):
        train("plain")


# ---------------------------------------------------------------------------------------------
# The correction loop: fine-tuning on a few corrected cases keeps what the model was


SOURCE_CT = {"modality": "ct", "clip": [-732.0, 837.0], "mean": 113.2, "std": 178.8}


def save_source_model(folder: Path, **preprocessing) -> Path:
    """A tiny CT/MR model over the phantom labels whose card differs from every training default:
    CT window [-732, 837] HU, 1st-99th percentile MR, 5 mm in-plane spacing, clean-up of the liver
    and spleen, 2.5 mm through-plane smoothing and 3 test-time passes."""
    from m4oe.checkpoint import save_checkpoint
    from m4oe.model import build_model
    from m4oe.model_card import ExpertInfo, ModelCard, Preprocessing, TaskInfo

    torch.manual_seed(1)
    model = build_model("m4oe-tiny", experts=("ct", "mr"), tasks=(("abdomen", len(PHANTOM_LABELS) + 1),))
    labels = [standard_label(key, value) for key, value in PHANTOM_LABELS.items()]
    card = ModelCard(
        name="source",
        architecture=model.cfg,
        experts=[ExpertInfo("ct", "ct"), ExpertInfo("mr", "mr")],
        tasks=[TaskInfo("abdomen", labels, [1, 2], through_plane_sigma_mm=2.5, test_time_passes=3)],
        preprocessing=Preprocessing(
            **{
                "in_plane": "spacing",
                "target_spacing_mm": (5.0, 5.0),
                "intensity": {"ct": SOURCE_CT, "mr": {"modality": "mr", "percentiles": [1.0, 99.0]}},
                **preprocessing,
            }
        ),
    )
    return save_checkpoint(model, card, folder)


@pytest.fixture(scope="module")
def one_case(tmp_path_factory) -> Path:
    """A CT data set of a single case, as one case exported from Slicer is."""
    return write_dataset(tmp_path_factory.mktemp("one_case") / "ct", "ct", 1, seed=7, max_size=48)


def fine_tune_config(path: Path, one_case: Path, phantoms, **top) -> Path:
    """One corrected CT case (no validation) plus the T1 phantoms replayed (no validation)."""
    return write_config(
        path,
        [dataset(one_case, "ct", val_cases=0), dataset(phantoms["t1"], "mr", val_cases=0)],
        [{"kind": "joint", "epochs": 2, "lr": 1e-4, "shared_lr_scale": 0.1}],
        batch_size=2,
        iterations_per_epoch=1,
        optimizer="adamw",
        **top,
    )


def test_a_chain_of_fine_tunes_keeps_every_earlier_run_in_the_last_card(phantoms, one_case, tmp_path):
    """Each fine-tune records the run behind its starting model and that model's own lineage, so the
    last card of a chain tells every run (``provenance.lineage``, newest first; ``m4oe info``)."""
    from m4oe.card_summary import training_data_text

    source = save_source_model(tmp_path / "source")
    first = fine_tune_config(
        tmp_path / "first.toml", one_case, phantoms, init=str(source), output_dir=str(tmp_path / "first")
    )
    _, first_card = load_checkpoint(run(load_config(first)[0], base_dir=tmp_path) / "model")
    second = fine_tune_config(
        tmp_path / "second.toml",
        one_case,
        phantoms,
        init=str(tmp_path / "first" / "model"),
        output_dir=str(tmp_path / "second"),
        seed=3,
    )
    _, card = load_checkpoint(run(load_config(second)[0], base_dir=tmp_path) / "model")
    _, source_card = load_checkpoint(source)

    assert [entry["name"] for entry in first_card.provenance["lineage"]] == ["source"]
    newest, oldest = card.provenance["lineage"]
    assert newest["weights_sha256"] == first_card.weights_sha256 == card.provenance["init_weights_sha256"]
    assert newest["init_weights_sha256"] == source_card.weights_sha256 == oldest["weights_sha256"]
    assert (newest["iterations"], newest["batch_size"], newest["seed"]) == (2, 2, 0)
    assert newest["data"] == first_card.provenance["data"] and newest["data"]
    assert oldest["iterations"] is None and oldest["init_weights_sha256"] is None  # no record: None
    lineage_text = training_data_text(card.to_dict()).split("continued from ")[1]
    parent = f"{first_card.name} (weights {first_card.weights_sha256[:12]})"
    assert lineage_text.startswith(f"{parent}, the last of 2 earlier runs: ")
    assert str(one_case) in lineage_text
    assert "iterations" not in lineage_text  # the source model's run is unknown: no total is claimed


@pytest.mark.slow
def test_fine_tuning_one_case_by_model_name_keeps_the_init_models_preprocessing_and_clean_up(
    phantoms, one_case, tmp_path, monkeypatch, capsys
):
    """``init`` names a cached model; one case and no validation anywhere: the run trains, exports
    the last epoch of the stage, says so in the card, and the card normalises, resamples and cleans
    up exactly as the init model's does. ``m4oe train`` says "exported" only once a model is there."""
    cache = tmp_path / "cache"
    source = save_source_model(cache / "tiny-source")
    monkeypatch.setenv("M4OE_CACHE_DIR", str(cache))
    path = fine_tune_config(tmp_path / "configs" / "tune.toml", one_case, phantoms, init="tiny-source")
    cfg, _ = load_config(path)
    assert cfg.init == "tiny-source"  # a name: nothing of that name beside the config
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "run"

    # Mid-stage, with no validation, nothing is exported yet, and the command says so.
    assert m4oe_main(["train", str(path), "--stop-after-epochs", "1"]) == 0
    assert "no model exported yet" in capsys.readouterr().out and not (out / "model").exists()
    assert m4oe_main(["train", str(path), "--resume"]) == 0
    assert f"exported model: {out / 'model'}" in capsys.readouterr().out

    model, card = load_checkpoint(out / "model")
    _, parent = load_checkpoint(source)
    assert card.preprocessing.intensity == parent.preprocessing.intensity  # CT clip, mean, std; MR
    assert card.preprocessing.intensity["ct"]["clip"] == [-732.0, 837.0]
    assert (card.preprocessing.in_plane, card.preprocessing.target_spacing_mm) == ("spacing", (5.0, 5.0))
    task, theirs = card.task("abdomen"), parent.task("abdomen")
    assert (task.largest_component, task.through_plane_sigma_mm, task.test_time_passes) == ([1, 2], 2.5, 3)
    assert task.labels == theirs.labels
    assert card.provenance["init_weights_sha256"] == parent.weights_sha256
    assert card.provenance["config"]["init"] == "tiny-source"
    assert card.metrics["validation"] is None
    assert card.metrics["selected"] == {"stage": 0, "epoch": 2, "mean_dice": None}
    assert [r["val_mean_dice"] for r in read_log(out)] == ["", ""]
    assert model.cfg.experts == ("ct", "mr")

    # Clean-up the config sets, even to the defaults, replaces the inherited one.
    path = fine_tune_config(
        tmp_path / "configs" / "set.toml",
        one_case,
        phantoms,
        init="tiny-source",
        output_dir=str(tmp_path / "set"),
        largest_component=[],
        through_plane_sigma_mm=0.0,
        test_time_passes=1,
    )
    _, card = load_checkpoint(run(load_config(path)[0], base_dir=tmp_path) / "model")
    task = card.task("abdomen")
    assert (task.largest_component, task.through_plane_sigma_mm, task.test_time_passes) == ([], 0.0, 1)
    assert card.preprocessing.intensity == parent.preprocessing.intensity


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"in_plane": "resize"}, r"in_plane = 'resize': the init model 'source' .* in_plane = 'spacing'"),
        ({"target_spacing_mm": [1.0, 1.0]}, r"target_spacing_mm = \(1.0, 1.0\): .* \(5.0, 5.0\)"),
    ],
    ids=["in-plane", "spacing"],
)
def test_fine_tuning_refuses_other_in_plane_preprocessing_than_the_init_models(
    phantoms, one_case, tmp_path, top, message
):
    source = save_source_model(tmp_path / "source")
    path = fine_tune_config(
        tmp_path / "cfg.toml", one_case, phantoms, init=str(source), output_dir=str(tmp_path / "run"), **top
    )
    with pytest.raises(ConfigError, match=message):
        run(load_config(path)[0], base_dir=tmp_path)
    assert not (tmp_path / "run" / "train_log.csv").exists()
    # Repeating the init model's own values is allowed; leaving them out takes them.
    from m4oe.checkpoint import read_model_card
    from m4oe_training.init_model import inherit_preprocessing

    card = read_model_card(source)
    for top in ({"in_plane": "spacing", "target_spacing_mm": [5.0, 5.0]}, {}):
        cfg = load_config(fine_tune_config(tmp_path / "same.toml", one_case, phantoms, **top))[0]
        resolved = inherit_preprocessing(cfg, card)
        assert (resolved.in_plane, resolved.target_spacing_mm) == ("spacing", (5.0, 5.0))
    assert inherit_preprocessing(cfg, None).in_plane == "resize"  # without init: the default
    # A deliberate change of geometry (a model retrained for another grid) says so explicitly.
    changed = load_config(
        fine_tune_config(
            tmp_path / "new.toml", one_case, phantoms, in_plane="resize", keep_init_in_plane=False
        )
    )[0]
    assert (inherit_preprocessing(changed, card).in_plane, changed.target_spacing_mm) == ("resize", None)


def test_a_one_case_dataset_with_the_default_validation_cases_says_what_to_set(one_case, tmp_path):
    path = write_config(
        tmp_path / "cfg.toml",
        [{"path": str(one_case), "expert": "ct", "task": "abdomen"}],  # val_cases left at 2
        [{"kind": "experts", "epochs": 1, "lr": 1e-3}],
        model="swin-unet-tiny",
        output_dir=str(tmp_path / "run"),
    )
    message = r"datasets\[0\] .*val_cases = 2 leaves none of its 1 case\(s\) to train on; set val_cases = 0"
    with pytest.raises(ConfigError, match=message):
        run(load_config(path)[0], base_dir=tmp_path)
    assert not (tmp_path / "run").joinpath("train_log.csv").exists()


def test_init_is_a_path_beside_the_config_or_else_a_model_name(tmp_path):
    stages = [{"kind": "joint", "epochs": 1, "lr": 1e-3}]
    datasets = [dataset("/data/ct", "ct")]
    (tmp_path / "configs" / "m4oe-phantom").mkdir(parents=True)
    beside = load_config(write_config(tmp_path / "configs" / "a.toml", datasets, stages, init="m4oe-phantom"))
    assert beside[0].init == str(tmp_path / "configs" / "m4oe-phantom")  # a folder there wins
    named = load_config(write_config(tmp_path / "b.toml", datasets, stages, init="m4oe-phantom"))
    assert named[0].init == "m4oe-phantom"
    relative = load_config(write_config(tmp_path / "c.toml", datasets, stages, init="models/x"))
    assert relative[0].init == str(tmp_path / "models" / "x")  # a path, missing or not
    from m4oe.hub import EMBEDDED_DIR
    from m4oe_training.init_model import resolve_init

    assert resolve_init("m4oe-phantom") == EMBEDDED_DIR / "m4oe-phantom"
    with pytest.raises(ConfigError, match="init: unknown model 'no-such-model'"):
        resolve_init("no-such-model")


def test_parameter_groups_split_gates_shared_layers_and_the_rest():
    from m4oe_training.optim import group_lr, parameter_groups

    module = tiny_stage_loss(0)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in parameter_groups(module)}
    assert list(groups) == ["gates", "rest", "shared"]
    names = {id(p): name for name, p in module.named_parameters()}
    by_group = {k: {names[i] for i in ids} for k, ids in groups.items()}
    assert sum(len(v) for v in by_group.values()) == len(names)
    assert all(".mlp.gate." in n for n in by_group["gates"])
    assert all(
        ".mlp.experts." in n or n.startswith("model.heads.") or n.startswith("reconstruct.")
        for n in by_group["rest"]
    )
    assert {"model.patch_embed.proj.weight", "model.norm_up.weight"} <= by_group["shared"]
    assert not any(".mlp." in n or "heads" in n for n in by_group["shared"])
    stage = StageConfig("joint", 1, 0.1, gate_lr_scale=4.0, shared_lr_scale=0.0)
    assert [group_lr(stage, g, 0.1) for g in groups] == [pytest.approx(0.4), 0.1, 0.0]  # 0 freezes
    with pytest.raises(ConfigError, match="shared_lr_scale must be >= 0"):
        TrainConfig(
            "x", (DatasetConfig("/d", "ct", "a"),), (StageConfig("joint", 1, 0.1, shared_lr_scale=-1.0),)
        )


@pytest.mark.slow
def test_shared_learning_rate_scale_moves_only_the_shared_layers_slower(phantoms, tmp_path):
    """Plain SGD, one step: updates of the shared layers are ``shared_lr_scale`` times the full
    rate's, experts', gates' and heads' updates the same."""
    from m4oe_training.optim import is_shared_parameter

    initial = initial_tiny_weights()
    datasets = [dataset(phantoms["ct"], "ct", val_cases=0), dataset(phantoms["t1"], "mr", val_cases=0)]
    full, slow = (one_sgd_step(tmp_path, f"shared{s}", datasets, shared_lr_scale=s) for s in (1.0, 0.25))
    shared = [k for k in initial if is_shared_parameter(f"model.{k}")]
    assert 0 < len(shared) < len(initial)
    for key, start in initial.items():
        step, scaled = full[key] - start, slow[key] - start
        if key in shared:
            torch.testing.assert_close(scaled, 0.25 * step, rtol=1e-3, atol=1e-7, msg=key)
        else:
            torch.testing.assert_close(scaled, step, rtol=1e-3, atol=1e-7, msg=key)
    assert any(full[k].ne(initial[k]).any() for k in shared)


def test_a_state_saved_with_two_optimiser_groups_resumes_with_three(tmp_path, monkeypatch):
    """States written before the "shared" group (version 2) still resume: each parameter gets its own
    AdamW moments back."""
    from m4oe_training import state as state_module
    from m4oe_training.optim import is_gate_parameter, parameter_groups

    module = tiny_stage_loss(0)
    named = list(module.named_parameters())
    old_groups = [
        {"params": [p for n, p in named if is_gate_parameter(n)], "name": "gates"},
        {"params": [p for n, p in named if not is_gate_parameter(n)], "name": "rest"},
    ]
    old = torch.optim.AdamW(old_groups, lr=1e-3)
    train_steps(module, old, 1, seed=0)
    monkeypatch.setattr(state_module, "STATE_VERSION", 2)
    save_state(tmp_path / "state", module, old, {"stage": 0})
    monkeypatch.undo()
    new = torch.optim.AdamW(parameter_groups(module), lr=1e-3)
    assert load_state(tmp_path / "state", module, new)["version"] == 2
    assert [g["name"] for g in new.param_groups] == ["gates", "rest", "shared"]
    assert len(old.state) > len(named) // 2
    for _, p in named:  # parameters without a gradient (the MIM read-out) have no moments
        assert (p in new.state) == (p in old.state)
        for key in ("exp_avg", "exp_avg_sq") if p in old.state else ():
            torch.testing.assert_close(new.state[p][key], old.state[p][key])
    train_steps(module, new, 1, seed=1)  # and it steps on
