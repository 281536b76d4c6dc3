"""Training images of another contrast from real slices (m4oe_training.crossmodal): MR-like images
of real CT slices (synth family "ct-to-mr") and real MR slices given a random contrast ("mr-to-mr")."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
from training_helpers import UNDEFORMED

from m4oe.checkpoint import read_model_card
from m4oe.hub import resolve_model
from m4oe.phantom import PHANTOM_LABELS, write_dataset
from m4oe.preprocessing import DEFAULT_PARAMS, IntensityParams
from m4oe_training.config import ConfigError, DatasetConfig, StageConfig, TrainConfig
from m4oe_training.crossmodal import (
    body_mask,
    image_family_slice,
    mr_body_mask,
    mr_from_ct_slice,
    mr_from_mr_slice,
    opposed_phase,
    random_intensity_net,
)
from m4oe_training.data import DatasetInfo, SliceData, dataset_modality
from m4oe_training.examples import write_examples
from m4oe_training.synth import SynthSettings

CT = IntensityParams.ct((-1000.0, 1000.0), mean=0.0, std=1000.0)  # normalised = HU / 1000
STILL = dataclasses.replace(  # no deformation, blur, bias, gamma, noise or resolution loss
    UNDEFORMED,
    blur_sigma=(0.0, 0.0),
    bias_strength=(0.0, 0.0),
    gamma_std=0.0,
    mr_noise=(0.0, 0.0),
    p_low_resolution=0.0,
)


def ct_slice(size: int = 64) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A CT slice in HU / 1000 (CT above): air, a table strip under a body of fat around soft
    tissue with a liver, a bright vertebra and a bubble of bowel gas; its labels; region masks."""
    yy, xx = np.mgrid[:size, :size]
    hu = np.full((size, size), -1000.0)
    body = (yy - 30) ** 2 / 24**2 + (xx - 32) ** 2 / 28**2 < 1
    hu[body] = -100.0
    inner = (yy - 30) ** 2 / 18**2 + (xx - 32) ** 2 / 22**2 < 1
    hu[inner] = 40.0
    table = (yy >= 58) & (yy <= 59) & (xx > 6) & (xx < 58)
    hu[table] = 200.0
    gas = (yy - 30) ** 2 + (xx - 44) ** 2 < 9
    hu[gas] = -900.0
    target = np.zeros((size, size), np.uint8)
    target[18:32, 14:30] = PHANTOM_LABELS["liver"]
    hu[18:32, 14:30] = 60.0
    target[40:46, 29:35] = PHANTOM_LABELS["vertebrae"]
    hu[40:46, 29:35] = 500.0
    regions = {"body": body & ~gas, "table": table, "gas": gas, "air": ~body & ~table}
    return (hu / 1000.0).astype(np.float32), target, regions


def test_random_intensity_net_remaps_regions_keeps_edges_and_is_reproducible():
    size = 48
    x = np.zeros((2, size, size), np.float32)
    x[0, :, :24], x[0, :, 24:] = 0.2, 0.8  # two regions, one edge between them
    x[1, :, :24], x[1, :, 24:] = 0.5, 0.6
    left, right = (slice(8, 40), slice(6, 18)), (slice(8, 40), slice(30, 42))  # away from edge and border
    brighter_right, differ = [], 0
    for seed in range(20):
        out = random_intensity_net(x, np.random.default_rng(seed))
        assert out.shape == (size, size) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        a, b = out[left], out[right]
        assert a.std() < 1e-5 and b.std() < 1e-5  # a region stays one intensity: no texture invented
        differ += abs(float(a.mean()) - float(b.mean())) > 0.01
        brighter_right.append(float(b.mean()) > float(a.mean()))
        np.testing.assert_array_equal(out, random_intensity_net(x, np.random.default_rng(seed)))
    assert differ >= 15  # the edge survives in (nearly) every draw
    assert 0 < sum(brighter_right) < 20  # and the contrast is sometimes inverted: not a monotone map
    assert not np.array_equal(
        random_intensity_net(x, np.random.default_rng(0)), random_intensity_net(x, np.random.default_rng(1))
    )
    with pytest.raises(ValueError, match=r"\(V, S, S\) or \(N, V, S, S\) views"):
        random_intensity_net(x[0], np.random.default_rng(0))


def test_body_mask_keeps_the_body_and_drops_table_air_and_gas():
    image, _, regions = ct_slice()
    mask = body_mask(image * 1000.0)
    np.testing.assert_array_equal(mask, regions["body"])
    assert not body_mask(np.full((8, 8), -1000.0)).any()


def test_mr_from_ct_slice_has_no_signal_outside_the_body_and_keeps_the_labels():
    image, target, regions = ct_slice()
    outs = []
    for seed in range(6):
        out, labels = mr_from_ct_slice(image, target, np.random.default_rng(seed), CT, STILL)
        assert out.shape == target.shape and out.dtype == np.float32 and np.isfinite(out).all()
        np.testing.assert_array_equal(labels, target)  # no deformation asked: labels as given
        assert labels.dtype == np.uint8
        empty = out[regions["air"] | regions["table"] | regions["gas"]]
        # one value, the darkest (to float error of the identity resampling): no MR signal
        assert np.ptp(empty) < 1e-4 and abs(float(empty.max()) - float(out.min())) < 1e-4
        assert (out[regions["body"]] > empty.max() + 0.1).any()
        outs.append(out)
    assert not all(np.array_equal(outs[0], o) for o in outs[1:])  # each draw its own contrast
    again, _ = mr_from_ct_slice(image, target, np.random.default_rng(0), CT, STILL)
    np.testing.assert_array_equal(again, outs[0])
    # with the default draws the slice and its labels deform together and keep label values
    out, labels = mr_from_ct_slice(image, target, np.random.default_rng(1), CT)
    assert not np.array_equal(labels, target) and set(np.unique(labels)) <= set(np.unique(target))
    with pytest.raises(ValueError, match="a \\(C, S, S\\) stack with C odd"):
        mr_from_ct_slice(np.stack([image] * 2), np.stack([target] * 2), np.random.default_rng(0), CT)
    with pytest.raises(ValueError, match="the same shape"):
        mr_from_ct_slice(np.stack([image] * 3), target, np.random.default_rng(0), CT)
    with pytest.raises(ValueError, match="image family must be one of"):
        image_family_slice("t1", image, target, {}, np.random.default_rng(0), CT)


@pytest.fixture(scope="module")
def ct_phantoms(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("crossmodal") / "ct", "ct", 2, seed=5, max_size=48)


def test_ct_to_mr_trains_mr_experts_from_ct_datasets_only(ct_phantoms, tmp_path):
    info = DatasetInfo.read(ct_phantoms)
    params = {"ct": DEFAULT_PARAMS["ct"], "mr": DEFAULT_PARAMS["mr"]}
    ct_to_mr = DatasetConfig(str(ct_phantoms), "mr-t1", "abdomen", val_cases=0, synth="ct-to-mr")
    assert dataset_modality(ct_to_mr, info) == "mr"
    data = SliceData([ct_to_mr], [info], params, 48, "resize", None, tmp_path / "cache")
    assert data.by_dataset[0][0].anatomy is None  # drawn from the images, not from label maps
    images, labels, index = data.sample(np.random.default_rng(0), 12, 1.0)
    assert images.shape == (12, 1, 48, 48) and labels.shape == (12, 48, 48) and set(index.tolist()) == {0}
    real = [c.image[k].astype(np.float32) for c in data.cases for k in range(c.image.shape[0])]
    assert not any(np.array_equal(images[i, 0].numpy(), r) for i in range(12) for r in real)
    assert labels.max() > 0
    for bad in (
        dataclasses.replace(ct_to_mr, val_cases=1),
        dataclasses.replace(ct_to_mr, synth_fraction=0.5),
    ):
        with pytest.raises(ConfigError, match="set synth_fraction = 1 and val_cases = 0"):
            SliceData([bad], [info], params, 48, "resize", None, None)
    mr_info = dataclasses.replace(info, modality="mr")
    with pytest.raises(ConfigError, match="works on the dataset's own ct images, but the dataset is mr"):
        SliceData([ct_to_mr], [mr_info], params, 48, "resize", None, None)


def test_write_examples_shows_ct_to_mr_images_of_ct_datasets_only(ct_phantoms, tmp_path):
    card = read_model_card(resolve_model("m4oe-phantom"))
    paths = write_examples(ct_phantoms, tmp_path / "ex", "ct-to-mr", 3, 0, card)
    images = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[1])))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[2])))
    assert images.shape == labels.shape == (3, card.architecture.img_size, card.architecture.img_size)
    for image in images:  # outside the body no signal but noise: the corners are the dark part
        corners = np.concatenate([image[:8, :8].ravel(), image[:8, -8:].ravel(), image[-8:, :8].ravel()])
        assert corners.mean() < np.percentile(image, 60) and labels.max() > 0
    mr = write_dataset(tmp_path / "t1", "t1", 1, seed=4, max_size=48)
    with pytest.raises(ValueError, match="needs a ct dataset, got mr"):
        write_examples(mr, tmp_path / "bad", "ct-to-mr", 3, 0, card)
    assert not (tmp_path / "bad").exists()


def test_opposed_phase_cancels_where_fat_meets_tissue_and_nowhere_else():
    # 32 x 32 HU: fat (-100 HU) in the left half, tissue in the right (an enhancing organ, 150 HU)
    hu = np.full((32, 32), -100.0, np.float32)
    hu[:, 16:] = 150.0
    signal = np.full((32, 32), 2.0, np.float32)
    out = opposed_phase(signal, hu, sigma_px=1.0, depth=1.0)
    assert out.dtype == np.float32 and out.shape == hu.shape
    # pure fat and pure tissue keep their signal, a few pixels from the border
    np.testing.assert_allclose(out[:, :11], 2.0, atol=1e-3)
    np.testing.assert_allclose(out[:, 21:], 2.0, atol=1e-3)
    # the two pixels at the border share fat and tissue: a dark line, one column either side
    assert out[:, 15:17].max() < 0.45 * 2.0 and out[:, 15:17].max() < out[:, [14, 17]].min()
    # a shared pixel reads by its mean HU: -60 (mostly fat) moves the line one pixel into the tissue
    hu[:, 16] = -60.0
    moved = opposed_phase(signal, hu, sigma_px=1.0)
    np.testing.assert_allclose(moved[:, 1:31], out[:, :30], atol=1e-5)
    # depth scales the loss; sigma 0 leaves a sharp border with nothing half and half
    half = opposed_phase(signal, hu, sigma_px=1.0, depth=0.5)
    np.testing.assert_allclose(2.0 - half, 0.5 * (2.0 - moved), atol=1e-5)
    np.testing.assert_allclose(opposed_phase(signal, hu, sigma_px=0.0), signal)


def test_ct_to_mr_opposed_phase_share_changes_only_the_slices_it_draws():
    image, target, regions = ct_slice()
    # off (the default): the draws of every run configured before the option, unchanged
    off = dataclasses.replace(STILL, p_ct_opposed_phase=0.0)
    for seed in range(3):
        a, _ = mr_from_ct_slice(image, target, np.random.default_rng(seed), CT, STILL)
        b, _ = mr_from_ct_slice(image, target, np.random.default_rng(seed), CT, off)
        np.testing.assert_array_equal(a, b)
    # always: the border of the body's fat with the soft tissue inside turns dark against both sides
    on = dataclasses.replace(STILL, p_ct_opposed_phase=1.0)
    yy, xx = np.mgrid[:64, :64]
    ring = np.abs(np.sqrt((yy - 30) ** 2 / 18**2 + (xx - 32) ** 2 / 22**2) - 1.0) < 0.03
    fat = regions["body"] & ((yy - 30) ** 2 / 18**2 + (xx - 32) ** 2 / 22**2 > 1.25)
    inner = ((yy - 30) ** 2 / 14**2 + (xx - 32) ** 2 / 18**2 < 1) & (target == 0) & ~regions["gas"]
    darker = 0
    for seed in range(6):
        out, labels = mr_from_ct_slice(image, target, np.random.default_rng(seed), CT, on)
        np.testing.assert_array_equal(labels, target)
        if np.median(out[ring]) < min(np.median(out[fat]), np.median(out[inner])):
            darker += 1
    assert darker == 6
    # the config key: a share, handed to the run's draws
    stage = StageConfig(kind="joint", epochs=1, lr=1e-3)
    dataset = DatasetConfig("x", "mr-t1", "abdomen")
    with pytest.raises(ConfigError, match="synth_opposed_phase"):
        TrainConfig(name="x", datasets=(dataset,), stages=(stage,), synth_opposed_phase=1.5)
    cfg = TrainConfig(name="x", datasets=(dataset,), stages=(stage,), synth_opposed_phase=0.5)
    assert cfg.synth_settings() == SynthSettings(p_ct_opposed_phase=0.5)


def mr_slice(size: int = 64) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """An MR slice normalised as the engine does (z-score; the air its darkest value, with noise):
    a body of tissue around a bright kidney, a dark liver and a black gas bubble; labels; regions."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:size, :size]
    x = 0.01 * rng.random((size, size))  # air: noise near 0
    body = (yy - 30) ** 2 / 24**2 + (xx - 32) ** 2 / 28**2 < 1
    x[body] = 0.4
    gas = (yy - 30) ** 2 + (xx - 44) ** 2 < 9
    x[gas] = 0.0
    target = np.zeros((size, size), np.uint8)
    target[18:32, 14:30] = PHANTOM_LABELS["liver"]
    x[18:32, 14:30] = 0.2
    target[36:44, 34:40] = PHANTOM_LABELS["kidney_right"]
    x[36:44, 34:40] = 0.9
    regions = {"body": body, "air": ~body, "gas": gas, "liver": target == PHANTOM_LABELS["liver"]}
    regions["tissue"] = body & ~gas & (target == 0)
    return ((x - 0.3) / 0.25).astype(np.float32), target, regions


def test_mr_body_mask_keeps_the_body_with_its_holes_and_drops_the_air():
    image, _, regions = mr_slice()
    x = (image - image.min()) / (image.max() - image.min())
    np.testing.assert_array_equal(mr_body_mask(x), regions["body"])  # the gas inside stays body
    assert not mr_body_mask(np.zeros((8, 8), np.float32)).any()


def test_mr_from_mr_slice_draws_new_contrasts_of_the_same_anatomy():
    image, target, regions = mr_slice()
    outs, liver_darker = [], []
    for seed in range(24):
        out, labels = mr_from_mr_slice(image, target, np.random.default_rng(seed), STILL)
        assert out.shape == target.shape and out.dtype == np.float32 and np.isfinite(out).all()
        np.testing.assert_array_equal(labels, target)  # no deformation asked: labels as given
        air = out[regions["air"]]
        assert np.ptp(air) < 1e-4 and abs(float(air.max()) - float(out.min())) < 1e-4  # no signal
        liver, tissue = float(np.median(out[regions["liver"]])), float(np.median(out[regions["tissue"]]))
        liver_darker.append(liver < tissue)
        outs.append(out)
    # the input's liver is darker than the tissue around it; the draws keep it so or invert it
    assert 0 < sum(liver_darker) < 24  # about one draw in six inverts it
    assert not all(np.array_equal(outs[0], o) for o in outs[1:])
    np.testing.assert_array_equal(
        mr_from_mr_slice(image, target, np.random.default_rng(0), STILL)[0], outs[0]
    )
    same, _ = image_family_slice("mr-to-mr", image, target, {}, np.random.default_rng(0), CT, STILL)
    np.testing.assert_array_equal(same, outs[0])
    out, labels = mr_from_mr_slice(image, target, np.random.default_rng(1))  # default draws deform both
    assert not np.array_equal(labels, target) and set(np.unique(labels)) <= set(np.unique(target))
    with pytest.raises(ValueError, match="a \\(C, S, S\\) stack with C odd"):
        mr_from_mr_slice(np.stack([image] * 2), np.stack([target] * 2), np.random.default_rng(0))


def test_mr_to_mr_trains_any_mr_expert_from_mr_datasets_only(tmp_path):
    t2 = write_dataset(tmp_path / "t2", "t2", 2, seed=6, max_size=48)
    info = DatasetInfo.read(t2)
    params = {"ct": DEFAULT_PARAMS["ct"], "mr": DEFAULT_PARAMS["mr"]}
    # the same modality as the images: a share of the samples, and validation cases, are allowed
    mr_to_mr = DatasetConfig(str(t2), "mr-t1", "abdomen", val_cases=1, synth="mr-to-mr", synth_fraction=1.0)
    assert dataset_modality(mr_to_mr, info) == "mr"
    data = SliceData([mr_to_mr], [info], params, 48, "resize", None, tmp_path / "cache")
    assert data.by_dataset[0][0].anatomy is None  # drawn from the images, not from label maps
    images, labels, _ = data.sample(np.random.default_rng(0), 8, 1.0)
    assert images.shape == (8, 1, 48, 48) and labels.max() > 0
    real = [c.image[k].astype(np.float32) for c in data.cases for k in range(c.image.shape[0])]
    assert not any(np.array_equal(images[i, 0].numpy(), r) for i in range(8) for r in real)
    half = dataclasses.replace(mr_to_mr, synth_fraction=0.5)
    SliceData([half], [info], params, 48, "resize", None, None)
    ct_info = dataclasses.replace(info, modality="ct")
    with pytest.raises(ConfigError, match="works on the dataset's own mr images, but the dataset is ct"):
        SliceData([mr_to_mr], [ct_info], params, 48, "resize", None, None)
    card = read_model_card(resolve_model("m4oe-phantom"))
    paths = write_examples(t2, tmp_path / "ex", "mr-to-mr", 2, 0, card)
    assert sitk.ReadImage(str(paths[1])).GetSize()[2] == 2
    ct = write_dataset(tmp_path / "ct", "ct", 1, seed=4, max_size=48)
    with pytest.raises(ValueError, match="needs a mr dataset, got ct"):
        write_examples(ct, tmp_path / "bad", "mr-to-mr", 2, 0, card)
