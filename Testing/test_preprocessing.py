"""Intensity normalisation: CT window, MR per-volume statistics, streaming, and the params contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from m4oe.preprocessing import (
    DEFAULT_PARAMS,
    IntensityParams,
    VolumeStatistics,
    ct_statistics_from_samples,
    mr_volume_statistics,
    normalize,
    normalize_slices,
)


def mr_like(shape=(12, 64, 64), seed=0) -> np.ndarray:
    """An MR-like volume, (z, y, x): zero padding, noisy background, two tissues, a bright spot."""
    rng = np.random.default_rng(seed)
    volume = np.abs(rng.normal(0, 15, shape))
    volume[:, 8:56, 8:56] += 300 + rng.normal(0, 40, (shape[0], 48, 48))
    volume[:, 20:40, 20:40] += 250
    volume[:, 30:33, 30:33] = 3000
    volume[:, :, :4] = 0
    return volume.astype(np.float32)


def test_ct_default_maps_window_to_fixed_values_and_is_monotone():
    params = DEFAULT_PARAMS["ct"]
    lo, hi = params.clip
    ramp = np.linspace(-2000, 3000, 5001, dtype=np.float32)
    out = normalize(ramp, "ct")
    assert out.dtype == np.float32 and out.shape == ramp.shape
    assert np.all(np.diff(out) >= 0)
    assert out.min() == pytest.approx((lo - params.mean) / params.std)
    assert out.max() == pytest.approx((hi - params.mean) / params.std)
    assert normalize(np.array([lo, hi, -1000, 2000], np.int16), "CT").tolist() == pytest.approx(
        [-2, 2, -2, 2]
    )


def test_published_unit_range_is_expressible():
    params = IntensityParams.ct(clip=(-125, 275), mean=-125, std=400)
    out = normalize(np.array([-1000, -125, 75, 275, 1000], np.float32), "ct", params)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


@pytest.mark.parametrize(("scale", "offset"), [(3.7, 0.0), (0.01, 0.0), (1.0, 1000.0), (250.0, -42.0)])
def test_mr_normalisation_is_invariant_to_scale_and_offset(scale, offset):
    volume = mr_like()
    reference = normalize(volume, "mr")
    transformed = normalize(volume.astype(np.float64) * scale + offset, "mr")
    np.testing.assert_allclose(transformed, reference, atol=2e-3)


def test_mr_normalisation_clips_outliers_and_centres_foreground():
    volume = mr_like()
    stats = mr_volume_statistics(volume)
    assert stats.hi < 3000
    out = normalize(volume, "mr")
    foreground = out[volume > 0]
    assert abs(float(foreground.mean())) < 0.1
    assert 0.8 < float(foreground.std()) < 1.2
    assert out.max() == pytest.approx((stats.hi - stats.mean) / stats.std, rel=1e-5)


def test_streaming_slices_equals_whole_volume():
    volume = mr_like()
    whole = normalize(volume, "mr")
    stats = mr_volume_statistics(volume)
    batches = [
        normalize_slices(volume[i : i + 5], "mr", volume_stats=stats) for i in range(0, len(volume), 5)
    ]
    np.testing.assert_array_equal(np.concatenate(batches), whole)
    ct = np.random.default_rng(1).normal(0, 300, (6, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(
        np.concatenate([normalize_slices(ct[i : i + 2], "ct") for i in range(0, 6, 2)]), normalize(ct, "ct")
    )


def test_torch_batches_match_numpy():
    volume = mr_like()
    stats = mr_volume_statistics(torch.from_numpy(volume))
    assert stats == mr_volume_statistics(volume)
    batch = torch.from_numpy(volume[:4])[:, None]
    out = normalize_slices(batch, "mr", volume_stats=stats)
    assert isinstance(out, torch.Tensor) and out.shape == batch.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out[:, 0].numpy(), normalize(volume, "mr")[:4], atol=1e-6)
    hu = torch.tensor([-1000, 0, 75, 500], dtype=torch.int16)
    assert normalize_slices(hu, "ct").tolist() == pytest.approx([-2.0, -0.75, 0.0, 2.0])


def test_constant_volumes_give_zeros_not_nan():
    for value in (0.0, 7.5):
        out = normalize(np.full((3, 8, 8), value, np.float32), "mr")
        assert np.all(np.isfinite(out)) and np.all(out == 0)
    assert np.all(np.isfinite(normalize(np.full((2, 4, 4), 40.0), "ct")))
    stats = mr_volume_statistics(np.zeros((2, 4, 4)))
    assert isinstance(stats, VolumeStatistics) and stats.std > 0


def test_ct_statistics_from_samples_nnunet_style():
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(60, 30, 100_000), [-3000.0] * 10, [5000.0] * 10])
    params = ct_statistics_from_samples(values)
    assert params.modality == "ct"
    assert params.clip[0] == pytest.approx(np.percentile(values, 0.5))
    assert params.clip[1] == pytest.approx(np.percentile(values, 99.5))
    assert params.mean == pytest.approx(60, abs=1)
    assert params.std == pytest.approx(30, rel=0.05)
    out = normalize(values, "ct", params)
    assert abs(float(out.mean())) < 0.01 and float(out.std()) == pytest.approx(1.0, rel=0.01)
    with pytest.raises(ValueError, match="constant"):
        ct_statistics_from_samples(np.full(100, 40.0))
    with pytest.raises(ValueError, match="no finite"):
        ct_statistics_from_samples([np.nan])
    with pytest.raises(ValueError, match="clip_percentiles"):
        ct_statistics_from_samples(values, clip_percentiles=(99, 1))


def test_params_round_trip_through_json():
    for params in (*DEFAULT_PARAMS.values(), ct_statistics_from_samples(np.arange(1000.0))):
        assert IntensityParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"modality": "ct", "clip": [-125, 275], "mean": 75, "std": 100, "window": 3}, "'window'"),
        ({"modality": "mr", "percentiles": [0.5, 99.5], "mean": 1.0}, "'mean'"),
        ({"modality": "ct", "clip": "wide", "mean": 75, "std": 100}, "'clip'"),
        ({"modality": "ct", "clip": [-125], "mean": 75, "std": 100}, "'clip'"),
        ({"modality": "ct", "clip": [-125, 275], "mean": "75", "std": 100}, "'mean'"),
        ({"modality": "ct", "clip": [-125, 275], "mean": 75, "std": True}, "'std'"),
        ({"modality": "ct", "clip": [-125, 275], "mean": 75}, "'std'"),
        ({"modality": "ct", "clip": [275, -125], "mean": 75, "std": 100}, "lo < hi"),
        ({"modality": "ct", "clip": [-125, 275], "mean": 75, "std": 0}, "std"),
        ({"modality": "mr", "percentiles": [0.5, 101]}, "percentiles"),
        ({"modality": "pet", "percentiles": [0.5, 99.5]}, "'pet'"),
        (["ct"], "JSON object"),
    ],
)
def test_from_dict_rejects_bad_input(data, message):
    with pytest.raises(ValueError, match=message):
        IntensityParams.from_dict(data)


def test_mismatched_or_missing_arguments_raise():
    with pytest.raises(ValueError, match="params for mr"):
        normalize(np.zeros(3), "ct", DEFAULT_PARAMS["mr"])
    with pytest.raises(ValueError, match="volume statistics"):
        normalize_slices(np.zeros(3), "mr")
    with pytest.raises(ValueError, match="MR only"):
        normalize_slices(np.zeros(3), "ct", volume_stats=VolumeStatistics(0, 1, 0, 1))
    with pytest.raises(ValueError, match="'us'"):
        normalize(np.zeros(3), "us")


@pytest.mark.realdata
def test_real_mr_invariance(shared_data):
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "example_mr_sm.nii.gz")))
    volume = volume.astype(np.float32)
    reference = normalize(volume, "mr")
    assert np.all(np.isfinite(reference))
    np.testing.assert_allclose(normalize(volume * 2.5 + 300, "mr"), reference, atol=2e-3)
