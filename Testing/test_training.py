"""The training subpackage's whole runs on phantoms and real data: export, resume, DDP, stages.

Runs are tiny (the 64-pixel ``m4oe-tiny`` model, phantoms of at most 48 pixels a side, a few
iterations per epoch) but go through the real loop, the real engine export and, for DDP, two real
``torchrun`` processes on the gloo backend. Configs, state, data and fine-tuning have their own
files (``test_training_config.py``, ``test_training_state.py``, ``test_training_data.py``,
``test_fine_tuning.py``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file
from training_helpers import (
    dataset,
    read_log,
    safetensors_parts,
    tensors_sha256,
    training_phantoms,
    write_config,
)

from m4oe.checkpoint import load_checkpoint, read_model_card
from m4oe.cli import main as m4oe_main
from m4oe.model import build_model
from m4oe.phantom import PHANTOM_LABELS
from m4oe.terminology import standard_label
from m4oe_training.config import ConfigError, StageConfig, TrainConfig, load_config
from m4oe_training.data import DatasetInfo, split_cases
from m4oe_training.train import StageLoss, portable_config, portable_path, run
from m4oe_training.validation import missed_warnings, validate

STAGES_3 = [
    {"kind": "mim", "epochs": 1, "lr": 1e-3},
    {"kind": "experts", "epochs": 1, "lr": 1e-3},
    {"kind": "joint", "epochs": 1, "lr": 5e-4, "load_balance_weight": 0.01},
]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    return training_phantoms(tmp_path_factory.mktemp("phantoms"))


# ---------------------------------------------------------------------------------------------
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


def test_validation_names_the_structures_a_model_predicts_nowhere(phantoms, tmp_path):
    """A model whose head always prefers the liver (a bias added to its bias-free 1x1 head) predicts
    every other structure nowhere: validation lists exactly those present in the held-out case under
    ``missed``, and the log line names them; with the liver's bias very low, the liver is missed."""
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(phantoms["ct"], "ct")],
        [{"kind": "experts", "epochs": 1, "lr": 1e-3}],
        model="swin-unet-tiny",
        batch_size=2,
        iterations_per_epoch=1,
        optimizer="adamw",
        augment=False,
        output_dir=str(tmp_path / "run"),
    )
    cfg, _ = load_config(path)
    out = run(cfg, base_dir=tmp_path, command=["test"])
    model, card = load_checkpoint(out / "model")
    model.float()
    infos = [DatasetInfo.read(d.path) for d in cfg.datasets]
    (case,) = split_cases(infos[0], 1)["val"]
    present = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(infos[0].label_path(case)))))
    names = {v: n for n, v in infos[0].labels.items()}
    liver = infos[0].labels["liver"]
    assert liver in present and len(present) > 3
    head = model.heads["abdomen"]
    head.bias = torch.nn.Parameter(torch.zeros(head.out_channels))
    with torch.no_grad():
        head.bias[liver] = 1.0e4
    results = validate(model, card, cfg, infos, "cpu", "experts")
    (entry,) = results.values()
    expected = sorted(names[int(v)] for v in present if v not in (0, liver))
    assert entry["missed"] == expected
    assert entry["dice"]["liver"] > 0 and all(entry["dice"][n] == 0.0 for n in expected)
    (line,) = missed_warnings(results)
    assert line.startswith(f"validation: 0:ct labels {', '.join(expected)} in its 1 held-out case(s)")
    with torch.no_grad():
        head.bias[liver] = -1.0e4  # now the liver alone never wins
    entry = next(iter(validate(model, card, cfg, infos, "cpu", "experts").values()))
    assert "liver" in entry["missed"]
    assert "the class may have died" in missed_warnings({"0:ct": {"missed": ["liver"], "cases": 1}})[0]


def test_a_folder_listed_twice_is_validated_logged_and_averaged_once(phantoms, tmp_path, caplog):
    """The CT phantoms listed twice (the same held-out case, task and route), the T1 phantoms once
    with a held-out case and once without: the repeat gets the first's result with ``same_as``; the
    log line leaves out the set without cases and shows the repeat as ``same_as``; the run's
    validation mean counts the CT volumes once; the card summary lists each set of volumes once."""
    from m4oe.card_summary import phantom_validation_lines
    from m4oe_training.validation import log_view

    path = write_config(
        tmp_path / "cfg.toml",
        [
            dataset(phantoms["ct"], "ct"),
            dataset(phantoms["ct"], "ct"),
            dataset(phantoms["t1"], "mr"),
            dataset(phantoms["t1"], "mr", val_cases=0),
        ],
        [{"kind": "experts", "epochs": 1, "lr": 1e-3}],
        batch_size=2,
        iterations_per_epoch=1,
        optimizer="adamw",
        augment=False,
        output_dir=str(tmp_path / "run"),
    )
    with caplog.at_level("INFO", logger="m4oe_training"):
        out = run(load_config(path)[0], base_dir=tmp_path, command=["test"])
    _, card = load_checkpoint(out / "model")
    results = card.metrics["validation"]
    assert list(results) == ["0:ct", "1:ct", "2:t1", "3:t1"]
    assert results["1:ct"] == {**results["0:ct"], "same_as": "0:ct"}
    assert "same_as" not in results["0:ct"] and results["3:t1"]["cases"] == 0
    shown = {"0:ct": results["0:ct"], "1:ct": {"same_as": "0:ct"}, "2:t1": results["2:t1"]}
    assert log_view(results) == shown
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation mean Dice")]
    assert json.loads(line.split(" ", 4)[4]) == log_view(results)
    once = (results["0:ct"]["mean_dice"] + results["2:t1"]["mean_dice"]) / 2
    assert results["0:ct"]["mean_dice"] != pytest.approx(results["2:t1"]["mean_dice"], abs=1e-3)
    assert float(read_log(out)[-1]["val_mean_dice"]) == pytest.approx(once, abs=1e-4)
    assert [ln.split(" ")[0] for ln in phantom_validation_lines(card.to_dict())] == ["0:ct", "2:t1"]
    first = {**results["0:ct"], "missed": ["liver"]}
    assert len(missed_warnings({"0:ct": first, "1:ct": {**first, "same_as": "0:ct"}})) == 1


@pytest.mark.slow
@pytest.mark.parametrize(("ema_decay", "deep_supervision"), [(0.0, False), (0.5, False), (0.0, True)])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(
    phantoms, tmp_path, ema_decay, deep_supervision
):
    """Interrupt after epoch 2 (mid-stage) and after epoch 3 (a stage boundary), with augmentation on;
    with a moving average of the weights (``ema_decay``) too, which the state keeps and restores;
    with deep supervision, whose training-only heads the state keeps too."""

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
            ema_decay=ema_decay,
            deep_supervision=deep_supervision,
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
    kept = ("state/weights.safetensors", "state/optimizer.safetensors")
    for name in (*kept, "state/ema.safetensors") if ema_decay else kept:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "state" / "ema.safetensors").exists() == bool(ema_decay)
    state_keys = load_file(str(a / "state" / "weights.safetensors")).keys()
    assert any(k.startswith("model.") for k in state_keys)  # not an empty file
    assert any(k.startswith("aux_heads.") for k in state_keys) == deep_supervision
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
    from m4oe_training.optim import is_context_parameter

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


def test_a_dense_model_trained_on_two_modalities_can_be_fine_tuned(phantoms, tmp_path):
    """A dense model has no experts; its data sets' expert names ("ct", "mr") only label them. A
    fine-tune from it (``init``, as ``mome_partial.py continue`` writes) starts from its weights
    with the same names, where it used to stop: "the datasets' experts are not among its []"."""
    datasets = [dataset(phantoms["ct"], "ct", val_cases=0), dataset(phantoms["t1"], "mr", val_cases=0)]
    common = {"model": "swin-unet-tiny", "batch_size": 2, "iterations_per_epoch": 1, "augment": False}
    stages = [{"kind": "joint", "epochs": 1, "lr": 1e-3}]
    first = run(
        load_config(
            write_config(tmp_path / "a.toml", datasets, stages, output_dir=str(tmp_path / "a"), **common)
        )[0],
        base_dir=tmp_path,
        command=["test"],
    )
    assert read_model_card(first / "model").experts == []
    path = write_config(
        tmp_path / "b.toml",
        datasets,
        [{"kind": "joint", "epochs": 1, "lr": 1e-9}],  # one tiny step: the weights stay the init model's
        init=str(first / "model"),
        output_dir=str(tmp_path / "b"),
        **common,
    )
    second = run(load_config(path)[0], base_dir=tmp_path, command=["test"])
    card = read_model_card(second / "model")
    assert card.experts == [] and not card.architecture.is_moe
    before, after = (
        load_file(first / "model" / "model.safetensors"),
        load_file(second / "model" / "model.safetensors"),
    )
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k].float(), after[k].float(), atol=1e-5) for k in before)
    # A mixture model named as the init still checks the data sets' experts against its own.
    moe = write_config(
        tmp_path / "c.toml",
        [dataset(phantoms["ct"], "ct", val_cases=0), dataset(phantoms["t1"], "mr-t9", val_cases=0)],
        stages,
        init="m4oe-phantom",
        output_dir=str(tmp_path / "c"),
    )
    with pytest.raises(ConfigError, match=r"the datasets' experts \['mr-t9'\] are not among its"):
        run(load_config(moe)[0], base_dir=tmp_path, command=["test"])


def test_expert_parameter_names():
    from m4oe_training.optim import is_expert_parameter

    assert is_expert_parameter("layers.0.blocks.1.mlp.experts.2.fc1.weight", {2})
    assert is_expert_parameter("model.layers_up.1.blocks.0.mlp.experts.0.fc2.bias", {0, 2})
    assert not is_expert_parameter("layers.0.blocks.1.mlp.experts.2.fc1.weight", {0, 1})
    assert not is_expert_parameter("layers.0.blocks.1.mlp.experts.12.fc1.weight", {1})
    assert not is_expert_parameter("layers.0.blocks.1.mlp.gate.weight", {0})
    assert not is_expert_parameter("routers.0.experts.0.fc1.weight", {0})  # MoME router experts


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


@pytest.mark.slow
def test_a_context_stage_trains_the_slice_context_alone(phantoms, tmp_path):
    """A ``context`` stage, then a joint stage with ``trainable = "context"``: the gates' slice
    context learns; every other weight, the token gates included, stays as it was. A model without
    a context cannot have such stages."""
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
