"""Volume and segmentation nodes <-> SimpleITK images, and where new nodes go in the scene.

Frames. A Slicer volume node holds its voxels as a ``vtkImageData`` (index order i, j, k, i
fastest) and its geometry as an IJK-to-RAS mapping: spacing (mm), origin (mm, RAS) and direction
cosines (RAS, column n = direction of index axis n). SimpleITK images use the same voxel index
order (x, y, z) = (i, j, k) but the LPS frame. The two frames differ by the sign of their first two
axes, ``LPS = diag(-1, -1, 1) @ RAS``, so the conversion negates the first two components of the
origin and the first two rows of the direction matrix; spacing and voxels are copied unchanged,
and the geometry stays exact (a sign flip loses no precision). numpy arrays of either side are
(k, j, i) = (z, y, x).

Transforms. A node's geometry is read in its own (local) frame: a parent transform is not applied.
Result nodes are placed under the input volume's parent transform (:func:`place_in_study`), so they
overlay it wherever the user has moved it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from m4oe.io import same_geometry
from m4oe.labels import Label

logger = logging.getLogger(__name__)

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
"""Maps RAS coordinates (Slicer) to LPS (SimpleITK, DICOM), and back (it is its own inverse)."""

GEOMETRY_TOLERANCE = 1e-4
"""Largest difference (mm for origin and spacing above 1, absolute below; direction cosines)
accepted between a label map read from the engine's output and the volume it was computed from.
The engine writes the input's exact geometry; a file format may round it (NIfTI stores float32)."""

BINARY_LABELMAP = "Binary labelmap"
_INTEGER_KINDS = "iu"


def segment_id(label: Label) -> str:
    """The segment ID of a label, as the engine writes it in ``.seg.nrrd`` files: ``Segment_{value}``."""
    return f"Segment_{label.value}"


def _scene(scene=None, node=None):
    """The scene to use: the one given, else the node's, else ``slicer.mrmlScene``."""
    if scene is None and node is not None:
        scene = node.GetScene()
    if scene is None:
        scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise ValueError("no MRML scene: pass scene=... or set slicer.mrmlScene")
    return scene


def _node_name(node) -> str:
    return node.GetName() if node is not None and node.GetName() else "(unnamed node)"


def _lps_geometry(volume_node) -> tuple[tuple, tuple, tuple]:
    """(spacing mm, origin mm LPS, direction row-major LPS) of voxel (0, 0, 0) of the node's array.

    The origin is that of the node (the RAS position of IJK (0, 0, 0)) moved to the first voxel of
    the image data's extent when the extent does not start at 0.
    """
    spacing = tuple(float(s) for s in volume_node.GetSpacing())
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(matrix)
    direction_ras = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    origin_ras = np.array(volume_node.GetOrigin(), dtype=float)
    image_data = volume_node.GetImageData()
    start = np.array(image_data.GetExtent()[::2], dtype=float) if image_data is not None else np.zeros(3)
    if start.any():
        origin_ras = origin_ras + direction_ras @ (np.array(spacing) * start)
    origin = tuple(float(v) for v in LPS_FROM_RAS @ origin_ras)
    direction = tuple(float(v) for v in (LPS_FROM_RAS @ direction_ras).flatten())
    return spacing, origin, direction


def _set_geometry_from_image(volume_node, image: sitk.Image) -> None:
    """Set a node's spacing, origin and direction (RAS) from an image's (LPS)."""
    direction_lps = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    direction_ras = LPS_FROM_RAS @ direction_lps
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(direction_ras[r, c]))
    volume_node.SetIJKToRASDirectionMatrix(matrix)
    volume_node.SetSpacing(*image.GetSpacing())
    volume_node.SetOrigin(*(float(v) for v in LPS_FROM_RAS @ np.array(image.GetOrigin(), dtype=float)))


def volume_node_to_sitk(volume_node) -> sitk.Image:
    """A scalar volume node as a SimpleITK image with the node's exact geometry, in LPS.

    Args:
        volume_node: ``vtkMRMLScalarVolumeNode`` (or ``vtkMRMLLabelMapVolumeNode``) with one
            scalar component per voxel.
    Returns:
        A 3D image of the node's voxel type (int16 stays int16), size (x, y, z) = (i, j, k) =
        the image data's dimensions, spacing in mm, origin in mm and direction cosines in LPS.
        Voxels are copied. The node's parent transform is not applied (local frame).

    Raises ValueError for a node that is not a scalar volume, has no voxels or several components.
    """
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise ValueError(f"{_node_name(volume_node)}: expected a scalar volume node")
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise ValueError(f"{_node_name(volume_node)}: the volume has no voxels")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"{_node_name(volume_node)}: has {image_data.GetNumberOfScalarComponents()} components per "
            "voxel; expected a scalar volume"
        )
    shape_zyx = tuple(reversed(image_data.GetDimensions()))
    voxels = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(shape_zyx)
    image = sitk.GetImageFromArray(voxels)  # copies; (z, y, x) array -> (x, y, z) image
    spacing, origin, direction = _lps_geometry(volume_node)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def sitk_to_volume_node(image: sitk.Image, name: str, *, scene=None, node=None, labelmap: bool = False):
    """A SimpleITK image as a scalar (or label map) volume node with the same geometry, in RAS.

    Args:
        image: 3D scalar image, geometry in LPS (mm). Voxels are copied; 64-bit integers are
            narrowed to 32 bits when the values fit (Slicer does not display 64-bit volumes).
        name: node name (also given to an existing ``node``).
        scene: the scene for a new node (default: ``slicer.mrmlScene``).
        node: an existing volume node to update instead of creating one.
        labelmap: create a ``vtkMRMLLabelMapVolumeNode`` (integer voxels required).
    Returns:
        The ``vtkMRMLScalarVolumeNode`` (``vtkMRMLLabelMapVolumeNode`` when ``labelmap``), in the
        scene, with display nodes. Its IJK-to-RAS geometry is the image's LPS geometry flipped.

    Raises ValueError for an image that is not 3D scalar, or a label map with non-integer voxels.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{name}: expected a 3D scalar image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    voxels = sitk.GetArrayViewFromImage(image)  # (z, y, x)
    if labelmap and voxels.dtype.kind not in _INTEGER_KINDS:
        raise ValueError(f"{name}: a label map needs integer voxels, got {voxels.dtype}")
    voxels = _narrow_64bit(voxels, name)
    if node is None:
        scene = _scene(scene)
        node = scene.AddNewNodeByClass(
            "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name
        )
    else:
        node.SetName(name)
    slicer.util.updateVolumeFromArray(node, voxels)
    _set_geometry_from_image(node, image)
    if node.GetScene() is not None and node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def _narrow_64bit(voxels: np.ndarray, name: str) -> np.ndarray:
    if voxels.dtype.itemsize < 8 or voxels.dtype.kind not in _INTEGER_KINDS:
        return voxels
    target = (
        np.int32 if voxels.dtype.kind == "i" or voxels.max(initial=0) > np.iinfo(np.uint32).max else np.uint32
    )
    info = np.iinfo(target)
    if voxels.size and (voxels.min() < info.min or voxels.max() > info.max):
        raise ValueError(f"{name}: {voxels.dtype} voxels outside the 32-bit range cannot be shown in Slicer")
    return voxels.astype(target)


def _check_labels(labels: Sequence[Label]) -> None:
    values = [label.value for label in labels]
    names = [label.name for label in labels]
    if not labels:
        raise ValueError("no labels given")
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate label values {sorted(values)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate label names {names}")


def labelmap_to_segmentation(
    labelmap: sitk.Image,
    labels: Sequence[Label],
    reference_volume_node,
    *,
    segmentation_node=None,
    name: str = "M4oE segmentation",
    scene=None,
):
    """A label map as a segmentation node: one segment per label, on the input volume's grid.

    Args:
        labelmap: 3D integer image (x, y, z), 0 = background, other values = ``Label.value``,
            on the grid of ``reference_volume_node`` (size equal; spacing, origin and direction in
            LPS within :data:`GEOMETRY_TOLERANCE`), as the engine writes it. Its voxels are placed
            on the reference volume's exact geometry.
        labels: every label of the task, in display order. Each becomes a segment, present in the
            label map or not (an absent organ is an empty segment the user can paint): ID
            :func:`segment_id`, the label's name and colour, and the ``TerminologyEntry`` tag
            :meth:`Label.terminology_entry`. All segments share one labelmap layer.
        reference_volume_node: the volume that was segmented; it becomes the segmentation's
            reference geometry (and, for a new node, its place in the scene and parent transform).
        segmentation_node: an existing segmentation node whose segments are replaced; by default
            a new node named ``name`` is added to ``scene`` (default: the reference's scene).
    Returns:
        The ``vtkMRMLSegmentationNode``.

    Raises ValueError for a label map that is not 3D scalar integer, holds values no label
    describes, or lies on another grid than the reference volume; for duplicate label values or
    names; RuntimeError when Slicer refuses the import.
    """
    _check_labels(labels)
    reference = volume_node_to_sitk(reference_volume_node)
    voxels = _checked_labelmap_voxels(labelmap, labels, reference, _node_name(reference_volume_node))
    # Slicer maps label value v to the v-th ID of the list it is given, so consecutive values
    # 1..N (in the order of ``labels``) let any label numbering, with gaps, map to our IDs.
    lookup = np.zeros(int(voxels.max(initial=0)) + 1, np.uint16 if len(labels) > 255 else np.uint8)
    for position, label in enumerate(labels, start=1):
        if label.value < lookup.size:
            lookup[label.value] = position
    consecutive = slicer.vtkMRMLLabelMapVolumeNode()  # outside the scene: no display node, no events
    slicer.util.updateVolumeFromArray(consecutive, lookup[voxels])
    _set_geometry_from_image(consecutive, reference)

    created = segmentation_node is None
    if created:
        scene = _scene(scene, reference_volume_node)
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation = segmentation_node.GetSegmentation()
    segmentation.RemoveAllSegments()
    # The import reads the label map in world coordinates; with no parent transform during the
    # import, the voxels land in the segmentation's local frame, which is the volume's once the
    # volume's transform is set below.
    segmentation_node.SetAndObserveTransformNodeID(None)
    ids = vtk.vtkStringArray()
    for label in labels:
        ids.InsertNextValue(segment_id(label))
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        consecutive, segmentation_node, ids
    ):
        raise RuntimeError(f"{segmentation_node.GetName()}: Slicer could not import the label map")
    segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    if reference_volume_node.GetID():
        segmentation_node.SetNodeReferenceID(
            segmentation_node.GetReferenceImageGeometryReferenceRole(), reference_volume_node.GetID()
        )
    for label in labels:
        segment = segmentation.GetSegment(segment_id(label))
        segment.SetName(label.name)
        segment.SetNameAutoGenerated(False)
        segment.SetColor(*(float(c) for c in label.color))
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), label.terminology_entry())
    if created:
        place_in_study(segmentation_node, reference_volume_node)
    return segmentation_node


def load_segmentation_file(
    path,
    labels: Sequence[Label],
    reference_volume_node,
    *,
    segmentation_node=None,
    name: str = "M4oE segmentation",
    scene=None,
):
    """The engine's ``.seg.nrrd`` read with Slicer's segmentation storage node, as a segmentation node.

    Slicer's ``vtkMRMLSegmentationStorageNode`` (what ``slicer.util.loadSegmentation`` uses) reads
    the file: segments with their IDs (:func:`segment_id`), names, colours, label values and
    ``TerminologyEntry`` tags as :func:`m4oe.io.write_segmentation` wrote them, on the file's grid.

    Args:
        path: the ``.seg.nrrd`` that ``m4oe segment`` wrote for ``reference_volume_node``.
        labels: every label of the task; the file must hold exactly these segments (IDs, names and
            terminology), each a layer of the input volume's grid.
        reference_volume_node: the volume that was segmented; its grid (size; spacing, origin and
            direction within :data:`GEOMETRY_TOLERANCE`) must be the file's. It becomes the
            segmentation's reference geometry, and for a new node its place in the scene and its
            parent transform.
        segmentation_node: an existing segmentation node whose segments are replaced; by default
            a new node named ``name`` is added to ``scene`` (default: the reference's scene).
    Returns:
        The ``vtkMRMLSegmentationNode``. Nothing is added to or changed in the scene when the file
        is refused.

    Raises ValueError naming the file when Slicer cannot read it, when its segments are not the
    labels' or its grid is not the reference volume's.
    """
    _check_labels(labels)
    # Read in a private scene (the storage node gives the node display nodes) until it is checked.
    private_scene = slicer.vtkMRMLScene()
    read = private_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(read):
        raise ValueError(f"{path}: Slicer could not read the segmentation")
    segmentation = read.GetSegmentation()
    found = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    expected = [segment_id(label) for label in labels]
    if sorted(found) != sorted(expected):
        raise ValueError(f"{path}: the segmentation holds segments {found}; the task's labels are {expected}")
    tag = slicer.vtkSegment.GetTerminologyEntryTagName()
    for label in labels:
        segment = segmentation.GetSegment(segment_id(label))
        terminology = vtk.reference("")
        segment.GetTag(tag, terminology)
        if segment.GetName() != label.name or str(terminology) != label.terminology_entry():
            raise ValueError(
                f"{path}: segment {segment_id(label)} is {segment.GetName()!r} ({terminology}), "
                f"not the task's {label.name!r} ({label.terminology_entry()})"
            )
    _check_file_grid(path, segmentation.GetSegment(expected[0]), reference_volume_node)

    created = segmentation_node is None
    if created:
        scene = _scene(scene, reference_volume_node)
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.GetSegmentation().DeepCopy(segmentation)
    segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    if reference_volume_node.GetID():
        segmentation_node.SetNodeReferenceID(
            segmentation_node.GetReferenceImageGeometryReferenceRole(), reference_volume_node.GetID()
        )
    if created:
        place_in_study(segmentation_node, reference_volume_node)
    return segmentation_node


def _check_file_grid(path, segment, reference_volume_node) -> None:
    """Refuse a segment whose labelmap (IJK to RAS, dimensions) is not the reference volume's grid."""
    labelmap = segment.GetRepresentation(BINARY_LABELMAP)
    file_matrix, volume_matrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(file_matrix)
    reference_volume_node.GetIJKToRASMatrix(volume_matrix)
    extent = labelmap.GetExtent()
    size = tuple(extent[2 * i + 1] - extent[2 * i] + 1 for i in range(3))
    start = np.array(extent[::2], dtype=float)
    file_ijk = np.array([[file_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    volume_ijk = np.array([[volume_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    file_origin = (file_ijk @ np.append(start, 1.0))[:3]
    volume_origin = (volume_ijk @ np.append(start, 1.0))[:3]
    reference_size = tuple(reference_volume_node.GetImageData().GetDimensions())
    scale = np.maximum(1.0, np.abs(volume_ijk[:3, :3]))
    if (
        size != reference_size
        or np.any(np.abs(file_ijk[:3, :3] - volume_ijk[:3, :3]) > GEOMETRY_TOLERANCE * scale)
        or np.any(
            np.abs(file_origin - volume_origin) > GEOMETRY_TOLERANCE * np.maximum(1.0, np.abs(volume_origin))
        )
    ):
        raise ValueError(
            f"{path}: the segmentation's grid (size {size}) is not that of volume "
            f"{_node_name(reference_volume_node)!r} (size {reference_size})"
        )


def _checked_labelmap_voxels(
    labelmap: sitk.Image, labels: Sequence[Label], reference: sitk.Image, reference_name: str
) -> np.ndarray:
    """The label map's (z, y, x) voxels, after checking its type, values and grid."""
    if labelmap.GetDimension() != 3 or labelmap.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("the label map must be a 3D scalar image")
    voxels = sitk.GetArrayViewFromImage(labelmap)
    if voxels.dtype.kind not in _INTEGER_KINDS:
        raise ValueError(f"the label map must have integer voxels, got {voxels.dtype}")
    unknown = sorted(set(np.unique(voxels).tolist()) - {0, *(label.value for label in labels)})
    if unknown:
        raise ValueError(f"the label map holds values {unknown} that no label describes")
    if not same_geometry(labelmap, reference, tol=GEOMETRY_TOLERANCE):
        raise ValueError(
            f"the label map's grid (size {labelmap.GetSize()}, spacing {labelmap.GetSpacing()}, origin "
            f"{labelmap.GetOrigin()} LPS) is not that of volume {reference_name!r} (size "
            f"{reference.GetSize()}, spacing {reference.GetSpacing()}, origin {reference.GetOrigin()} LPS)"
        )
    return voxels


def segmentation_to_labelmap(segmentation_node, reference_volume_node, labels: Sequence[Label]) -> sitk.Image:
    """A segmentation node as a label map on the reference volume's grid, in LPS.

    Args:
        segmentation_node: ``vtkMRMLSegmentationNode``, e.g. the result after editing.
        reference_volume_node: the volume whose grid the label map takes (the segmented volume).
        labels: the labels to write. Each is matched to a segment by name, else by ID
            (:func:`segment_id`, so a renamed segment is still found); its voxels get
            ``Label.value``. A label without a segment stays absent (0); segments no label matches
            are left out (logged). Where segments overlap, the later label in ``labels`` wins.
    Returns:
        A 3D uint8 image (uint16 when a value exceeds 255) with the reference volume's size,
        spacing, origin and direction (LPS) as :func:`volume_node_to_sitk` gives them.

    Raises ValueError for duplicate labels or a reference that is not a scalar volume;
    RuntimeError when Slicer cannot rasterise the segments.
    """
    _check_labels(labels)
    reference = volume_node_to_sitk(reference_volume_node)
    segmentation = segmentation_node.GetSegmentation()
    chosen = _match_segments(segmentation, labels)
    values = np.zeros(
        reference.GetSize()[::-1], np.uint16 if max(lab.value for lab in labels) > 255 else np.uint8
    )
    if chosen:
        merged = _merged_labelmap(segmentation_node, reference_volume_node, chosen)
        values[...] = merged
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(reference)
    return image


def _match_segments(segmentation, labels: Sequence[Label]) -> list[tuple[str, int]]:
    """(segment ID, label value) per label found, names matched first, then IDs."""
    found: dict[int, str] = {}
    used: set[str] = set()
    for label in labels:
        sid = segmentation.GetSegmentIdBySegmentName(label.name)
        if sid and sid not in used:
            found[label.value] = sid
            used.add(sid)
    for label in labels:
        sid = segment_id(label)
        if label.value not in found and segmentation.GetSegment(sid) is not None and sid not in used:
            found[label.value] = sid
            used.add(sid)
    others = [
        segmentation.GetNthSegment(n).GetName()
        for n in range(segmentation.GetNumberOfSegments())
        if segmentation.GetNthSegmentID(n) not in used
    ]
    if others:
        logger.warning("segments %s match no label of the task and are left out of the label map", others)
    return [(found[label.value], label.value) for label in labels if label.value in found]


def _merged_labelmap(segmentation_node, reference_volume_node, chosen: list[tuple[str, int]]) -> np.ndarray:
    """The chosen segments painted with their values on the reference grid: (z, y, x) array."""
    if not segmentation_node.GetSegmentation().ContainsRepresentation(BINARY_LABELMAP):
        segmentation_node.CreateBinaryLabelmapRepresentation()
    geometry = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(
        reference_volume_node, segmentation_node.GetParentTransformNode()
    )
    geometry.UnRegister(None)  # the logic hands over a new reference; Python now holds the only one
    ids = vtk.vtkStringArray()
    values = vtk.vtkIntArray()
    for sid, value in chosen:
        ids.InsertNextValue(sid)
        values.InsertNextValue(value)
    merged = slicer.vtkOrientedImageData()
    if not segmentation_node.GenerateMergedLabelmapForAllSegments(
        merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, geometry, ids, values
    ):
        raise RuntimeError(f"{segmentation_node.GetName()}: Slicer could not merge the segments")
    want = geometry.GetExtent()
    have = merged.GetExtent()
    shape = tuple(reversed(merged.GetDimensions()))
    array = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars()).reshape(shape)
    if tuple(have) == tuple(want):
        return array
    # Crop or pad a merged extent that differs from the reference's (ranges are inclusive).
    out = np.zeros([want[2 * a + 1] - want[2 * a] + 1 for a in (2, 1, 0)], array.dtype)
    src, dst = [], []
    for a in (2, 1, 0):
        lo, hi = max(want[2 * a], have[2 * a]), min(want[2 * a + 1], have[2 * a + 1])
        if hi < lo:
            return out
        src.append(slice(lo - have[2 * a], hi - have[2 * a] + 1))
        dst.append(slice(lo - want[2 * a], hi - want[2 * a] + 1))
    out[tuple(dst)] = array[tuple(src)]
    return out


def place_in_study(node, reference_node) -> bool:
    """Put ``node`` where ``reference_node`` is: same subject hierarchy parent and parent transform.

    The subject hierarchy parent of a volume loaded from DICOM is its study, so a result lands in
    the input's study (as SlicerTotalSegmentator does); the shared parent transform makes it
    overlay the input. Returns whether the subject hierarchy placement was made: False when the
    scene has no subject hierarchy (the ``slicer-core`` package without Slicer's plugins) or the
    reference has no item in it.
    """
    if node.IsA("vtkMRMLTransformableNode"):
        node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    scene = reference_node.GetScene()
    hierarchy_class = getattr(slicer, "vtkMRMLSubjectHierarchyNode", None)
    if scene is None or hierarchy_class is None:
        return False
    hierarchy = hierarchy_class.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return False
    invalid = hierarchy.GetInvalidItemID()
    reference_item = hierarchy.GetItemByDataNode(reference_node)
    if reference_item == invalid:
        return False
    parent = hierarchy.GetItemParent(reference_item)
    item = hierarchy.GetItemByDataNode(node)
    if item == invalid:
        item = hierarchy.CreateItem(parent, node)
    else:
        hierarchy.SetItemParent(item, parent)
    return item != invalid


def study_volumes(volume_node) -> list:
    """The scalar volumes (not label maps) of ``volume_node``'s study, in subject hierarchy order.

    The study is the volume's subject hierarchy parent (for a DICOM series, its study), searched
    with its sub-folders; a volume directly under the scene, or without a subject hierarchy item,
    has the whole scene as its study. ``volume_node`` itself is always in the list.
    """
    scene = volume_node.GetScene()
    hierarchy_class = getattr(slicer, "vtkMRMLSubjectHierarchyNode", None)
    hierarchy = None if hierarchy_class is None else hierarchy_class.GetSubjectHierarchyNode(scene)
    item = hierarchy.GetItemByDataNode(volume_node) if hierarchy is not None else 0
    if not item:
        nodes = [
            scene.GetNthNodeByClass(n, "vtkMRMLScalarVolumeNode")
            for n in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))
        ]
    else:
        children = vtk.vtkIdList()
        hierarchy.GetItemChildren(hierarchy.GetItemParent(item), children, True)
        nodes = [hierarchy.GetItemDataNode(children.GetId(n)) for n in range(children.GetNumberOfIds())]
    found = [
        node
        for node in nodes
        if node is not None
        and node.IsA("vtkMRMLScalarVolumeNode")
        and not node.IsA("vtkMRMLLabelMapVolumeNode")
    ]
    return found if volume_node in found else [volume_node, *found]


def roi_lps_bounds(roi_node, volume_node=None) -> tuple[float, float, float, float, float, float]:
    """A markups ROI as the engine's region: (x0, y0, z0, x1, y1, z1), mm, LPS, axis-aligned.

    The ROI's eight corners (its box, in world RAS through its parent transforms) are brought into
    ``volume_node``'s local frame (the frame of :func:`volume_node_to_sitk`: through the inverse of
    the volume's parent transform, which must be linear) and converted to LPS. A ROI rotated
    against the LPS axes becomes the axis-aligned box around it. Raises ValueError for a ROI that
    has no size yet (not placed) or a volume under a non-linear transform.
    """
    size = np.array(roi_node.GetSize(), dtype=float)
    if roi_node.GetNumberOfControlPoints() == 0 or not (size > 0).all():
        raise ValueError(f"{_node_name(roi_node)}: the ROI has no size; place it in the views first")
    object_to_world = roi_node.GetObjectToWorldMatrix()
    corners = []
    for signs in np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T:
        point = [*(signs * size / 2), 1.0]
        corners.append(object_to_world.MultiplyPoint(point)[:3])
    world_to_local = vtk.vtkMatrix4x4()
    parent = volume_node.GetParentTransformNode() if volume_node is not None else None
    if parent is not None and not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
        None, parent, world_to_local
    ):
        raise ValueError(f"{_node_name(volume_node)}: the ROI cannot be used under a non-linear transform")
    local = [world_to_local.MultiplyPoint([*c, 1.0])[:3] for c in corners]
    return lps_bounds_of_ras_points(local)


def lps_bounds_of_ras_points(points_ras) -> tuple[float, float, float, float, float, float]:
    """The axis-aligned LPS box (x0, y0, z0, x1, y1, z1), mm, around points given in RAS (N, 3)."""
    lps = np.asarray(points_ras, dtype=float) @ LPS_FROM_RAS.T
    return (*(float(v) for v in lps.min(axis=0)), *(float(v) for v in lps.max(axis=0)))
