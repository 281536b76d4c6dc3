"""Where results are shown: slice-view layers, segmentation display, and the module's plot view and
Segment Editor nodes.

Everything here works on MRML nodes only (slice composite, display, plot view and segment editor
nodes), not on widgets, so it runs on a bare scene; the module file adds what needs the
application (the layout manager, the 3D view's focal point). Imports only ``slicer``, so the panel
can use it before the engine's packages are installed.
"""

from __future__ import annotations

import slicer

OVERLAY_OPACITY = 0.4
SLICE_VIEWS = ("Red", "Yellow", "Green")
"""The slice views that show a gate map overlay (the default layout's axial, sagittal, coronal)."""
GATE_MAP_ATTRIBUTE = "M4oESegmentation.Role"
GATE_MAP_ROLE = "gate map"
"""A dominant-expert map volume carries attribute ``GATE_MAP_ATTRIBUTE = GATE_MAP_ROLE``, so that
hiding the overlay clears the foreground only where a gate map is shown."""
GATE_PLOT_SINGLETON = "M4oESegmentationGatePlot"
SEGMENT_EDITOR_SINGLETON = "SegmentEditor"
"""The Segment Editor module's own node tag: the embedded editor shares its state (effect, mask)."""


def _scene(scene):
    scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise ValueError("no MRML scene: pass scene=... or set slicer.mrmlScene")
    return scene


def _nodes_by_class(scene, class_name: str) -> list:
    return [scene.GetNthNodeByClass(n, class_name) for n in range(scene.GetNumberOfNodesByClass(class_name))]


def singleton_node(class_name: str, tag: str, *, scene=None):
    """The scene's node of ``class_name`` with singleton ``tag``, added when missing."""
    scene = _scene(scene)
    node = scene.GetSingletonNode(tag, class_name)
    if node is None:
        node = scene.CreateNodeByClass(class_name)
        node.UnRegister(None)  # CreateNodeByClass hands over a reference; the scene keeps its own
        node.SetSingletonTag(tag)
        node = scene.AddNode(node)
    return node


def gate_plot_view_node(*, scene=None):
    """The plot view node of the module's embedded gate chart (one per scene)."""
    return singleton_node("vtkMRMLPlotViewNode", GATE_PLOT_SINGLETON, scene=scene)


def segment_editor_node(*, scene=None):
    """The scene's Segment Editor node, shared with the Segment Editor module."""
    return singleton_node("vtkMRMLSegmentEditorNode", SEGMENT_EDITOR_SINGLETON, scene=scene)


def mark_gate_map(volume_node) -> None:
    """Tag a dominant-expert map volume so :func:`show_gate_overlay` knows it for one."""
    volume_node.SetAttribute(GATE_MAP_ATTRIBUTE, GATE_MAP_ROLE)


def show_gate_overlay(overlay, show: bool, *, scene=None) -> list[str]:
    """Show (or hide) a dominant-expert map as the foreground of the :data:`SLICE_VIEWS`.

    Showing sets the map as foreground at :data:`OVERLAY_OPACITY`; hiding (or ``overlay`` None)
    clears the foreground only where it is a gate map (see :func:`mark_gate_map`), never another
    volume the user put there. Returns the names of the slice views changed.
    """
    scene = _scene(scene)
    changed = []
    for composite in _nodes_by_class(scene, "vtkMRMLSliceCompositeNode"):
        if composite.GetLayoutName() not in SLICE_VIEWS:
            continue
        if show and overlay is not None:
            composite.SetForegroundVolumeID(overlay.GetID())
            composite.SetForegroundOpacity(OVERLAY_OPACITY)
            changed.append(composite.GetLayoutName())
            continue
        foreground = scene.GetNodeByID(composite.GetForegroundVolumeID() or "")
        if foreground is not None and foreground.GetAttribute(GATE_MAP_ATTRIBUTE) == GATE_MAP_ROLE:
            composite.SetForegroundVolumeID(None)
            changed.append(composite.GetLayoutName())
    return changed


def show_segmentation(segmentation_node, *, outlines_only: bool = False) -> None:
    """Make a segmentation visible in the slice views and as closed surfaces in 3D.

    ``outlines_only``: no fill in the slice views (a comparison drawn over the result's fill).
    """
    segmentation_node.CreateClosedSurfaceRepresentation()
    display = segmentation_node.GetDisplayNode()
    if display is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display = segmentation_node.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2D(True)
    display.SetVisibility3D(True)
    display.SetVisibility2DFill(not outlines_only)
    display.SetVisibility2DOutline(True)
