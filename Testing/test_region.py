"""Issue #24 points 1 and 2: structures to keep, a region of interest and the body crop.

The equivalence checks use the embedded model on a generated phantom CT (air around the body), so
that the labels compared are real organs, with one forward pass per slice to stay fast.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from m4oe.cli import main
from m4oe.demo import synthetic_ct
from m4oe.errors import InputError
from m4oe.geometry import to_axial_stack
from m4oe.inplane import from_model_grid, make_grid, model_window
from m4oe.phantom import generate_case
from m4oe.predictor import Predictor
from m4oe.preprocessing import DEFAULT_PARAMS
from m4oe.region import (
    VoxelBox,
    body_box,
    body_rows_columns,
    box_from_ijk,
    box_from_lps_mm,
    box_from_stack_slices,
    mr_body_threshold,
    otsu_threshold,
    parse_bounds,
    stack_slices,
)
from m4oe.terminology import TERMS, select_labels, standard_label, structure_key


@pytest.fixture(scope="module")
def embedded() -> Predictor:
    return Predictor.from_pretrained(None, device="cpu", threads=1)


@pytest.fixture(scope="module")
def phantom_ct() -> sitk.Image:
    """A 64x64x40 phantom CT, RAS-stored (flipped axes), air around the body."""
    image, _ = generate_case("ct", 7, max_size=64)
    return sitk.DICOMOrient(image, "RAS")


def arr(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


# --- structures ------------------------------------------------------------------------------


def test_structure_names_are_keys_or_display_names_in_any_case():
    labels = [standard_label(k, i + 1) for i, k in enumerate(("liver", "kidney_right", "spleen"))]
    assert [structure_key(label) for label in labels] == ["liver", "kidney_right", "spleen"]
    chosen = select_labels(labels, ["Right Kidney", "LIVER"])
    assert [label.value for label in chosen] == [1, 2]  # the task's order, not the request's
    assert select_labels(labels, ["right_kidney"]) == [labels[1]]
    with pytest.raises(
        ValueError, match="unknown structure 'lungs'; this task has: liver, kidney_right, spleen"
    ):
        select_labels(labels, ["liver", "lungs"])
    with pytest.raises(ValueError, match="no structure"):
        select_labels(labels, [])
    assert structure_key(TERMS["inferior_vena_cava"].label(4)) == "inferior_vena_cava"


def test_chosen_structures_are_exactly_those_of_the_whole_task(embedded, phantom_ct):
    full = embedded.predict(phantom_ct, test_time_passes=1)
    some = embedded.predict(phantom_ct, test_time_passes=1, structures=["liver", "kidney_left"], gates=True)
    assert [label.name for label in some.labels] == ["liver", "left kidney"]
    a, b = arr(full.labelmap), arr(some.labelmap)
    assert {1, 2, 4} <= set(np.unique(a))  # the phantom has a spleen the choice drops
    assert set(np.unique(b)) <= {0, 1, 4}
    for value in (1, 4):  # argmax over all classes first: each kept organ is the whole task's
        np.testing.assert_array_equal(a == value, b == value)
    assert geometry(some.labelmap) == geometry(phantom_ct)
    assert set(some.gate_summary["per_segment"]) <= {"liver", "left kidney"}
    assert some.largest_component == [1, 4]


def test_unknown_structure_is_refused_before_any_work(embedded, phantom_ct):
    calls = []
    with pytest.raises(InputError, match=r"unknown structure 'lung'.*liver, spleen"):
        embedded.predict(phantom_ct, structures=["lung"], progress=calls.append)
    assert calls == []


# --- boxes and frames ------------------------------------------------------------------------


def test_parse_bounds():
    assert parse_bounds("1,2,3,4,5,6", True) == (1, 2, 3, 4, 5, 6)
    assert parse_bounds(" -1.5, 2,3,4,5,6e1", False) == (-1.5, 2, 3, 4, 5, 60.0)
    for bad in ("1,2,3", "1,2,3,4,5,x", "1,2,3,4,5,nan"):
        with pytest.raises(ValueError, match="six comma-separated"):
            parse_bounds(bad, False)
    with pytest.raises(ValueError, match="i0,j0,k0"):
        parse_bounds("1.5,2,3,4,5,6", True)


def test_ijk_box_is_half_open_clamped_and_refused_when_empty():
    image = sitk.Image([10, 8, 6], sitk.sitkInt16)
    assert box_from_ijk((2, 3, 1, 5, 9, 4), image) == VoxelBox((2, 3, 1), (5, 8, 4))
    assert box_from_ijk((5, 9, 4, 2, 3, 1), image).size == (3, 5, 3)  # either corner first
    with pytest.raises(InputError, match=r"scan.nrrd: the region .* holds no voxel of this 10x8x6 image"):
        box_from_ijk((10, 0, 0, 20, 8, 6), image, "scan.nrrd")


def test_mm_box_takes_the_voxels_whose_centres_it_holds_in_lps():
    image = sitk.Image([10, 10, 10], sitk.sitkInt16)
    image.SetSpacing((2.0, 2.0, 3.0))
    image.SetOrigin((100.0, -50.0, 10.0))
    # Voxel i is at x = 100 + 2 i; the box 103..107 mm holds the centres of i = 2, 3.
    box = box_from_lps_mm((103, -50, 10, 107, -44, 16), image)
    assert box == VoxelBox((2, 0, 0), (4, 4, 3))
    # A RAS-stored image: x decreases with i; the same physical box, other voxels.
    flipped = sitk.Image(image)
    flipped.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    flipped.SetOrigin((118.0, 0.0, 10.0))
    box = box_from_lps_mm((103, -6, 10, 107, 0, 16), flipped)
    centres = [flipped.TransformIndexToPhysicalPoint((i, 0, 0))[0] for i in range(box.start[0], box.stop[0])]
    assert centres == [106.0, 104.0]
    assert box.start[1:] == (0, 0) and box.stop[1:] == (4, 3)
    with pytest.raises(InputError, match="mm, LPS"):
        box_from_lps_mm((0, 0, 0, 1, 1, 1), image)


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PSR"])
def test_stack_slices_are_the_same_voxels_as_the_image_box(orientation):
    rng = np.random.default_rng(0)
    image = sitk.DICOMOrient(
        sitk.GetImageFromArray(rng.normal(size=(7, 9, 11)).astype(np.float32)), orientation
    )
    stack = to_axial_stack(image)
    box = VoxelBox((1, 2, 3), (5, 6, 6))
    region = stack_slices(box, stack)
    crop = sitk.RegionOfInterest(image, box.size, box.start)
    np.testing.assert_array_equal(to_axial_stack(crop).array, stack.array[region])
    assert box_from_stack_slices(region, stack) == box


def test_window_of_the_back_mapping_is_the_window_of_the_whole_slice():
    grid = make_grid((100, 90), (0.8, 0.9), 64, "spacing", (3.5, 3.5))
    maps = torch.randn(2, 5, 64, 64)
    whole = from_model_grid(maps, grid)
    rows, cols = slice(13, 77), slice(0, 41)
    window = from_model_grid(maps, grid, rows, cols)
    assert window.shape == (2, 5, 64, 41)
    torch.testing.assert_close(window, whole[..., rows, cols], rtol=0, atol=1e-4)
    (r0, r1), (c0, _c1) = ((s.start, s.stop) for s in model_window(grid, rows, cols))
    oy, ox = grid.offset
    assert r0 <= oy + 13 * grid.scaled_shape[0] / 100 and r1 >= oy + 77 * grid.scaled_shape[0] / 100
    assert c0 == ox


# --- body crop -------------------------------------------------------------------------------


def test_otsu_splits_two_populations():
    rng = np.random.default_rng(1)
    dark, bright = rng.normal(10, 2, 5000), rng.normal(100, 5, 3000)
    threshold = otsu_threshold(np.concatenate([dark, bright]))
    assert dark.max() < threshold < bright.min()


def test_the_mr_body_holds_dark_soft_tissue_beside_bright_fluid():
    """A fat-suppressed T2 in miniature: background noise, soft tissue at 120 and a fluid-filled
    organ at 900 in one corner of the body. Otsu on the intensities puts the split between tissue
    and fluid (the box would hold the fluid alone); the MR threshold keeps the whole body."""
    rng = np.random.default_rng(3)
    volume = np.abs(rng.normal(0, 8, (12, 160, 160))).astype(np.float32)
    volume[2:10, 30:130, 20:140] = rng.normal(120, 15, (8, 100, 120))
    volume[2:10, 35:60, 110:135] = 900.0
    assert otsu_threshold(volume) > 165  # above nearly all of the tissue (120, sd 15)
    assert 25 < mr_body_threshold(volume) < 100
    box = body_box(to_axial_stack(sitk.GetImageFromArray(volume)), "mr", margin_mm=0.0)
    assert box.start[:2] == (20, 30) and box.stop[:2] == (140, 130), (box.start, box.stop)


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_body_box_finds_the_body_in_air_with_a_margin(modality):
    """A box-shaped 'body' in air, with a small bright speck (noise) far from it."""
    air, body = (-1000.0, 40.0) if modality == "ct" else (5.0, 400.0)
    volume = np.full((20, 200, 180), air, np.float32)
    volume[4:15, 50:120, 30:150] = body
    volume[10, 190, 5] = body  # one voxel: removed by the opening
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((1.0, 1.0, 2.0))
    box = body_box(to_axial_stack(image), modality, margin_mm=4.0)
    # x 30..150, y 50..120, z 4..15, then 4 mm: 4 voxels in plane, 2 slices; subsampling may add a few.
    assert 22 <= box.start[0] <= 26 and 154 <= box.stop[0] <= 158
    assert 42 <= box.start[1] <= 46 and 124 <= box.stop[1] <= 128
    assert (box.start[2], box.stop[2]) == (2, 17)
    empty = sitk.GetImageFromArray(np.full((4, 40, 40), air, np.float32))
    assert body_box(to_axial_stack(empty), modality) is None


def test_body_crop_changes_no_label_and_keeps_the_grid(embedded, phantom_ct):
    full = embedded.predict(phantom_ct, test_time_passes=1, probabilities="uint8", body_crop=False)
    crop = embedded.predict(phantom_ct, test_time_passes=1, probabilities="uint8")  # on by default
    assert crop.region.size != phantom_ct.GetSize()  # there was air to crop
    assert geometry(crop.labelmap) == geometry(phantom_ct)
    assert geometry(crop.probabilities) == geometry(phantom_ct)
    np.testing.assert_array_equal(arr(crop.labelmap), arr(full.labelmap))
    p_full, p_crop = arr(full.probabilities), arr(crop.probabilities)
    i0, j0, k0 = crop.region.start
    i1, j1, k1 = crop.region.stop
    inside = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
    assert np.abs(p_full[inside].astype(int) - p_crop[inside]).max() <= 1
    outside = np.ones(p_crop.shape[:3], bool)
    outside[inside] = False
    assert (p_crop[outside][:, 0] == 255).all() and (p_crop[outside][:, 1:] == 0).all()


def test_a_field_of_view_too_wide_for_the_model_is_framed_on_the_body(embedded):
    """520 mm of field of view do not fit the embedded model's 128 px of 3.5 mm: with the body crop
    the model sees the body's box at 3.5 mm, exactly as it sees that box cropped out beforehand."""
    wide = synthetic_ct((12, 240, 520), (1.0, 1.0, 5.0))  # RAS-stored: flipped rows and columns
    framed = embedded.predict(wide, modality="ct", test_time_passes=1, gates=True, body_crop=True)
    shrunk = embedded.predict(wide, modality="ct", test_time_passes=1, gates=True, body_crop=False)
    factor = 128 / framed.gate_map.GetSize()[0]  # the gate map is on the model grid's tokens
    assert framed.gate_map.GetSpacing()[0] == pytest.approx(3.5 * factor, rel=0.01)  # rounded to pixels
    assert shrunk.gate_map.GetSpacing()[0] == pytest.approx(520 / 128 * factor, rel=0.01)
    assert geometry(framed.labelmap) == geometry(wide)
    box = framed.region
    assert box.size[0] < 520 and box.size[1] == 240  # air cut at the sides only
    cropped = sitk.RegionOfInterest(wide, box.size, box.start)
    alone = embedded.predict(cropped, modality="ct", test_time_passes=1, gates=True, body_crop=False)
    labels = arr(framed.labelmap)
    inside = (
        slice(box.start[2], box.stop[2]),
        slice(box.start[1], box.stop[1]),
        slice(box.start[0], box.stop[0]),
    )
    assert labels[inside].any()
    np.testing.assert_array_equal(labels[inside], arr(alone.labelmap))
    labels[inside] = 0
    assert not labels.any()
    # The gate map lies where the cropped box's gate map lies, in physical space, with its weights.
    mapped, own = framed.gate_map, alone.gate_map
    assert mapped.GetSize() == own.GetSize() and mapped.GetDirection() == own.GetDirection()
    np.testing.assert_allclose(mapped.GetOrigin(), own.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(mapped.GetSpacing(), own.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(arr(mapped), arr(own), atol=1e-5)


def test_training_frames_a_too_wide_field_of_view_on_the_body_as_inference_does(tmp_path):
    from m4oe_training.data import DatasetInfo, prepare_case

    wide = synthetic_ct((6, 240, 520), (1.0, 1.0, 5.0))
    labels = sitk.Cast(wide > 20, sitk.sitkUInt8)  # soft tissue and organs: label 1
    stack = to_axial_stack(wide)
    box = box_from_stack_slices((slice(0, 6), *body_rows_columns(stack, "ct")), stack)
    assert box.size[0] < 520
    root = tmp_path / "wide"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    cases = {"wide": (wide, labels)}
    cases["crop"] = tuple(sitk.RegionOfInterest(im, box.size, box.start) for im in (wide, labels))
    for name, (image, label) in cases.items():
        sitk.WriteImage(image, str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"{name}.nii.gz"))
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "soft": 1}}
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": 2, "file_ending": ".nii.gz"}))
    info = DatasetInfo.read(root)
    ct = DEFAULT_PARAMS["ct"]
    framed = prepare_case(info, "wide", ct, 128, "spacing", (3.5, 3.5))
    alone = prepare_case(info, "crop", ct, 128, "spacing", (3.5, 3.5))
    assert framed[1].any()
    np.testing.assert_array_equal(framed[1], alone[1])  # labels: the body's box at 3.5 mm
    np.testing.assert_allclose(framed[0].astype(np.float32), alone[0].astype(np.float32), atol=1e-2)
    resized = prepare_case(info, "wide", ct, 128, "resize", None)  # the published preprocessing
    assert not np.array_equal(resized[1], framed[1])


def test_roi_gives_the_whole_run_labels_inside_and_zeros_outside(embedded, phantom_ct):
    """Smoothing on: the run takes the Gaussian's neighbour slices, so the region's labels match."""
    roi = VoxelBox((10, 20, 8), (50, 45, 30))
    full = embedded.predict(phantom_ct, test_time_passes=1, cleanup=False, gates=True)
    part = embedded.predict(phantom_ct, test_time_passes=1, cleanup=False, gates=True, roi=roi)
    assert geometry(part.labelmap) == geometry(phantom_ct)
    assert part.region == roi
    a, b = arr(full.labelmap), arr(part.labelmap)
    inside = (slice(8, 30), slice(20, 45), slice(10, 50))
    assert a[inside].any()
    np.testing.assert_array_equal(b[inside], a[inside])
    b[inside] = 0
    assert not b.any()
    # The gate map covers the slices run (the region's and the smoothing's), at their positions.
    run = part.gate_map.GetSize()[2]
    assert 22 <= run < phantom_ct.GetSize()[2]
    positions = [s["position_mm"] for s in part.gate_summary["per_slice"]]
    assert len(positions) == run
    whole_positions = [s["position_mm"] for s in full.gate_summary["per_slice"]]
    first = whole_positions.index(positions[0])
    assert whole_positions[first : first + run] == positions
    gate_origin_z = part.gate_map.GetOrigin()[2]
    assert gate_origin_z == pytest.approx(positions[0])


# --- command line ----------------------------------------------------------------------------


def test_cli_structures_roi_and_body_crop(phantom_ct, tmp_path, capsys):
    source = tmp_path / "ct.nrrd"
    sitk.WriteImage(phantom_ct, str(source))
    out = tmp_path / "seg.seg.nrrd"
    code = main(
        [
            "segment", source, "-o", out, "--threads", "1", "--tta", "1", "--progress", "json",
            "--structures", "liver,Left Kidney", "--roi-ijk", "0,0,5,64,64,35",
        ]
    )  # fmt: skip
    assert code == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["structures"] == ["liver", "left kidney"]
    assert done["region"]["roi"] and done["region"]["body_crop"]
    assert done["region"]["start_ijk"][2] >= 5 and done["region"]["stop_ijk"][2] <= 35
    import slicerio

    segmentation = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in segmentation["segments"]] == ["liver", "left kidney"]
    labels = sitk.ReadImage(str(out))
    assert labels.GetSize() == phantom_ct.GetSize()
    voxels = arr(labels)
    assert not voxels[:5].any() and not voxels[35:].any()

    # The same box in mm (LPS), from the image's own geometry: the same region.
    lo = phantom_ct.TransformIndexToPhysicalPoint((0, 0, 5))
    hi = phantom_ct.TransformIndexToPhysicalPoint((63, 63, 34))
    mm = ",".join(f"{v:.4f}" for v in (*lo, *hi))
    out2 = tmp_path / "mm.nii.gz"
    argv = ["segment", source, "-o", out2, "--threads", "1", "--tta", "1", "--progress", "json"]
    assert main([*argv, f"--roi-mm={mm}", "--no-body-crop", "--structures", "liver"]) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["region"] == {
        "start_ijk": [0, 0, 5],
        "stop_ijk": [64, 64, 35],
        "body_crop": False,
        "roi": True,
    }


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--structures", "liver,lungs"], "unknown structure 'lungs'; this task has: liver, spleen"),
        (["--roi-ijk", "1,2,3"], "six comma-separated integers"),
        (["--roi-ijk", "100,100,100,200,200,200"], "holds no voxel"),
        (["--roi-ijk", "0,0,0,5,5,5", "--roi-mm", "0,0,0,5,5,5"], "not allowed with argument"),
    ],
)
def test_cli_refuses_bad_structures_and_regions(phantom_ct, tmp_path, capsys, extra, message):
    source = tmp_path / "ct.nrrd"
    sitk.WriteImage(phantom_ct, str(source))
    out = tmp_path / "seg.nii.gz"
    try:
        code = main(["segment", source, "-o", out, "--threads", "1", "--tta", "1", *extra])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
