"""Through-plane smoothing: the streaming Gaussian, and the Predictor that uses it.

The streaming filter must give what scipy gives on the whole stack, however the slices arrive;
the Predictor must smooth along the axial stack (whatever the stored orientation) before the
argmax, take its sigma from the model card unless told otherwise, and refuse a bad sigma.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from m4oe.demo import synthetic_ct
from m4oe.errors import InputError
from m4oe.model_card import TaskInfo
from m4oe.predictor import Predictor
from m4oe.smoothing import SliceSmoother, gaussian_weights

# Slices exactly the tiny model's 64-pixel input: in "resize" mode the in-plane resampling is then
# the identity, so the smoothed probabilities can be compared with scipy's filter of the plain ones.
SHAPE_ZYX = (11, 64, 64)
SPACING_XYZ = (5.0, 5.0, 4.0)


def smooth_in_batches(maps: np.ndarray, sigma: float, sizes: list[int]) -> tuple[np.ndarray, list[int]]:
    """Push ``maps`` (Z, ...) through a SliceSmoother in batches of ``sizes``; the output and starts."""
    smoother = SliceSmoother(sigma, maps.shape[0])
    out = np.full(maps.shape, np.nan)
    starts, at = [], 0
    for size in sizes:
        start, done = smoother.push(torch.from_numpy(maps[at : at + size]))
        at += size
        starts.append(start)
        out[start : start + done.shape[0]] = done.numpy()
    return out, starts


@pytest.mark.parametrize(
    ("num_slices", "sigma", "sizes"),
    [
        (40, 1.5, [8] * 5),
        (40, 0.7, [1] * 40),
        (23, 3.2, [5, 1, 9, 8]),
        (5, 4.0, [2, 3]),  # the kernel is wider than the stack
        (1, 2.0, [1]),
        (30, 2.5, [30]),
    ],
)
def test_streaming_filter_equals_scipy_on_the_whole_stack(num_slices, sigma, sizes):
    maps = np.random.default_rng(num_slices).random((num_slices, 3, 4, 5))
    out, starts = smooth_in_batches(maps, sigma, sizes)
    expected = ndimage.gaussian_filter1d(maps, sigma, axis=0, mode="nearest", truncate=4.0)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    assert starts == sorted(starts)  # slices come out in order, each once (no NaN left above)


def test_streaming_filter_holds_only_the_slices_it_still_needs():
    sigma, batch = 1.0, 4
    smoother = SliceSmoother(sigma, 400)
    for _ in range(100):
        smoother.push(torch.zeros(batch, 2))
        assert smoother._buffer.shape[0] <= 2 * smoother.radius + batch


def test_streaming_filter_refuses_bad_use():
    with pytest.raises(ValueError, match="sigma must be a positive"):
        gaussian_weights(0.0)
    with pytest.raises(ValueError, match="sigma must be a positive"):
        gaussian_weights(float("nan"))
    smoother = SliceSmoother(1.0, 3)
    smoother.push(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="more than the 3 slices"):
        smoother.push(torch.zeros(2, 1))


@pytest.fixture(scope="module")
def ct() -> sitk.Image:
    return sitk.DICOMOrient(synthetic_ct(SHAPE_ZYX, SPACING_XYZ), "LPS")


def probabilities(prediction) -> np.ndarray:
    return sitk.GetArrayFromImage(prediction.probabilities)  # (z, y, x, K)


def test_probabilities_are_smoothed_along_the_slices_in_mm(loaded, ct):
    predictor = Predictor(*loaded, device="cpu", batch_size=3)  # 11 slices: 4 batches, streamed
    plain = predictor.predict(ct, probabilities="float16", through_plane_sigma_mm=0)
    smooth = predictor.predict(ct, probabilities="float16", through_plane_sigma_mm=6.0, cleanup=False)
    assert (plain.through_plane_sigma_mm, smooth.through_plane_sigma_mm) == (0.0, 6.0)
    p0, p1 = probabilities(plain), probabilities(smooth)
    expected = ndimage.gaussian_filter1d(p0, 6.0 / SPACING_XYZ[2], axis=0, mode="nearest")
    assert np.abs(p1 - p0).max() > 0.02  # the smoothing changed something
    np.testing.assert_allclose(p1, expected, atol=2e-3)  # float16 outputs
    top2 = np.sort(p1, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-2
    labels = sitk.GetArrayFromImage(smooth.labelmap)
    np.testing.assert_array_equal(labels[clear], p1.argmax(-1)[clear])


def test_smoothing_follows_the_stack_not_the_stored_axes(loaded, ct):
    """A volume stored sagittally is smoothed along its axial stack, as the same volume stored axially."""
    predictor = Predictor(*loaded, device="cpu")
    axial = predictor.predict(ct, through_plane_sigma_mm=6.0)
    sagittal = predictor.predict(sitk.DICOMOrient(ct, "SPL"), through_plane_sigma_mm=6.0)
    back = sitk.DICOMOrient(sagittal.labelmap, "LPS")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(axial.labelmap))
    assert not np.array_equal(
        sitk.GetArrayFromImage(axial.labelmap),
        sitk.GetArrayFromImage(predictor.predict(ct, through_plane_sigma_mm=0).labelmap),
    )


def test_the_model_card_value_is_the_default(loaded, ct):
    model, card = loaded
    tasks = [TaskInfo(t.name, t.labels, t.largest_component, through_plane_sigma_mm=6.0) for t in card.tasks]
    predictor = Predictor(model, dataclasses.replace(card, tasks=tasks), device="cpu")
    by_card = predictor.predict(ct)
    assert by_card.through_plane_sigma_mm == 6.0
    told = Predictor(*loaded, device="cpu").predict(ct, through_plane_sigma_mm=6.0)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(by_card.labelmap), sitk.GetArrayFromImage(told.labelmap)
    )
    assert predictor.predict(ct, through_plane_sigma_mm=0).through_plane_sigma_mm == 0.0


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf"), "3", True])
def test_a_bad_sigma_is_refused(loaded, ct, sigma):
    with pytest.raises(InputError, match="through-plane sigma must be a number of mm >= 0"):
        Predictor(*loaded, device="cpu").predict(ct, through_plane_sigma_mm=sigma)


def test_gate_routing_per_segment_counts_the_smoothed_labels(loaded, ct):
    """The gate summary's per-organ routing is over the labels as written, not the unsmoothed ones."""
    predictor = Predictor(*loaded, device="cpu", batch_size=3)

    def pixels(prediction) -> tuple[dict[int, int], dict[int, int]]:
        labels = sitk.GetArrayFromImage(prediction.labelmap)  # model grid = slice grid here
        written = {int(v): int((labels == v).sum()) for v in np.unique(labels) if v != 0}
        segments = prediction.gate_summary["per_segment"].values()
        return written, {entry["label"]: entry["model_grid_pixels"] for entry in segments}

    plain_written, plain_routed = pixels(
        predictor.predict(ct, gates=True, through_plane_sigma_mm=0, cleanup=False)
    )
    written, routed = pixels(predictor.predict(ct, gates=True, through_plane_sigma_mm=6.0, cleanup=False))
    assert routed == written
    assert plain_routed == plain_written
    assert routed != plain_routed  # the smoothing moved some pixels between segments
