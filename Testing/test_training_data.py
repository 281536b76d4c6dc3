"""Training data: dataset labels and terminology, CT statistics, augmentation, gradient clipping
and data sets sharing a folder name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from training_helpers import (
    dataset,
    read_log,
    training_phantoms,
    write_config,
)

from m4oe.model import build_model
from m4oe.phantom import PHANTOM_LABELS, write_dataset
from m4oe_training.config import ConfigError, load_config
from m4oe_training.train import run


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    return training_phantoms(tmp_path_factory.mktemp("phantoms"))


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


def test_augment_scale_sets_the_range_of_zooms_and_keeps_the_default_draws():
    from m4oe_training.augment import Augmentation, augment_batch, build_augmentation

    assert build_augmentation() == Augmentation()  # 0.15: the draws of every run before the key
    assert build_augmentation(0.5, 0.3) == Augmentation(p_elastic=0.5, max_scale=0.3)
    labels = torch.zeros((64, 64, 64), dtype=torch.int64)
    labels[:, 24:40, 24:40] = 1  # one 16 x 16 square in the middle of each slice
    images = labels[:, None].float()

    def area_ratios(max_scale: float) -> torch.Tensor:
        aug = geometric_only(p_affine=1.0, max_rotation_deg=0.0, max_shift=0.0, max_scale=max_scale)
        _, out = augment_batch(aug, images, labels, seed=11)
        return (out == 1).float().sum(dim=(1, 2)) / 256.0

    narrow, wide = area_ratios(0.15), area_ratios(0.3)
    # the affine's zoom s samples s times the field: an organ's area goes as 1 / s^2
    assert narrow.min() > 1 / 1.15**2 - 0.05 and narrow.max() < 1 / 0.85**2 + 0.05
    assert wide.min() < 1 / 1.15**2 - 0.05 and wide.max() > 1 / 0.85**2 + 0.05
    assert wide.min() > 1 / 1.3**2 - 0.05 and wide.max() < 1 / 0.7**2 + 0.05


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
