"""How the gate routed a volume: gate maps and the gate summary.

The model returns, per MoE layer, expert weights (B, E, h, w) on that layer's token grid of the
model input. :class:`GateRecorder` receives them batch by batch and keeps only small sums, plus
the per-token map of one layer or of the mean over layers (upsampled to the finest token grid):
a (Z, h, w, E) array that :func:`gate_map_image` turns into a vector image whose geometry places
each token over the patient region it saw, so any viewer overlays it on the input.

A MoME model (:class:`~m4oe.model.mome.MoME`) routes per pixel *and per class query* at each
decoder scale: its "layers" are the routers ``router.0`` (deepest) .. ``router.{n-1}`` (finest),
each giving (B, Q, E, h_l, w_l). The recorder is then told the queries' label values: the maps,
per-layer and per-slice figures are the weights averaged over the queries (the chosen classes),
every scale is also kept as a map of its own (:attr:`GateRecorder.layer_maps`), per slice and per
segment the summary adds each scale's figures (``per_layer``), and a segment's weights are those
of *its own* query over its own pixels, not the average over every class.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import InputError
from .geometry import AxialStack
from .inplane import InPlaneGrid

CHANNEL_GATE_WARNING = (
    "this model's gate weighs every expert equally (channel gate, as in the released M4oE code): "
    "every expert weighs 1/{experts} on every token, so the gate map and the expert weights show "
    "no routing"
)


def _entropy(weights: torch.Tensor, dim: int) -> torch.Tensor:
    """Shannon entropy over ``dim`` normalised by log(E): 0 = one expert, 1 = uniform."""
    E = weights.shape[dim]
    p = weights.clamp_min(1e-12)
    return -(p * p.log()).sum(dim) / math.log(E)


class GateRecorder:
    """Accumulates gate statistics over the batches of one volume.

    Args:
        num_slices: Z of the axial stack.
        layer: name of the one layer to map, or None for the mean over all MoE layers.
        queries: a MoME model's class queries, the label values of the gates' Q axis in order;
            None for a model whose gates have no query axis.
    """

    def __init__(self, num_slices: int, layer: str | None = None, queries: list[int] | None = None):
        self.num_slices = num_slices
        self.layer = layer
        self.queries = None if queries is None else [int(v) for v in queries]
        # MoME only: every layer's own map, (Z, h_l, w_l, E) each; per slice (Z, L, E) weights and
        # (Z, L) entropy; each slice's per-query gates until its labels arrive; per segment and layer
        # the summed weights of the segment's own query.
        self.layer_maps: dict[str, np.ndarray] = {}
        self.slice_layer_weights: np.ndarray | None = None
        self.slice_layer_entropy: np.ndarray | None = None
        self._query_gates: dict[int, dict[str, torch.Tensor]] = {}
        self.segment_layer_sums: dict[int, dict[str, torch.Tensor]] = {}
        self.layers: list[str] = []
        self.map: np.ndarray | None = None  # (Z, h, w, E) float32
        self.slice_weights: np.ndarray | None = None  # (Z, E)
        self.slice_entropy = np.zeros(num_slices, np.float32)
        self.layer_sums: dict[str, torch.Tensor] = {}
        self.layer_entropy: dict[str, float] = {}
        self.tokens_per_layer: dict[str, int] = {}
        self.segment_sums: dict[int, torch.Tensor] = {}
        self.segment_pixels: dict[int, int] = {}

    def add(self, start: int, gates: dict[str, torch.Tensor]) -> None:
        """Record the gates of one batch.

        Args:
            start: stack index of the batch's first slice.
            gates: {layer: (B, E, h_l, w_l)} expert weights on the model grid; with ``queries``
                {layer: (B, Q, E, h_l, w_l)}, Q in the order of ``queries``.
        """
        if not gates:
            raise ValueError("the model returned no gates: it has no mixture-of-experts layer")
        if not self.layers:
            self.layers = list(gates)
            if self.layer is not None and self.layer not in gates:
                raise InputError(f"unknown gate layer {self.layer!r}; this model has {self.layers}")
        gates = {k: v.float() for k, v in gates.items()}
        if self.queries is not None:
            gates = self._add_queries(start, gates)
        B = next(iter(gates.values())).shape[0]
        for name, g in gates.items():
            self.layer_sums[name] = self.layer_sums.get(name, 0) + g.sum(dim=(0, 2, 3))
            self.layer_entropy[name] = self.layer_entropy.get(name, 0.0) + float(_entropy(g, 1).sum())
            self.tokens_per_layer[name] = self.tokens_per_layer.get(name, 0) + g[:, 0].numel()
        if self.layer is not None:
            mapped = gates[self.layer]
        else:
            finest = max(g.shape[-1] for g in gates.values())
            mapped = torch.stack(
                [F.interpolate(g, size=(finest, finest), mode="nearest") for g in gates.values()]
            )
            mapped = mapped.mean(dim=0)
        if self.map is None:
            E, h, w = mapped.shape[1:]
            self.map = np.zeros((self.num_slices, h, w, E), np.float32)
            self.slice_weights = np.zeros((self.num_slices, E), np.float32)
        self.map[start : start + B] = mapped.permute(0, 2, 3, 1).cpu().numpy()
        # Per slice: mean over layers of each layer's mean weights (every layer counts equally).
        per_layer = torch.stack([g.mean(dim=(2, 3)) for g in gates.values()])  # (L, B, E)
        self.slice_weights[start : start + B] = per_layer.mean(dim=0).cpu().numpy()
        self.slice_entropy[start : start + B] = (
            torch.stack([_entropy(g, 1).mean(dim=(1, 2)) for g in gates.values()]).mean(dim=0).cpu().numpy()
        )

    def _add_queries(self, start: int, gates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep a MoME batch's per-query gates {layer: (B, Q, E, h, w)} (each layer's map, per-slice
        figures, the gates per slice until :meth:`add_segments`); return their mean over Q."""
        shapes = {k: tuple(v.shape) for k, v in gates.items()}
        if any(len(shape) != 5 or shape[1] != len(self.queries) for shape in shapes.values()):
            raise ValueError(f"expected gates (B, {len(self.queries)}, E, h, w) per layer, got {shapes}")
        mean = {k: v.mean(dim=1) for k, v in gates.items()}
        B, E = next(iter(mean.values())).shape[:2]
        if self.slice_layer_weights is None:
            self.slice_layer_weights = np.zeros((self.num_slices, len(gates), E), np.float32)
            self.slice_layer_entropy = np.zeros((self.num_slices, len(gates)), np.float32)
        for n, (name, g) in enumerate(mean.items()):
            if name not in self.layer_maps:
                self.layer_maps[name] = np.zeros((self.num_slices, *g.shape[2:], E), np.float32)
            self.layer_maps[name][start : start + B] = g.permute(0, 2, 3, 1).cpu().numpy()
            self.slice_layer_weights[start : start + B, n] = g.mean(dim=(2, 3)).cpu().numpy()
            self.slice_layer_entropy[start : start + B, n] = _entropy(g, 1).mean(dim=(1, 2)).cpu().numpy()
        for b in range(B):
            self._query_gates[start + b] = {k: v[b].cpu() for k, v in gates.items()}
        return mean

    def _add_query_segments(self, start: int, labels: torch.Tensor) -> None:
        """Per segment and layer: the weights of the segment's own query summed over its pixels
        (each layer's gates upsampled, nearest, to the S x S model grid of ``labels`` (B, S, S))."""
        size = labels.shape[-1]
        for b in range(labels.shape[0]):
            gates = self._query_gates.pop(start + b, None)
            if gates is None:
                raise ValueError(f"no per-query gates recorded for slice {start + b}")
            present = [v for v in labels[b].unique().tolist() if v != 0]
            for name, g in gates.items():
                full = F.interpolate(g, size=(size, size), mode="nearest")  # (Q, E, S, S)
                for value in present:
                    if value not in self.queries:
                        raise ValueError(f"label {value} is not one of the queries {self.queries}")
                    w = full[self.queries.index(value)][:, labels[b] == value].sum(dim=1)
                    sums = self.segment_layer_sums.setdefault(value, {})
                    sums[name] = sums.get(name, 0) + w

    def add_segments(self, start: int, labels: torch.Tensor) -> None:
        """Record which segment each model-grid pixel of slices start.. was given (per-segment means).

        Called with the labels as written, so after any through-plane smoothing: the slices of
        ``start`` onward must already have their gates (:meth:`add`).

        Args:
            start: stack index of the first slice.
            labels: (B, S, S) labels on the model grid (S x S, the model input's pixels).
        """
        B, size = labels.shape[0], labels.shape[-1]
        if self.map is None or start + B > self.num_slices:
            raise ValueError(f"no gates recorded for slices {start}..{start + B - 1}")
        mapped = torch.from_numpy(self.map[start : start + B]).permute(0, 3, 1, 2)  # (B, E, h, w)
        full = F.interpolate(mapped, size=(size, size), mode="nearest").permute(0, 2, 3, 1)  # (B, S, S, E)
        labels = labels.cpu()
        if self.queries is not None:
            self._add_query_segments(start, labels)
        for value in labels.unique().tolist():
            if value == 0:
                continue
            mask = labels == value
            self.segment_sums[value] = self.segment_sums.get(value, 0) + full[mask].sum(dim=0)
            self.segment_pixels[value] = self.segment_pixels.get(value, 0) + int(mask.sum())

    def summary(
        self,
        experts: list[dict],
        expected: list[int],
        segment_names: dict[int, str],
        slice_positions_mm: list[float],
        gate: str = "softmax",
        forced: bool = False,
    ) -> dict:
        """The gate summary (JSON-ready).

        Args:
            experts: [{"name": ..., "modality": ...}] in expert order.
            expected: indices of the experts of the input's modality.
            segment_names: label value -> segment name.
            slice_positions_mm: per stack slice, its superior (LPS z) coordinate in mm.
            gate: the model's gate (``ModelConfig.gate``). The "channel" gate cannot prefer an
                expert: ``gate_can_prefer_experts`` is then False and, unless the routing was
                ``forced`` to one expert, the warning says so instead of comparing the dominant
                expert with the modality (with equal weights the "dominant" one is only the first).
            forced: the routing was forced to one expert (the gate did not run).

        With ``queries`` (MoME) the summary also has ``router``: ``{"kind": "text-conditioned
        router per class query", "queries": [the chosen classes' names, whose mean the maps show],
        "layer_kind": "decoder scale", "scales": {layer: {"token_grid": [h, w]}}}`` (layers deepest
        first); each ``per_slice`` entry has ``per_layer`` {layer: {mean_weights, dominant_expert,
        entropy}} (weights averaged over the queries); each ``per_segment`` entry has ``per_layer``
        with its own query's mean weights over its pixels at that scale, and its top-level
        weights are their mean over the scales (or the mapped layer's).
        """
        names = [e["name"] for e in experts]

        def describe(weights, entropy) -> dict:
            w = [round(float(v), 6) for v in weights]
            return {
                "mean_weights": dict(zip(names, w, strict=True)),
                "dominant_expert": names[int(np.argmax(w))],
                "entropy": round(float(entropy), 6),
            }

        per_layer = {}
        for name in self.layers:
            n = self.tokens_per_layer[name]
            per_layer[name] = describe((self.layer_sums[name] / n).tolist(), self.layer_entropy[name] / n)
        overall_w = np.mean(
            [(self.layer_sums[k] / self.tokens_per_layer[k]).cpu().numpy() for k in self.layers], 0
        )
        overall_h = float(np.mean([self.layer_entropy[k] / self.tokens_per_layer[k] for k in self.layers]))
        overall = describe(overall_w, overall_h)
        overall["routing_confidence"] = round(1.0 - overall_h, 6)
        per_slice = []
        for k in range(self.num_slices):
            entry = {"index": k, "position_mm": round(float(slice_positions_mm[k]), 4)}
            entry.update(describe(self.slice_weights[k], self.slice_entropy[k]))
            if self.slice_layer_weights is not None:
                entry["per_layer"] = {
                    name: describe(self.slice_layer_weights[k, n], self.slice_layer_entropy[k, n])
                    for n, name in enumerate(self.layers)
                }
            per_slice.append(entry)

        def describe_weights(w) -> dict:
            return describe(w, float(_entropy(torch.as_tensor(w)[None], 1)[0]))

        per_segment = {}
        for value in sorted(self.segment_sums):
            pixels = self.segment_pixels[value]
            entry = {"label": value, "model_grid_pixels": pixels}
            if self.queries is None:
                entry.update(describe_weights((self.segment_sums[value] / pixels).cpu().numpy()))
            else:
                own = {k: (v / pixels).cpu().numpy() for k, v in self.segment_layer_sums[value].items()}
                mapped = own[self.layer] if self.layer is not None else np.mean(list(own.values()), axis=0)
                entry.update(describe_weights(mapped))
                entry["per_layer"] = {name: describe_weights(own[name]) for name in self.layers}
            per_segment[segment_names.get(value, f"label_{value}")] = entry
        dominant = int(np.argmax(overall_w))
        warning = None
        can_prefer = gate != "channel"
        if not can_prefer:
            if not forced:
                warning = CHANNEL_GATE_WARNING.format(experts=len(names))
        elif expected and dominant not in expected:
            wanted = ", ".join(names[i] for i in expected)
            warning = (
                f"routing disagrees with the input modality: the gate sent most weight to expert "
                f"'{names[dominant]}' ({overall_w[dominant]:.2f}), not to {wanted} "
                f"({sum(overall_w[i] for i in expected):.2f}); check the modality or the image"
            )
        router = {}
        if self.queries is not None:
            router["router"] = {
                "kind": "text-conditioned router per class query",
                "queries": [segment_names.get(v, f"label_{v}") for v in self.queries],
                "layer_kind": "decoder scale",
                "scales": {k: {"token_grid": list(self.layer_maps[k].shape[1:3])} for k in self.layers},
            }
        return {
            "experts": experts,
            "gate": gate,
            "gate_can_prefer_experts": can_prefer,
            "expected_experts": [names[i] for i in expected],
            "layers": self.layers,
            "mapped_layer": self.layer or "mean",
            **router,
            "overall": overall,
            "per_layer": per_layer,
            "per_slice": per_slice,
            "per_segment": per_segment,
            "warning": warning,
        }


def oriented_frame(stack: AxialStack) -> tuple[np.ndarray, np.ndarray]:
    """Origin (3,) and direction (3x3, columns = stack axes x, y, z) of the stack's LPS frame, in mm."""
    ref = stack.reference
    size = ref.GetSize()
    direction = np.array(ref.GetDirection()).reshape(3, 3)
    corner = [0, 0, 0]
    columns = []
    for n in range(3):
        axis = stack.permute_order[n]
        sign = -1.0 if stack.flip_axes[n] else 1.0
        if stack.flip_axes[n]:
            corner[axis] = size[axis] - 1
        columns.append(direction[:, axis] * sign)
    origin = np.array(ref.TransformIndexToPhysicalPoint(corner))
    return origin, np.stack(columns, axis=1)


def gate_map_image(
    array: np.ndarray, stack: AxialStack, grid: InPlaneGrid, first_slice: int = 0
) -> sitk.Image:
    """Vector image of per-token expert weights, placed over the patient.

    Args:
        array: (Z, h, w, E) float32 expert weights per token; h = w = S / factor.
        stack: the axial stack the tokens were computed from.
        grid: the in-plane mapping used for the model input.
        first_slice: the stack slice of ``array[0]`` (a run over part of the stack).
    Returns:
        An E-component image (x = columns, y = rows, z = slices of the stack, LPS frame): spacing
        is the token size in mm, origin the centre of token (0, 0) of slice 0.
    """
    h = array.shape[1]
    factor = grid.size // h
    origin, direction = oriented_frame(stack)
    sz, sy, sx = stack.spacing
    row0, col0 = grid.token_index_origin(factor)
    my, mx = grid.model_spacing
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32), isVector=True)
    image.SetSpacing((mx * factor, my * factor, sz))
    image.SetDirection(direction.flatten().tolist())
    image.SetOrigin((origin + direction @ np.array([col0 * sx, row0 * sy, first_slice * sz])).tolist())
    return image


def slice_positions(stack: AxialStack) -> list[float]:
    """Superior coordinate (LPS z, mm) of the first voxel of each stack slice."""
    origin, direction = oriented_frame(stack)
    sz = stack.spacing[0]
    return [float(origin[2] + direction[2, 2] * sz * k) for k in range(stack.array.shape[0])]
