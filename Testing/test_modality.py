"""Modality detection: user override, DICOM tag, intensity statistics, and the traps in between."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from m4oe.errors import InputError
from m4oe.modality import ModalityResult, detect_modality, parse_modality, strided_subsample


def phantom_regions(shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks (z, y, x) of an elliptic body, an inner organ region and a small round bone."""
    _, y, x = np.indices(shape)
    cy, cx = shape[1] / 2, shape[2] / 2
    r = ((y - cy) / (0.42 * shape[1])) ** 2 + ((x - cx) / (0.45 * shape[2])) ** 2
    return r < 1.0, r < 0.6, ((y - cy) ** 2 + (x - cx - 10) ** 2) < 36


def phantom_ct(shape=(24, 96, 96), seed=0) -> np.ndarray:
    """A CT-like volume in HU, (z, y, x): air around a body of fat, soft tissue and a bone."""
    body, organ, bone = phantom_regions(shape)
    volume = np.select([bone, organ, body], [700.0, 40.0, -100.0], default=-1000.0)
    return (volume + np.random.default_rng(seed).normal(0, 15, shape)).astype(np.float32)


def phantom_mr(shape=(24, 96, 96), seed=0) -> np.ndarray:
    """An MR-like volume, (z, y, x): dark background, tissues at arbitrary positive intensities."""
    body, organ, bone = phantom_regions(shape)
    volume = np.select([bone, organ, body], [120.0, 300.0, 850.0], default=0.0)
    return np.abs(volume + np.random.default_rng(seed).normal(0, 20, shape)).astype(np.float32)


def read_array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)


def read_dicom_series(folder) -> tuple[np.ndarray, str]:
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(names)
    array = sitk.GetArrayFromImage(reader.Execute()).astype(np.float32)
    header = sitk.ImageFileReader()
    header.SetFileName(names[0])
    header.ReadImageInformation()
    return array, header.GetMetaData("0008|0060").strip()


def test_synthetic_ct_and_mr_by_intensity():
    ct = detect_modality(phantom_ct())
    mr = detect_modality(phantom_mr())
    assert isinstance(ct, ModalityResult)
    assert (ct.modality, ct.source) == ("ct", "intensity")
    assert ct.confidence >= 0.9
    assert "air" in ct.evidence
    assert (mr.modality, mr.source) == ("mr", "intensity")
    assert mr.confidence >= 0.9
    assert mr.statistics["suspected_hu_offset"] == 0.0


def test_unsigned_ct_without_rescale_is_ct_with_low_confidence_and_flagged():
    # HU + 1024 stored unsigned: detected as the CT it is, but flagged so the caller can refuse or
    # warn, since CT normalisation of these values would be wrong; the values are not shifted here.
    result = detect_modality(np.clip(phantom_ct() + 1024, 0, None))
    assert result.modality == "ct"
    assert result.confidence <= 0.5
    assert result.statistics["suspected_hu_offset"] == 1024.0
    assert "rescale" in result.evidence
    tagged = detect_modality(np.clip(phantom_ct() + 1024, 0, None), dicom_modality="CT")
    assert tagged.source == "dicom" and "rescale" in tagged.evidence


def test_override_beats_detection_and_notes_disagreement():
    result = detect_modality(phantom_ct(), dicom_modality="CT", override="MR")
    assert (result.modality, result.source, result.confidence) == ("mr", "user", 1.0)
    assert "intensities suggest ct" in result.evidence
    assert detect_modality(phantom_ct(), override="auto").modality == "ct"
    assert detect_modality(phantom_mr(), override=" ct ").modality == "ct"


@pytest.mark.parametrize("bad", ["pet", "", "mri", 3])
def test_bad_override_raises_naming_the_value(bad):
    with pytest.raises(InputError, match=repr(bad)):
        detect_modality(phantom_ct(), override=bad)


def test_dicom_tag_is_trusted_and_other_tags_fall_through():
    tagged = detect_modality(phantom_mr(), dicom_modality="MR")
    assert (tagged.modality, tagged.source, tagged.confidence) == ("mr", "dicom", 1.0)
    assert tagged.evidence == "DICOM Modality tag is 'MR'"
    disagreeing = detect_modality(phantom_mr(), dicom_modality="CT")
    assert (disagreeing.modality, disagreeing.source) == ("ct", "dicom")
    assert disagreeing.confidence < 1.0 and "suggest mr" in disagreeing.evidence
    pet = detect_modality(phantom_ct(), dicom_modality="PT")
    assert (pet.modality, pet.source) == ("ct", "intensity")
    assert "'PT'" in pet.evidence


def test_ambiguous_volumes_get_a_guess_with_low_confidence():
    # A CT cropped inside the body keeps its fat (-100 HU) as evidence; cropped inside one organ it
    # has none, and whichever guess is made must come with a low confidence.
    with_fat = detect_modality(np.clip(phantom_ct(), -150, 250)[:, 23:73, 20:76])
    assert with_fat.modality == "ct" and with_fat.confidence < 0.9
    organ_only = detect_modality(np.clip(phantom_ct(), -150, 250)[:, 38:58, 30:50])
    assert organ_only.confidence <= 0.6
    z_scored_mr = (phantom_mr() - 500.0) / 300.0
    result = detect_modality(z_scored_mr)
    assert result.modality == "mr" and result.confidence < 0.9
    for odd in (np.zeros((4, 8, 8)), np.full((3, 5, 5), -1000.0), np.array([[1.0, np.nan]])):
        assert detect_modality(odd).modality in ("ct", "mr")


def test_no_finite_value_is_an_input_error():
    with pytest.raises(InputError, match="finite"):
        detect_modality(np.full((2, 3, 3), np.nan))
    with pytest.raises(InputError, match="empty"):
        detect_modality(np.zeros((0, 4, 4)))


def test_large_volume_is_fast():
    slab = phantom_ct(shape=(1, 512, 512))
    volume = np.tile(slab, (300, 1, 1))
    start = time.perf_counter()
    result = detect_modality(volume)
    elapsed = time.perf_counter() - start
    assert result.modality == "ct"
    assert elapsed < 0.5, f"detection took {elapsed:.2f} s on 300x512x512"


def test_strided_subsample_bounds_and_spreads():
    array = np.arange(300 * 64 * 64, dtype=np.float32).reshape(300, 64, 64)
    sample = strided_subsample(array, 10_000)
    assert 0 < sample.size <= 10_000
    assert sample.min() == 0 and sample.max() > 0.9 * array.max()
    assert strided_subsample(array[:1, :4, :4], 10_000).size == 16


def test_parse_modality():
    assert parse_modality("CT") == "ct"
    with pytest.raises(InputError, match="'us'"):
        parse_modality("us")


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["example_ct.nii.gz", "example_ct_sm.nii.gz"])
def test_real_ct_by_intensity(shared_data, name):
    result = detect_modality(read_array(shared_data / name))
    assert (result.modality, result.source) == ("ct", "intensity")
    assert result.confidence >= 0.9


@pytest.mark.realdata
def test_real_mr_by_intensity(shared_data):
    # This MRI has a few negative values (down to -47): "nearly non-negative" must still read as MR.
    result = detect_modality(read_array(shared_data / "example_mr_sm.nii.gz"))
    assert (result.modality, result.source) == ("mr", "intensity")
    assert result.confidence >= 0.9
    assert result.statistics["suspected_hu_offset"] == 0.0


@pytest.mark.realdata
def test_real_dicom_ct_by_tag_and_without_it(shared_data):
    array, tag = read_dicom_series(shared_data / "example_ct_dicom")
    assert tag == "CT"
    by_tag = detect_modality(array, dicom_modality=tag)
    assert (by_tag.modality, by_tag.source, by_tag.confidence) == ("ct", "dicom", 1.0)
    untagged = detect_modality(array)
    assert (untagged.modality, untagged.source) == ("ct", "intensity")
