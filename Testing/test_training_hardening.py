"""``m4oe train`` against bad datasets, a second run into a folder in use, and a kill between the
log row and the state save (issue 23, point 8).

Runs use the 64-pixel ``m4oe-tiny`` model on phantoms of at most 48 pixels a side, one iteration
per epoch and no validation: the real loop, seconds each.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from m4oe.cli import main as m4oe_main
from m4oe.errors import InputError
from m4oe.phantom import write_dataset
from m4oe.preprocessing import DEFAULT_PARAMS
from m4oe_training.config import ConfigError, DatasetConfig, load_config
from m4oe_training.data import DatasetInfo, SliceData
from m4oe_training.nnunet import verify_dataset
from m4oe_training.train import _append_csv, run

ROOT = Path(__file__).resolve().parents[1]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def write_config(path: Path, datasets: list[dict], **top) -> Path:
    """A TrainConfig TOML: the tiny model, one "experts" stage of ``epochs`` one-iteration epochs."""
    top = {
        "name": "run",
        "model": "m4oe-tiny",
        "threads": 1,
        "batch_size": 2,
        "iterations_per_epoch": 1,
        "optimizer": "adamw",
        "augment": False,
        "output_dir": str(path.parent / "run"),
        **top,
    }
    epochs = top.pop("epochs", 3)
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for row in datasets:
        lines += ["", "[[datasets]]", *(f"{k} = {toml_value(v)}" for k, v in row.items())]
    lines += ["", "[[stages]]", 'kind = "experts"', f"epochs = {epochs}", "lr = 0.001"]
    path.write_text("\n".join(lines) + "\n")
    return path


def dataset(path: Path, expert: str, **more) -> dict:
    return {"path": str(path), "expert": expert, "task": "abdomen", "val_cases": 0, **more}


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("phantoms")
    return {
        "ct": write_dataset(root / "ct", "ct", 3, seed=0, max_size=48),
        "t1": write_dataset(root / "t1", "t1", 2, seed=0, max_size=48),
    }


@pytest.fixture
def tiny_config(phantoms, tmp_path) -> Path:
    return write_config(tmp_path / "cfg.toml", [dataset(phantoms["ct"], "ct"), dataset(phantoms["t1"], "mr")])


# ---------------------------------------------------------------------------------------------
# The datasets are checked before anything is built


def drop_label(root: Path) -> Path:
    """An image whose label map is gone: training used to drop the case silently."""
    label = root / "labelsTr" / "phantomct_001.nii.gz"
    label.unlink()
    return label


def drop_image(root: Path) -> Path:
    (root / "imagesTr" / "phantomct_001_0000.nii.gz").unlink()
    return root / "imagesTr" / "phantomct_001_0000.nii.gz"


def wrong_count(root: Path) -> Path:
    """numTraining one more than the cases: training used to ignore it."""
    meta = json.loads((root / "dataset.json").read_text())
    meta["numTraining"] += 1
    (root / "dataset.json").write_text(json.dumps(meta))
    return root / "dataset.json"


def cropped_label(root: Path) -> Path:
    """A label map two slices shorter than its image: training used to end in an IndexError."""
    label = root / "labelsTr" / "phantomct_001.nii.gz"
    image = sitk.ReadImage(str(label))
    sitk.WriteImage(image[:, :, 2:], str(label))
    return label


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (drop_label, "missing: no label for image phantomct_001_0000.nii.gz"),
        (drop_image, "missing: channel 0000 of case phantomct_001"),
        (wrong_count, "numTraining is 4 but labelsTr holds 3 cases"),
        (cropped_label, "geometry differs from its image phantomct_001_0000.nii.gz: size"),
    ],
    ids=["image-without-label", "label-without-image", "wrong-numTraining", "shape-mismatch"],
)
def test_train_refuses_a_bad_dataset_in_one_line_naming_the_file(phantoms, tmp_path, capsys, damage, message):
    """The bad dataset is used only as a synthesis source (MR renders of CT anatomy): it is still
    checked, before the run folder is made or a model built."""
    bad = tmp_path / "bad_ct"
    shutil.copytree(phantoms["ct"], bad)
    file = damage(bad)
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(phantoms["ct"], "ct"), dataset(bad, "mr", synth="t1", synth_fraction=1.0)],
    )
    code = m4oe_main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"m4oe: error: {file}: {message}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_header_only_check_reads_no_label_values_and_training_still_refuses_a_bad_one(phantoms, tmp_path):
    """``label_values=False`` (what training runs at every start) passes a label map holding a value
    dataset.json lacks, which the full check refuses; the case is refused when it is prepared."""
    bad = tmp_path / "bad_ct"
    shutil.copytree(phantoms["ct"], bad)
    label = bad / "labelsTr" / "phantomct_000.nii.gz"
    image = sitk.ReadImage(str(label))
    image[0, 0, 0] = 99
    sitk.WriteImage(image, str(label))
    with pytest.raises(InputError, match=r"label value 99 is not in dataset\.json labels"):
        verify_dataset(bad)
    summary = verify_dataset(bad, label_values=False)
    assert summary.cases == ("phantomct_000", "phantomct_001", "phantomct_002")
    assert summary.label_presence == {}
    info = DatasetInfo.read(bad)
    with pytest.raises(ConfigError, match=re.escape(f"{label}: label values [99] not in dataset.json")):
        SliceData([DatasetConfig(str(bad), "ct", "abdomen", 0)], [info], DEFAULT_PARAMS, 64, "resize", None)


# ---------------------------------------------------------------------------------------------
# One run per folder

HOLDER = """
import sys, time
from pathlib import Path
from m4oe_training.state import folder_lock

with folder_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(300)
"""


def test_a_second_run_into_a_folder_in_use_stops_naming_the_holder_and_a_killed_holder_frees_it(
    tiny_config, tmp_path, capsys
):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code = m4oe_main(["train", str(tiny_config)])
        err = capsys.readouterr().err
        assert code == 3
        assert err == f"m4oe: error: {out}: folder in use by another training run (pid {holder.pid})\n"
        assert sorted(p.name for p in out.iterdir()) == ["train.lock"]  # nothing else written
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait(timeout=60)
    assert m4oe_main(["train", str(tiny_config), "--stop-after-epochs", "1"]) == 0
    assert len(read_log(out)) == 1
    assert (out / "train.lock").read_text() == f"{os.getpid()}\n"
    # Released when the run ends: the same process runs into the folder again.
    assert m4oe_main(["train", str(tiny_config), "--resume"]) == 0
    assert [r["epoch"] for r in read_log(out)] == ["1", "2", "3"]


# ---------------------------------------------------------------------------------------------
# The log follows the state


@pytest.mark.parametrize("killed", ["after-the-row", "inside-the-row"])
def test_a_run_killed_between_log_row_and_state_save_resumes_without_a_duplicate_row(tiny_config, killed):
    """Each epoch appends its log row, then saves the state. The kill is simulated by writing the
    next epoch's row (or part of it) to the log of a run stopped after epoch 1, as the real writer
    does, and not saving the state; the resumed run writes epoch 2 once, with its own values."""
    cfg, _ = load_config(tiny_config)
    base = tiny_config.parent
    out = run(cfg, base_dir=base, stop_after_epochs=1, command=["test"])
    assert json.loads((out / "state" / "state.json").read_text())["step"] == 1
    orphan = {"stage": 0, "kind": "experts", "epoch": 2, "step": 2, "lr": 0.001, "seconds": 1.0, "seg": 123.0}
    _append_csv(out / "train_log.csv", orphan)
    if killed == "inside-the-row":
        with open(out / "train_log.csv", "r+", newline="") as f:
            f.truncate(f.read().rindex(",123.0"))
    run(cfg, base_dir=base, resume=True, command=["test"])
    rows = read_log(out)
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "1"), ("2", "2"), ("3", "3")]
    assert all(r["seg"] and float(r["seg"]) != 123.0 for r in rows)


@pytest.mark.parametrize("killed", ["between-the-renames", "after-the-renames"])
def test_a_run_killed_inside_the_state_save_resumes_from_the_newest_state(tiny_config, killed):
    """The state is written to ``state.tmp``, then ``state`` is renamed to ``state.old`` and
    ``state.tmp`` to ``state``, then ``state.old`` removed. A kill between the renames left no
    ``state`` ("nothing to resume"); one after them, a ``state.old`` on which the next save's rename
    failed. Both folder layouts are made from the real states of epochs 1 and 2."""
    cfg, _ = load_config(tiny_config)
    base = tiny_config.parent
    out = run(cfg, base_dir=base, stop_after_epochs=1, command=["test"])
    shutil.copytree(out / "state", base / "epoch1")
    run(cfg, base_dir=base, resume=True, stop_after_epochs=1, command=["test"])
    if killed == "between-the-renames":
        (out / "state").rename(out / "state.tmp")
        (base / "epoch1").rename(out / "state.old")
    else:
        (base / "epoch1").rename(out / "state.old")
    run(cfg, base_dir=base, resume=True, command=["test"])
    assert [(r["epoch"], r["step"]) for r in read_log(out)] == [("1", "1"), ("2", "2"), ("3", "3")]
    assert json.loads((out / "state" / "state.json").read_text())["step"] == 3
    assert not (out / "state.old").exists() and not (out / "state.tmp").exists()


def test_a_fresh_run_into_an_old_run_folder_starts_a_fresh_log(tiny_config):
    """Without --resume the run starts at step 0: the old run's rows go with its state."""
    cfg, _ = load_config(tiny_config)
    base = tiny_config.parent
    out = run(cfg, base_dir=base, stop_after_epochs=2, command=["test"])
    assert len(read_log(out)) == 2
    run(cfg, base_dir=base, stop_after_epochs=1, command=["test"])
    assert [(r["epoch"], r["step"]) for r in read_log(out)] == [("1", "1")]


def test_cached_cases_are_prepared_again_when_their_label_map_changes(phantoms, tmp_path):
    """The prepared-slice cache is keyed by the label file too: an edited label map (a corrected
    case exported again) is read, not replaced by the cached labels of the old one."""
    ct = tmp_path / "ct"
    shutil.copytree(phantoms["ct"], ct)
    cfg = [DatasetConfig(str(ct), "ct", "abdomen", 0)]

    def prepared() -> SliceData:
        return SliceData(cfg, [DatasetInfo.read(ct)], DEFAULT_PARAMS, 64, "resize", None, tmp_path / "cache")

    before = prepared()
    label = ct / "labelsTr" / "phantomct_000.nii.gz"
    image = sitk.ReadImage(str(label))
    sitk.WriteImage(image * 0, str(label))  # the case's organs all erased
    after = prepared()
    assert before.cases[0].label.any() and not after.cases[0].label.any()
    np.testing.assert_array_equal(before.cases[1].label, after.cases[1].label)
