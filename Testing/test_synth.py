"""Images rendered from label maps (m4oe_training.synth) and their use as a training data source."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from training_helpers import UNDEFORMED

from m4oe.checkpoint import read_model_card
from m4oe.hub import resolve_model
from m4oe.phantom import PHANTOM_LABELS, write_dataset
from m4oe.preprocessing import DEFAULT_PARAMS, IntensityParams
from m4oe_training.anatomy import (
    DENSE,
    FAT,
    FLUID,
    SOFT_HIGH,
    SOFT_LOW,
    add_organ_interiors,
    anatomy_from_image,
    change_fat_layer,
    structure_keys,
)
from m4oe_training.config import SYNTH_CHOICES, ConfigError, DatasetConfig, StageConfig, TrainConfig
from m4oe_training.crossmodal import image_family_slice
from m4oe_training.data import DatasetInfo, SliceData, dataset_modality
from m4oe_training.examples import write_examples
from m4oe_training.families import FAMILIES, IMAGE_FAMILIES
from m4oe_training.synth import (
    CT_ENHANCING,
    CT_HU,
    CT_PHASES,
    SynthSettings,
    deform,
    enhance_slice,
    neighbours,
    render_slice,
)

CT = IntensityParams.ct((-1000.0, 1000.0), mean=0.0, std=1000.0)  # normalised = HU / 1000
STILL = dataclasses.replace(  # no deformation, texture, blur, noise or resolution loss
    UNDEFORMED,
    texture_std=(0.0, 0.0),
    neighbour_weight=(0.0, 0.0),
    blur_sigma=(0.0, 0.0),
    bias_strength=(0.0, 0.0),
    gamma_std=0.0,
    ct_noise_hu=(0.0, 0.0),
    mr_noise=(0.0, 0.0),
    p_low_resolution=0.0,
    p_opposed_phase=0.0,
    p_fat_suppressed=0.0,
    p_invert=0.0,
    p_random_contrast=0.0,
)
KEYS = structure_keys(PHANTOM_LABELS)


def toy_anatomy(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A body of fat around soft tissue holding a liver (1), spleen (2) and a vertebra (7): (3, S, S)
    anatomy (the same slice three times) and (S, S) target labels."""
    yy, xx = np.mgrid[:size, :size]
    anatomy = np.zeros((size, size), np.uint8)
    anatomy[(yy - 32) ** 2 / 26**2 + (xx - 32) ** 2 / 30**2 < 1] = FAT
    anatomy[(yy - 32) ** 2 / 20**2 + (xx - 32) ** 2 / 24**2 < 1] = SOFT_LOW
    target = np.zeros((size, size), np.uint8)
    target[20:36, 12:30] = PHANTOM_LABELS["liver"]
    target[22:32, 40:50] = PHANTOM_LABELS["spleen"]
    target[42:48, 29:35] = PHANTOM_LABELS["vertebrae"]
    anatomy[target > 0] = target[target > 0]
    return np.stack([anatomy] * 3), target


def test_anatomy_from_ct_splits_the_unlabelled_body_by_hounsfield_units_and_keeps_organs():
    hu = np.array([-1000, -100, 10, 60, 400], np.float32)
    image = np.repeat(np.repeat(hu, 4)[None, None, :], 4, axis=1)  # (1, 4, 20): 4-pixel bands
    labels = np.zeros(image.shape, np.uint8)
    labels[0, :, 8:12] = 1  # the 10 HU band is liver
    anatomy = anatomy_from_image(image, labels, "ct")
    assert anatomy.dtype == np.uint8 and anatomy.shape == image.shape
    assert anatomy[0, 1, ::4].tolist() == [0, FAT, 1, SOFT_HIGH, DENSE]
    labels[0, :, 8:12] = 0
    assert anatomy_from_image(image, labels, "ct")[0, 1, 8] == SOFT_LOW


def test_anatomy_from_mr_uses_intensity_tertiles_of_the_unlabelled_body():
    values = np.array([0, 100, 200, 300], np.float32)
    image = np.repeat(np.repeat(values, 5)[None, None, :], 5, axis=1)
    labels = np.zeros(image.shape, np.uint8)
    anatomy = anatomy_from_image(image, labels, "mr")
    assert anatomy[0, 2, ::5].tolist() == [0, SOFT_LOW, SOFT_HIGH, FAT]


def test_anatomy_refuses_mismatched_shapes_and_unknown_modalities():
    with pytest.raises(ValueError, match="differs from label shape"):
        anatomy_from_image(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), np.uint8), "ct")
    with pytest.raises(ValueError, match="modality must be"):
        anatomy_from_image(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), np.uint8), "pet")
    with pytest.raises(ValueError, match="organ labels must lie in"):
        anatomy_from_image(np.zeros((1, 2, 2)), np.full((1, 2, 2), FAT, np.uint8), "ct")


def test_ct_renders_give_each_structure_one_plausible_hounsfield_value_per_phase():
    anatomy, target = toy_anatomy()
    for seed in range(12):
        image, labels = render_slice(anatomy, target, KEYS, "ct", np.random.default_rng(seed), CT, STILL)
        hu = image * 1000.0
        np.testing.assert_array_equal(labels, target)
        for key in ("liver", "spleen", "vertebrae"):
            region = hu[target == PHANTOM_LABELS[key]]
            assert np.ptp(region) < 1e-3  # one value per structure when texture and noise are off
            low = min(r[0] for r in CT_HU[key])
            high = max(r[1] for r in CT_HU[key])
            assert low - 1e-3 <= region[0] <= high + 1e-3, (key, region[0])
        assert -1010 <= hu[0, 0] <= -950  # air outside the body
        assert -130 <= hu[anatomy[1] == FAT][0] <= -70


def test_mr_families_keep_their_characteristic_contrasts():
    anatomy, target = toy_anatomy()
    fat = anatomy[1] == FAT
    liver, spleen = target == PHANTOM_LABELS["liver"], target == PHANTOM_LABELS["spleen"]
    for seed in range(10):
        t1, _ = render_slice(anatomy, target, KEYS, "t1", np.random.default_rng(seed), CT, STILL)
        t2, _ = render_slice(anatomy, target, KEYS, "t2", np.random.default_rng(seed), CT, STILL)
        assert t1[fat].mean() > t1[liver].mean()  # fat bright on T1
        assert t2[spleen].mean() > t2[liver].mean()  # spleen brighter than liver on T2
        for image in (t1, t2):  # MR z-score: order kept, air the darkest, the body spread around 0
            assert image[0, 0] == image.min() and -3.0 < image.min() < 0.0 < image.max() < 3.0


def test_renders_are_reproducible_from_the_generator_and_vary_between_seeds():
    anatomy, target = toy_anatomy()
    first = render_slice(anatomy, target, KEYS, "any", np.random.default_rng(5), CT)
    again = render_slice(anatomy, target, KEYS, "any", np.random.default_rng(5), CT)
    other = render_slice(anatomy, target, KEYS, "any", np.random.default_rng(6), CT)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.allclose(first[0], other[0])


def native_ct_slice(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`toy_anatomy` as a textured native CT slice (HU / 1000, see ``CT``) and its labels."""
    anatomy, target = toy_anatomy(size)
    hu = np.full(anatomy.shape[1:], -1000.0, np.float32)
    for value, base in ((FAT, -100.0), (SOFT_LOW, 20.0)):
        hu[anatomy[1] == value] = base
    for key, base in (("liver", 50.0), ("spleen", 42.0), ("vertebrae", 300.0)):
        hu[target == PHANTOM_LABELS[key]] = base
    body = hu > -1000
    hu[body] += np.random.default_rng(seed).normal(0.0, 12.0, int(body.sum()))
    return hu / 1000.0, target


def interior(mask: np.ndarray, pixels: int = 3) -> np.ndarray:
    """The mask without its rim: where the blurred shift map equals the organ's own shift."""
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=pixels)


def test_ct_phase_moves_enhancing_organs_to_one_phase_and_keeps_the_real_texture():
    image, target = native_ct_slice()
    hu_in = image * 1000.0
    organs = {key: target == PHANTOM_LABELS[key] for key in ("liver", "spleen", "vertebrae")}
    phases_seen = set()
    for seed in range(16):
        out, labels = enhance_slice(image, target, KEYS, np.random.default_rng(seed), CT, STILL)
        np.testing.assert_array_equal(labels, target)  # no deformation in STILL: labels in place
        hu = out * 1000.0
        medians = {key: float(np.median(hu[interior(m, 1)])) for key, m in organs.items()}
        phases = [
            p
            for p in range(len(CT_PHASES))
            if all(CT_HU[k][p][0] - 1 <= medians[k] <= CT_HU[k][p][1] + 1 for k in ("liver", "spleen"))
        ]
        assert phases, medians  # liver and spleen moved to the ranges of one and the same phase
        phases_seen.update(phases)
        for key in ("liver", "spleen"):  # the texture is the real one, shifted, not redrawn
            inside = interior(organs[key])
            np.testing.assert_allclose(
                hu[inside] - hu[inside].mean(), hu_in[inside] - hu_in[inside].mean(), atol=1e-2
            )
        # bone and fat do not enhance: they keep their values exactly, away from an organ's rim
        untouched = interior(organs["vertebrae"], 1) | interior(target == 0, 4)
        np.testing.assert_allclose(hu[untouched], hu_in[untouched], atol=1e-2)
    assert len(phases_seen) >= 3  # the draws cover the phases, not one
    assert "vertebrae" not in CT_ENHANCING and "aorta" in CT_ENHANCING


def test_ct_phase_deforms_image_and_labels_together_and_is_reproducible():
    image, target = native_ct_slice(seed=1)
    first = enhance_slice(image, target, KEYS, np.random.default_rng(3), CT)
    again = enhance_slice(image, target, KEYS, np.random.default_rng(3), CT)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    out, labels = first
    assert out.shape == labels.shape == target.shape and labels.dtype == np.uint8
    assert not np.array_equal(labels, target)  # the default settings deform
    assert set(np.unique(labels)) <= set(np.unique(target))  # nearest neighbour: no new values
    # the bright vertebra and its label moved together: the label covers the brightest pixels
    vertebra = labels == PHANTOM_LABELS["vertebrae"]
    assert vertebra.any() and np.median(out[vertebra]) * 1000 > 150 > np.median(out[labels == 0]) * 1000
    with pytest.raises(ValueError, match="a \\(C, S, S\\) stack with C odd"):
        enhance_slice(np.stack([image] * 2), np.stack([target] * 2), KEYS, np.random.default_rng(0), CT)
    # through the image-family entry point a run's settings reach the phase family too
    by_family = image_family_slice("ct-phase", image, target, KEYS, np.random.default_rng(3), CT, STILL)
    still = enhance_slice(image, target, KEYS, np.random.default_rng(3), CT, STILL)
    np.testing.assert_array_equal(by_family[0], still[0])
    np.testing.assert_array_equal(by_family[1], target)  # STILL does not deform


def test_ct_phase_needs_a_ct_dataset_and_reads_no_anatomy(ct_phantoms, tmp_path):
    info = DatasetInfo.read(ct_phantoms)
    params = {"ct": DEFAULT_PARAMS["ct"], "mr": DEFAULT_PARAMS["mr"]}
    phase = DatasetConfig(
        str(ct_phantoms), "ct", "abdomen", val_cases=0, synth="ct-phase", synth_fraction=0.5
    )
    assert dataset_modality(phase, info) == "ct"
    data = SliceData([phase], [info], params, 48, "resize", None, tmp_path / "cache")
    assert data.by_dataset[0][0].anatomy is None  # it works on the images, not on label maps
    images, labels, _ = data.sample(np.random.default_rng(0), 16, 1.0)
    assert images.shape == (16, 1, 48, 48) and labels.shape == (16, 48, 48)
    real = [c.image[k].astype(np.float32) for c in data.cases for k in range(c.image.shape[0])]
    matches = [any(np.array_equal(images[i, 0].numpy(), r) for r in real) for i in range(16)]
    assert 0 < sum(matches) < 16  # about half the samples real, the rest with a simulated phase
    mr_info = dataclasses.replace(info, modality="mr")
    with pytest.raises(ConfigError, match="works on the dataset's own ct images, but the dataset is mr"):
        SliceData([phase], [mr_info], params, 48, "resize", None, None)


def test_deformation_moves_anatomy_and_labels_together():
    """With deformation on and every other effect off, each target label still covers pixels of one
    intensity: the image was rendered from the anatomy warped exactly as the labels were."""
    anatomy, target = toy_anatomy()
    settings = dataclasses.replace(
        STILL, max_rotation_deg=25.0, scale=(0.8, 1.2), max_shift=0.1, p_elastic=1.0
    )
    moved = 0
    for seed in range(6):
        image, labels = render_slice(anatomy, target, KEYS, "ct", np.random.default_rng(seed), CT, settings)
        moved += int((labels != target).sum())
        for value in (1, 2, 7):
            region = image[labels == value]
            assert region.size > 10 and np.ptp(region) < 1e-6
    assert moved > 100  # the maps did move


def test_deform_keeps_label_values_and_slice_thickness_mixes_neighbours():
    import torch

    anatomy, target = toy_anatomy()
    warped = deform(torch.from_numpy(anatomy.astype(np.int64)), np.random.default_rng(0), SynthSettings())
    assert set(np.unique(warped.numpy())) <= set(np.unique(anatomy))
    volume = np.stack([anatomy[0], np.zeros_like(anatomy[0]), anatomy[0]])
    np.testing.assert_array_equal(neighbours(volume, 0), volume[[0, 0, 1]])
    np.testing.assert_array_equal(neighbours(volume, 2), volume[[1, 2, 2]])
    thick = dataclasses.replace(STILL, neighbour_weight=(0.5, 0.5))
    mixed, _ = render_slice(
        neighbours(volume, 1), target * 0, KEYS, "ct", np.random.default_rng(1), CT, thick
    )
    liver = target == 1
    # slice k is air; its neighbours' liver shows through at half weight each: between air and liver
    assert -1.0 < mixed[liver].mean() < mixed[0, 0] + 0.6


def test_render_refuses_bad_arguments():
    anatomy, target = toy_anatomy()
    with pytest.raises(ValueError, match="family must be one of"):
        render_slice(anatomy, target, KEYS, "pet", np.random.default_rng(0), CT)
    with pytest.raises(ValueError, match=r"anatomy \(C \+ 2, S, S\) with C odd"):
        render_slice(anatomy[:2], target, KEYS, "ct", np.random.default_rng(0), CT)


def test_config_and_command_line_offer_the_generators_families():
    import argparse

    from m4oe_training.cli import register_synth

    assert SYNTH_CHOICES == ("off", *FAMILIES, *IMAGE_FAMILIES)
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    register_synth(commands)
    (synth,) = [a for a in commands.choices["synth"]._actions if a.dest == "family"]
    assert tuple(synth.choices) == SYNTH_CHOICES[1:]
    # The command line registers into `m4oe` at every start: it must not pull PyTorch in.
    code = "import sys, m4oe_training.cli; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert run.stdout.strip() == "False"


@pytest.fixture(scope="module")
def ct_phantoms(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synth") / "ct", "ct", 2, seed=3, max_size=48)


def test_slice_data_renders_synth_datasets_and_keeps_real_images_otherwise(ct_phantoms, tmp_path):
    info = DatasetInfo.read(ct_phantoms)
    real = DatasetConfig(str(ct_phantoms), "ct", "abdomen", val_cases=0)
    t1 = DatasetConfig(str(ct_phantoms), "mr-t1", "abdomen", val_cases=0, synth="t1")
    params = {"ct": DEFAULT_PARAMS["ct"], "mr": DEFAULT_PARAMS["mr"]}
    data = SliceData([real, t1], [info, info], params, 48, "resize", None, tmp_path / "cache")
    assert data.by_dataset[0][0].anatomy is None
    anatomy = data.by_dataset[1][0].anatomy
    assert anatomy.shape == data.by_dataset[1][0].label.shape and anatomy.dtype == np.uint8
    assert {FAT, SOFT_LOW} <= set(np.unique(anatomy))
    images, labels, index = data.sample(np.random.default_rng(0), 16, 1.0)
    again = data.sample(np.random.default_rng(0), 16, 1.0)
    assert all(torch_equal(a, b) for a, b in zip((images, labels, index), again, strict=True))
    stored = {c.case: c for c in data.cases if c.dataset == 0}
    for image, d in zip(images[:, 0].numpy(), index.tolist(), strict=True):
        is_stored = any(
            np.array_equal(image, c.image[k].astype(np.float32))
            for c in stored.values()
            for k in range(len(c.image))
        )
        assert is_stored == (d == 0)
    # the anatomy is cached with the prepared slices and read back, not derived again
    cached = SliceData([t1], [info], params, 48, "resize", None, tmp_path / "cache")
    np.testing.assert_array_equal(cached.by_dataset[0][0].anatomy, anatomy)
    assert dataset_modality(t1, info) == "mr" and dataset_modality(real, info) == "ct"


def test_datasets_are_drawn_in_proportion_to_their_weights(ct_phantoms, tmp_path):
    """``weight`` 3 : 1 draws about three quarters of the samples from the first dataset; equal
    weights of any size keep the uniform draw, so a config without weights gives the batches it
    always gave."""
    info = DatasetInfo.read(ct_phantoms)
    params = {"ct": DEFAULT_PARAMS["ct"], "mr": DEFAULT_PARAMS["mr"]}

    def data(*weights):
        datasets = [DatasetConfig(str(ct_phantoms), "ct", "abdomen", val_cases=0, weight=w) for w in weights]
        return SliceData(datasets, [info] * len(weights), params, 48, "resize", None, tmp_path / "cache")

    _, _, index = data(3.0, 1.0).sample(np.random.default_rng(0), 800, 0.0)
    share = float((index == 0).float().mean())
    assert 0.70 < share < 0.80  # binomial standard deviation 0.015 around 0.75
    _, _, uniform = data(1.0, 1.0).sample(np.random.default_rng(0), 800, 0.0)
    _, _, scaled = data(2.5, 2.5).sample(np.random.default_rng(0), 800, 0.0)
    assert torch_equal(uniform, scaled) and 0.45 < float((uniform == 0).float().mean()) < 0.55


def test_fat_layer_grows_or_thins_the_body_and_leaves_organs_table_and_bowel_gas():
    """The outline moves by the asked distance; organs, a table apart from the body and air inside
    the body (bowel gas) are untouched, and a thinned layer removes only fat the target does not label."""
    anatomy, target = toy_anatomy()
    anatomy[:, 40:44, 6:9] = 0  # bowel gas in the body's fat, next to its outline
    anatomy[:, 62:64, 10:54] = DENSE  # a scanner table, apart from the body
    row = anatomy[1, 32]  # the body spans columns 3..61 in this row, fat up to column 8
    assert row[3] == FAT and row[2] == 0 and row[61] == FAT and row[62] == 0 and row[8] == FAT
    grown = change_fat_layer(anatomy, target, 1.5)
    assert anatomy[1, 32, 1] == 0  # the input is not changed
    assert grown.dtype == anatomy.dtype and grown.shape == anatomy.shape
    for k in range(3):
        assert grown[k, 32, 1:3].tolist() == [0, FAT] and grown[k, 32, 62:64].tolist() == [FAT, 0]
    assert (grown[:, 40:44, 6:9] == 0).all()  # the gas stays, although it is within 1.5 px of fat
    assert (grown[:, 62:64, 10:54] == DENSE).all()
    np.testing.assert_array_equal(grown[anatomy != 0], anatomy[anatomy != 0])  # nothing else moves
    added = (grown != anatomy) & (anatomy == 0)
    assert (grown[added] == FAT).all() and added.sum() > 0
    thinned = change_fat_layer(anatomy, target, -3.0)
    removed = thinned != anatomy
    assert (anatomy[removed] == FAT).all() and (thinned[removed] == 0).all()
    assert thinned[1, 32, 3:6].tolist() == [0, 0, 0] and thinned[1, 32, 6] == FAT
    assert (thinned[:, 40:44, 6:9] == 0).all() and (thinned[:, 62:64, 10:54] == DENSE).all()
    organs = np.broadcast_to(target > 0, anatomy.shape)
    np.testing.assert_array_equal(thinned[organs], anatomy[organs])
    # thinning never removes a pixel the target labels, even where the anatomy says fat there
    target[32, 3] = PHANTOM_LABELS["liver"]
    assert change_fat_layer(anatomy, target, -3.0)[1, 32, 3] == FAT
    np.testing.assert_array_equal(change_fat_layer(np.zeros_like(anatomy), target, 4.0), 0)


def test_fat_layer_is_drawn_only_when_asked_so_earlier_runs_render_as_before(ct_phantoms, tmp_path):
    anatomy, target = toy_anatomy()
    default = render_slice(anatomy, target, KEYS, "t1", np.random.default_rng(4), CT)
    off = render_slice(
        anatomy, target, KEYS, "t1", np.random.default_rng(4), CT, SynthSettings(p_fat_layer=0.0)
    )
    assert all(np.array_equal(a, b) for a, b in zip(default, off, strict=True))
    grow = dataclasses.replace(STILL, p_fat_layer=1.0, fat_layer_px=(4.0, 4.0))
    image, labels = render_slice(anatomy, target, KEYS, "ct", np.random.default_rng(4), CT, grow)
    plain, plain_labels = render_slice(anatomy, target, KEYS, "ct", np.random.default_rng(4), CT, STILL)
    np.testing.assert_array_equal(labels, plain_labels)  # the target does not move
    body, plain_body = image > -0.9, plain > -0.9  # HU / 1000: air -1
    assert plain_body.sum() < body.sum() and (body >= plain_body).all()
    assert body[32, 1] and not plain_body[32, 1]
    assert_training_data_draws(ct_phantoms, tmp_path, grow, synth_fat_layer=1.5)


def assert_training_data_draws(dataset, tmp_path, settings: SynthSettings, **bad_config) -> None:
    """Training samples with ``settings`` differ from plain ones, and the config key refuses a bad share."""
    info = DatasetInfo.read(dataset)
    t1 = DatasetConfig(str(dataset), "mr-t1", "abdomen", val_cases=0, synth="t1")
    params = {"ct": DEFAULT_PARAMS["ct"], "mr": DEFAULT_PARAMS["mr"]}
    plain_data = SliceData([t1], [info], params, 48, "resize", None, tmp_path / "cache")
    drawn_data = SliceData([t1], [info], params, 48, "resize", None, tmp_path / "cache", settings)
    a = plain_data.sample(np.random.default_rng(2), 4, 1.0)
    b = drawn_data.sample(np.random.default_rng(2), 4, 1.0)
    assert not torch_equal(a[0], b[0])
    with pytest.raises(ConfigError, match=next(iter(bad_config))):
        TrainConfig(name="x", datasets=(t1,), stages=(StageConfig("joint", 1, 1e-3),), **bad_config)


def interior_anatomy(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The toy body with a right kidney (16 x 12 px) and a stomach (an ellipse) added: (3, S, S), (S, S)."""
    anatomy, target = toy_anatomy(size)
    yy, xx = np.mgrid[:size, :size]
    target[36:52, 12:24] = PHANTOM_LABELS["kidney_right"]
    target[(yy - 20) ** 2 / 8**2 + (xx - 44) ** 2 / 7**2 < 1] = PHANTOM_LABELS["stomach"]
    anatomy[:, target > 0] = target[target > 0]
    return anatomy, target


def test_organ_interiors_draw_kidney_and_stomach_insides_as_tissue_and_keep_a_rim():
    """Only the kidney's and stomach's deeper pixels change, to a tissue each may hold (kidney: sinus
    fat or urine; stomach: fluid, or gas in the anterior part only), the same through the slices."""
    from scipy import ndimage

    anatomy, target = interior_anatomy()
    kidney, stomach = PHANTOM_LABELS["kidney_right"], PHANTOM_LABELS["stomach"]
    seen = set()
    for seed in range(12):
        out = add_organ_interiors(anatomy, KEYS, np.random.default_rng(seed))
        assert out.dtype == anatomy.dtype and (anatomy[:, target > 0] == target[target > 0]).all()
        changed = out != anatomy
        assert (out[0] == out[1]).all() and (out[1] == out[2]).all()  # one draw for the three slices
        assert set(np.unique(anatomy[changed])) <= {kidney, stomach}
        for organ, tissues in ((kidney, {FAT, FLUID}), (stomach, {0, FLUID})):
            inside = changed[1] & (target == organ)
            assert inside.any(), (seed, organ)
            tissue = set(np.unique(out[1][inside]))
            if organ == stomach and len(tissue) > 1:  # food: a mottled mix, mostly soft tissue
                assert tissue <= {0, FAT, SOFT_LOW, SOFT_HIGH} and {SOFT_LOW, SOFT_HIGH} <= tissue
                values, counts = np.unique(out[1][inside], return_counts=True)
                assert counts[values == SOFT_LOW] + counts[values == SOFT_HIGH] > 0.6 * inside.sum()
                tissue = {"food"}
            else:
                assert len(tissue) == 1 and tissue <= tissues
            seen |= {(organ, t if isinstance(t, str) else int(t)) for t in tissue}
            depth = ndimage.distance_transform_edt(target == organ)
            assert (depth[inside] > 1.5).all()  # the outline and the pixel inside it stay the organ
            if tissue == {0}:  # gas rises: some of the lumen behind it stays stomach
                deep_rest = (depth > depth[inside].min()) & ~inside & (target == organ)
                assert deep_rest.any() and np.nonzero(deep_rest)[0].max() > np.nonzero(inside)[0].max()
    assert seen == {(kidney, FAT), (kidney, FLUID), (stomach, 0), (stomach, FLUID), (stomach, "food")}
    np.testing.assert_array_equal(
        add_organ_interiors(anatomy, KEYS, np.random.default_rng(0)),
        add_organ_interiors(anatomy, KEYS, np.random.default_rng(0)),
    )
    small = anatomy.copy()
    small[:, target == kidney] = SOFT_LOW
    small[:, 44:46, 16:18] = kidney  # 2 x 2 px: no pixel deeper than 1.5, so no interior
    assert (add_organ_interiors(small, KEYS, np.random.default_rng(1))[:, 44:46, 16:18] == kidney).all()


def test_organ_interiors_render_as_their_tissue_only_when_asked_and_the_training_data_takes_the_key(
    ct_phantoms, tmp_path
):
    anatomy, target = interior_anatomy()
    kidney = PHANTOM_LABELS["kidney_right"]
    both = dataclasses.replace(STILL, p_organ_interior=1.0)
    fat_hu = CT_HU["fat"][0]
    for seed in range(40):  # a CT render in which the kidney shows sinus fat
        image, labels = render_slice(anatomy, target, KEYS, "ct", np.random.default_rng(seed), CT, both)
        kid = labels == kidney
        hu = image * 1000.0  # CT: normalised = HU / 1000
        if (hu[kid] < -60).any():
            break
    else:
        raise AssertionError("no render drew the kidney's sinus fat")
    np.testing.assert_array_equal(labels, target)  # the labels stay (no deformation in STILL)
    fat = kid & (hu < -60)
    assert (hu[fat] >= fat_hu[0] - 1e-3).all() and (hu[fat] <= fat_hu[1] + 1e-3).all()
    assert (hu[kid & ~fat] > -20).all() and fat.sum() < kid.sum()
    plain, _ = render_slice(anatomy, target, KEYS, "ct", np.random.default_rng(seed), CT, STILL)
    assert (plain[kid] * 1000.0 > -20).all()  # without the setting, the kidney is one structure
    assert_training_data_draws(ct_phantoms, tmp_path, both, synth_organ_interior=-0.1)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_renders_of_another_modality_may_not_mix_with_or_validate_on_the_real_images(ct_phantoms):
    info = DatasetInfo.read(ct_phantoms)
    params = {"ct": DEFAULT_PARAMS["ct"], "mr": DEFAULT_PARAMS["mr"]}
    for bad in (
        DatasetConfig(str(ct_phantoms), "mr-t1", "abdomen", val_cases=1, synth="t1"),
        DatasetConfig(str(ct_phantoms), "mr-t1", "abdomen", val_cases=0, synth="t1", synth_fraction=0.5),
    ):
        with pytest.raises(ConfigError, match="set synth_fraction = 1 and val_cases = 0"):
            SliceData([bad], [info], params, 48, "resize", None, None)


def test_write_examples_writes_a_picture_and_aligned_volumes_once(ct_phantoms, tmp_path):
    from m4oe.errors import OutputError

    card = read_model_card(resolve_model("m4oe-phantom"))
    paths = write_examples(ct_phantoms, tmp_path / "ex", "t2", 5, 0, card)
    assert [p.name for p in paths] == ["examples.png", "images.nii.gz", "labels.nii.gz"]
    images = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[1])))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[2])))
    size = card.architecture.img_size
    assert images.shape == labels.shape == (5, size, size)
    assert set(np.unique(labels)) - {0} and set(np.unique(labels)) <= set(range(10))
    before = paths[0].stat().st_mtime_ns
    with pytest.raises(OutputError, match="exists"):
        write_examples(ct_phantoms, tmp_path / "ex", "t2", 5, 0, card)
    assert paths[0].stat().st_mtime_ns == before


def test_write_examples_simulates_phases_on_ct_datasets_only(ct_phantoms, tmp_path):
    card = read_model_card(resolve_model("m4oe-phantom"))
    paths = write_examples(ct_phantoms, tmp_path / "ph", "ct-phase", 3, 0, card)
    assert sitk.ReadImage(str(paths[1])).GetSize()[2] == 3
    mr = write_dataset(tmp_path / "t1", "t1", 1, seed=4, max_size=48)
    with pytest.raises(ValueError, match="needs a ct dataset, got mr"):
        write_examples(mr, tmp_path / "bad", "ct-phase", 3, 0, card)
    assert not (tmp_path / "bad").exists()


def test_synth_command_renders_examples(ct_phantoms, tmp_path, capsys):
    from m4oe.cli import main

    assert main(["synth", str(ct_phantoms), str(tmp_path / "out"), "--family", "ct", "--count", "3"]) == 0
    assert "examples.png" in capsys.readouterr().out
    assert json.loads((ct_phantoms / "dataset.json").read_text())["modality"] == "ct"
    assert (tmp_path / "out" / "labels.nii.gz").exists()


def test_synth_command_shows_the_fat_layer_and_organ_interior_draws_and_refuses_a_bad_share(
    ct_phantoms, tmp_path, capsys
):
    from m4oe.cli import UsageError, main

    def images(out, *extra):
        argv = ["synth", str(ct_phantoms), str(out), "--family", "t1", "--count", "3", "--seed", "5"]
        assert main([*argv, *extra]) == 0
        return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "images.nii.gz")))

    plain = images(tmp_path / "plain")
    again = images(tmp_path / "again", "--fat-layer", "0")
    fat = images(tmp_path / "fat", "--fat-layer", "1")
    interior = images(tmp_path / "interior", "--organ-interior", "1")
    np.testing.assert_array_equal(plain, again)  # 0, the default, renders as before
    assert not np.array_equal(plain, fat) and not np.array_equal(plain, interior)
    np.testing.assert_array_equal(plain, images(tmp_path / "again0", "--organ-interior", "0"))
    for bad in (["--fat-layer", "1.5"], ["--fat-layer", "x"], ["--organ-interior", "-1"], ["--count", "0"]):
        with pytest.raises(UsageError) as raised:
            main(["synth", str(ct_phantoms), str(tmp_path / "bad"), "--family", "t1", *bad])
        assert raised.value.code == 2 and "must be" in raised.value.message
    assert not (tmp_path / "bad").exists()
