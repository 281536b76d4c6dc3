"""Generation classes: the structures a dataset does not segment, drawn in its anatomy maps.

TotalSegmentator labels far more than the nine project organs (muscles, bowel, lungs, bones, the
spinal cord, vessels...). ``converters totalsegmentator --anatomy-classes`` keeps them as
generation classes (``anatomyTr/``), the training's anatomy maps draw them, and label-map renders
give each its own intensity from its tissue's range. The target labels never change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from training_helpers import UNDEFORMED

from m4oe.preprocessing import DEFAULT_PARAMS
from m4oe_training.anatomy import (
    GENERATION_BASE,
    GENERATION_CLASSES,
    SOFT_HIGH,
    anatomy_from_image,
    structure_keys,
)
from m4oe_training.config import ConfigError
from m4oe_training.converters import main
from m4oe_training.data import DatasetInfo, _sample_key, prepare_case
from m4oe_training.synth import render_slice
from m4oe_training.totalsegmentator import (
    TOTALSEGMENTATOR_CLASSES,
    TOTALSEGMENTATOR_GENERATION,
    TOTALSEGMENTATOR_IDS,
    TOTALSEGMENTATOR_NAMES,
    convert_totalsegmentator,
    generation_table,
)

SHAPE = (6, 32, 32)  # (z, y, x)
MUSCLE = GENERATION_CLASSES.index("muscle") + 1
BOWEL = GENERATION_CLASSES.index("bowel") + 1
CANAL = GENERATION_CLASSES.index("spinal_canal") + 1


def write(path: Path, array: np.ndarray) -> None:
    """``array`` (z, y, x) at 1.5 x 1.5 x 3 mm, CT's LPS-flipped direction."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 1.5, 3.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def ts_case() -> tuple[np.ndarray, np.ndarray]:
    """A CT (HU) and its TotalSegmentator ``total`` map: liver 5, left iliopsoas 88, colon 20,
    spinal cord 79, brain 90 (not drawn), in a soft-tissue body surrounded by air."""
    image = np.full(SHAPE, -1000, np.int16)
    image[:, 2:30, 2:30] = 40
    ids = np.zeros(SHAPE, np.uint8)
    ids[:, 4:12, 4:12] = 5
    ids[:, 4:12, 16:24] = 88
    ids[:, 16:24, 4:12] = 20
    ids[:, 16:24, 16:20] = 79
    ids[:, 26:28, 26:28] = 90
    return image, ids


def test_the_tables_cover_totalsegmentator_apart_from_the_project_organs():
    for task, last in (("total", 117), ("total_mr", 50)):
        drawn = [i for ids in TOTALSEGMENTATOR_GENERATION[task].values() for i in ids]
        organs = [i for ids in TOTALSEGMENTATOR_IDS[task].values() for i in ids]
        assert len(drawn) == len(set(drawn)) and not set(drawn) & set(organs)
        assert set(range(1, last + 1)) - set(drawn) - set(organs) == {90 if task == "total" else 50}  # brain
        assert sorted(TOTALSEGMENTATOR_CLASSES[task]) == sorted(drawn)
        assert list(TOTALSEGMENTATOR_GENERATION[task]) == list(GENERATION_CLASSES)
    table = generation_table("total")
    assert (table[88], table[20], table[79], table[5], table[90]) == (MUSCLE, BOWEL, CANAL, 0, 0)
    assert TOTALSEGMENTATOR_CLASSES["total"][79] == "spinal_cord"
    with pytest.raises(ValueError, match="total_ct"):
        generation_table("total_ct")


def test_converter_writes_generation_classes_only_when_asked(tmp_path):
    image, ids = ts_case()
    write(tmp_path / "src" / "images" / "c1.nii.gz", image)
    write(tmp_path / "src" / "labels" / "c1.nii.gz", ids)
    command = ["totalsegmentator", str(tmp_path / "src"), str(tmp_path / "with"), "--modality", "ct"]
    assert main([*command, "--anatomy-classes"]) == 0
    plain = convert_totalsegmentator(tmp_path / "plain", "ct", src=tmp_path / "src")
    assert not (plain.folder / "anatomyTr").exists()
    with_meta = json.loads((tmp_path / "with" / "dataset.json").read_text())
    plain_meta = json.loads((plain.folder / "dataset.json").read_text())
    assert with_meta.pop("anatomy_classes") == list(GENERATION_CLASSES)
    assert with_meta["source"].pop("generation_labels")["spinal_canal"] == [79]
    assert with_meta["source"].pop("folder") == plain_meta["source"].pop("folder")
    assert with_meta == plain_meta
    labels = tmp_path / "with" / "labelsTr" / "c1.nii.gz"
    assert np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(labels))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(plain.folder / "labelsTr" / "c1.nii.gz"))),
    )
    anatomy = sitk.ReadImage(str(tmp_path / "with" / "anatomyTr" / "c1.nii.gz"))
    assert anatomy.GetDirection() == sitk.ReadImage(str(labels)).GetDirection()
    drawn = sitk.GetArrayFromImage(anatomy)
    assert (drawn[0, 5, 20], drawn[0, 20, 5], drawn[0, 20, 17]) == (MUSCLE, BOWEL, CANAL)
    assert drawn[0, 5, 5] == 0 and drawn[0, 26, 26] == 0  # the liver is an organ; the brain is not drawn

    # TotalSegmentator's per-structure masks give the same anatomy map (the masks that exist).
    case = tmp_path / "masks" / "c1"
    write(case / "ct.nii.gz", image)
    masks = {**TOTALSEGMENTATOR_NAMES["total"], 88: "iliopsoas_left", 20: "colon", 79: "spinal_cord"}
    for ts_id, name in masks.items():  # no brain mask, and none of the other generation structures
        write(case / "segmentations" / f"{name}.nii.gz", (ids == ts_id).astype(np.uint8))
    convert_totalsegmentator(tmp_path / "from_masks", "ct", src=tmp_path / "masks", anatomy_classes=True)
    from_masks = sitk.GetArrayFromImage(
        sitk.ReadImage(str(tmp_path / "from_masks" / "anatomyTr" / "c1.nii.gz"))
    )
    assert np.array_equal(from_masks, drawn)


def test_anatomy_map_draws_generation_classes_where_no_organ_is_labelled():
    image = np.full((1, 4, 4), 50.0, np.float32)  # soft tissue above 45 HU
    labels = np.zeros((1, 4, 4), np.uint8)
    labels[0, 0, 0] = 1
    generation = np.zeros((1, 4, 4), np.int64)
    generation[0, 0, :2] = MUSCLE  # the organ keeps (0, 0)
    out = anatomy_from_image(image, labels, "ct", generation)
    assert out[0, 0, 0] == 1 and out[0, 0, 1] == GENERATION_BASE + MUSCLE - 1 and out[0, 3, 3] == SOFT_HIGH
    assert structure_keys({"liver": 1})[GENERATION_BASE + MUSCLE - 1] == "muscle"
    with pytest.raises(ValueError, match=r"generation classes must lie in 0\.\.8, got 9\.\.9"):
        anatomy_from_image(image, labels, "ct", np.full((1, 4, 4), 9))
    with pytest.raises(ValueError, match="generation map shape"):
        anatomy_from_image(image, labels, "ct", np.zeros((1, 4, 3), np.int64))
    with pytest.raises(ValueError, match=r"organ labels must lie in 0\.\.239, got 240"):
        anatomy_from_image(image, np.full((1, 4, 4), 240, np.uint8), "ct", generation)


@pytest.fixture
def anatomy_dataset(tmp_path) -> Path:
    image, ids = ts_case()
    write(tmp_path / "src" / "images" / "c1.nii.gz", image)
    write(tmp_path / "src" / "labels" / "c1.nii.gz", ids)
    return convert_totalsegmentator(tmp_path / "ds", "ct", src=tmp_path / "src", anatomy_classes=True).folder


def test_training_reads_the_generation_classes_onto_the_model_grid(anatomy_dataset):
    info = DatasetInfo.read(anatomy_dataset)
    assert info.anatomy_classes == GENERATION_CLASSES
    params = DEFAULT_PARAMS["ct"]
    _, labels, anatomy = prepare_case(info, "c1", params, 32, "resize", None, anatomy=True)
    values = set(np.unique(anatomy).tolist())
    assert {GENERATION_BASE + k - 1 for k in (MUSCLE, BOWEL, CANAL)} <= values
    assert np.array_equal(anatomy[labels > 0], labels[labels > 0])  # organs keep their labels
    assert not (labels[anatomy >= GENERATION_BASE] > 0).any()
    key = _sample_key(info, "c1")
    # A dataset.json whose classes are in another order reads the file's values in that order.
    meta = json.loads((anatomy_dataset / "dataset.json").read_text())
    meta["anatomy_classes"] = list(reversed(GENERATION_CLASSES))
    (anatomy_dataset / "dataset.json").write_text(json.dumps(meta))
    _, _, reversed_map = prepare_case(
        DatasetInfo.read(anatomy_dataset), "c1", params, 32, "resize", None, True
    )
    assert GENERATION_BASE + len(GENERATION_CLASSES) - MUSCLE in set(np.unique(reversed_map).tolist())
    # The cache key follows the anatomy file, and a bad file or class list is refused by name.
    path = anatomy_dataset / "anatomyTr" / "c1.nii.gz"
    write(path, np.full(SHAPE, 9, np.uint8))
    with pytest.raises(ConfigError, match=r"c1\.nii\.gz: values 9\.\.9, expected 0\.\.8"):
        prepare_case(DatasetInfo.read(anatomy_dataset), "c1", params, 32, "resize", None, True)
    assert _sample_key(DatasetInfo.read(anatomy_dataset), "c1") != key
    meta["anatomy_classes"] = ["muscle", "tendon"]
    (anatomy_dataset / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="anatomy_classes must be a list of muscle"):
        DatasetInfo.read(anatomy_dataset)
    meta["anatomy_classes"] = ["muscle"]
    (anatomy_dataset / "dataset.json").write_text(json.dumps(meta))
    path.unlink()
    with pytest.raises(ConfigError, match=r"anatomyTr/c1\.nii\.gz: missing"):
        DatasetInfo.read(anatomy_dataset)


@pytest.mark.parametrize("family", ["t1", "t2", "ct"])
def test_renders_draw_each_generation_class_from_its_own_range(family):
    """With the textbook contrasts, lung is darker than muscle (CT, T1), marrow-filled bone brighter
    than muscle (CT, T1), and on T2 the spinal canal's fluid brighter than muscle and lung."""
    size = 48
    anatomy = np.full((3, size, size), SOFT_HIGH, np.uint8)
    anatomy[:, :4] = 0  # air above the body
    regions = {"lung": (slice(6, 20), slice(4, 20)), "muscle": (slice(6, 20), slice(26, 44))}
    regions["spinal_canal" if family == "t2" else "bone"] = (slice(26, 44), slice(4, 20))
    for key, (rows, cols) in regions.items():
        anatomy[:, rows, cols] = GENERATION_BASE + GENERATION_CLASSES.index(key)
    target = np.zeros((size, size), np.uint8)
    keys = structure_keys({})
    # No random contrast, no deformation: the textbook ranges, regions where they were drawn.
    settings = dataclasses.replace(
        UNDEFORMED,
        p_random_contrast=0.0,
        p_low_resolution=0.0,
        p_fat_suppressed=0.0,
        p_opposed_phase=0.0,
        bias_strength=(0.0, 0.0),
    )
    rng = np.random.default_rng(7)
    for _ in range(10):
        image, _ = render_slice(anatomy, target, keys, family, rng, DEFAULT_PARAMS["ct"], settings)
        mean = {key: float(image[rows, cols][2:-2, 2:-2].mean()) for key, (rows, cols) in regions.items()}
        brighter = "spinal_canal" if family == "t2" else "bone"
        assert mean["lung"] < mean[brighter] and mean[brighter] > mean["muscle"], mean
        if family != "t2":  # on T2 muscle is dark too
            assert mean["lung"] < mean["muscle"], mean
