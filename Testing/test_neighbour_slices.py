"""Adjacent slices as input channels (``neighbour_slices``, "2.5D"): the architecture and its card,
the engine's input stacks, the one-slice model a run extends, and the training samples (real,
rendered and image-family slices), which must share every draw across a stack."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny_models import save_tiny_model
from training_helpers import UNDEFORMED, dataset, training_phantoms, write_config

from m4oe.card_summary import info_page
from m4oe.checkpoint import load_checkpoint, save_checkpoint
from m4oe.cli import main as m4oe_main
from m4oe.geometry import to_axial_stack
from m4oe.model import SwinUNet
from m4oe.model.config import ModelConfig
from m4oe.phantom import PHANTOM_LABELS
from m4oe.predictor import Predictor
from m4oe.prepare import SlicePlan, neighbour_index
from m4oe.preprocessing import DEFAULT_PARAMS
from m4oe_training.config import ConfigError, DatasetConfig, load_config
from m4oe_training.crossmodal import image_family_slice
from m4oe_training.data import DatasetInfo, SliceData
from m4oe_training.optim import is_shared_parameter
from m4oe_training.synth import render_slice
from m4oe_training.train import run

CT = DEFAULT_PARAMS["ct"]
KEYS = {v: k for k, v in PHANTOM_LABELS.items()}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    return training_phantoms(tmp_path_factory.mktemp("phantoms"))


@pytest.fixture(scope="module")
def one_slice(tmp_path_factory) -> Path:
    """A one-slice tiny M4oE model."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)


def test_architecture_reads_2k_plus_1_slices_and_its_card_says_so(one_slice, tmp_path):
    cfg = ModelConfig(neighbour_slices=2)
    assert cfg.input_channels == 5 and ModelConfig().input_channels == 1
    assert ModelConfig(in_chans=3).input_channels == 3
    with pytest.raises(ValueError, match=r"neighbour_slices must be 0\.\.3"):
        ModelConfig(neighbour_slices=4)
    with pytest.raises(ValueError, match="needs in_chans 1"):
        ModelConfig(in_chans=3, neighbour_slices=1)
    # A one-slice card has no key (it reads as cards written before it); a 2.5D card keeps it.
    assert "neighbour_slices" not in ModelConfig().to_dict()
    model, card = load_checkpoint(one_slice)
    wide = SwinUNet(model.cfg.replace(neighbour_slices=1, gate_context="slice"))
    # The centre slice keeps the one-slice projection and the gates' descriptor reads it alone;
    # the two neighbours have their own projection, zero at the start.
    assert wide.patch_embed.proj.weight.shape[1] == 1 and wide.slice_context.features[0].weight.shape[1] == 1
    assert wide.neighbour_embed.weight.shape[:2] == (model.cfg.embed_dim, 2)
    assert not wide.neighbour_embed.weight.any()
    with pytest.raises(ValueError, match=r"expected input \(B, 3, 64, 64\)"):
        wide(torch.zeros(1, 1, 64, 64))
    folder = save_checkpoint(wide, dataclasses.replace(card, architecture=wide.cfg), tmp_path / "wide")
    page = json.loads((folder / "model.json").read_text())
    assert page["architecture"]["neighbour_slices"] == 1
    assert load_checkpoint(folder)[0].cfg.neighbour_slices == 1
    assert "3 adjacent slices in (1 each side)" in info_page(page, folder / "model.safetensors")


def test_neighbour_index_clamps_at_the_ends_of_the_volume():
    assert neighbour_index(0, 3, 1, 3).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2]]
    assert neighbour_index(4, 5, 2, 5).tolist() == [[2, 3, 4, 4, 4]]


def test_engine_input_stacks_each_slice_with_its_neighbours(phantoms):
    image = sitk.ReadImage(str(next((phantoms["ct"] / "imagesTr").glob("*.nii.gz"))))
    stack = to_axial_stack(image)
    plan = SlicePlan.for_stack(stack, "ct", CT, 64)
    depth = stack.array.shape[0]
    x = plan.neighbour_input(stack.array, 0, depth, 2)
    single = plan.model_input(stack.array)
    assert x.shape == (depth, 5, 64, 64)
    for z in (0, 1, depth // 2, depth - 1):
        for j in range(5):
            assert torch.equal(x[z, j], single[min(max(z - 2 + j, 0), depth - 1), 0])
    part = plan.neighbour_input(stack.array, 3, 7, 2)  # a batch in the middle reads past its ends
    assert torch.equal(part, x[3:7])


def _predict(model, card, image) -> np.ndarray:
    prediction = Predictor(model, card, device="cpu", threads=1).predict(
        image, modality="ct", task="abdomen", cleanup=False, test_time_passes=1, through_plane_sigma_mm=0.0
    )
    return sitk.GetArrayFromImage(prediction.labelmap)


def test_a_one_slice_models_weights_segment_as_it_did_and_the_neighbours_are_read_in_order(
    one_slice, phantoms
):
    """With a one-slice model's weights (and the neighbours' projection at zero) the 2.5D network
    gives that model's labels; with the centre's projection moved to the slice below it segments
    slice z as the model segments slice z - 1: the first neighbour channel is the slice below (the
    first slice repeated at the volume's end)."""
    parent, card = load_checkpoint(one_slice)
    parent.float()
    wide = SwinUNet(parent.cfg.replace(neighbour_slices=1)).eval()
    state = {**parent.state_dict(), "neighbour_embed.weight": wide.neighbour_embed.weight.detach().clone()}
    wide.load_state_dict(state)
    wide_card = dataclasses.replace(card, architecture=wide.cfg)
    image = sitk.ReadImage(str(next((phantoms["ct"] / "imagesTr").glob("*.nii.gz"))))
    expected = _predict(parent, card, image)
    assert len(np.unique(expected)) > 1
    assert np.array_equal(_predict(wide, wide_card, image), expected)
    centre = state["patch_embed.proj.weight"]
    state["neighbour_embed.weight"] = torch.cat([centre, torch.zeros_like(centre)], dim=1)
    state["patch_embed.proj.weight"] = torch.zeros_like(centre)
    wide.load_state_dict(state)
    below = _predict(wide, wide_card, image)
    # the axial stack of this LPS image is its own voxel order: z is numpy axis 0
    assert np.array_equal(below[1:], expected[:-1]) and np.array_equal(below[0], expected[0])


@pytest.mark.slow
def test_onnx_runtime_runs_a_model_that_reads_adjacent_slices(one_slice, phantoms, tmp_path, monkeypatch):
    """The exported graph takes the 3-channel stacks: the same labels as PyTorch."""
    monkeypatch.setenv("M4OE_CACHE_DIR", str(tmp_path / "cache"))
    parent, card = load_checkpoint(one_slice)
    wide = SwinUNet(parent.cfg.replace(neighbour_slices=1)).eval()
    centre = parent.float().state_dict()["patch_embed.proj.weight"]
    below = torch.cat([0.5 * centre, torch.zeros_like(centre)], dim=1)  # reads the slice below too
    wide.load_state_dict({**parent.state_dict(), "neighbour_embed.weight": below})
    folder = save_checkpoint(wide, dataclasses.replace(card, architecture=wide.cfg), tmp_path / "wide")
    image = sitk.ReadImage(str(next((phantoms["ct"] / "imagesTr").glob("*.nii.gz"))))
    labels = []
    for backend in ("torch", "onnx"):
        prediction = Predictor(*load_checkpoint(folder), device="cpu", backend=backend).predict(
            image, modality="ct"
        )
        assert prediction.backend == backend
        labels.append(sitk.GetArrayFromImage(prediction.labelmap))
    assert len(np.unique(labels[0])) > 1 and (labels[0] == labels[1]).mean() >= 0.999


@pytest.mark.parametrize("source", ["real", "ct", "t1", "ct-phase", "ct-to-mr", "mr-to-mr"])
def test_training_stacks_share_every_draw_but_the_noise(phantoms, source):
    """Samples are (B, 3, S, S), the labelled slice in the centre; a stack of identical slices comes
    out as near-identical channels (only the noise differs), far closer than two draws of the slice."""
    root = phantoms["t1" if source == "mr-to-mr" else "ct"]
    info = DatasetInfo.read(root)
    expert = "ct" if source in ("real", "ct", "ct-phase") else "mr"
    cfg = DatasetConfig(
        str(root), expert, "abdomen", val_cases=0, synth="off" if source == "real" else source
    )
    args = ([cfg], [info], {"ct": CT, "mr": DEFAULT_PARAMS["mr"]}, 48, "resize", None, None, UNDEFORMED)
    wide, flat = SliceData(*args, neighbour_slices=1), SliceData(*args)
    images, labels, _ = wide.sample(np.random.default_rng(5), 4, 1.0)
    singles, single_labels, _ = flat.sample(np.random.default_rng(5), 4, 1.0)
    assert images.shape == (4, 3, 48, 48) and singles.shape == (4, 1, 48, 48)
    assert labels.shape == single_labels.shape == (4, 48, 48)
    if source == "real":  # no draw at all: the centre is the slice itself, the others its neighbours
        assert torch.equal(images[:, 1], singles[:, 0]) and torch.equal(labels, single_labels)
        centre = images[0, 1].numpy()
        (case, k), *_ = [
            (c, z) for c in wide.cases for z in range(len(c.image)) if np.array_equal(c.image[z], centre)
        ]
        last = case.image.shape[0] - 1
        around = case.image[[max(k - 1, 0), k, min(k + 1, last)]].astype(np.float32)
        assert torch.equal(images[0], torch.from_numpy(around))
        return
    case = wide.cases[0]
    k = int(case.foreground_slices[len(case.foreground_slices) // 2])
    rng = lambda seed: np.random.default_rng(seed)  # noqa: E731
    if source in ("ct", "t1"):
        anatomy = np.repeat(case.anatomy[k][None], 5, axis=0)
        out, _ = render_slice(anatomy, case.label[k], wide.structure_keys[0], source, rng(1), CT, UNDEFORMED)
        other, _ = render_slice(
            anatomy[1:4], case.label[k], wide.structure_keys[0], source, rng(2), CT, UNDEFORMED
        )
    else:
        image, label = np.repeat(case.image[k][None], 3, axis=0), np.repeat(case.label[k][None], 3, axis=0)
        out, _ = image_family_slice(source, image, label, wide.structure_keys[0], rng(1), CT, UNDEFORMED)
        other, _ = image_family_slice(
            source, image[1], label[1], wide.structure_keys[0], rng(2), CT, UNDEFORMED
        )
    assert out.shape == (3, 48, 48) and other.shape == (48, 48)
    assert np.abs(out[0] - out[2]).mean() < 0.5 * np.abs(out[1] - other).mean()
    # Without noise, the three slices of the stack are one image: every other draw is shared.
    quiet = dataclasses.replace(
        UNDEFORMED, texture_std=(0.0, 0.0), ct_noise_hu=(0.0, 0.0), mr_noise=(0.0, 0.0)
    )
    if source in ("ct", "t1"):
        out, _ = render_slice(anatomy, case.label[k], wide.structure_keys[0], source, rng(1), CT, quiet)
    else:
        out, _ = image_family_slice(source, image, label, wide.structure_keys[0], rng(1), CT, quiet)
    assert np.abs(out[0] - out[1]).max() < 1e-5 and np.abs(out[2] - out[1]).max() < 1e-5


def test_a_run_gives_adjacent_slices_to_a_one_slice_model_and_exports_a_2_5d_model(phantoms, tmp_path):
    datasets = [dataset(phantoms["ct"], "ct"), dataset(phantoms["t1"], "mr")]
    small = {"batch_size": 2, "iterations_per_epoch": 2, "optimizer": "adamw"}
    first = write_config(
        tmp_path / "first.toml",
        datasets,
        [{"kind": "joint", "epochs": 1, "lr": 1e-3}],
        **small,
        model_overrides={"gate_context": "slice"},
        output_dir=str(tmp_path / "first"),
    )
    parent = run(load_config(first)[0], base_dir=tmp_path, command=["test"]) / "model"
    path = write_config(
        tmp_path / "cfg.toml",
        datasets,
        [{"kind": "joint", "epochs": 1, "lr": 1e-4, "anchor_weight": 0.01}],
        **small,
        init=str(parent),
        model_overrides={"neighbour_slices": 1},
        output_dir=str(tmp_path / "run"),
    )
    out = run(load_config(path)[0], base_dir=tmp_path, command=["test"])
    model, card = load_checkpoint(out / "model")
    assert model.cfg.neighbour_slices == 1 and card.architecture.input_channels == 3
    # The neighbours' projection trained from zero at the stage's rate (not the shared layers');
    # the rest started from the parent's weights.
    assert model.neighbour_embed.weight.abs().max() > 0
    assert is_shared_parameter("model.patch_embed.proj.weight")
    assert not is_shared_parameter("model.neighbour_embed.weight")
    seg = tmp_path / "seg.nii.gz"
    volume = next((phantoms["ct"] / "imagesTr").glob("*.nii.gz"))
    argv = ["segment", str(volume), "-o", str(seg), "--model", str(out / "model"), "--threads", "1"]
    assert m4oe_main([*argv, "--progress", "none"]) == 0
    assert sitk.ReadImage(str(seg)).GetSize() == sitk.ReadImage(str(volume)).GetSize()
    # A model that reads adjacent slices keeps their number.
    again = write_config(
        tmp_path / "again.toml",
        datasets,
        [{"kind": "joint", "epochs": 1, "lr": 1e-4}],
        init=str(out / "model"),
        model_overrides={"neighbour_slices": 2},
        output_dir=str(tmp_path / "again"),
    )
    with pytest.raises(ConfigError, match="reads 1 adjacent slices per side"):
        run(load_config(again)[0], base_dir=tmp_path, command=["test"])
