"""The CHAOS converter on the challenge's own release: DICOM slices and PNG masks.

A synthetic release is written the way CHAOS lays it out (``MR/<study>/T2SPIR/DICOM_anon``,
``T1DUAL/DICOM_anon/{InPhase,OutPhase}``, ``Ground/*.png`` with grey values 63/126/189/252), with
file names numbered against the slice positions and a SeriesInstanceUID per file, so that only
the right pairing and stacking give back the anatomy it was written from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_io import write_dicom_series

from m4oe.errors import InputError
from m4oe_training.chaos import convert_chaos, pair_masks, png_ids
from m4oe_training.converters import main as converters_main

SHAPE = (6, 12, 10)  # (z, rows, columns): rows != columns, so a transposed mask cannot fit
PNG_GREY = {1: 63, 2: 126, 3: 189, 4: 252}  # CHAOS id -> grey value in the release's masks
WRITTEN = {0: 0, 1: 1, 2: 3, 3: 4, 4: 2}  # CHAOS id -> the project's value (spleen 2, kidneys 3 and 4)


def anatomy(study: int) -> np.ndarray:
    """CHAOS ids (z, rows, columns), different on every slice and study."""
    ids = np.zeros(SHAPE, np.uint8)
    for z in range(SHAPE[0]):
        ids[z, 1 : 4 + z % 3, 1 : 5 + study % 2] = 1  # liver, growing with z
        ids[z, 8:11, 6 + z % 2 : 9] = 4  # spleen
        if z >= 2:
            ids[z, 5:7, 1:3] = 2  # right kidney, only on the lower slices
        if z == 4:
            ids[z, 5:7, 7:9] = 3  # left kidney, one slice
    return ids


def series(ids: np.ndarray, offset: int) -> sitk.Image:
    """An int16 image whose values encode label and slice (LPS, axial, 1.5 x 1.5 x 5 mm)."""
    values = 100 + 40 * ids.astype(np.int16) + 3 * np.arange(SHAPE[0], dtype=np.int16)[:, None, None] + offset
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((1.5, 1.5, 5.0))
    image.SetOrigin((-7.0, -9.0, 30.0))
    return image


def write_png(path: Path, grey: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(grey.astype(np.uint8)), str(path))


def write_study(root: Path, study: int, *, ground: bool = True) -> None:
    """One study: T2-SPIR and T1-DUAL series, named so that file order runs against position."""
    ids = anatomy(study)
    grey = np.zeros(256, np.uint8)
    for chaos_id, value in PNG_GREY.items():
        grey[chaos_id] = value
    masks = grey[ids]
    n = SHAPE[0]
    uid = f"1.2.826.0.1.3680043.2.1125.{study}"
    folder = root / "MR" / str(study)
    t2_names = [f"IMG-0002-{n - k:05d}" for k in range(n)]  # the last file is the lowest slice
    write_dicom_series(
        folder / "T2SPIR" / "DICOM_anon", series(ids, 0), "MR", uid + ".2",
        names=[f"{name}.dcm" for name in t2_names], uid_per_file=True,
    )  # fmt: skip
    in_names = [f"IMG-0004-{2 * (n - k):05d}" for k in range(n)]  # InPhase even, OutPhase odd numbers
    out_names = [f"IMG-0004-{2 * (n - k) - 1:05d}" for k in range(n)]
    for phase, names, offset in (("InPhase", in_names, 1000), ("OutPhase", out_names, 2000)):
        write_dicom_series(
            folder / "T1DUAL" / "DICOM_anon" / phase, series(ids, offset), "MR", uid + f".{offset}",
            names=[f"{name}.dcm" for name in names], uid_per_file=True,
        )  # fmt: skip
    if ground:
        for k in range(n):
            write_png(folder / "T2SPIR" / "Ground" / f"{t2_names[k]}.png", masks[k])
            write_png(folder / "T1DUAL" / "Ground" / f"{in_names[k]}.png", masks[k])  # named after InPhase


def write_ct_study(root: Path, study: int) -> None:
    """One CT study as the release names it: ``i<k>,0000b.dcm`` and ``liver_GT_<k>.png`` (0 or 255),
    numbered against the slice positions; liver and spleen in the anatomy, the liver alone in the masks."""
    ids = anatomy(study)
    n = SHAPE[0]
    folder = root / "CT" / str(study)
    write_dicom_series(
        folder / "DICOM_anon", series(ids, -1000), "CT", f"1.2.826.0.1.3680043.2.1125.{study}.9",
        names=[f"i{n - 1 - k:04d},0000b.dcm" for k in range(n)], uid_per_file=True,
    )  # fmt: skip
    for k in range(n):
        write_png(folder / "Ground" / f"liver_GT_{n - 1 - k:03d}.png", 255 * (ids[k] == 1))


@pytest.fixture
def release(tmp_path) -> Path:
    root = tmp_path / "CHAOS_Train_Sets" / "Train_Sets"
    for study in (1, 5, 10):
        write_study(root, study)
        write_ct_study(root, study + 20)
    write_study(root, 7, ground=False)  # a study without masks, as in the test set
    return tmp_path / "CHAOS_Train_Sets"


@pytest.mark.parametrize(
    ("sequence", "tag", "offset"), [("t2", "t2", 0), ("t1-in", "t1in", 1000), ("t1-out", "t1out", 2000)]
)
def test_release_series_come_back_with_their_masks_on_every_slice(release, tmp_path, sequence, tag, offset):
    result = convert_chaos(release, tmp_path / "out", sequence=sequence)
    assert result.cases == (f"chaos_{tag}_01", f"chaos_{tag}_05", f"chaos_{tag}_10")
    assert result.unlabelled_skipped == 1
    for study in (1, 5, 10):
        truth = anatomy(study)
        image = sitk.ReadImage(str(tmp_path / "out" / "imagesTr" / f"chaos_{tag}_{study:02d}_0000.nii.gz"))
        label = sitk.ReadImage(str(tmp_path / "out" / "labelsTr" / f"chaos_{tag}_{study:02d}.nii.gz"))
        expected = series(truth, offset)
        assert np.allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-4)
        assert np.allclose(image.GetSpacing(), expected.GetSpacing(), atol=1e-4)
        assert np.allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected))
        assert label.GetPixelID() == sitk.sitkUInt8
        assert np.allclose(label.GetOrigin(), image.GetOrigin()) and label.GetSize() == image.GetSize()
        written = sitk.GetArrayFromImage(label)
        np.testing.assert_array_equal(written, np.vectorize(WRITTEN.get)(truth))
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["modality"] == "mr" and meta["labels"]["spleen"] == 2 and meta["labels"]["kidney_left"] == 4
    assert meta["source"]["license"] == "CC-BY-NC-SA-4.0"
    assert meta["source"]["mask_pairing"] == (
        {"by file order": 3} if sequence == "t1-out" else {"by file name": 3}
    )


def test_mask_grey_values_follow_the_challenge_ranges():
    table = png_ids()
    grey = (0, 55, 56, 63, 70, 71, 110, 111, 126, 135, 176, 189, 200, 240, 241, 252, 255)
    assert [table[v] for v in grey] == [0, 0, 1, 1, 1, 0, 0, 2, 2, 2, 3, 3, 3, 0, 4, 4, 4]


def test_masks_pair_by_name_else_by_file_order_else_refused(tmp_path):
    dicoms = [Path(f"IMG-{k}.dcm") for k in (1, 2, 3)]
    by_name, how = pair_masks(dicoms, [Path(f"IMG-{k}.png") for k in (3, 1, 2)], tmp_path)
    assert how == "name" and by_name[Path("IMG-2.dcm")] == Path("IMG-2.png")
    masks = [Path(f"liver_GT_{k:03d}.png") for k in (0, 1, 2)]
    by_order, how = pair_masks(dicoms, masks, tmp_path)
    assert how == "order" and [by_order[d] for d in dicoms] == masks
    with pytest.raises(InputError, match="3 DICOM files and its Ground folder 2 PNG masks"):
        pair_masks(dicoms, masks[:2], tmp_path)


def test_a_phase_paired_by_order_onto_other_slices_is_refused(release, tmp_path):
    """OutPhase files renumbered with position (InPhase against it): the i-th mask in name order
    would land on another slice than the InPhase file of its name, so nothing is written."""
    folder = release / "Train_Sets" / "MR" / "5" / "T1DUAL" / "DICOM_anon" / "OutPhase"
    files = sorted(folder.iterdir())
    for file in files:
        file.rename(file.with_name(f"tmp-{file.name}"))
    for k, file in enumerate(sorted(folder.iterdir())):  # reverse their numbering: 1 <-> 11, 3 <-> 9, ...
        file.rename(folder / f"IMG-0004-{2 * (SHAPE[0] - k) - 1:05d}.dcm")
    with pytest.raises(InputError, match="masks pair with InPhase by file name") as error:
        convert_chaos(release, tmp_path / "out", sequence="t1-out")
    assert "OutPhase" in str(error.value) and not (tmp_path / "out").exists()
    assert convert_chaos(release, tmp_path / "in", sequence="t1-in").cases[1] == "chaos_t1in_05"


def test_release_errors_name_the_file_and_leave_nothing(release, tmp_path):
    with pytest.raises(InputError, match="t1-in or t1-out"):
        convert_chaos(release, tmp_path / "out", sequence="t1")
    mask = release / "Train_Sets" / "MR" / "10" / "T2SPIR" / "Ground" / "IMG-0002-00003.png"
    write_png(mask, np.zeros((SHAPE[2], SHAPE[1])))  # transposed
    with pytest.raises(InputError, match="PNG mask is 12x10 pixels, its DICOM slice 10x12") as error:
        convert_chaos(release, tmp_path / "out")
    assert str(mask) in str(error.value)
    assert not (tmp_path / "out").exists() and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".out")
    ]
    mask.unlink()
    with pytest.raises(InputError, match="6 DICOM files and its Ground folder 5 PNG masks"):
        convert_chaos(release, tmp_path / "out")
    assert converters_main(["chaos", str(release), str(tmp_path / "out"), "--sequence", "t1"]) != 0
    assert not (tmp_path / "out").exists()


def test_the_test_set_without_masks_is_refused(tmp_path):
    root = tmp_path / "CHAOS_Test_Sets" / "Test_Sets"
    write_study(root, 2, ground=False)
    with pytest.raises(InputError, match="no T2SPIR study with Ground masks"):
        convert_chaos(root / "MR", tmp_path / "out")


def test_the_command_converts_the_release(release, tmp_path):
    assert (
        converters_main(["chaos", str(release / "Train_Sets"), str(tmp_path / "out"), "--sequence", "t1-out"])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out" / "labelsTr").iterdir())[0] == "chaos_t1out_01.nii.gz"


def test_release_ct_comes_back_with_its_liver_masks(release, tmp_path):
    result = convert_chaos(release, tmp_path / "ct", sequence="ct")
    assert result.cases == ("chaos_ct_21", "chaos_ct_25", "chaos_ct_30") and result.modality == "ct"
    truth = anatomy(25)
    image = sitk.ReadImage(str(tmp_path / "ct" / "imagesTr" / "chaos_ct_25_0000.nii.gz"))
    label = sitk.ReadImage(str(tmp_path / "ct" / "labelsTr" / "chaos_ct_25.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(series(truth, -1000)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), (truth == 1).astype(np.uint8))  # liver 1
    meta = json.loads((tmp_path / "ct" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1} and meta["modality"] == "ct"
    assert meta["source"]["mask_pairing"] == {"by file order": 3}
    assert meta["source"]["layout"]["label"] == "{study}/Ground/*.png"
    with pytest.raises(InputError, match="no CHAOS release"):
        convert_chaos(release / "Train_Sets" / "MR", tmp_path / "ct2", sequence="ct")


def test_grey_masks_saved_as_rgb_or_16_bit_read_the_same_and_colour_is_refused(release, tmp_path):
    ground = release / "Train_Sets" / "MR" / "1" / "T2SPIR" / "Ground"
    first, second = sorted(ground.iterdir())[:2]
    grey = sitk.GetArrayFromImage(sitk.ReadImage(str(first)))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([grey] * 3, axis=-1), isVector=True), str(first))
    sitk.WriteImage(
        sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.ReadImage(str(second))).astype(np.uint16)),
        str(second),
    )
    assert sitk.ReadImage(str(first)).GetNumberOfComponentsPerPixel() == 3
    assert sitk.ReadImage(str(second)).GetPixelID() == sitk.sitkUInt16
    convert_chaos(release, tmp_path / "out")
    label = sitk.ReadImage(str(tmp_path / "out" / "labelsTr" / "chaos_t2_01.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), np.vectorize(WRITTEN.get)(anatomy(1)))
    colour = np.stack([grey, grey, np.zeros_like(grey)], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(first))
    with pytest.raises(InputError, match="PNG mask is in colour") as error:
        convert_chaos(release, tmp_path / "out2")
    assert str(first) in str(error.value) and not (tmp_path / "out2").exists()
