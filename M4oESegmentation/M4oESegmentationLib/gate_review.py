"""How the gate routed a volume, shown in Slicer: a per-segment table, a per-slice chart, a map.

All functions read the engine's gate summary, the dict of ``gate_summary.json`` written by
``m4oe segment --gates DIR`` (see :meth:`m4oe.gates.GateRecorder.summary`): ``experts``
[{name, modality}] in expert order, ``overall`` {mean_weights, dominant_expert, entropy,
routing_confidence}, ``per_slice`` [{index, position_mm, mean_weights {expert: w},
dominant_expert, entropy}], ``per_segment`` {segment name: {label, mean_weights, dominant_expert,
entropy}}, ``warning`` (every warning of the run in one line), ``warnings`` {kind: message}
("routing": the gate's, "scan": the scan check's), ``scan_check``, ``forced_expert``,
``input_modality``, ``dominant_expert_values`` {expert: value in the dominant-expert map},
``gate`` (the model's gate) and ``gate_can_prefer_experts`` (false for the channel gate, whose
weights are 1/E everywhere: its views show no routing).

A MoME model's summary also has ``router`` (its ``queries``, the chosen classes, and its
``scales``, the decoder scales ``router.0`` (deepest) .. as layers), ``per_layer`` in each
``per_slice`` and ``per_segment`` entry (a segment's weights are those of its own class query) and
``scale_gate_maps`` {layer: file}: the views then show one scale at a time
(:func:`layer_choices`; "" is the mean over the scales).

Weights are mean gate weights in [0, 1] (they sum to 1 over experts); entropy is normalised by
log(E): 0 = one expert takes everything, 1 = all experts equal. Slice positions are in mm along
the patient's superior axis: LPS z, which is also RAS S, so Slicer's axial slice offset compares
to them directly.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from .volumes import sitk_to_volume_node

EXPERT_COLORS = (
    (0.90, 0.49, 0.13),
    (0.12, 0.47, 0.71),
    (0.17, 0.63, 0.17),
    (0.58, 0.40, 0.74),
    (0.84, 0.15, 0.16),
    (0.55, 0.34, 0.29),
    (0.89, 0.47, 0.76),
    (0.50, 0.50, 0.50),
)
"""Colour (RGB 0..1) of expert n, cycled: the same in the chart, the table legend and the map."""

MARKER_COLOR = (0.15, 0.15, 0.15)
LOW_ROUTING_CONFIDENCE = 0.1
"""Below this routing confidence (1 - normalised entropy) the gate spreads its weight almost evenly,
so the gate views say little about which expert segmented what."""

ROLE_ATTRIBUTE = "M4oESegmentation.role"
MARKER_ROLE = "slice marker"
POSITION_COLUMN = "position (mm)"
MARKER_COLUMN = "current slice"
LAYER_ATTRIBUTE = "M4oESegmentation.gateLayer"
"""Attribute of a chart made by :func:`expert_plot`: the layer its table and chart show ("" mean)."""


def expert_names(summary: dict) -> list[str]:
    """Expert names in expert order (the order of the gate map's components)."""
    experts = summary.get("experts")
    if not experts:
        raise ValueError("the gate summary lists no experts")
    return [str(expert["name"]) for expert in experts]


def expert_legend(summary: dict) -> list[str]:
    """Legend text per expert, in expert order: ``"name (MODALITY)"``, e.g. ``"mr-t2 (MR)"``."""
    return [f"{e['name']} ({str(e.get('modality', '?')).upper()})" for e in summary["experts"]]


def expert_color(index: int) -> tuple[float, float, float]:
    """Colour of expert ``index`` (0-based)."""
    return EXPERT_COLORS[index % len(EXPERT_COLORS)]


def layer_choices(summary: dict) -> list[tuple[str, str]]:
    """(layer, item text) of the layers the views can show one at a time; empty when they show only
    the summary's mean (a model without a router per decoder scale, or a summary without them).

    For a MoME summary: ``("", "mean over the 3 decoder scales")`` then, deepest first,
    ``("router.0", "decoder scale 1 of 3 (deepest, 4x4 tokens)")``, ...
    """
    router = summary.get("router") or {}
    scales = router.get("scales") or {}
    if not scales:
        return []
    count = len(scales)
    choices = [("", f"mean over the {count} decoder scales")]
    for n, (layer, info) in enumerate(scales.items()):
        grid = "x".join(str(v) for v in info.get("token_grid", []))
        where = "deepest" if n == 0 else "finest" if n == count - 1 else "middle"
        choices.append((layer, f"decoder scale {n + 1} of {count} ({where}, {grid} tokens)"))
    return choices


def layer_weights(entry: dict, layer: str = "") -> dict:
    """The {mean_weights, dominant_expert, entropy} of a ``per_slice`` or ``per_segment`` entry at
    ``layer`` ("" : the entry's own figures, the mean over layers). Raises ValueError for a layer
    the entry does not list."""
    if not layer:
        return entry
    per_layer = entry.get("per_layer") or {}
    if layer not in per_layer:
        raise ValueError(f"the gate summary has no layer {layer!r}; it has {sorted(per_layer)}")
    return per_layer[layer]


def _scene(scene):
    if scene is None:
        scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise ValueError("no MRML scene: pass scene=... or set slicer.mrmlScene")
    return scene


def _fill_table(table_node, columns: list[tuple[str, list]]) -> None:
    """Replace a table node's content with ``columns`` [(name, values)]: str -> string, else double."""
    table = table_node.GetTable()
    table.Initialize()
    for name, values in columns:
        is_text = any(isinstance(v, str) for v in values)
        array = vtk.vtkStringArray() if is_text else vtk.vtkDoubleArray()
        array.SetName(name)
        array.SetNumberOfValues(len(values))
        for row, value in enumerate(values):
            array.SetValue(row, str(value) if is_text else float(value))
        table.AddColumn(array)
    table.Modified()
    table_node.Modified()


def expert_table(summary: dict, *, scene=None, node=None, layer: str = ""):
    """Per-segment routing as a table node: which expert each predicted organ was routed to.

    Rows: the segments of ``per_segment`` (organs present in the prediction), by label value.
    Columns: ``segment`` (name), ``dominant expert``, one column per expert named by the expert
    (mean gate weight over the segment's pixels on the model grid, 0..1), ``entropy`` (0..1).
    ``layer``: the figures of this layer (a MoME decoder scale, see :func:`layer_choices`);
    "" the mean. Updates ``node`` when given, else adds a ``vtkMRMLTableNode`` to ``scene``
    (default ``slicer.mrmlScene``). The table is locked: it is derived data, not for editing.
    """
    names = expert_names(summary)
    clash = {"segment", "dominant expert", "entropy"} & set(names)
    if clash:
        raise ValueError(f"expert names {sorted(clash)} clash with the table's other column names")
    segments = sorted(summary.get("per_segment", {}).items(), key=lambda item: item[1].get("label", 0))
    segments = [(name, layer_weights(entry, layer)) for name, entry in segments]
    if node is None:
        node = _scene(scene).AddNewNodeByClass("vtkMRMLTableNode", "M4oE expert per segment")
    columns: list[tuple[str, list]] = [
        ("segment", [name for name, _ in segments]),
        ("dominant expert", [entry["dominant_expert"] for _, entry in segments]),
    ]
    columns += [(expert, [entry["mean_weights"][expert] for _, entry in segments]) for expert in names]
    columns.append(("entropy", [entry["entropy"] for _, entry in segments]))
    _fill_table(node, columns)
    legend = expert_legend(summary)
    titles = {"segment": "segment", "dominant expert": "dominant expert", "entropy": "entropy"}
    titles.update({expert: legend[n] for n, expert in enumerate(names)})
    descriptions = {
        expert: f"mean gate weight of expert {legend[n]} (0..1)" for n, expert in enumerate(names)
    }
    descriptions["entropy"] = "gate entropy (0: one expert takes all, 1: all experts equal)"
    _set_column_headers(node, titles, descriptions)
    node.SetLocked(True)
    return node


def _set_column_headers(table_node, titles: dict[str, str], descriptions: dict[str, str]) -> None:
    """Show ``titles`` as column headers (Slicer >= 5.7 has column titles; before, long names)."""
    if hasattr(table_node, "SetColumnTitle"):
        for column, title in titles.items():
            table_node.SetColumnTitle(column, title)
        table_node.SetUseColumnTitleAsColumnHeader(True)
    else:
        for column, title in titles.items():
            table_node.SetColumnLongName(column, title)
        table_node.SetUseColumnNameAsColumnHeader(True)
    for column, description in descriptions.items():
        table_node.SetColumnDescription(column, description)


def _slice_positions(summary: dict) -> np.ndarray:
    per_slice = summary.get("per_slice") or []
    if not per_slice:
        raise ValueError("the gate summary has no slices")
    return np.array([float(entry["position_mm"]) for entry in per_slice])


def nearest_slice(summary: dict, position_mm: float) -> int:
    """Index (``per_slice[n]["index"]``, the stack slice) of the slice nearest ``position_mm``.

    ``position_mm``: superior coordinate in mm (LPS z = RAS S), e.g. an axial slice offset.
    Ties go to the first slice listed. Raises ValueError for a NaN position or no slices.
    """
    if not math.isfinite(position_mm):
        raise ValueError(f"slice position must be a finite number of mm, got {position_mm!r}")
    row = int(np.argmin(np.abs(_slice_positions(summary) - position_mm)))
    return int(summary["per_slice"][row]["index"])


def expert_plot(summary: dict, *, scene=None, layer: str = ""):
    """A chart of the mean gate weight of each expert per slice, with a current-slice marker.

    ``layer``: the weights of this layer (a MoME decoder scale, see :func:`layer_choices`); ""
    the mean. Switch it later with :func:`show_layer`.

    Adds to ``scene`` (default ``slicer.mrmlScene``): a table node (``position (mm)`` then one
    column per expert), one scatter-line series per expert (weight 0..1 against the slice's
    superior position in mm), a two-row marker table and its series (a vertical line from weight 0
    to 1 at the current slice, tagged with attribute ``M4oESegmentation.role = "slice marker"``),
    and the ``vtkMRMLPlotChartNode`` that shows them. The marker starts on the first slice; move it
    with :func:`update_slice_marker`.
    """
    scene = _scene(scene)
    names = expert_names(summary)
    legend = expert_legend(summary)
    positions = _slice_positions(summary).tolist()
    data = scene.AddNewNodeByClass("vtkMRMLTableNode", "M4oE expert weight per slice")
    _fill_slice_weights(data, summary, layer)
    data.SetLocked(True)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "M4oE expert weight per slice")
    _set_chart_layer(chart, summary, layer)
    chart.SetXAxisTitle("slice position S (mm)")
    chart.SetYAxisTitle("mean gate weight")
    chart.SetYAxisRangeAuto(False)
    chart.SetYAxisRange(0.0, 1.0)
    chart.SetLegendVisibility(True)
    for index, expert in enumerate(names):
        series = _add_series(scene, legend[index], data, expert, expert_color(index))
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    marker_table = scene.AddNewNodeByClass("vtkMRMLTableNode", "M4oE current slice")
    _fill_table(marker_table, [(POSITION_COLUMN, [positions[0]] * 2), (MARKER_COLUMN, [0.0, 1.0])])
    marker_table.SetLocked(True)
    marker = _add_series(scene, "current slice", marker_table, MARKER_COLUMN, MARKER_COLOR)
    marker.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash)
    marker.SetAttribute(ROLE_ATTRIBUTE, MARKER_ROLE)
    chart.AddAndObservePlotSeriesNodeID(marker.GetID())
    return chart


def _fill_slice_weights(data, summary: dict, layer: str) -> None:
    """Fill a chart's data table: ``position (mm)`` then one column per expert (weights at ``layer``)."""
    per_slice = [layer_weights(entry, layer) for entry in summary["per_slice"]]
    columns = [(POSITION_COLUMN, _slice_positions(summary).tolist())]
    columns += [(e, [s["mean_weights"][e] for s in per_slice]) for e in expert_names(summary)]
    _fill_table(data, columns)


def _set_chart_layer(chart, summary: dict, layer: str) -> None:
    text = dict(layer_choices(summary)).get(layer, "") if layer else ""
    chart.SetTitle(f"Gate weight per slice, {text}" if text else "Gate weight per slice")
    chart.SetAttribute(LAYER_ATTRIBUTE, layer)


def shown_layer(chart_node) -> str:
    """The layer a chart made by :func:`expert_plot` shows ("": the mean)."""
    return chart_node.GetAttribute(LAYER_ATTRIBUTE) or ""


def show_layer(summary: dict, chart_node, table_node, layer: str) -> None:
    """Show ``layer`` (see :func:`layer_choices`; "" the mean) in a chart made by :func:`expert_plot`
    and a table made by :func:`expert_table`, in place: the chart keeps its series and marker.

    Raises ValueError for a layer the summary does not list (nothing is changed then).
    """
    if layer and layer not in dict(layer_choices(summary)):
        known = [k for k, _ in layer_choices(summary) if k]
        raise ValueError(f"the gate summary has no layer {layer!r} to show; it has {known}")
    data = next(
        (
            chart_node.GetNthPlotSeriesNode(n).GetTableNode()
            for n in range(chart_node.GetNumberOfPlotSeriesNodes())
            if chart_node.GetNthPlotSeriesNode(n).GetAttribute(ROLE_ATTRIBUTE) != MARKER_ROLE
        ),
        None,
    )
    if data is None:
        raise ValueError(f"{chart_node.GetName()}: not a chart made by expert_plot (no expert series)")
    _fill_slice_weights(data, summary, layer)
    _set_chart_layer(chart_node, summary, layer)
    expert_table(summary, node=table_node, layer=layer)


def _add_series(scene, name: str, table_node, y_column: str, color):
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
    series.SetAndObserveTableNodeID(table_node.GetID())
    series.SetXColumnName(POSITION_COLUMN)
    series.SetYColumnName(y_column)
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    series.SetLineWidth(2)
    series.SetColor(*color)
    return series


def marker_series(chart_node):
    """The current-slice marker series of a chart made by :func:`expert_plot`, or None."""
    for n in range(chart_node.GetNumberOfPlotSeriesNodes()):
        series = chart_node.GetNthPlotSeriesNode(n)
        if series is not None and series.GetAttribute(ROLE_ATTRIBUTE) == MARKER_ROLE:
            return series
    return None


def update_slice_marker(chart_node, summary: dict, position_mm: float) -> int:
    """Move the chart's marker to the slice nearest ``position_mm`` (mm, superior); return its index.

    The returned index is the stack slice index (``per_slice[n]["index"]``); the marker is drawn
    at that slice's listed position, so it sits exactly on the chart's data points.
    """
    series = marker_series(chart_node)
    if series is None or series.GetTableNode() is None:
        raise ValueError(f"{chart_node.GetName()}: not a chart made by expert_plot (no slice marker)")
    index = nearest_slice(summary, position_mm)
    position = next(float(s["position_mm"]) for s in summary["per_slice"] if int(s["index"]) == index)
    table_node = series.GetTableNode()
    column = table_node.GetTable().GetColumnByName(POSITION_COLUMN)
    for row in range(column.GetNumberOfTuples()):
        column.SetValue(row, position)
    column.Modified()
    table_node.GetTable().Modified()
    table_node.Modified()
    return index


def gate_overlay(gate_map: sitk.Image, summary: dict, *, scene=None, colors=None, name: str = ""):
    """The expert with the largest gate weight at each token, as a label volume with a legend.

    Args:
        gate_map: the engine's ``gate_map.nrrd``: an E-component float image (x, y, z) of gate
            weights per token, geometry in LPS (token size in mm, placed over the patient).
        summary: the gate summary of the same run (expert order = component order).
    Returns:
        (label map volume node, colour table node). Voxel value n + 1 = expert n
        (``summary["dominant_expert_values"]``), 0 is unused. Colour table entry n + 1 is named
        ``"expert (MODALITY)"`` (the legend) and coloured :func:`expert_color`; entry 0 is
        transparent. The volume's display uses the table. Both nodes go to ``scene``
        (default ``slicer.mrmlScene``); the volume is in the gate map's frame (place it under the
        input volume's transform with :func:`~M4oESegmentationLib.volumes.place_in_study`).
        ``colors``: a colour table made by an earlier call to use instead of a new one (a MoME
        model's scale maps share one legend). ``name``: the volume's name ("" the default).

    Raises ValueError when the map's component count is not the number of experts.
    """
    scene = _scene(scene)
    names = expert_names(summary)
    legend = expert_legend(summary)
    components = gate_map.GetNumberOfComponentsPerPixel()
    if gate_map.GetDimension() != 3 or components != len(names):
        raise ValueError(
            f"the gate map has {components} components ({gate_map.GetDimension()}D); "
            f"expected a 3D map with one component per expert {names}"
        )
    values = summary.get("dominant_expert_values") or {name: n + 1 for n, name in enumerate(names)}
    if [values.get(name) for name in names] != list(range(1, len(names) + 1)):
        raise ValueError(f"dominant_expert_values {values} do not number the experts {names} from 1")
    weights = sitk.GetArrayViewFromImage(gate_map)  # (z, y, x, E)
    dominant = sitk.GetImageFromArray((np.argmax(weights, axis=-1) + 1).astype(np.uint8))
    dominant.CopyInformation(gate_map)
    if colors is None:
        colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "M4oE experts")
        colors.SetTypeToUser()
        colors.SetNumberOfColors(len(names) + 1)
        colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
        for n, text in enumerate(legend):
            colors.SetColor(n + 1, text, *expert_color(n), 1.0)
    volume = sitk_to_volume_node(dominant, name or "M4oE dominant expert", scene=scene, labelmap=True)
    volume.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    return volume, colors


def routing_warning(summary: dict) -> str | None:
    """What the user should know about the routing, or None.

    The engine's warning when the gate sent most weight to an expert of another modality than the
    input's; and a note when the routing confidence (``overall.routing_confidence``, 1 - mean
    normalised entropy) is below :data:`LOW_ROUTING_CONFIDENCE`. Neither applies to forced routing.
    A model whose gate cannot prefer an expert (``gate_can_prefer_experts`` false: the released
    code's channel gate) gets the engine's plain statement of that instead, and no confidence note.
    """
    if summary.get("forced_expert"):
        return None
    messages = []
    # The gate's own warning; a summary written before "warnings" existed has it as "warning".
    routing = summary["warnings"].get("routing") if "warnings" in summary else summary.get("warning")
    if summary.get("gate_can_prefer_experts") is False:
        return (
            str(routing)
            if routing
            else (
                f"this model's gate weighs every expert equally ({summary.get('gate', 'channel')} gate): "
                "the gate map shows no routing"
            )
        )
    if routing:
        messages.append(str(routing))
    confidence = summary.get("overall", {}).get("routing_confidence")
    if confidence is not None and float(confidence) < LOW_ROUTING_CONFIDENCE:
        messages.append(
            f"routing confidence is very low ({float(confidence):.2f}): the gate spreads its weight "
            "almost evenly over the experts, so the gate views say little about which expert "
            "segmented what"
        )
    return "; ".join(messages) or None


def remove_gate_nodes(chart_node) -> None:
    """Remove a chart made by :func:`expert_plot` with its series and tables from its scene."""
    scene = chart_node.GetScene()
    if scene is None:
        return
    nodes = {chart_node.GetID(): chart_node}
    for n in range(chart_node.GetNumberOfPlotSeriesNodes()):
        series = chart_node.GetNthPlotSeriesNode(n)
        for node in (series, series.GetTableNode() if series is not None else None):
            if node is not None:
                nodes[node.GetID()] = node
    for node in nodes.values():
        scene.RemoveNode(node)


def legend_html(summary: dict | None) -> str:
    """The gate map's legend as rich text: a coloured square and ``"expert (MODALITY)"`` each."""
    if summary is None:
        return ""
    swatches = []
    for n, text in enumerate(expert_legend(summary)):
        r, g, b = (round(255 * c) for c in expert_color(n))
        swatches.append(f'<span style="color: rgb({r},{g},{b});">&#9632;</span>&nbsp;{text}')
    return "&nbsp;&nbsp;".join(swatches)


def slice_weights_text(summary: dict, index: int, layer: str = "") -> str:
    """The line under the chart for stack slice ``index``: its position and each expert's weight.

    E.g. ``"Slice 12 (S 35.0 mm): ct 0.71, mr 0.20, mr-t2 0.09"``; ``layer``: at that layer (a MoME
    decoder scale), "" the mean. Raises ValueError for a slice or layer the summary does not list.
    """
    entry = next((s for s in summary.get("per_slice", []) if int(s["index"]) == index), None)
    if entry is None:
        raise ValueError(f"the gate summary lists no slice {index}")
    shown = layer_weights(entry, layer)
    weights = ", ".join(f"{name} {float(w):.2f}" for name, w in shown["mean_weights"].items())
    return f"Slice {index} (S {float(entry['position_mm']):.1f} mm): {weights}"
