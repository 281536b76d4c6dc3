"""The BTCV converter: few-shot label volumes and 8-bit PNG slices of a clipped CT window -> an
nnU-Net dataset in HU and LPS, partial (no vertebrae), with generation classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from training_helpers import dataset, write_config

from m4oe.errors import InputError
from m4oe_training.anatomy import GENERATION_CLASSES
from m4oe_training.btcv import AIR_HU, CLIPPED_HIGH_HU, convert_btcv, parse_cases, window_to_hu
from m4oe_training.config import load_config
from m4oe_training.converters import main as converters_main
from m4oe_training.data import DatasetInfo
from m4oe_training.export import dataset_values, labelled_classes

SHAPE = (6, 40, 36)  # (z, y, x) of the label arrays; a PNG slice is (x, y): the transpose
SPACING = (1.2, 1.3, 3.0)  # x, y, z mm


def btcv_labels(flip_x: bool = False) -> np.ndarray:
    """BTCV ids (z, y, x) in the few-shot arrays' frame: x from the patient's right to left, y from
    back to front, z from feet to head."""
    ids = np.zeros(SHAPE, dtype=np.float32)  # the few-shot files store labels as floats
    ids[3:, 4:20, 2:14] = 6  # liver: high, on the right (low x)
    ids[3:, 6:14, 24:32] = 1  # spleen: high, on the left, posterior
    ids[:3, 4:10, 4:10] = 2  # right kidney: low, posterior
    ids[:3, 4:10, 26:32] = 3  # left kidney
    ids[:, 2:6, 16:20] = 8  # aorta: posterior (low y)
    ids[:, 6:9, 12:15] = 9  # IVC
    ids[2:5, 24:34, 20:30] = 7  # stomach: anterior (high y)
    ids[1:3, 16:20, 16:26] = 11  # pancreas
    ids[3, 22:25, 12:15] = 4  # gallbladder: a generation class (fluid-filled organ)
    ids[5, 30:33, 4:7] = 12  # right adrenal: a gland
    if flip_x:
        ids = ids[:, :, ::-1].copy()
    return ids


def png_values(ids: np.ndarray) -> np.ndarray:
    """(z, y, x) uint8 window values: air around the body, fat, organs, clipped bone."""
    values = np.full(SHAPE, 0, dtype=np.uint8)
    values[:, 3:39, 3:34] = 16  # body: fat, about -100 HU
    values[ids > 0] = 160  # organs, about 126 HU
    values[:, 36:39, 14:22] = 255  # clipped bone
    values[:, 20, 30] = 0  # one dark fat voxel: stays at the window's floor
    values[:, 14:18, 28:33] = 0  # a gas pocket: air
    return values


def write_case(labels_dir: Path, slices_dir: Path, number: int, *, flip_x: bool = False) -> np.ndarray:
    ids = btcv_labels(flip_x)
    volume = sitk.GetImageFromArray(ids)
    volume.SetSpacing(SPACING)
    labels_dir.mkdir(parents=True, exist_ok=True)
    slices_dir.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume, str(labels_dir / f"label_{number}.nii.gz"))
    values = png_values(ids)
    for k in range(SHAPE[0]):
        sitk.WriteImage(
            sitk.GetImageFromArray(values[k].T.copy()),
            str(slices_dir / f"image_SABS_{number}_slice{k:03d}.png"),
        )
    return values


@pytest.fixture
def btcv_source(tmp_path) -> tuple[Path, Path]:
    labels, slices = tmp_path / "SABS" / "sabs_CT_normalized", tmp_path / "png"
    for number in (0, 1, 10):
        write_case(labels, slices, number)
    (labels / "fgmask_0.nii.gz").write_bytes(b"")  # other files of the layout are ignored
    return tmp_path / "SABS", slices


def test_window_values_become_hu_with_air_and_bone_put_back():
    values = png_values(btcv_labels())
    hu = window_to_hu(values)
    assert hu[0, 3, 17] == pytest.approx(-125 + 400 * 160 / 255)  # an organ (the aorta)
    assert hu[0, 12, 3] == pytest.approx(-125 + 400 * 16 / 255)  # fat
    assert (
        hu[0, 0, 0] == AIR_HU and hu[0, 39, 35] == AIR_HU and hu[0, 15, 30] == AIR_HU
    )  # around the body; gas
    assert hu[0, 20, 30] == pytest.approx(-125.0)  # a lone dark voxel is fat at the floor, not air
    assert hu[0, 37, 16] == CLIPPED_HIGH_HU


def test_converter_writes_hu_lps_and_the_project_organs(btcv_source, tmp_path):
    labels_src, slices = btcv_source
    result = convert_btcv(labels_src, slices, tmp_path / "btcv")
    assert result.cases == ("btcv_00", "btcv_01", "btcv_10") and result.modality == "ct"
    out = tmp_path / "btcv"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {
        "background": 0,
        "liver": 1,
        "spleen": 2,
        "kidney_right": 3,
        "kidney_left": 4,
        "aorta": 5,
        "inferior_vena_cava": 6,
        "stomach": 7,
        "pancreas": 8,
    }
    assert "vertebrae" not in meta["labels"] and meta["anatomy_classes"] == list(GENERATION_CLASSES)
    image = sitk.ReadImage(str(out / "imagesTr" / "btcv_01_0000.nii.gz"))
    label = sitk.ReadImage(str(out / "labelsTr" / "btcv_01.nii.gz"))
    for volume in (image, label):
        assert volume.GetDirection() == (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
        assert volume.GetSpacing() == pytest.approx(SPACING) and volume.GetSize() == SHAPE[::-1]
    hu, written = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    assert image.GetPixelID() == sitk.sitkInt16 and label.GetPixelID() == sitk.sitkUInt8
    ids = btcv_labels()
    for btcv_id, value in ((6, 1), (1, 2), (2, 3), (3, 4), (8, 5), (9, 6), (7, 7), (11, 8), (4, 0), (12, 0)):
        assert np.all(written[ids == btcv_id] == value)
    assert np.all(hu[ids > 0] == round(-125 + 400 * 160 / 255))  # the PNG transposed back onto the labels
    assert hu[0, 0, 0] == AIR_HU
    # Physical frame: the liver on the patient's right (smaller x), the stomach in front (smaller y).
    liver = image.TransformIndexToPhysicalPoint((5, 10, 4))
    spleen = image.TransformIndexToPhysicalPoint((28, 10, 4))
    stomach = image.TransformIndexToPhysicalPoint((25, 30, 3))
    aorta = image.TransformIndexToPhysicalPoint((18, 4, 3))
    assert liver[0] < spleen[0] and stomach[1] < aorta[1]
    anatomy = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "anatomyTr" / "btcv_01.nii.gz")))
    assert np.all(anatomy[ids == 4] == GENERATION_CLASSES.index("fluid_organ") + 1)
    assert np.all(anatomy[ids == 12] == GENERATION_CLASSES.index("gland") + 1)
    assert np.all(anatomy[ids == 6] == 0)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no work folder left


def test_btcv_is_a_partial_dataset_matched_by_name(btcv_source, tmp_path):
    """After a fully labelled nine-organ dataset, BTCV's stomach (7) and pancreas (8) take the
    task's values 8 and 9, and the vertebrae (7) are unknown on its slices, not background."""
    from m4oe.phantom import write_dataset

    write_dataset(tmp_path / "phantom", "ct", cases=1, seed=0, max_size=48)
    labels_src, slices = btcv_source
    convert_btcv(labels_src, slices, tmp_path / "btcv")
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(tmp_path / "phantom", "ct"), dataset(tmp_path / "btcv", "ct")],
        [{"kind": "joint", "epochs": 1, "lr": 0.01}],
    )
    cfg, _ = load_config(path)
    infos = [DatasetInfo.read(d.path) for d in cfg.datasets]
    assert labelled_classes(cfg, infos) == [None, (1, 2, 3, 4, 5, 6, 8, 9)]
    values = dataset_values(cfg, infos)[1]
    assert values["stomach"] == 8 and values["pancreas"] == 9 and values["liver"] == 1


def test_cases_selects_numbers(btcv_source, tmp_path):
    labels_src, slices = btcv_source
    result = convert_btcv(labels_src, slices, tmp_path / "first", cases="0-1")
    assert result.cases == ("btcv_00", "btcv_01")
    assert parse_cases("0-2,5") == {0, 1, 2, 5}
    for bad in ("3-1", "a", "1,,2"):
        with pytest.raises(InputError, match="--cases"):
            parse_cases(bad)
    with pytest.raises(InputError, match=r"case\(s\) \[7\]"):
        convert_btcv(labels_src, slices, tmp_path / "x", cases="7")


def test_a_case_in_another_orientation_is_refused_naming_its_file(tmp_path):
    labels, slices = tmp_path / "labels", tmp_path / "png"
    write_case(labels, slices, 0)
    write_case(labels, slices, 3, flip_x=True)  # liver on the left: mirrored
    with pytest.raises(
        InputError, match="orientation check failed: the liver is not on the patient's right"
    ) as error:
        convert_btcv(labels, slices, tmp_path / "btcv")
    assert "label_3.nii.gz" in str(error.value)
    assert not (tmp_path / "btcv").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_missing_or_extra_slices_are_refused(btcv_source, tmp_path):
    labels_src, slices = btcv_source
    (slices / "image_SABS_1_slice003.png").unlink()
    with pytest.raises(InputError, match="missing: slice 3 of BTCV case 1") as error:
        convert_btcv(labels_src, slices, tmp_path / "btcv")
    assert "image_SABS_1_slice003.png" in str(error.value)
    write_case(labels_src / "sabs_CT_normalized", slices, 1)
    sitk.WriteImage(sitk.Image(40, 36, sitk.sitkUInt8), str(slices / "image_SABS_10_slice006.png"))
    with pytest.raises(InputError, match="more slices of BTCV case 10"):
        convert_btcv(labels_src, slices, tmp_path / "btcv")
    assert not (tmp_path / "btcv").exists()


def test_command_line(btcv_source, tmp_path, capsys):
    labels_src, slices = btcv_source
    assert (
        converters_main(["btcv", str(labels_src), str(slices), str(tmp_path / "out"), "--cases", "10"]) == 0
    )
    assert "BTCV_CT: 1 cases" in capsys.readouterr().out
    assert converters_main(["btcv", str(tmp_path / "nowhere"), str(slices), str(tmp_path / "y")]) == 2
    assert "nowhere: is not a folder" in capsys.readouterr().err
    assert converters_main(["btcv", str(labels_src), str(slices), str(tmp_path / "out")]) == 3  # exists
