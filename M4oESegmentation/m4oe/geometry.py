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
closest to superior. The stack is a view of the image's own voxels in their own pixel type (no
copy: a 512x512x300 int16 CT stays 157 MB, not a second 315 MB float32 array).
:func:`from_axial_stack` undoes the permutation and flips exactly and returns an image on the
original grid (same size, spacing, origin and direction, bit for bit).

Also the geometry of an image as numbers: :func:`ijk_to_lps` (voxel index to LPS mm),
:func:`image_geometry` and :func:`same_geometry` (also importable from :mod:`m4oe.io`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

AXIAL_ORIENTATION = "LPS"


@dataclass(frozen=True)
class AxialStack:
    """A volume as a stack of axial slices.

    ``array``: shape (Z, Y, X), the image's pixel type; ``array[k]`` is the k-th axial slice, k from
    inferior to superior, rows anterior -> posterior, columns patient right -> left. A read-only,
    possibly non-contiguous view of ``reference``'s voxels as they were when the stack was made:
    it shares their buffer and keeps it alive (SimpleITK copies a shared buffer on write).
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


class _Voxels:
    """The voxel buffer of a SimpleITK image as a read-only numpy array (z, y, x), kept alive.

    ``sitk.GetArrayViewFromImage`` alone gives a view that dangles once the image is freed (e.g.
    ``to_axial_stack(sitk.RegionOfInterest(...)).array``). numpy keeps this object as the base of
    every view made from ``np.asarray(_Voxels(image))``, and it holds a shallow copy of the image:
    one more owner of the same buffer, so the buffer lives as long as any view, and a later write
    to ``image`` through SimpleITK copies the buffer first instead of changing the view.
    """

    def __init__(self, image: sitk.Image):
        view = sitk.GetArrayViewFromImage(image)  # first: makes ``image`` own its buffer, if shared
        interface = dict(view.__array_interface__)
        interface["data"] = (interface["data"][0], True)  # read-only
        self.__array_interface__ = interface
        self._owner = sitk.Image(image)  # shares the buffer (copy on write)


def to_axial_stack(image: sitk.Image) -> AxialStack:
    """Reorient a 3D scalar image (any direction cosines) to an axial (Z, Y, X) stack, without copying.

    Permutes and flips the voxel axes to the nearest LPS orientation, as SimpleITK's
    DICOMOrientImageFilter does (same permutation and flips, from the same orientation code), but
    as a numpy view of ``image``'s buffer: never interpolated, never copied, never cast, so the
    stack holds exactly the original voxel values in the original pixel type.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"expected a 3D scalar image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    # Stack axis n (x, y, z order) is the image axis pointing along L/R, P/A, S/I, flipped unless it
    # points towards L, P, S.
    permute_order = tuple(next(n for n in range(3) if orientation[n] in pair) for pair in ("LR", "PA", "SI"))
    flip_axes = tuple(orientation[permute_order[n]] != AXIAL_ORIENTATION[n] for n in range(3))
    # Numpy axis 2 - n is SimpleITK axis n: stack numpy axis m is image numpy axis 2 - permute_order[2 - m].
    array = np.asarray(_Voxels(image)).transpose([2 - permute_order[2 - m] for m in range(3)])
    array = np.flip(array, [m for m in range(3) if flip_axes[2 - m]])
    spacing = image.GetSpacing()
    return AxialStack(
        array=array,
        spacing=tuple(spacing[permute_order[n]] for n in (2, 1, 0)),
        reference=image,
        orientation=orientation,
        permute_order=permute_order,
        flip_axes=flip_axes,
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


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix mapping voxel index (i, j, k) = (x, y, z) to physical LPS coordinates in mm."""
    matrix = np.eye(4)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def image_geometry(image: sitk.Image) -> dict:
    """Size (voxels, x y z), spacing (mm), origin (mm, LPS) and direction (row-major) as tuples."""
    return {
        "size": tuple(image.GetSize()),
        "spacing": tuple(image.GetSpacing()),
        "origin": tuple(image.GetOrigin()),
        "direction": tuple(image.GetDirection()),
    }


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> bool:
    """Whether two images share size exactly, and spacing, origin and direction within ``tol``.

    ``tol`` is relative for values above 1 (mm) and absolute below.
    """
    ga, gb = image_geometry(a), image_geometry(b)
    if ga["size"] != gb["size"]:
        return False
    return all(
        np.allclose(ga[key], gb[key], rtol=tol, atol=tol) for key in ("spacing", "origin", "direction")
    )
