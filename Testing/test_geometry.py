"""Axial slice stacks: orientation of synthetic and real volumes, and exact round trips."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk

from m4oe.geometry import AxialStack, from_axial_stack, to_axial_stack
from m4oe.io import image_geometry, read_image

# A volume spanning about +-60 mm around the LPS origin, with a ball of radius 15 mm centred in
# the patient's left-anterior-superior octant: L = +x, anterior = -y, superior = +z in LPS.
BLOB_CENTRE_LPS = np.array([35.0, -35.0, 35.0])
BLOB_RADIUS = 15.0
SIZE = (40, 44, 36)  # (x, y, z) voxel counts of the image's own axes
SPACING = (3.0, 2.8, 3.4)  # mm, distinct per axis so that a permutation shows in stack.spacing


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation about LPS axis 0, 1 or 2."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [n for n in range(3) if n != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    # Slice axis (superior) is image axis 0: a sagittal-like layout, columns (S, L, A).
    "slice_axis_0": np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0]], dtype=float),
    # Slice axis is image axis 1, coronal-like: columns (R, I, P).
    "slice_axis_1": np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float),
    "oblique_about_s": rotation(2, 20.0),
    "oblique_about_l": rotation(0, 20.0) @ np.diag([-1.0, 1.0, 1.0]),
}


def blob_image(direction: np.ndarray) -> sitk.Image:
    """A float32 image with the given direction, centred on LPS (0, 0, 0), holding 1 in the blob."""
    direction = np.asarray(direction, dtype=float)
    spacing = np.array(SPACING)
    centre_index = (np.array(SIZE) - 1) / 2
    origin = -direction @ (spacing * centre_index)
    # Physical LPS point of every voxel, arrays in (z, y, x) order.
    k, j, i = np.meshgrid(*(np.arange(n) for n in SIZE[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(float)
    points = origin + (index * spacing) @ direction.T
    inside = np.linalg.norm(points - BLOB_CENTRE_LPS, axis=-1) < BLOB_RADIUS
    image = sitk.GetImageFromArray(inside.astype(np.float32))
    image.SetSpacing(SPACING)
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction.flatten().tolist())
    return image


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_blob_lies_left_anterior_superior_in_the_stack(name):
    stack = to_axial_stack(blob_image(DIRECTIONS[name]))
    z, y, x = np.nonzero(stack.array)
    depth, rows, columns = stack.array.shape
    assert len(z) > 100
    assert z.min() > (depth - 1) / 2, "blob should be in the superior half (large k)"
    assert y.max() < (rows - 1) / 2, "blob should be in the anterior half (small row index)"
    assert x.min() > (columns - 1) / 2, "blob should be on the patient's left (large column index)"


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_stack_spacing_follows_the_axis_that_points_superior(name):
    direction = DIRECTIONS[name]
    stack = to_axial_stack(blob_image(direction))
    # Image axis n points mostly along LPS axis argmax |direction[:, n]|.
    lps_axis_of = [int(np.argmax(np.abs(direction[:, n]))) for n in range(3)]
    expected = tuple(SPACING[lps_axis_of.index(lps)] for lps in (2, 1, 0))
    assert stack.spacing == expected
    assert stack.array.shape == tuple(SIZE[lps_axis_of.index(lps)] for lps in (2, 1, 0))
    assert stack.array.dtype == np.float32


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_round_trip_is_exact(name):
    image = blob_image(DIRECTIONS[name])
    # Distinct values per voxel, so that any misplaced voxel shows.
    values = np.arange(np.prod(SIZE), dtype=np.float32).reshape(SIZE[::-1])
    image = _with_voxels(image, values)
    stack = to_axial_stack(image)
    back = from_axial_stack(stack.array, stack)
    assert image_geometry(back) == image_geometry(image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), values)


def test_orientation_codes():
    assert to_axial_stack(blob_image(DIRECTIONS["identity"])).orientation == "LPS"
    assert to_axial_stack(blob_image(DIRECTIONS["flipped"])).orientation == "RAS"
    assert to_axial_stack(blob_image(DIRECTIONS["slice_axis_0"])).orientation == "SLA"


def test_from_axial_stack_keeps_label_dtypes_and_converts_bool():
    stack = to_axial_stack(blob_image(DIRECTIONS["slice_axis_1"]))
    labels = from_axial_stack(stack.array.astype(np.uint8) * 7, stack)
    assert labels.GetPixelID() == sitk.sitkUInt8
    mask = from_axial_stack(stack.array > 0, stack)
    assert mask.GetPixelID() == sitk.sitkUInt8
    original = sitk.GetArrayFromImage(stack.reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), original.astype(np.uint8) * 7)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), original.astype(np.uint8))


def test_from_axial_stack_with_channels_gives_a_vector_image_on_the_same_grid():
    image = blob_image(DIRECTIONS["oblique_about_l"])
    stack = to_axial_stack(image)
    channels = np.stack([stack.array, 1 - stack.array, 2 * stack.array], axis=-1)
    vector = from_axial_stack(channels, stack)
    assert vector.GetNumberOfComponentsPerPixel() == 3
    assert image_geometry(vector) == image_geometry(image)
    result = sitk.GetArrayFromImage(vector)  # (z, y, x, C) of the original grid
    original = sitk.GetArrayFromImage(image)
    np.testing.assert_array_equal(result[..., 0], original)
    np.testing.assert_array_equal(result[..., 1], 1 - original)
    np.testing.assert_array_equal(result[..., 2], 2 * original)


def test_from_axial_stack_refuses_a_wrong_shape():
    stack = to_axial_stack(blob_image(DIRECTIONS["slice_axis_0"]))
    with pytest.raises(ValueError, match="shape"):
        from_axial_stack(stack.array.transpose(0, 2, 1), stack)
    with pytest.raises(ValueError, match="shape"):
        from_axial_stack(stack.array[0], stack)


def test_to_axial_stack_refuses_a_vector_image():
    vector = sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 2)
    with pytest.raises(ValueError, match="scalar"):
        to_axial_stack(vector)


# Directions beyond DIRECTIONS: exact 45-degree ties, and arbitrary rotations (with a flip).
MORE_DIRECTIONS = {
    "tie_about_s": rotation(2, 45.0),
    "tie_about_l": rotation(0, -45.0),
    "tie_about_p": rotation(1, 135.0),
    "rotation_a": rotation(0, 33.0) @ rotation(1, -71.0) @ rotation(2, 12.0),
    "rotation_b": rotation(2, 160.0) @ rotation(0, 95.0) @ np.diag([1.0, -1.0, 1.0]),
}


@pytest.mark.parametrize("name", sorted(DIRECTIONS) + sorted(MORE_DIRECTIONS))
def test_stack_is_what_dicom_orient_gives_in_the_image_type_without_a_copy(name):
    direction = DIRECTIONS.get(name, MORE_DIRECTIONS.get(name))
    values = (np.arange(np.prod(SIZE)) % 30011 - 15000).astype(np.int16).reshape(SIZE[::-1])
    image = _with_voxels(blob_image(direction), values)
    orienter = sitk.DICOMOrientImageFilter()
    orienter.SetDesiredCoordinateOrientation("LPS")
    oriented = orienter.Execute(image)
    tracemalloc.start()
    stack = to_axial_stack(image)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < values.nbytes / 10, "the stack must be a view, not a copy of the volume"
    assert stack.array.dtype == np.int16 and not stack.array.flags.writeable
    np.testing.assert_array_equal(stack.array, sitk.GetArrayFromImage(oriented))
    sx, sy, sz = oriented.GetSpacing()
    assert stack.spacing == (sz, sy, sx)
    assert stack.permute_order == tuple(orienter.GetPermuteOrder())
    assert stack.flip_axes == tuple(bool(f) for f in orienter.GetFlipAxes())
    back = from_axial_stack(stack.array, stack)
    assert image_geometry(back) == image_geometry(image) and back.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), values)


def test_stack_array_outlives_its_image_and_ignores_later_writes():
    values = (np.arange(np.prod(SIZE)) % 3001).astype(np.int16).reshape(SIZE[::-1])
    image = _with_voxels(blob_image(DIRECTIONS["flipped"]), values)
    expected = values[:, ::-1, ::-1]
    # Neither the stack nor the image it was made from outlives this line, only the array.
    array = to_axial_stack(_with_voxels(blob_image(DIRECTIONS["flipped"]), values)).array
    gc.collect()
    overwrite = [np.full(values.shape, -7, np.int16) for _ in range(16)]  # reuses freed memory
    np.testing.assert_array_equal(array, expected)
    stack = to_axial_stack(image)
    image.SetPixel((0, 0, 0), -5)  # a write through SimpleITK copies the shared buffer first
    assert image.GetPixel((0, 0, 0)) == -5 and stack.array[0, -1, -1] == values[0, 0, 0]
    np.testing.assert_array_equal(stack.array, expected)
    assert len(overwrite) == 16


def _with_voxels(image: sitk.Image, values: np.ndarray) -> sitk.Image:
    result = sitk.GetImageFromArray(values)
    result.CopyInformation(image)
    return result


# Real data (../shared/data/totalsegmentator, see SOURCES.md).

CT_SPLEEN, CT_LIVER = 1, 5


def _side_of(stack: AxialStack, label: int) -> float:
    """Mean column index of ``label`` relative to the centre: < 0 patient right, > 0 left."""
    _, _, x = np.nonzero(stack.array == label)
    assert len(x) > 100, f"label {label} missing"
    return x.mean() - (stack.array.shape[2] - 1) / 2


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("volume", "segmentation", "direction"),
    [
        ("example_ct_sm.nii.gz", "example_seg.nii.gz", (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)),
        ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)),
    ],
)
def test_real_volume_liver_right_spleen_left_and_exact_round_trip(
    shared_data, volume, segmentation, direction
):
    image = read_image(shared_data / volume).image
    assert image.GetDirection() == direction
    stack = to_axial_stack(image)
    assert stack.spacing == (3.0, 3.0, 3.0)
    back = from_axial_stack(stack.array, stack)
    assert image_geometry(back) == image_geometry(image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))

    labels = to_axial_stack(sitk.ReadImage(str(shared_data / segmentation)))
    assert _side_of(labels, CT_LIVER) < -10
    assert _side_of(labels, CT_SPLEEN) > 10


@pytest.mark.realdata
def test_dicom_series_with_y_flipped_segmentation(shared_data):
    image = read_image(shared_data / "example_ct_dicom").image
    stack = to_axial_stack(image)
    assert stack.array.shape == (20, 512, 512)
    assert stack.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    back = from_axial_stack(stack.array, stack)
    assert image_geometry(back) == image_geometry(image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))

    stored = sitk.ReadImage(str(shared_data / "example_seg_dicom.nii.gz"))
    assert stored.GetDirection()[4] == -1.0, "the trap: y is stored flipped"
    aligned = sitk.Resample(stored, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, stored.GetPixelID())
    labels = to_axial_stack(aligned)
    assert _side_of(labels, CT_LIVER) < -50
    assert _side_of(labels, CT_SPLEEN) > 50
    organs = (labels.array == CT_LIVER) | (labels.array == CT_SPLEEN)
    assert (stack.array[organs] > -500).mean() > 0.99
    # Index-by-index (ignoring direction cosines) the same labels land partly outside the body.
    stored_values = sitk.GetArrayFromImage(stored)
    naive = (stored_values == CT_LIVER) | (stored_values == CT_SPLEEN)
    assert (sitk.GetArrayFromImage(image)[naive] > -500).mean() < 0.9
