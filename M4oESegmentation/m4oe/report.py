"""A one-page picture of one prediction: the segmentation and how the gate routed it.

The page (a PNG of 1600 x 1000 pixels) is for a reader who would rather look than read:

- (a) an axial slice of the input (the one with the most segmented voxels), organs outlined in
  their label colours;
- (b) a coronal slice through the same volume, outlined the same way;
- (c) the dominant expert at every pixel of the slice of (a), one colour per expert;
- (d) the mean weight of each expert per slice along the volume, the slice of (a) marked;

with a legend of the organs (and their volumes), the detected modality and why, the routing
warnings in red (the gate disagrees with the modality; the gate cannot prefer an expert, as the
released code's channel gate cannot, so (c) and (d) show no routing; the scan may not show an
abdomen, see :mod:`m4oe.ood`), and the timings.

Image panels follow the radiological convention, which is the layout of the axial stack
(:mod:`m4oe.geometry`): patient right on the left of the picture, anterior up in axial views,
superior up in coronal views. Their data coordinates are millimetres, so pixels keep their true
aspect ratio.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

from m4oe import __version__
from m4oe.errors import OutputError
from m4oe.geometry import AxialStack, to_axial_stack
from m4oe.io import same_geometry, write_atomic
from m4oe.labels import Label
from m4oe.modality import ModalityResult, strided_subsample

if TYPE_CHECKING:
    from m4oe.predictor import Prediction

PAGE_SIZE_IN = (16.0, 10.0)
DPI = 100  # PAGE_SIZE_IN x DPI = 1600 x 1000 pixels
CT_WINDOW = (400.0, 40.0)  # (width, level) in HU: the abdominal soft-tissue window
MR_PERCENTILES = (1.0, 99.0)
# One colour per expert, in expert order (matplotlib's tab10), shared by the overlay, its legend
# and the weight curves.
EXPERT_COLORS = (
    (0.122, 0.467, 0.706),
    (1.000, 0.498, 0.055),
    (0.173, 0.627, 0.173),
    (0.839, 0.153, 0.157),
    (0.580, 0.404, 0.741),
    (0.549, 0.337, 0.294),
    (0.890, 0.467, 0.761),
    (0.498, 0.498, 0.498),
    (0.737, 0.741, 0.133),
    (0.090, 0.745, 0.812),
)
OVERLAY_ALPHA = 0.45
OUTLINE_WIDTH = 2.0  # points
NO_GATES = "no gate maps (dense model, or gates not recorded)"
WARNING_COLOR = "#c00000"
WHITE = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class _Views:
    """The slices the image panels show.

    ``labels``: the label map's axial stack ((Z, Y, X) label values in the label map's type, a view
    of it); its geometry is the input's. ``k``: the axial slice (stack axis 0); ``row``: the coronal
    slice (stack axis 1). ``axial``: (Y, X) input intensities of slice ``k``; ``coronal``: (Z, X)
    input intensities of row ``row``, slices inferior -> superior. ``window``: (low, high) display
    intensities. Only these two planes of the input are read out, so a large volume costs no copy.
    """

    labels: AxialStack
    k: int
    row: int
    axial: np.ndarray
    coronal: np.ndarray
    window: tuple[float, float]

    @property
    def axial_labels(self) -> np.ndarray:
        """(Y, X) int label values of slice ``k``."""
        return np.rint(self.labels.array[self.k]).astype(np.int32)

    @property
    def coronal_labels(self) -> np.ndarray:
        """(Z, X) int label values of row ``row``, slices inferior -> superior."""
        return np.rint(self.labels.array[:, self.row]).astype(np.int32)


def write_report(
    image: sitk.Image,
    prediction: Prediction,
    path: str | Path,
    *,
    overwrite: bool = False,
    title: str | None = None,
) -> Path:
    """Draw the page of :func:`render_report` and write it as a PNG, atomically.

    Args:
        image: the input volume the prediction was made on (3D scalar, any direction; LPS, mm;
            HU for CT).
        prediction: what :meth:`m4oe.predictor.Predictor.predict` returned for ``image``.
        path: the ``.png`` file to write.
        overwrite: replace an existing file; otherwise an existing file is an :class:`OutputError`.
        title: the page title; None names the task.

    Returns:
        ``path``. Raises :class:`OutputError` as :func:`m4oe.io.write_atomic` does, and for a name
        not ending in ``.png``; ValueError as :func:`render_report` does.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OutputError("a report must be written as .png", path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError("exists; pass --overwrite to replace it", path)  # refused before drawing
    figure = render_report(image, prediction, title=title)

    def write(temporary: Path) -> None:
        figure.savefig(temporary, format="png", dpi=DPI, facecolor="white")

    return write_atomic(path, write, overwrite)


def render_report(image: sitk.Image, prediction: Prediction, *, title: str | None = None) -> Figure:
    """The report page as a matplotlib Figure, 16 x 10 inches (1600 x 1000 pixels at 100 dpi).

    Uses no pyplot state, so it needs no display and is safe in a worker thread. The axes carry
    the labels ``"axial"``, ``"coronal"``, ``"gate_map"``, ``"gate_curves"`` and ``"organs"``.

    Raises ValueError when ``image`` is not a 3D scalar volume, when the label map is not on its
    grid, or when the gate map is not a 3D image with one component per expert of the summary.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"the report needs a 3D scalar input volume, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    if not same_geometry(image, prediction.labelmap):
        raise ValueError("the label map is not on the input volume's grid (size, spacing, origin, direction)")
    experts = _expert_names(prediction)
    labels = to_axial_stack(prediction.labelmap)
    k = _busiest(np.count_nonzero(labels.array > 0, axis=(1, 2)))
    row = _busiest(np.count_nonzero(labels.array > 0, axis=(0, 2)))
    low, high, window_note = _display_window(sitk.GetArrayViewFromImage(image), prediction.modality)
    views = _Views(
        labels=labels,
        k=k,
        row=row,
        axial=to_axial_stack(stack_slab(image, labels, 0, k)).array[0],
        coronal=to_axial_stack(stack_slab(image, labels, 1, row)).array[:, 0],
        window=(low, high),
    )

    figure = Figure(figsize=PAGE_SIZE_IN, dpi=DPI, facecolor="white")
    grid = figure.add_gridspec(
        2,
        3,
        left=0.025,
        right=0.985,
        top=0.85,
        bottom=0.075,
        hspace=0.22,
        wspace=0.1,
        height_ratios=(1.75, 1.0),
    )
    position = _slice_position(prediction, image, views)
    _draw_axial(figure.add_subplot(grid[0, 0], label="axial"), views, prediction.labels, position)
    _draw_coronal(figure.add_subplot(grid[0, 1], label="coronal"), views, prediction.labels)
    gate_map = figure.add_subplot(grid[0, 2], label="gate_map")
    if prediction.gate_map is not None:
        _draw_gate_map(gate_map, image, views, prediction, experts)
    else:
        _empty_panel(gate_map, "(c) Dominant expert")
    curves = figure.add_subplot(grid[1, 1:], label="gate_curves")
    if prediction.gate_summary is not None:
        _draw_gate_curves(curves, prediction.gate_summary, experts, position)
    else:
        _empty_panel(curves, "(d) Expert weight per slice")
    _draw_organ_legend(figure.add_subplot(grid[1, 0], label="organs"), views, prediction.labels)
    _write_header(figure, prediction, title, window_note)
    _write_footer(figure, labels, prediction)
    return figure


def stack_slab(image: sitk.Image, stack: AxialStack, axis: int, index: int) -> sitk.Image:
    """The one-voxel-thick 3D sub-image of ``image`` that is plane ``index`` of ``stack.array``.

    Args:
        image: a volume on the grid of ``stack.reference`` (any pixel type).
        stack: an axial stack of that grid, for its permutation and flips.
        axis: numpy axis of the stack: 0 for axial slice ``index``, 1 for coronal row ``index``.
    Returns:
        The sub-image, with the spacing and direction of ``image`` and its origin moved to the slab
        (LPS, mm); its own axial stack is the plane of ``stack.array`` (thickness 1 along ``axis``).
    """
    n = 2 - axis  # stack numpy axis m is stack SimpleITK axis 2 - m
    source = stack.permute_order[n]  # the image axis (x, y, z order) it comes from
    start, size = [0, 0, 0], list(image.GetSize())
    start[source] = size[source] - 1 - index if stack.flip_axes[n] else index
    size[source] = 1
    return sitk.RegionOfInterest(image, size, start)


def dominant_expert_slice(gate_map: sitk.Image, image: sitk.Image, stack: AxialStack, k: int) -> np.ndarray:
    """The dominant expert at every pixel of axial slice ``k`` of ``image``.

    The E-component ``gate_map`` (expert weights per token on any grid, LPS, mm; see
    :func:`m4oe.gates.gate_map_image`) is resampled linearly, by physical position, onto the
    input's own grid for that slice; then the argmax over experts is taken.

    Returns:
        (Y, X) int array laid out like ``stack.array[k]`` (rows anterior -> posterior, columns
        patient right -> left): the expert index, or -1 where the gate map does not reach.
    """
    slab = stack_slab(image, stack, 0, k)
    resampled = sitk.Resample(
        sitk.Cast(gate_map, sitk.sitkVectorFloat32), slab, sitk.Transform(), sitk.sitkLinear, 0.0
    )
    components = range(resampled.GetNumberOfComponentsPerPixel())
    weights = np.stack(
        [to_axial_stack(sitk.VectorIndexSelectionCast(resampled, e)).array[0] for e in components], axis=-1
    )  # (Y, X, E)
    dominant = np.argmax(weights, axis=-1)
    # Weights sum to 1 where the map reaches; beyond it, Resample fills every component with 0.
    dominant[weights.sum(axis=-1) < 0.5] = -1
    return dominant


def _expert_names(prediction: Prediction) -> list[str]:
    """Legend entries "name (MODALITY)" of the experts, checked against the gate map's components."""
    summary = prediction.gate_summary or {}
    expected = set(summary.get("expected_experts") or [])
    names = [
        f"{e['name']} ({str(e.get('modality', '?')).upper()})"
        + (", expected" if e["name"] in expected else "")
        for e in summary.get("experts", [])
    ]
    gate_map = prediction.gate_map
    if gate_map is None:
        return names
    if gate_map.GetDimension() != 3:
        raise ValueError(f"the gate map must be a 3D image, got {gate_map.GetDimension()}D")
    components = gate_map.GetNumberOfComponentsPerPixel()
    if not names:
        return [f"expert {e}" for e in range(components)]
    if components != len(names):
        raise ValueError(
            f"the gate map has {components} components, the gate summary names {len(names)} experts"
        )
    return names


def _busiest(counts: np.ndarray) -> int:
    """Index of the largest count, or the middle index when every count is zero."""
    return int(np.argmax(counts)) if counts.any() else len(counts) // 2


def _display_window(array: np.ndarray, modality: ModalityResult) -> tuple[float, float, str | None]:
    """(low, high) display range for (Z, Y, X) intensities, and a note when the CT window is moved.

    CT: the abdominal window W400/L40 (HU), moved up by 1024 when modality detection suspects a CT
    stored without its rescale intercept. MR: the 1st and 99th percentiles of the volume.
    """
    if modality.modality == "ct":
        width, level = CT_WINDOW
        offset = float(modality.statistics.get("suspected_hu_offset") or 0.0)
        note = None
        if offset:
            note = f"intensities look like CT without its rescale intercept; window moved up by {offset:.0f}"
        return level + offset - width / 2, level + offset + width / 2, note
    low, high = np.percentile(strided_subsample(array, 1 << 20).astype(np.float32), MR_PERCENTILES)
    return float(low), float(max(high, low + 1e-6)), None


def _slice_position(prediction: Prediction, image: sitk.Image, views: _Views) -> float:
    """LPS z (mm) of the axial slice: the gate summary's figure when it has one, else the slab origin's."""
    for entry in (prediction.gate_summary or {}).get("per_slice", []):
        if entry.get("index") == views.k:
            return float(entry["position_mm"])
    return float(stack_slab(image, views.labels, 0, views.k).GetOrigin()[2])


def _extent(shape: tuple[int, int], spacing: tuple[float, float]) -> tuple[float, float, float, float]:
    """imshow extent (mm) of a (rows, cols) array: row 0 at the top, pixel (r, c) centred at (c sx, r sy)."""
    (rows, cols), (s_row, s_col) = shape, spacing
    return (-0.5 * s_col, (cols - 0.5) * s_col, (rows - 0.5) * s_row, -0.5 * s_row)


def _show_slice(
    ax: Axes, pixels: np.ndarray, spacing: tuple[float, float], window: tuple[float, float]
) -> None:
    """Draw a (rows, cols) grey slice whose pixels measure ``spacing`` = (row, column) mm."""
    ax.imshow(pixels, cmap="gray", vmin=window[0], vmax=window[1], extent=_extent(pixels.shape, spacing))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_anchor("N")  # image panels hang from the top of their cells, so their titles line up
    limit = min(pixels.shape[1] * spacing[1] / 4, pixels.shape[0] * spacing[0] / 3)
    bar = max([n for n in (5, 10, 20, 50, 100, 200) if n <= limit], default=5)
    ax.add_artist(
        AnchoredSizeBar(ax.transData, bar, f"{bar} mm", "lower right", pad=0.4, color="white", frameon=False)
    )


def _outline(
    ax: Axes, slice_labels: np.ndarray, colors: dict[int, tuple], spacing: tuple[float, float], width: float
) -> None:
    """Outline each label value of a (rows, cols) label slice in ``colors[value]`` (RGB 0..1), in mm."""
    ys = np.arange(slice_labels.shape[0]) * spacing[0]
    xs = np.arange(slice_labels.shape[1]) * spacing[1]
    for value, color in colors.items():
        mask = slice_labels == value
        if mask.any() and not mask.all():
            ax.contour(xs, ys, mask.astype(np.uint8), levels=[0.5], colors=[color], linewidths=width)


def _orientation_letters(ax: Axes, top: str, bottom: str) -> None:
    """Patient directions at the panel edges: R left, L right (radiological convention)."""
    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    style = {"transform": ax.transAxes, "color": "white", "fontsize": 12, "weight": "bold"}
    for x, y, letter, ha, va in (
        (0.015, 0.5, "R", "left", "center"),
        (0.985, 0.5, "L", "right", "center"),
        (0.5, 0.985, top, "center", "top"),
        (0.5, 0.015, bottom, "center", "bottom"),
    ):
        ax.text(x, y, letter, ha=ha, va=va, path_effects=outline, **style)


def _marker_line(ax: Axes, y_mm: float) -> None:
    """Thin dashed line across an image panel where the other view's slice cuts it."""
    ax.axhline(y_mm, color="white", linestyle=(0, (4, 4)), linewidth=0.8, alpha=0.6)


def _draw_axial(ax: Axes, views: _Views, labels: list[Label], position: float) -> None:
    """(a): axial slice ``k`` with organ outlines; a dashed line marks the coronal row."""
    _, sy, sx = views.labels.spacing
    _show_slice(ax, views.axial, (sy, sx), views.window)
    _outline(ax, views.axial_labels, {lab.value: lab.color for lab in labels}, (sy, sx), OUTLINE_WIDTH)
    _marker_line(ax, views.row * sy)
    _orientation_letters(ax, "A", "P")
    Z = views.labels.array.shape[0]
    ax.set_title(f"(a) Axial, slice {views.k + 1} of {Z} (z = {position:.1f} mm)", loc="left")


def _draw_coronal(ax: Axes, views: _Views, labels: list[Label]) -> None:
    """(b): the coronal slice at stack row ``row``, superior at the top; a dashed line marks slice ``k``."""
    sz, _, sx = views.labels.spacing
    Z, Y, _ = views.labels.array.shape
    # The stack runs inferior -> superior along axis 0; reversed, display row 0 is the top slice.
    _show_slice(ax, views.coronal[::-1], (sz, sx), views.window)
    colors = {lab.value: lab.color for lab in labels}
    _outline(ax, views.coronal_labels[::-1], colors, (sz, sx), OUTLINE_WIDTH)
    _marker_line(ax, (Z - 1 - views.k) * sz)
    _orientation_letters(ax, "S", "I")
    ax.set_title(f"(b) Coronal, row {views.row + 1} of {Y} (anterior to posterior)", loc="left")


def gate_map_note(summary: dict) -> str:
    """What the gate map of panel (c) shows: forced routing, a gate without routing, the mean over
    layers or one layer; for a MoME router, its decoder scales and the classes averaged."""
    mapped = summary.get("mapped_layer", "mean")
    router = summary.get("router")
    if summary.get("forced_expert"):
        return f"routing forced to {summary['forced_expert']}"
    if summary.get("gate_can_prefer_experts") is False:
        return f"{summary.get('gate', 'channel')} gate: equal weights, no routing"
    if router:
        scales = (
            f"mean over {len(router['scales'])} decoder scales" if mapped == "mean" else f"scale {mapped}"
        )
        return f"MoME router, {scales}, averaged over {len(router['queries'])} classes"
    return "mean over layers" if mapped == "mean" else f"layer {mapped}"


def _draw_gate_map(
    ax: Axes, image: sitk.Image, views: _Views, prediction: Prediction, experts: list[str]
) -> None:
    """(c): slice ``k`` with the dominant expert as a colour overlay, organ outlines in thin white."""
    _, sy, sx = views.labels.spacing
    dominant = dominant_expert_slice(prediction.gate_map, image, views.labels, views.k)
    covered = dominant >= 0
    overlay = np.zeros((*dominant.shape, 4))
    overlay[covered, :3] = np.array([_expert_color(e) for e in range(len(experts))])[dominant[covered]]
    overlay[covered, 3] = OVERLAY_ALPHA
    _show_slice(ax, views.axial, (sy, sx), views.window)
    ax.imshow(overlay, extent=_extent(dominant.shape, (sy, sx)), interpolation="nearest")
    _outline(ax, views.axial_labels, {lab.value: WHITE for lab in prediction.labels}, (sy, sx), 0.8)
    _orientation_letters(ax, "A", "P")
    ax.set_title(
        f"(c) Dominant expert on slice (a) ({gate_map_note(prediction.gate_summary or {})})", loc="left"
    )
    handles = [Patch(facecolor=_expert_color(e), label=name) for e, name in enumerate(experts)]
    ax.legend(
        handles=handles, loc="upper left", fontsize=9, framealpha=0.85, title="Expert", title_fontsize=9
    )


def _draw_gate_curves(ax: Axes, summary: dict, experts: list[str], position: float) -> None:
    """(d): each expert's mean weight per slice against slice position (mm, superior to the right)."""
    per_slice = sorted(summary.get("per_slice", []), key=lambda s: s["position_mm"])
    z = [s["position_mm"] for s in per_slice]
    for e, expert in enumerate(summary.get("experts", [])):
        weights = [s["mean_weights"].get(expert["name"], np.nan) for s in per_slice]
        ax.plot(z, weights, color=_expert_color(e), linewidth=2, label=experts[e])
    if len(z) > 1:
        margin = 0.5 * (z[-1] - z[0]) / (len(z) - 1)
        ax.set_xlim(z[0] - margin, z[-1] + margin)
    ax.set_ylim(0, 1.02)
    ax.axvline(position, color="black", linestyle="--", linewidth=1)
    right = position > np.mean(ax.get_xlim())  # label the marker on the side with room
    ax.annotate(
        "slice (a)",
        (position, 1.0),
        xytext=(-4 if right else 4, -3),
        textcoords="offset points",
        ha="right" if right else "left",
        va="top",
        fontsize=9,
    )
    ax.set_xlabel("slice position z (mm, LPS): inferior \u2190 \u2192 superior")
    ax.set_ylabel("mean gate weight")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9, framealpha=0.85)
    confidence = summary.get("overall", {}).get("routing_confidence")
    title = "(d) Expert weight per slice"
    if summary.get("gate_can_prefer_experts") is False and not summary.get("forced_expert"):
        title += f" ({summary.get('gate', 'channel')} gate: every expert weighs 1/E, no routing to show)"
    elif confidence is not None:
        title += f" (routing confidence {confidence:.2f}: 1 = one expert, 0 = uniform)"
    ax.set_title(title, loc="left")


def _empty_panel(ax: Axes, title: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("#f2f2f2")
    ax.text(
        0.5, 0.5, NO_GATES, transform=ax.transAxes, ha="center", va="center", fontsize=13, color="#555555"
    )
    ax.set_title(title, loc="left")


def _draw_organ_legend(ax: Axes, views: _Views, labels: list[Label]) -> None:
    """Colour, name and volume (mL) of every label of the task; labels not found say so."""
    ax.axis("off")
    if not labels:
        return
    ml_per_voxel = float(np.prod(views.labels.spacing)) / 1000.0
    counts = np.zeros(max(lab.value for lab in labels) + 1, np.int64)
    for (
        plane
    ) in views.labels.array:  # slice by slice: bincount of the whole volume would take 8 bytes a voxel
        values = np.rint(plane).astype(np.int64).ravel()
        counts += np.bincount(values, minlength=len(counts))[: len(counts)]
    handles = []
    for label in labels:
        volume = counts[label.value] * ml_per_voxel
        text = f"{label.name}  {volume:.1f} mL" if volume > 0 else f"{label.name}  (not found)"
        handles.append(Patch(facecolor=label.color, edgecolor=label.color, label=text))
    ax.legend(
        handles=handles,
        loc="upper left",
        ncol=1 if len(handles) <= 8 else 2,
        fontsize=10,
        frameon=False,
        title="Organs (outlines in (a), (b))",
        title_fontsize=11,
        alignment="left",
    )


def _write_header(figure: Figure, prediction: Prediction, title: str | None, window_note: str | None) -> None:
    """Title, the modality line, then warnings in red."""
    figure.text(
        0.025,
        0.975,
        title or f"M4oE segmentation \u2013 task {prediction.task}",
        fontsize=17,
        weight="bold",
        va="top",
    )
    m = prediction.modality
    source = {"user": "set by the user", "dicom": "from the DICOM tag", "intensity": "from intensities"}
    line = (
        f"Modality {m.modality.upper()} ({source.get(m.source, m.source)}, confidence {m.confidence:.2f}): "
    )
    lines = [
        (text, "black") for text in textwrap.wrap(line + m.evidence, 190, max_lines=2, placeholder=" ...")
    ]
    for note in (*prediction.warnings.values(), window_note):
        if note:
            wrapped = textwrap.wrap("\u26a0 " + note, 170, max_lines=2, placeholder=" ...")
            lines += [(text, WARNING_COLOR) for text in wrapped]
    for n, (text, color) in enumerate(lines):
        weight = "bold" if color == WARNING_COLOR else "normal"
        figure.text(0.025, 0.935 - 0.021 * n, text, fontsize=10.5, color=color, weight=weight, va="top")


def _write_footer(figure: Figure, stack: AxialStack, prediction: Prediction) -> None:
    """Input geometry, timings and engine version, one line at the bottom."""
    sz, sy, sx = stack.spacing
    Z, Y, X = stack.array.shape
    parts = [
        f"Input {X}\u00d7{Y}\u00d7{Z} voxels, {sx:.2f}\u00d7{sy:.2f}\u00d7{sz:.2f} mm, {stack.orientation}"
    ]
    if prediction.seconds:
        times = [
            f"{name} {float(s):.{1 if float(s) >= 1 else 2}f} s" for name, s in prediction.seconds.items()
        ]
        parts.append("time: " + ", ".join(times))
    parts.append(f"m4oe {__version__}")
    figure.text(0.025, 0.02, "   \u00b7   ".join(parts), fontsize=10, color="#333333")


def _expert_color(index: int) -> tuple[float, float, float]:
    return EXPERT_COLORS[index % len(EXPERT_COLORS)]
