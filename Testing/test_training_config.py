"""Training configs: loading, validation of every key, overrides, relative paths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from training_helpers import (
    dataset,
    write_config,
)

from m4oe.cli import main as m4oe_main
from m4oe_training.config import ConfigError, DatasetConfig, StageConfig, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


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
        ({"augment_scale": 0.8}, {}, "augment_scale"),
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
        ({"ema_decay": 1.0}, {}, "ema_decay"),
        ({"ema_decay": -0.1}, {}, "ema_decay"),
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
