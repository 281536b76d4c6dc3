"""Axial slice stacks: the volume as the 2D model sees it, and the way back to the original grid.

The model segments axial slices one by one. Whatever the direction cosines of an input volume
(flipped axes as in most CT NIfTI files, permuted axes of a sagittal or coronal acquisition, or an
oblique acquisition), :func:`to_axial_stack` permutes and flips its voxel axes, without resampling,
so that the numpy array reads in the nearest LPS orientation:

- axis 0 (k, slices): inferior -> superior,
- axis 1 (rows): anterior -> posterior,
- axis 2 (columns): patient right -> patient left,

which is how ``sitk.GetArrayFromImage`` lays out an image with identity direction. For an oblique
volume the slices are the acquired slices, not resampled ones: "axial" means the voxel axis
closest to superior. :func:`from_axial_stack` undoes the permutation and flips exactly and returns
an image on the original grid (same size, spacing, origin and direction, bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

AXIAL_ORIENTATION = "LPS"


@dataclass(frozen=True)
class AxialStack:
    """A volume as a stack of axial slices.

    ``array``: float32, shape (Z, Y, X); ``array[k]`` is the k-th axial slice, k from inferior to
    superior, rows anterior -> posterior, columns patient right -> left.
    ``spacing``: (sz, sy, sx) in mm, the spacing of the array's axes.
    ``reference``: the original image, whose grid :func:`from_axial_stack` maps back to.
    ``orientation``: the original's orientation code in SimpleITK's convention, the letter each
    voxel axis (x, y, z) points towards, e.g. ``"LPS"`` (identity direction), ``"RAS"`` (direction
    diag(-1, -1, 1)), ``"PSR"`` (a sagittal acquisition).
    ``permute_order``, ``flip_axes``: what :func:`to_axial_stack` did, in SimpleITK axis order
    (x, y, z): stack axis n is original axis ``permute_order[n]``, then flipped if ``flip_axes[n]``.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    reference: sitk.Image
    orientation: str
    permute_order: tuple[int, int, int]
    flip_axes: tuple[bool, bool, bool]


def to_axial_stack(image: sitk.Image) -> AxialStack:
    """Reorient a 3D scalar image (any direction cosines) to an axial (Z, Y, X) float32 stack.

    Uses SimpleITK's DICOMOrientImageFilter to the nearest LPS orientation: voxels are permuted and
    flipped, never interpolated, so the stack holds exactly the original voxel values.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"expected a 3D scalar image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    orienter = sitk.DICOMOrientImageFilter()
    orienter.SetDesiredCoordinateOrientation(AXIAL_ORIENTATION)
    oriented = orienter.Execute(image)
    array = sitk.GetArrayFromImage(oriented).astype(np.float32, copy=False)
    sx, sy, sz = oriented.GetSpacing()
    return AxialStack(
        array=array,
        spacing=(sz, sy, sx),
        reference=image,
        orientation=sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()),
        permute_order=tuple(int(n) for n in orienter.GetPermuteOrder()),
        flip_axes=tuple(bool(f) for f in orienter.GetFlipAxes()),
    )


def from_axial_stack(array: np.ndarray, stack: AxialStack) -> sitk.Image:
    """Put a (Z, Y, X) or (Z, Y, X, C) array laid out like ``stack.array`` back on the original grid.

    Any dtype SimpleITK stores (bool becomes uint8, float16 becomes float32). With a trailing
    channel axis the result is a vector image with C components per voxel (e.g. per-expert gate
    weights). The result has exactly the size, spacing, origin and direction of
    ``stack.reference``, and ``result[i, j, k]`` holds the value the array has at the stack position
    of original voxel (i, j, k).
    """
    array = np.asarray(array)
    if array.ndim not in (3, 4) or array.shape[:3] != stack.array.shape:
        raise ValueError(f"expected an array of shape {stack.array.shape} (+ channels), got {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    # Numpy axis 2 - n is SimpleITK axis n. Undo the flips (done after the permutation), then the
    # permutation: stack numpy axis m holds original numpy axis to_stack[m].
    flipped = [2 - n for n in range(3) if stack.flip_axes[n]]
    if flipped:
        array = np.flip(array, axis=flipped)
    to_stack = [2 - stack.permute_order[2 - m] for m in range(3)]
    original = np.transpose(array, [*np.argsort(to_stack), *range(3, array.ndim)])
    image = sitk.GetImageFromArray(np.ascontiguousarray(original), isVector=array.ndim == 4)
    assert image.GetSize() == stack.reference.GetSize(), (image.GetSize(), stack.reference.GetSize())
    image.CopyInformation(stack.reference)
    return image
