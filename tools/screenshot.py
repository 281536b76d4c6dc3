"""Render the extension's screenshot: the module's result on a real scan, in Slicer's own views.

What runs, and whose code it is:

- The scene is a ``slicer-core`` MRML scene set up as Slicer's start-up sets it (application logic,
  default colour tables, slice orientation presets, the segmentation converter rules that the
  Segmentations module registers). The scan is loaded by Slicer's Volumes logic
  (``vtkSlicerVolumesLogic.AddArchetypeVolume``, what "Add data" does; a DICOM series as its first
  file with the list of all its files) and given the module's CT window (``sample_data.set_default_window``).
- The segmentation is the module's: ``M4oESegmentationLib.segmenter.Segmenter.run`` writes the
  volume, runs ``m4oe segment`` in a separate process with the embedded default model and loads the
  label map, the gate table, chart and dominant-expert map into the scene
  (``views.show_segmentation``). The gate overlay is switched on by ``views.show_gate_overlay``,
  what the panel's "Show gate overlay" does.
- Rendering is Slicer's: each slice view is a ``vtkMRMLSliceLogic`` (it reslices and blends the
  background volume and the foreground gate map) with the slice-view displayable managers
  (``vtkMRMLSegmentationsDisplayableManager2D`` draws the segment fill and outlines); the 3D view is a
  ``vtkMRMLViewLogic`` view node with the 3D displayable managers
  (``vtkMRMLSegmentationsDisplayableManager3D`` draws the closed surfaces; the camera manager keeps
  the view's camera node), in off-screen VTK render windows (EGL here). What Slicer draws with Qt
  and CTK is not there: the view controller bars, the corner annotations and the orientation
  marker; the 3D cube and axis labels are switched off. The slice image is put on screen by a 2D
  image actor, as CTK's light-box renderer manager does in Slicer.
- Not Slicer's: the panel labels, the legend and the composition into one PNG (Pillow).

Usage (from the repository root; see tools/README.md)::

    PYTHONPATH=M4oESegmentation python tools/screenshot.py ../shared/data/totalsegmentator/example_ct_dicom \\
        --title "a held-out contrast CT (TotalSegmentator example_ct_dicom: 20 slices of 2 mm)"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# The slice and 3D views render off screen; EGL needs no X server. Set before VTK is imported.
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from PIL import Image, ImageDraw, ImageFont
from vtk.util import numpy_support

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "M4oESegmentation"
if str(MODULE_DIR) not in sys.path:  # as Slicer puts a scripted module's folder on sys.path
    sys.path.insert(0, str(MODULE_DIR))

from M4oESegmentationLib import gate_review, sample_data, segmenter, views, volumes  # noqa: E402

from m4oe.labels import Label  # noqa: E402

SLICE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLRulerDisplayableManager")
THREE_D_MANAGERS = (
    "vtkMRMLCameraDisplayableManager",
    "vtkMRMLViewDisplayableManager",
    "vtkMRMLModelDisplayableManager",
    "vtkMRMLSegmentationsDisplayableManager3D",
)
PANEL_FONT = 17
LEGEND_FONT = 15
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)


# ------------------------------------------------------------------------------------------ scene


def slicer_scene():
    """A fresh MRML scene with what Slicer's start-up puts in it; returns (scene, application logic)."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colors)  # the Volumes logic finds the grey colour table here
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not len(factory.GetConverterRules()):
        for rule in (
            slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
            slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
            slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
            slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
        ):
            factory.RegisterConverterRule(rule())
    for manager_factory in (
        slicer.vtkMRMLSliceViewDisplayableManagerFactory,
        slicer.vtkMRMLThreeDViewDisplayableManagerFactory,
    ):
        manager_factory.GetInstance().SetMRMLApplicationLogic(app_logic)
    return scene, app_logic


def load_volume(scene, app_logic, path: Path):
    """Load a scan (a file, or a DICOM series folder) with Slicer's Volumes logic.

    A folder is read as Slicer's DICOM plugin reads a series: its first file as the archetype, with
    the list of all its files. Raises ValueError when no scalar volume could be read.
    """
    files = vtk.vtkStringArray()
    archetype = path
    if path.is_dir():
        names = sorted(p for p in path.iterdir() if p.is_file())
        if not names:
            raise ValueError(f"{path}: the folder holds no files")
        archetype = names[0]
        for name in names:
            files.InsertNextValue(str(name))
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(app_logic)
    node = logic.AddArchetypeVolume(str(archetype), path.name.split(".")[0], 0, files)
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.GetImageData() is None:
        raise ValueError(f"{path}: Slicer's Volumes logic could not read a scalar volume")
    return node


def organ_positions(segmentation, volume) -> tuple[dict[str, float], set[int]]:
    """Slice offsets (mm, RAS) through the most organs, and the label values present.

    The segmentation is rasterised on the volume's grid (LPS; numpy (z, y, x)); every labelled
    voxel's RAS position is binned at 1 mm along S (for the axial view) and A (coronal), and the bin
    with the most distinct labels, then the most voxels, is chosen. Returns
    ``({"Axial": S, "Coronal": A}, {label values})``; ValueError for an empty segmentation.
    """
    text = segmentation.GetAttribute(segmenter.ATTRIBUTE + "Labels")
    labels = [Label.from_dict(entry) for entry in json.loads(text)]
    labelmap = volumes.segmentation_to_labelmap(segmentation, volume, labels)
    array = sitk.GetArrayViewFromImage(labelmap)
    zyx = np.argwhere(array > 0)
    if not len(zyx):
        raise ValueError("the segmentation is empty: nothing to show")
    direction = np.array(labelmap.GetDirection()).reshape(3, 3)
    lps = np.array(labelmap.GetOrigin()) + (zyx[:, ::-1] * np.array(labelmap.GetSpacing())) @ direction.T
    ras = lps * (-1.0, -1.0, 1.0)
    found = array[tuple(zyx.T)]
    positions = {}
    for view, axis in (("Axial", 2), ("Coronal", 1)):
        bins = np.round(ras[:, axis]).astype(int)
        positions[view] = float(
            max(
                np.unique(bins), key=lambda b: (len(np.unique(found[bins == b])), np.count_nonzero(bins == b))
            )
        )
    return positions, {int(v) for v in np.unique(found)}


# ------------------------------------------------------------------------------------------ views


def _manager_group(factory_class, names: tuple[str, ...], renderer):
    """A displayable manager group of Slicer's ``names`` on ``renderer``."""
    factory = factory_class.GetInstance()
    for name in names:
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.Initialize(factory, renderer)
    return group


def _render_window(width: int, height: int):
    """An off-screen render window with one renderer and an interactor (displayable managers need one)."""
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(8)
    window.SetSize(width, height)
    renderer = vtk.vtkRenderer()
    window.AddRenderer(renderer)
    interactor = vtk.vtkGenericRenderWindowInteractor()  # no event loop and no X server
    interactor.SetRenderWindow(window)
    interactor.Initialize()
    return window, renderer


def capture(window) -> np.ndarray:
    """Render ``window`` and return its pixels, (height, width, 3) uint8, top row first."""
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return pixels[::-1].copy()


class SliceView:
    """One of Slicer's slice views (``layout_name`` "Red", "Yellow" or "Green"), off screen.

    The slice logic reslices and blends the composite node's layers into an RGBA image of the view's
    size, shown by a 2D image actor (in Slicer, CTK's light-box renderer manager); the displayable
    managers add the segmentations (fill and outline) and the ruler.
    """

    def __init__(self, scene, app_logic, layout_name: str, orientation: str, size: tuple[int, int]):
        self.size = size
        self.window, self.renderer = _render_window(*size)
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.managers = _manager_group(
            slicer.vtkMRMLSliceViewDisplayableManagerFactory, SLICE_MANAGERS, self.renderer
        )
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app_logic)
        app_logic.GetSliceLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(scene)
        self.node = self.logic.AddSliceNode(layout_name)
        self.node.SetOrientation(orientation)
        self.node.SetRulerType(slicer.vtkMRMLAbstractViewNode.RulerTypeThin)
        self.managers.SetMRMLDisplayableNode(self.node)
        mapper = vtk.vtkImageMapper()
        mapper.SetColorWindow(255)  # the slice logic's output is already 8-bit RGBA
        mapper.SetColorLevel(127.5)
        self.image = vtk.vtkActor2D()
        self.image.SetMapper(mapper)
        self.image.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self.image)
        self.logic.ResizeSliceNode(*size)

    def show(self, background, offset_mm: float) -> None:
        """Show ``background`` (as the module does), fitted to the view, at ``offset_mm`` (RAS)."""
        self.logic.GetSliceCompositeNode().SetBackgroundVolumeID(background.GetID())
        self.logic.FitSliceToBackground(*self.size)
        self.logic.SetSliceOffset(offset_mm)
        self.logic.SnapSliceOffsetToIJK()

    def capture(self) -> np.ndarray:
        self.image.GetMapper().SetInputConnection(self.logic.GetImageDataConnection())
        return capture(self.window)


class ThreeDView:
    """Slicer's 3D view "1", off screen: the segmentations' closed surfaces, box and axis labels."""

    def __init__(self, scene, app_logic, size: tuple[int, int]):
        self.window, self.renderer = _render_window(*size)
        self.renderer.SetUseDepthPeeling(True)
        self.managers = _manager_group(
            slicer.vtkMRMLThreeDViewDisplayableManagerFactory, THREE_D_MANAGERS, self.renderer
        )
        self.logic = slicer.vtkMRMLViewLogic()
        self.logic.SetMRMLApplicationLogic(app_logic)
        app_logic.GetViewLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(scene)
        self.node = self.logic.AddViewNode("1")
        self.managers.SetMRMLDisplayableNode(self.node)

    def capture(self, elevation_deg: float, zoom: float) -> np.ndarray:
        """Look from anterior, raised by ``elevation_deg`` towards superior, centred on the surfaces.

        The 3D cube and the axis labels are switched off (the view controller's toggles in Slicer):
        on a thin slab of slices they stand over the surfaces. Centring is Slicer's "reset focal
        point" (the camera fitted to what is shown), then ``zoom``.
        """
        self.node.SetBoxVisible(False)
        self.node.SetAxisLabelsVisible(False)
        self.renderer.SetBackground(*self.node.GetBackgroundColor())
        self.renderer.SetBackground2(*self.node.GetBackgroundColor2())
        self.renderer.GradientBackgroundOn()
        camera_node = self.managers.GetDisplayableManagerByClassName(
            "vtkMRMLCameraDisplayableManager"
        ).GetCameraNode()
        camera_node.RotateTo(slicer.vtkMRMLCameraNode.Anterior)
        self.window.Render()
        self.renderer.ResetCamera()
        camera = self.renderer.GetActiveCamera()
        camera.Elevation(elevation_deg)
        camera.OrthogonalizeViewUp()
        camera.Zoom(zoom)
        self.renderer.ResetCameraClippingRange()
        return capture(self.window)


# ------------------------------------------------------------------------------------ composition


def _font(size: int):
    return ImageFont.load_default(size=size)


def _panel(pixels: np.ndarray, title: str) -> Image.Image:
    """A rendered view with its title in the top-left corner."""
    panel = Image.fromarray(pixels)
    draw = ImageDraw.Draw(panel, "RGBA")
    font = _font(PANEL_FONT)
    left, top, right, bottom = draw.textbbox((8, 6), title, font=font)
    draw.rectangle((left - 5, top - 4, right + 5, bottom + 4), fill=(0, 0, 0, 170))
    draw.text((8, 6), title, font=font, fill=TEXT)
    return panel


def _legend(
    draw, xy: tuple[int, int], entries: list[tuple[str, tuple[float, float, float]]], width: int
) -> int:
    """Draw coloured squares with names from ``xy``, wrapping at ``width``; return the next free y."""
    font = _font(LEGEND_FONT)
    x0, y = xy
    x = x0
    line = LEGEND_FONT + 10
    for text, color in entries:
        item = int(draw.textlength(text, font=font)) + 28
        if x + item > x0 + width and x > x0:
            x, y = x0, y + line
        draw.rectangle((x, y + 3, x + 14, y + 17), fill=tuple(round(255 * c) for c in color))
        draw.text((x + 20, y + 1), text, font=font, fill=TEXT)
        x += item + 14
    return y + line


def compose(
    panels: list[Image.Image],
    strip: Image.Image,
    title: str,
    legends: list[tuple[str, list[tuple[str, tuple[float, float, float]]]]],
) -> Image.Image:
    """Three square panels side by side, the wide strip under them, the title above, legends below."""
    gap = 4
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    title_font = _font(PANEL_FONT)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [""]
    for word in title.split(" "):
        candidate = f"{lines[-1]} {word}".strip()
        if measure.textlength(candidate, font=title_font) > width - 16 and lines[-1]:
            lines.append(word)
        else:
            lines[-1] = candidate
    title_h = 12 + (PANEL_FONT + 7) * len(lines)
    legend_h = 40 + 28 * len(legends)
    height = title_h + panels[0].height + gap + strip.height + legend_h
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.multiline_text((8, 6), "\n".join(lines), font=title_font, fill=TEXT, spacing=7)
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, title_h))
        x += panel.width + gap
    y = title_h + panels[0].height + gap
    sheet.paste(strip, (0, y))
    y += strip.height + 10
    font = _font(LEGEND_FONT)
    for heading, entries in legends:
        draw.text((8, y + 1), heading, font=font, fill=TEXT)
        y = _legend(draw, (8 + int(draw.textlength(heading, font=font)) + 12, y), entries, width - 300)
    return sheet.crop((0, 0, width, y + 4))


def save_png(image: Image.Image, path: Path, colors: int, exact: list[tuple[float, float, float]]) -> int:
    """Save as an optimised palette PNG of ``colors`` colours; return its size in bytes.

    The palette is median cut over the image (smooth greys, dithered) plus the ``exact`` colours
    (RGB 0..1: the legend's), which median cut alone shifts toward the large grey areas.
    """
    exact_rgb = sorted({tuple(round(255 * c) for c in color) for color in exact})
    if len(exact_rgb) >= colors:
        raise ValueError(f"{len(exact_rgb)} exact colours leave no room in a palette of {colors}")
    cut = image.quantize(colors - len(exact_rgb), method=Image.Quantize.MEDIANCUT)
    palette = cut.getpalette()[: 3 * (colors - len(exact_rgb))] + [v for rgb in exact_rgb for v in rgb]
    holder = Image.new("P", (1, 1))
    holder.putpalette(palette)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    image.quantize(palette=holder, dither=Image.Dither.FLOYDSTEINBERG).save(
        temporary, format="PNG", optimize=True
    )
    temporary.replace(path)
    return path.stat().st_size


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="the scan: a NIfTI/NRRD file or a DICOM series folder")
    parser.add_argument(
        "-o", "--output", type=Path, default=ROOT / "Resources/Screenshots/M4oESegmentation-1.png"
    )
    parser.add_argument("--title", default="", help="the scan as the title names it (default: its name)")
    parser.add_argument("--tta", type=int, default=None, help="test-time passes (default: the model card's)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the engine")
    parser.add_argument("--panel", type=int, default=440, help="side of the square views, pixels")
    parser.add_argument(
        "--zoom", type=float, default=1.35, help="slice view zoom over fitting the whole volume"
    )
    parser.add_argument("--colors", type=int, default=256, help="colours of the PNG palette")
    args = parser.parse_args(argv)
    if not args.input.exists():
        parser.error(f"{args.input}: no such file or folder")

    started = time.monotonic()
    scene, app_logic = slicer_scene()
    volume = load_volume(scene, app_logic, args.input)
    runner = segmenter.Segmenter(sys.executable, MODULE_DIR)
    extra = ("--threads", str(args.threads))
    result = runner.run(volume, test_time_passes=args.tta, extra_args=extra)
    segmented = time.monotonic()
    sample_data.set_default_window(volume, result.modality)
    review = segmenter.gate_review_of(result.segmentation)
    if review is None:
        raise RuntimeError("the result has no gate views")
    positions, present = organ_positions(result.segmentation, volume)

    side = args.panel
    red = SliceView(scene, app_logic, "Red", "Axial", (side, side))
    green = SliceView(scene, app_logic, "Green", "Coronal", (3 * side + 8, side * 2 // 5))
    three_d = ThreeDView(scene, app_logic, (side, side))
    for view, orientation in ((red, "Axial"), (green, "Coronal")):
        view.show(volume, positions[orientation])
        view.node.SetFieldOfView(
            *(f / args.zoom for f in view.node.GetFieldOfView()[:2]), view.node.GetFieldOfView()[2]
        )
    axial, coronal = red.capture(), green.capture()
    views.show_gate_overlay(review.overlay, True, scene=scene)  # the panel's "Show gate overlay"
    axial_gates = red.capture()
    surfaces = three_d.capture(elevation_deg=40.0, zoom=1.05)
    rendered = time.monotonic()

    segmentation = result.segmentation.GetSegmentation()
    segment_entries = []
    for label in json.loads(result.segmentation.GetAttribute(segmenter.ATTRIBUTE + "Labels")):
        segment = segmentation.GetSegment(volumes.segment_id(Label.from_dict(label)))
        if label["value"] in present and segment is not None:
            segment_entries.append((segment.GetName(), segment.GetColor()))
    weights = review.summary["overall"]["mean_weights"]
    expert_entries = [
        (f"{text}: {float(weights[name]):.2f}", gate_review.expert_color(n))
        for n, (name, text) in enumerate(
            zip(
                gate_review.expert_names(review.summary),
                gate_review.expert_legend(review.summary),
                strict=True,
            )
        )
    ]
    model = result.segmentation.GetAttribute(segmenter.ATTRIBUTE + "Model")
    title = (
        f"M4oE Segmentation in 3D Slicer's slice and 3D views: {args.title or args.input.name}, "
        f"segmented by the module with the embedded model {model}, a research demonstration model"
    )
    sheet = compose(
        [
            _panel(axial, "Red (axial): segmentation"),
            _panel(axial_gates, "Red (axial): gate overlay on"),
            _panel(surfaces, "3D: segment surfaces"),
        ],
        _panel(coronal, "Green (coronal): segmentation"),
        title,
        [("Segments", segment_entries), ("Gate overlay, dominant expert (mean weight):", expert_entries)],
    )
    exact = [color for _, color in segment_entries + expert_entries]
    size = save_png(sheet, args.output, args.colors, exact)
    print(
        f"{args.output}: {sheet.width}x{sheet.height}, {size / 1024:.0f} KiB; "
        f"segmentation {segmented - started:.1f} s (engine {result.seconds.get('total', 0):.1f} s), "
        f"rendering {rendered - segmented:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
