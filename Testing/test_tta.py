"""Test-time augmentation: forward passes on the slices shifted or zoomed in plane, averaged.

The shift and zoom must move pixels as documented and be undone by their inverses; the averaged
probabilities must equal the mean of the single passes mapped back by hand, and, for the shifted
passes, those of single passes over the same volume shifted by hand (with the slices exactly the
model's input size the in-plane resampling is the identity, so a shift of the volume is a shift of
the model input); the Predictor takes the pass count from the model card unless told otherwise,
keeps the gate maps of the first pass and refuses a bad count.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from m4oe.demo import synthetic_ct
from m4oe.errors import InputError
from m4oe.predictor import TEST_TIME_PASSES, Predictor, averaged_probabilities, shift_slices, zoom_slices

SHAPE_ZYX = (7, 64, 64)  # the tiny model's 64-pixel input
SPACING_XYZ = (5.0, 5.0, 4.0)


@pytest.fixture(scope="module")
def ct() -> sitk.Image:
    return sitk.DICOMOrient(synthetic_ct(SHAPE_ZYX, SPACING_XYZ), "LPS")


def shifted(array: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``array`` (z, y, x, ...) moved dy rows down and dx columns right, edge values repeated."""
    p = max(abs(dy), abs(dx))
    pad = [(0, 0), (p, p), (p, p)] + [(0, 0)] * (array.ndim - 3)
    padded = np.pad(array, pad, mode="edge")
    return padded[:, p - dy : p - dy + array.shape[1], p - dx : p - dx + array.shape[2]]


def test_shift_slices_moves_rows_and_columns_and_repeats_the_edge():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    out = shift_slices(x, 2, -1)
    np.testing.assert_array_equal(out[..., 2:, :5].numpy(), x[..., :3, 1:].numpy())
    np.testing.assert_array_equal(out[..., :2, :5].numpy(), x[..., :1, 1:].expand(-1, -1, 2, -1).numpy())
    np.testing.assert_array_equal(out[..., 2:, 5].numpy(), x[..., :3, 5].numpy())
    np.testing.assert_array_equal(shifted(x.permute(0, 2, 3, 1).numpy(), 2, -1), out.permute(0, 2, 3, 1))
    assert shift_slices(x, 0, 0) is x
    np.testing.assert_array_equal(
        shift_slices(shift_slices(x, 1, 1), -1, -1)[..., 1:-1, 1:-1], x[..., 1:-1, 1:-1]
    )


def test_zoom_slices_enlarges_about_the_centre_and_is_undone_by_its_inverse():
    yy, xx = np.mgrid[:64, :64] - 31.5
    disc = torch.from_numpy((np.hypot(yy, xx) <= 12).astype(np.float32))[None, None]
    assert zoom_slices(disc, 1.0) is disc
    for factor in (0.9, 1.1, 1.5):
        zoomed = zoom_slices(disc, factor)
        assert zoomed.shape == disc.shape
        assert float(zoomed.sum() / disc.sum()) == pytest.approx(factor**2, rel=0.05)
        centre = np.argwhere(zoomed[0, 0].numpy() > 0.5).mean(axis=0)
        np.testing.assert_allclose(centre, (31.5, 31.5), atol=0.01)
    smooth = torch.from_numpy(np.exp(-(yy**2 + xx**2) / 400.0).astype(np.float32))[None, None]
    back = zoom_slices(zoom_slices(smooth, 1.1), 1 / 1.1)
    np.testing.assert_allclose(back[..., 8:-8, 8:-8].numpy(), smooth[..., 8:-8, 8:-8].numpy(), atol=0.01)


def test_the_passes_are_mapped_back_and_averaged(loaded):
    model, _ = loaded
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    step = 2

    def network(inputs):
        return model(inputs, return_gates=True)

    with torch.no_grad():
        by_hand = []
        for dy, dx, zoom in TEST_TIME_PASSES:
            logits, _ = network(zoom_slices(shift_slices(x, dy * step, dx * step), zoom))
            back = zoom_slices(logits.softmax(dim=1), 1 / zoom)
            by_hand.append(shift_slices(back, -dy * step, -dx * step))
        for passes in (1, 3, 5):
            expected = torch.stack(by_hand[:passes]).mean(dim=0)
            got = averaged_probabilities(network, x, passes, step)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        first, _ = network(x)
        torch.testing.assert_close(averaged_probabilities(network, x, 5, step, first=first), expected)
        assert (expected - by_hand[0]).abs().max() > 0.02  # the passes disagree somewhere
    assert [p[2] for p in TEST_TIME_PASSES] == [1.0, 1.0, 1.0, 0.9, 1.1]


@pytest.mark.parametrize("passes", [2, 3])
def test_shifted_passes_average_the_probabilities_of_shifted_inputs(loaded, ct, passes):
    model, card = loaded
    predictor = Predictor(model, card, device="cpu", batch_size=3)
    options = {"probabilities": "float16", "through_plane_sigma_mm": 0, "cleanup": False}
    result = predictor.predict(ct, test_time_passes=passes, **options)
    assert result.test_time_passes == passes
    step = model.cfg.patch_size // 2
    array = sitk.GetArrayFromImage(ct)
    by_hand = []
    for dy, dx, _ in TEST_TIME_PASSES[:passes]:
        moved = sitk.GetImageFromArray(shifted(array, dy * step, dx * step))
        moved.CopyInformation(ct)
        p = sitk.GetArrayFromImage(predictor.predict(moved, test_time_passes=1, **options).probabilities)
        by_hand.append(shifted(p.astype(np.float64), -dy * step, -dx * step))
    expected = np.mean(by_hand, axis=0)
    got = sitk.GetArrayFromImage(result.probabilities)
    np.testing.assert_allclose(got, expected, atol=3e-3)  # float16 outputs
    assert np.abs(got - by_hand[0]).max() > 0.02  # the shifted passes changed something
    top2 = np.sort(got, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-2  # not a near tie that float16 rounding could flip
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labelmap)[clear], got.argmax(-1)[clear])


def test_the_model_card_count_is_the_default_and_the_gates_come_from_the_first_pass(loaded, ct):
    model, card = loaded
    tasks = [dataclasses.replace(t, test_time_passes=3) for t in card.tasks]
    by_card = Predictor(model, dataclasses.replace(card, tasks=tasks), device="cpu").predict(ct, gates=True)
    plain = Predictor(model, card, device="cpu")
    told = plain.predict(ct, test_time_passes=3, gates=True)
    once = plain.predict(ct, gates=True)
    assert (by_card.test_time_passes, told.test_time_passes, once.test_time_passes) == (3, 3, 1)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(by_card.labelmap), sitk.GetArrayFromImage(told.labelmap)
    )
    assert not np.array_equal(sitk.GetArrayFromImage(told.labelmap), sitk.GetArrayFromImage(once.labelmap))
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(told.gate_map), sitk.GetArrayFromImage(once.gate_map)
    )
    assert told.gate_summary["overall"] == once.gate_summary["overall"]


@pytest.mark.parametrize("passes", [0, 6, -1, 2.0, "3", True])
def test_a_bad_count_is_refused(loaded, ct, passes):
    with pytest.raises(InputError, match="test-time passes must be an integer 1-5"):
        Predictor(*loaded, device="cpu").predict(ct, test_time_passes=passes)
