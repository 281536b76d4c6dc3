"""The Predictor API on the tiny untrained model: geometry, batching, dtype, progress, cancel, gates.

Volumes are small synthetic CTs (6 slices of 40x48 pixels, 6x6x8 mm) so that every prediction
takes a fraction of a second on one CPU thread.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from m4oe.checkpoint import load_checkpoint
from m4oe.demo import synthetic_ct
from m4oe.errors import CancelledError, InputError
from m4oe.inplane import from_model_grid, labels_to_model_grid, make_grid, model_window, to_model_grid
from m4oe.predictor import Predictor, ProgressEvent, keep_largest_components

SHAPE_ZYX = (6, 40, 48)
SPACING_XYZ = (6.0, 6.0, 8.0)
MODEL_SIZE = 64  # the tiny model's input side
FINEST_TOKENS = 16  # 64 px / patch size 4


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_checkpoint(tiny_model_dir)


@pytest.fixture(scope="module")
def predictor(loaded) -> Predictor:
    return Predictor(*loaded, device="cpu")


@pytest.fixture(scope="module")
def ct_lps() -> sitk.Image:
    """The synthetic CT with identity direction (stored LPS), same voxels in the same places."""
    return sitk.DICOMOrient(synthetic_ct(SHAPE_ZYX, SPACING_XYZ), "LPS")


def geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def labels_of(prediction) -> np.ndarray:
    return sitk.GetArrayFromImage(prediction.labelmap)


# --- geometry --------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "LSP", "SPL"])
def test_labels_keep_the_input_grid_and_follow_the_anatomy(predictor, ct_lps, orientation):
    """Identity, flipped and permuted storage of one volume: same grid out, same labels in space."""
    reference = predictor.predict(ct_lps)
    image = sitk.DICOMOrient(ct_lps, orientation)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == orientation
    prediction = predictor.predict(image)
    assert geometry(prediction.labelmap) == geometry(image)
    # Reoriented back to LPS, the labels are those of the identity-direction input voxel for voxel.
    back = sitk.GetArrayFromImage(sitk.DICOMOrient(prediction.labelmap, "LPS"))
    np.testing.assert_array_equal(back, labels_of(reference))
    assert set(np.unique(back)) <= {0, 1, 2, 3}


def test_oblique_input_keeps_its_exact_grid(predictor, ct_lps):
    image = sitk.Image(ct_lps)
    angle = np.deg2rad(20.0)
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    image.SetDirection(rotation.flatten().tolist())
    prediction = predictor.predict(image, gates=True)
    assert geometry(prediction.labelmap) == geometry(image)
    gate_direction = np.array(prediction.gate_map.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(gate_direction, rotation, atol=1e-12)


# --- batching, dtype, probabilities -------------------------------------------------------------


def test_batch_size_does_not_change_the_labels(loaded, ct_lps):
    one = Predictor(*loaded, device="cpu", batch_size=1).predict(ct_lps)
    four = Predictor(*loaded, device="cpu", batch_size=4).predict(ct_lps)
    np.testing.assert_array_equal(labels_of(one), labels_of(four))


def test_bfloat16_agrees_with_float32_on_most_voxels(loaded, ct_lps):
    f32 = Predictor(*loaded, device="cpu").predict(ct_lps)
    bf16 = Predictor(*loaded, device="cpu", dtype="bfloat16").predict(ct_lps)
    assert geometry(bf16.labelmap) == geometry(ct_lps)
    agreement = float(np.mean(labels_of(f32) == labels_of(bf16)))
    assert agreement > 0.95


def test_probabilities_uint8_and_float16(predictor, ct_lps):
    u8 = predictor.predict(ct_lps, probabilities="uint8", cleanup=False)
    f16 = predictor.predict(ct_lps, probabilities="float16", cleanup=False)
    for prediction in (u8, f16):
        assert geometry(prediction.probabilities) == geometry(ct_lps)
        assert prediction.probabilities.GetNumberOfComponentsPerPixel() == 4
    assert u8.probabilities.GetPixelID() == sitk.sitkVectorUInt8
    assert f16.probabilities.GetPixelID() == sitk.sitkVectorFloat32  # float16 widened for SimpleITK
    p8 = sitk.GetArrayFromImage(u8.probabilities).astype(np.int64)  # (z, y, x, K)
    p16 = sitk.GetArrayFromImage(f16.probabilities)
    assert np.abs(p8.sum(-1) - 255).max() <= 2  # each of 4 classes rounds by at most 0.5
    np.testing.assert_allclose(p16.sum(-1), 1.0, atol=5e-3)
    np.testing.assert_allclose(p8 / 255.0, p16, atol=1 / 255 + 2e-3)
    # Without clean-up the labels are the argmax of the probabilities wherever that is not a near-tie.
    top2 = np.sort(p16, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-2
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(p16.argmax(-1)[clear], labels_of(f16)[clear])


# --- progress and cancel ------------------------------------------------------------------------


def test_progress_reports_every_batch(loaded, ct_lps):
    events: list[ProgressEvent] = []
    Predictor(*loaded, device="cpu", batch_size=2).predict(ct_lps, progress=events.append)
    inference = [e for e in events if e.stage == "inference"]
    assert [e.done for e in inference] == [1, 2, 3]
    assert all(e.total == 3 for e in inference)
    fractions = [e.fraction for e in inference]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert inference[-1].eta_s == 0.0
    assert events[0].stage == "preprocess" and events[-1].stage == "postprocess"
    elapsed = [e.elapsed_s for e in events]
    assert elapsed == sorted(elapsed)


def test_cancel_is_checked_before_the_first_batch(loaded, ct_lps):
    calls, events = [], []

    def cancel() -> bool:
        calls.append(1)
        return True

    with pytest.raises(CancelledError) as info:
        Predictor(*loaded, device="cpu", batch_size=2).predict(ct_lps, cancel=cancel, progress=events.append)
    assert info.value.exit_code == 130
    assert len(calls) == 1
    assert not [e for e in events if e.stage == "inference"]


def test_cancel_between_batches_stops_the_job(loaded, ct_lps):
    calls, events = [], []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(CancelledError):
        Predictor(*loaded, device="cpu", batch_size=2).predict(ct_lps, cancel=cancel, progress=events.append)
    assert [e.done for e in events if e.stage == "inference"] == [1]


# --- clean-up -----------------------------------------------------------------------------------


def test_keep_largest_components_only_touches_listed_labels():
    labels = np.zeros((5, 8, 8), np.uint8)
    labels[0:2, 0:2, 0:2] = 1  # 8 voxels: the largest liver blob
    labels[2, 2, 2] = 1  # touches it only at a corner: the same 26-connected component
    labels[4, 6:8, 6] = 1  # 2 voxels, separate: removed
    labels[0, 6, 0] = 2  # two separate blobs of an unlisted label: both kept
    labels[4, 0, 7] = 2
    expected = labels.copy()
    expected[4, 6:8, 6] = 0
    result = keep_largest_components(labels, [1])
    np.testing.assert_array_equal(result, expected)
    assert int((result == 1).sum()) == 9 and int((result == 2).sum()) == 2


def test_keep_largest_components_with_more_fragments_than_uint16_counts():
    """Above 65535 components the uint16 component map cannot hold them; the int32 one takes over."""
    labels = np.zeros((85, 81, 81), np.uint8)
    labels[:81:2, ::2, ::2] = 4  # 41^3 = 68921 voxels, none touching another (26-connectivity)
    labels[83:, :3, :3] = 4  # 2 x 3 x 3 = 18 voxels, the largest component
    labels[84, 10, 10] = 2  # an unlisted label
    assert int((labels == 4).sum()) > 1 << 16
    result = keep_largest_components(labels.copy(), [4])
    expected = np.zeros_like(labels)
    expected[83:, :3, :3] = 4
    expected[84, 10, 10] = 2
    np.testing.assert_array_equal(result, expected)


def test_keep_largest_components_matches_whole_volume_labelling():
    """Bounding boxes, uint16 maps and counting only the label's voxels change nothing."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (24, 30, 28)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.6] = 0
    expected = labels.copy()
    for value in (1, 3, 4):
        components, _ = ndimage.label(expected == value, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        expected[(expected == value) & (components != sizes.argmax())] = 0
    np.testing.assert_array_equal(keep_largest_components(labels, [1, 3, 4]), expected)


# --- pixel types --------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ["RAS", "SPL"])
def test_integer_input_gives_exactly_the_outputs_of_its_float32_copy(predictor, ct_lps, orientation):
    """The stack keeps the file's int16 (CT) or uint16 (MR); batches are cast to float32 as the
    whole volume was before, so labels, probabilities and gate maps are bit-identical."""
    ct = sitk.DICOMOrient(sitk.Cast(ct_lps, sitk.sitkInt16), orientation)
    mr = sitk.Cast(sitk.Clamp(ct + 1024, lowerBound=0) * 3, sitk.sitkUInt16)
    for image, modality in ((ct, "ct"), (mr, "mr")):
        as_float = sitk.Cast(image, sitk.sitkFloat32)
        outputs = [
            predictor.predict(x, probabilities="float16", gates=True, modality="auto")
            for x in (image, as_float)
        ]
        assert outputs[0].modality.modality == modality
        assert geometry(outputs[0].labelmap) == geometry(image)
        for name in ("labelmap", "probabilities", "gate_map"):
            a, b = (getattr(o, name) for o in outputs)
            assert geometry(a) == geometry(b)
            np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
        assert outputs[0].gate_summary == outputs[1].gate_summary


# --- gate maps ----------------------------------------------------------------------------------


def expected_token_origin(image: sitk.Image, factor: int) -> np.ndarray:
    """LPS centre of token (0, 0) of slice 0, derived by hand for an identity-direction volume.

    In "resize" mode model pixel u (of S) samples slice coordinate (u + 0.5) * n / S - 0.5
    (align_corners=False); token t of factor f covers model pixels t*f .. t*f + f - 1, centre
    u = (t + 0.5) * f - 0.5, hence slice coordinate (t + 0.5) * f * n / S - 0.5.
    """
    nx, ny, _ = image.GetSize()
    col = 0.5 * factor * nx / MODEL_SIZE - 0.5
    row = 0.5 * factor * ny / MODEL_SIZE - 0.5
    return np.array(image.TransformContinuousIndexToPhysicalPoint((col, row, 0.0)))


@pytest.mark.parametrize(("gate_layer", "tokens"), [(None, FINEST_TOKENS), ("encoder.1.0", 8)])
def test_gate_map_tokens_sit_over_the_region_they_saw(predictor, ct_lps, gate_layer, tokens):
    prediction = predictor.predict(ct_lps, gates=True, gate_layer=gate_layer)
    gate_map = prediction.gate_map
    assert gate_map.GetSize() == (tokens, tokens, SHAPE_ZYX[0])
    assert gate_map.GetNumberOfComponentsPerPixel() == 3
    factor = MODEL_SIZE // tokens
    nx, ny, _ = ct_lps.GetSize()
    sx, sy, sz = ct_lps.GetSpacing()
    np.testing.assert_allclose(
        gate_map.GetSpacing(), (factor * nx / MODEL_SIZE * sx, factor * ny / MODEL_SIZE * sy, sz)
    )
    np.testing.assert_allclose(gate_map.GetOrigin(), expected_token_origin(ct_lps, factor), atol=1e-9)
    np.testing.assert_allclose(gate_map.GetDirection(), ct_lps.GetDirection())
    # The first and last token centres are symmetric about the slice centre.
    first = np.array(gate_map.TransformIndexToPhysicalPoint((0, 0, 0)))
    last = np.array(gate_map.TransformIndexToPhysicalPoint((tokens - 1, tokens - 1, 0)))
    centre = np.array(ct_lps.TransformContinuousIndexToPhysicalPoint(((nx - 1) / 2, (ny - 1) / 2, 0.0)))
    np.testing.assert_allclose((first + last) / 2, centre, atol=1e-9)
    weights = sitk.GetArrayFromImage(gate_map)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-4)
    assert prediction.gate_summary["mapped_layer"] == (gate_layer or "mean")


def test_unknown_gate_layer_is_refused(predictor, ct_lps):
    with pytest.raises(InputError, match=r"unknown gate layer 'encoder\.9\.9'"):
        predictor.predict(ct_lps, gates=True, gate_layer="encoder.9.9")


# --- in-plane resampling -------------------------------------------------------------------------


def test_spacing_mode_keeps_the_aspect_ratio_and_fits_the_field_of_view():
    wide = make_grid((100, 200), (1.0, 1.0), 64, "spacing", (2.0, 2.0))
    assert wide.scaled_shape == (32, 64)  # 50 x 100 px at 2 mm, shrunk to fit 64
    assert wide.offset == (16, 0)
    assert wide.model_spacing[0] == pytest.approx(wide.model_spacing[1])
    small = make_grid((40, 20), (1.5, 1.5), 64, "spacing", (1.5, 1.5))
    assert small.scaled_shape == (40, 20) and small.offset == (12, 22)
    assert small.model_spacing == pytest.approx((1.5, 1.5))
    anisotropic = make_grid((80, 80), (1.0, 0.5), 64, "spacing", (1.0, 1.0))
    ry, rx = anisotropic.scaled_shape
    assert max(ry, rx) <= 64 and ry / rx == pytest.approx(2.0)
    with pytest.raises(ValueError, match="nearest"):
        make_grid((10, 10), (1.0, 1.0), 64, "nearest")


def test_a_field_of_view_too_wide_for_the_input_is_framed_on_the_body_not_shrunk():
    # 200 x 300 px at 1 mm: 100 x 150 px at 2 mm, too wide for 64; the body is rows 40-160, cols 110-210.
    body = (slice(40, 160), slice(110, 210))
    framed = make_grid((200, 300), (1.0, 1.0), 64, "spacing", (2.0, 2.0), body)
    assert framed.window_start == (40, 110) and framed.slice_shape == (120, 100)
    assert framed.window == body
    assert framed.scaled_shape == (60, 50) and framed.model_spacing == pytest.approx((2.0, 2.0))
    assert framed.offset == (2, 7)  # the body centred on the canvas
    assert make_grid((200, 300), (1.0, 1.0), 64, "spacing", (2.0, 2.0)).model_spacing[0] > 4.0  # shrunk
    # A body that does not fit either is framed, then shrunk to fit.
    wide = make_grid((200, 300), (1.0, 1.0), 64, "spacing", (2.0, 2.0), (slice(0, 200), slice(20, 280)))
    assert wide.window_start == (0, 20) and wide.scaled_shape[1] == 64
    assert wide.model_spacing[0] == pytest.approx(260 / 64, rel=0.02)
    # A slice that fits keeps its whole field of view; "resize" stretches the whole slice.
    fits = make_grid((100, 120), (1.0, 1.0), 64, "spacing", (2.0, 2.0), body)
    assert fits.window_start == (0, 0) and fits.slice_shape == (100, 120)
    assert make_grid((200, 300), (1.0, 1.0), 64, "resize", None, body).window_start == (0, 0)


def test_a_framed_grid_maps_the_bodys_pixels_and_refuses_others():
    y, x = np.mgrid[0:200, 0:300].astype(np.float32)
    smooth = torch.from_numpy(np.sin(x / 9) + np.cos(y / 7))[None, None]
    grid = make_grid((200, 300), (1.0, 1.0), 64, "spacing", (2.0, 2.0), (slice(40, 160), slice(110, 210)))
    model_input = to_model_grid(smooth, grid, pad_value=-5.0)
    assert float(model_input[0, 0, 0, 0]) == -5.0
    # The model pixel at the canvas centre looks at the body's centre, not the slice's.
    oy, ox = grid.offset
    u, v = oy + 30, ox + 25  # 30 and 25 model pixels (2 mm) into the body: slice pixel 100.5, 160.5
    expected = np.sin(160.5 / 9) + np.cos(100.5 / 7)
    assert float(model_input[0, 0, u, v]) == pytest.approx(expected, abs=0.02)
    back = from_model_grid(model_input, grid)
    assert back.shape == (1, 1, 120, 100)  # the window
    error = (back - smooth[..., 40:160, 110:210]).abs()
    assert float(error[..., 3:-3, 3:-3].max()) < 0.05
    part = from_model_grid(model_input, grid, slice(50, 90), slice(120, 200))
    torch.testing.assert_close(part, back[..., 10:50, 10:90], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="outside the grid's window"):
        from_model_grid(model_input, grid, slice(0, 90), slice(120, 200))
    rows, cols = model_window(grid, slice(0, 200), slice(0, 300))
    assert (rows, cols) == (slice(oy, oy + 60), slice(ox, ox + 50))
    labels = np.zeros((1, 200, 300), np.uint8)
    labels[0, 100:102, 160:162] = 3  # model pixel (30, 25) of the body's grid (nearest: pixel 101, 161)
    labels[0, 10:12, 10:12] = 4  # outside the body: not on the grid
    on_grid = labels_to_model_grid(labels, grid)
    assert on_grid[0, oy + 30, ox + 25] == 3 and not (on_grid == 4).any()
    # Token centres (gate maps) in slice pixels: model pixel u is window pixel (u - o + 0.5) * 2 - 0.5.
    assert grid.token_index_origin(4) == pytest.approx((40 + (2 - oy) * 2 - 0.5, 110 + (2 - ox) * 2 - 0.5))


@pytest.mark.parametrize("mode", ["resize", "spacing"])
def test_model_grid_round_trip_of_a_smooth_image(mode):
    y, x = np.mgrid[0:50, 0:70].astype(np.float32)
    smooth = torch.from_numpy(np.sin(x / 9) + np.cos(y / 7))[None, None]
    grid = make_grid((50, 70), (1.0, 1.0), 64, mode, (1.5, 1.5))
    model_input = to_model_grid(smooth, grid, pad_value=-5.0)
    assert model_input.shape == (1, 1, 64, 64)
    if mode == "spacing":
        assert float(model_input[0, 0, 0, 0]) == -5.0  # padding outside the scaled slice
    back = from_model_grid(model_input, grid)
    assert back.shape == smooth.shape
    error = (back - smooth).abs()
    assert float(error[..., 3:-3, 3:-3].max()) < 0.03
    assert float(error.max()) < 0.1


# --- modality -----------------------------------------------------------------------------------


def test_mr_input_is_routed_to_the_mr_experts(predictor, ct_lps):
    hu = sitk.GetArrayFromImage(ct_lps).astype(np.float32)
    mr = sitk.GetImageFromArray(np.clip((hu + 1000.0) * 0.3, 0.0, None))  # non-negative, no air at -1000
    mr.CopyInformation(ct_lps)
    prediction = predictor.predict(mr, gates=True)
    assert prediction.modality.modality == "mr" and prediction.modality.source == "intensity"
    assert prediction.gate_summary["input_modality"] == "mr"
    assert prediction.gate_summary["expected_experts"] == ["mr", "mr-t2"]


def test_modality_override_on_ct(predictor, ct_lps):
    prediction = predictor.predict(ct_lps, modality="mr", gates=True)
    assert prediction.modality.modality == "mr" and prediction.modality.source == "user"
    assert "intensities suggest ct" in prediction.modality.evidence
    assert prediction.gate_summary["input_modality"] == "mr"
    assert prediction.gate_summary["expected_experts"] == ["mr", "mr-t2"]
