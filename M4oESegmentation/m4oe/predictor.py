"""Volume inference: load a model once, segment many volumes slice by slice.

A volume goes: axial stack (no resampling) -> intensity normalisation for its modality ->
batches of slices resampled in plane to the model input -> forward passes (optionally several,
on the slices shifted or zoomed in plane, their probabilities averaged) -> optional through-plane smoothing
of the probabilities (see :mod:`m4oe.smoothing`) -> logits or probabilities resampled back to each
slice -> argmax -> optional largest-component clean-up -> the input's exact grid; then a check that
the labels look like an abdomen (:mod:`m4oe.ood`). Only one batch
of full-resolution logits exists at a time (plus, when smoothing, the few model-grid slices the
Gaussian still needs), so memory does not grow with classes x voxels.

The test-time passes live in :mod:`m4oe.tta`, the argmax and the clean-up in
:mod:`m4oe.postprocess`; their names are importable from here too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import onnx_runtime
from .card_summary import real_accuracy_warning
from .checkpoint import load_checkpoint
from .cpu import CPU_BATCH, MALLOC_TRIM, default_threads
from .errors import CancelledError, InputError, ModelError
from .gates import GateRecorder, gate_map_image, slice_positions
from .geometry import from_axial_stack, to_axial_stack
from .hub import resolve_model
from .inplane import from_model_grid, model_window
from .labels import Label
from .modality import ModalityResult, detect_modality
from .model import SwinUNet
from .model_card import MAX_TEST_TIME_PASSES, ModelCard, valid_passes, valid_sigma_mm
from .ood import ScanCheck, check_scan
from .postprocess import class_argmax, labels_to_host
from .postprocess import keep_largest_components as keep_largest_components
from .postprocess import keep_largest_components_on_gpu as keep_largest_components_on_gpu
from .prepare import SlicePlan
from .preprocessing import IntensityParams
from .progress import CancelCheck, ProgressCallback, ProgressEvent
from .region import VoxelBox, body_box, box_from_stack_slices, stack_slices
from .smoothing import TRUNCATE, SliceSmoother
from .terminology import organ_keys, select_labels
from .tta import TEST_TIME_PASSES as TEST_TIME_PASSES
from .tta import averaged_probabilities
from .tta import shift_slices as shift_slices
from .tta import zoom_slices as zoom_slices

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROBABILITY_DTYPES = ("uint8", "float16")
MIN_UPSAMPLING = 8  # refuse slices that must be enlarged more than this to fill the model input


@dataclass
class Prediction:
    """The result of one volume.

    ``labelmap``: uint8 (or uint16) label image on the input's exact grid (size, spacing, origin,
    direction). ``probabilities``: K-component vector image on the same grid (uint8 0-255 or
    float32 from float16), only when asked. ``gate_map``: E-component image of expert weights per
    token (see :func:`m4oe.gates.gate_map_image`), and ``gate_summary`` (JSON-ready dict), for
    mixture-of-experts models when asked. ``scale_gate_maps``: a MoME model's router weights at
    each decoder scale {"router.0" (deepest) ..: E-component image on that scale's token grid},
    averaged over the chosen classes (``gate_map`` is their mean, or the ``gate_layer`` one).
    ``through_plane_sigma_mm``: the smoothing applied (0: none). ``test_time_passes``: forward
    passes averaged per slice (1: one). ``largest_component``:
    the label values cut down to their largest 26-connected piece (empty: no clean-up).
    ``scan_check``: whether the labels look like an abdomen (see :mod:`m4oe.ood`; None when the
    task has none of the organs it checks). ``warnings``: what the user should know, by kind:
    ``"routing"`` (the gate disagreed with the modality, only with gates recorded), ``"scan"``
    (the scan check failed) and ``"accuracy"`` (structures segmented that scored low, or were not
    measured, on the real scans of this modality the card reports; see
    :func:`m4oe.card_summary.real_accuracy_warning`); :attr:`warning` joins them.
    ``labels``: the task's classes the label map holds (those chosen with ``structures``).
    ``region``: the voxels segmented (the whole image unless a region or the body crop narrowed
    it); outside it the label map is 0, the probabilities say background, and the gate map and
    summary cover the slices of the run.
    """

    labelmap: sitk.Image
    labels: list[Label]
    task: str
    modality: ModalityResult
    probabilities: sitk.Image | None = None
    gate_map: sitk.Image | None = None
    gate_summary: dict | None = None
    scale_gate_maps: dict[str, sitk.Image] | None = None
    seconds: dict = field(default_factory=dict)
    backend: str = "torch"
    through_plane_sigma_mm: float = 0.0
    test_time_passes: int = 1
    largest_component: list[int] = field(default_factory=list)
    scan_check: ScanCheck | None = None
    region: VoxelBox | None = None
    warnings: dict[str, str] = field(default_factory=dict)

    @property
    def warning(self) -> str | None:
        """Every warning in one line (routing first), or None."""
        return "; ".join(self.warnings.values()) or None


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES and not device.startswith("cuda:"):
        raise InputError(f"device {device!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU")
    return torch.device(device)


class Predictor:
    """A loaded model ready to segment volumes.

    Args:
        model: the network (moved to ``device`` and set to eval mode here).
        card: its model card (labels, experts, preprocessing).
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        dtype: "float32" or "bfloat16" (autocast of the forward pass; slower than float32 on CPUs
            without bfloat16 instructions, e.g. 7x on an AVX2 EPYC).
        threads: CPU threads for PyTorch (set for the whole process); None takes
            :func:`default_threads` (one per core that no other process keeps busy).
        batch_size: slices per forward pass; None takes the model card's ``slice_batch``, at most
            :data:`CPU_BATCH` on the CPU.
        backend: runtime of the network forward: "torch" (the default: the fastest end to end,
            see ``benchmarks/README.md``); "onnx" (ONNX Runtime, CPU and float32 only, exporting
            the network on first use, see :mod:`m4oe.onnx_runtime`); "auto" (ONNX Runtime when
            installed, supported and the exported graph is already cached, else PyTorch).
    """

    def __init__(
        self,
        model: SwinUNet,
        card: ModelCard,
        *,
        device: str = "auto",
        dtype: str = "float32",
        threads: int | None = None,
        batch_size: int | None = None,
        backend: str = "torch",
    ):
        if backend not in onnx_runtime.BACKENDS:
            raise InputError(f"backend {backend!r} is not one of {', '.join(onnx_runtime.BACKENDS)}")
        if dtype not in DTYPES:
            raise InputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if threads is not None and threads < 1:
            raise InputError(f"threads must be at least 1, got {threads}")
        if batch_size is not None and batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        torch.set_num_threads(threads or default_threads())
        self.device = resolve_device(device)
        self.dtype = DTYPES[dtype]
        self.model = model.to(self.device).eval()
        self.card = card
        self.backend = backend
        # Why ONNX Runtime cannot run this model here (None: it can); "torch" never asks.
        self._onnx_unsupported = (
            None
            if backend == "torch"
            else onnx_runtime.unsupported_reason(self.model, self.device, self.dtype)
        )
        if backend == "onnx" and self._onnx_unsupported is not None:
            raise InputError(f"backend onnx: {self._onnx_unsupported}", card.name)
        self._graphs: dict[tuple[str, int | None], onnx_runtime.OnnxNetwork] = {}
        self.batch_size = batch_size or card.preprocessing.slice_batch
        if batch_size is None and self.device.type == "cpu":
            self.batch_size = min(self.batch_size, CPU_BATCH)

    @classmethod
    def from_pretrained(
        cls, model: str | Path | None = None, *, sha256: str | None = None, **kwargs
    ) -> Predictor:
        """Load a model by name (embedded or cached), folder or file; None is the embedded default."""
        net, card = load_checkpoint(resolve_model(None if model is None else str(model)), sha256=sha256)
        return cls(net, card, **kwargs)

    def predict(
        self,
        image: sitk.Image,
        *,
        modality: str | None = "auto",
        dicom_modality: str | None = None,
        task: str | None = None,
        force_expert: int | str | None = None,
        probabilities: str | None = None,
        gates: bool = False,
        gate_layer: str | None = None,
        cleanup: bool = True,
        through_plane_sigma_mm: float | None = None,
        test_time_passes: int | None = None,
        structures: Sequence[str] | None = None,
        roi: VoxelBox | None = None,
        body_crop: bool = True,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        source: str | Path | None = None,
    ) -> Prediction:
        """Segment a 3D scalar volume.

        Args:
            image: the volume (any direction cosines; LPS physical frame, mm; HU for CT).
            modality: "ct", "mr", or "auto"/None to detect (DICOM tag first, then intensities).
            dicom_modality: the DICOM Modality tag when the volume came from DICOM.
            task: the model card task whose labels to predict; None is the first.
            force_expert: route every token to this expert (index or name) instead of the gate.
            probabilities: keep per-class probabilities as "uint8" (0-255) or "float16"; None keeps none.
            gates: record gate maps and the gate summary (mixture-of-experts models only).
            gate_layer: map only this MoE layer (e.g. "encoder.0.1"); None maps the mean of all.
            cleanup: keep only the largest connected component of the labels the card lists.
            through_plane_sigma_mm: average the class probabilities over neighbouring slices with
                a Gaussian of this standard deviation (mm, along the axial stack) before the
                argmax; 0 turns it off; None uses the task's value in the model card.
            test_time_passes: test-time augmentation, forward passes per slice batch, 1-5: the
                slices as they are, then shifted by half a patch, then zoomed by 0.9 and 1.1
                (:data:`TEST_TIME_PASSES`), the class probabilities mapped back and averaged
                (costs as many times the inference time); None uses the model card's. Gate maps
                come from the first pass.
            structures: the task's classes to keep, by structure key (``"kidney_right"``) or name
                (see :func:`m4oe.terminology.select_labels`); None keeps all. The argmax is taken
                over all classes first and the others then set to 0, so a chosen organ is exactly
                what the whole task gives it, never grown into a neighbour the model found. A MoME
                model (classes by name, independent per-class logits) computes only the chosen
                classes' logits: a chosen organ is where its own sigmoid passes 0.5 and beats the
                other chosen ones.
            roi: segment only these voxels of ``image`` (see :mod:`m4oe.region`); 0 elsewhere.
            body_crop: segment only the box around the patient's body (:func:`m4oe.region.body_box`).
                Only the region's slices (and the neighbours the through-plane smoothing reads)
                go through the network, each whole, so the labels inside the region are those of
                a whole-image run (up to float rounding; the largest-component clean-up looks
                inside the region only) -- except that a field of view too wide for the model
                input at its card's spacing is framed on the body's box instead of shrunk whole
                (:func:`m4oe.inplane.make_grid`), as training frames it. On by default, as in
                the CLI, ``m4oe batch`` and the Slicer module, so that the Python API gives what
                they give; False runs the whole field of view.
            progress: called after each stage and each batch with a :class:`ProgressEvent`.
            cancel: checked between batches; returning True raises :class:`CancelledError`.
            source: the file the volume came from, named in error messages.
        """
        t0 = time.perf_counter()
        seconds: dict[str, float] = {}
        where = source if source is not None else "input volume"
        card, cfg = self.card, self.model.cfg
        task_info = card.task(task)
        try:
            chosen = (
                list(task_info.labels) if structures is None else select_labels(task_info.labels, structures)
            )
        except ValueError as error:
            raise InputError(str(error), card.name) from None
        keep = [label.value for label in chosen] if len(chosen) < len(task_info.labels) else None
        expert = self._expert_index(force_expert)
        if gates and not cfg.is_moe:
            raise InputError("gate maps need a mixture-of-experts model; this model is dense", card.name)
        if probabilities not in (None, *PROBABILITY_DTYPES):
            raise InputError(f"probabilities must be one of {PROBABILITY_DTYPES}, got {probabilities!r}")
        sigma_mm = (
            task_info.through_plane_sigma_mm if through_plane_sigma_mm is None else through_plane_sigma_mm
        )
        if not valid_sigma_mm(sigma_mm):
            raise InputError(f"through-plane sigma must be a number of mm >= 0, got {sigma_mm!r}")
        passes = task_info.test_time_passes if test_time_passes is None else test_time_passes
        if not valid_passes(passes):
            raise InputError(f"test-time passes must be an integer 1-{MAX_TEST_TIME_PASSES}, got {passes!r}")
        step = max(1, cfg.patch_size // 2)  # half a patch, in model-grid pixels

        def report(stage: str, done: int, total: int, eta: float | None = None) -> None:
            if progress is not None:
                progress(ProgressEvent(stage, done, total, time.perf_counter() - t0, eta))

        stack = to_axial_stack(image)
        Z, Y, X = stack.array.shape
        if min(Y, X) * MIN_UPSAMPLING < cfg.img_size:
            raise InputError(
                f"slices of {Y}x{X} pixels are too small for this model's {cfg.img_size}-pixel input "
                f"(at least {math.ceil(cfg.img_size / MIN_UPSAMPLING)} pixels per side)",
                where,
            )
        values = stack.array
        if float(values.min()) == float(values.max()):
            raise InputError(f"is empty: every voxel has the value {float(values.min()):g}", where)
        found = detect_modality(values, dicom_modality=dicom_modality, override=modality)
        pre = card.preprocessing
        body = body_box(stack, found.modality) if body_crop else None
        zs, ys, xs = self._region(stack, roi, body, where)
        # A field of view too wide for the model input is framed on the body (make_grid), as in
        # training; only when the region lies inside the body's box, so that every voxel to write
        # is on the grid.
        framing = None if body is None else stack_slices(body, stack)[1:]
        if framing is not None and not all(
            w.start <= r.start and r.stop <= w.stop for w, r in zip(framing, (ys, xs), strict=True)
        ):
            framing = None
        plan = SlicePlan.for_stack(
            stack,
            found.modality,
            self._intensity_params(found.modality),
            cfg.img_size,
            pre.in_plane,
            pre.target_spacing_mm,
            framing,
        )
        grid = plan.grid
        # The run: the region's slices and the neighbours the through-plane Gaussian reads.
        sigma_slices = sigma_mm / stack.spacing[0]
        reach = int(TRUNCATE * sigma_slices + 0.5) if sigma_mm > 0 else 0
        run = slice(max(0, zs.start - reach), min(Z, zs.stop + reach))
        seconds["preprocess"] = time.perf_counter() - t0
        report("preprocess", 1, 1)

        K = cfg.num_classes(task_info.name)
        # On the network's device until the volume is done: one transfer at the end, not one per batch.
        labels = torch.zeros((Z, Y, X), dtype=torch.uint8 if K <= 256 else torch.int32, device=self.device)
        probs = (
            np.zeros((Z, Y, X, K), np.uint8 if probabilities == "uint8" else np.float16)
            if probabilities
            else None
        )
        whole = (zs, ys, xs) == (slice(0, Z), slice(0, Y), slice(0, X))
        if probs is not None and not whole:
            probs[..., 0] = 255 if probabilities == "uint8" else 1.0  # outside the region: background
        Zrun = run.stop - run.start
        # A MoME model computes only the chosen classes' logits (its classes are independent queries).
        queries = keep if cfg.arch == "mome" else None
        # and routes per class query: the recorder is told which label value each query is.
        recorder = None
        if gates:
            per_query = [label.value for label in chosen] if cfg.arch == "mome" else None
            recorder = GateRecorder(Zrun, gate_layer, queries=per_query)
        network, backend = self._network(
            task_info.name, expert, report, queries, gates and cfg.arch == "mome"
        )
        batches = range(run.start, run.stop, self.batch_size)
        smoother = SliceSmoother(sigma_slices, Zrun) if sigma_mm > 0 else None
        kept = None
        if keep is not None:  # label value -> itself if chosen, else 0
            kept = torch.zeros(K, dtype=torch.long)
            kept[keep] = torch.tensor(keep)
        # Model-grid pixels over the region, for the per-segment routing (None: all of them).
        window = None if whole else model_window(grid, ys, xs)

        def write(first: int, maps: torch.Tensor, are_probabilities: bool) -> None:
            """Resample model-grid maps (B, K, S, S) of run slices first.. back to the region; keep labels."""
            if recorder is not None:  # per-segment routing of the labels as written (after smoothing)
                segments = class_argmax(maps)
                segments = segments if kept is None else kept.to(segments.device)[segments]
                if window is not None:
                    outside = torch.ones_like(segments, dtype=torch.bool)
                    outside[:, window[0], window[1]] = False
                    segments = segments.masked_fill(outside, 0)
                recorder.add_segments(first, segments)
            # Only the region's slices of this batch are mapped back.
            lo, hi = max(first + run.start, zs.start), min(first + run.start + maps.shape[0], zs.stop)
            for at in range(lo, hi, 4):
                sub = slice(at - run.start - first, min(at + 4, hi) - run.start - first)
                full = from_model_grid(maps[sub], grid, ys, xs)
                k = slice(at, at + full.shape[0])
                labels[k, ys, xs] = class_argmax(full).to(labels.dtype)
                if probs is not None:
                    p = (full if are_probabilities else full.softmax(dim=1)).permute(0, 2, 3, 1)
                    p = (p * 255).round().to(torch.uint8) if probabilities == "uint8" else p.half()
                    probs[k, ys, xs] = p.cpu().numpy()

        t1 = time.perf_counter()
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with torch.inference_mode(), autocast:
            for b, start in enumerate(batches):
                if cancel is not None and cancel():
                    raise CancelledError("cancelled by the user", where)
                stop = min(start + self.batch_size, run.stop)
                if cfg.neighbour_slices:
                    x = plan.neighbour_input(values, start, stop, cfg.neighbour_slices, self.device)
                else:
                    x = plan.model_input(values[start:stop], self.device)
                if cfg.in_chans == 3:
                    x = x.expand(-1, 3, -1, -1)
                logits, layer_gates = network(x)
                logits = logits.float()
                if recorder is not None:
                    recorder.add(start - run.start, layer_gates)
                if passes > 1:
                    mean = averaged_probabilities(network, x, passes, step, first=logits)
                if smoother is not None:  # slices come out once the Gaussian has all their neighbours
                    write(
                        *smoother.push(mean if passes > 1 else logits.softmax(dim=1)), are_probabilities=True
                    )
                elif passes > 1:
                    write(start - run.start, mean, are_probabilities=True)
                else:
                    write(start - run.start, logits, are_probabilities=False)
                if MALLOC_TRIM is not None and self.device.type == "cpu":
                    MALLOC_TRIM(0)
                elapsed = time.perf_counter() - t1
                eta = elapsed / (b + 1) * (len(batches) - b - 1)
                report("inference", b + 1, len(batches), eta)
        seconds["inference"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        # The scan check reads every class of the task, cleaned up as the whole task would be: taken
        # before unchosen structures are dropped; not made inside a user's region, which need not
        # hold an abdomen's organs (the body crop keeps the whole body, so it is checked). Labels are
        # 0 outside the region, so cleaning the whole volume cleans the region.
        # A MoME model asked for some classes never computed the others: it is not checked either
        # (a check of the chosen ones alone would warn about every missing organ).
        host_dtype = np.uint8 if K <= 256 else np.uint16
        whole_task = kept is not None and roi is None and queries is None
        every_class = labels.clone() if whole_task else None
        if kept is not None:
            labels = kept.to(labels.device)[labels.long()].to(labels.dtype)
        cleaned = [v for v in task_info.largest_component if keep is None or v in keep] if cleanup else []
        labels = labels_to_host(labels, cleaned, host_dtype)
        if roi is not None or queries is not None:
            scan_check = None
        elif every_class is None:
            scan_check = check_scan(labels, stack.spacing, list(task_info.labels))
        else:
            every_cleaned = list(task_info.largest_component) if cleanup else []
            scan_check = check_scan(
                labels_to_host(every_class, every_cleaned, host_dtype), stack.spacing, list(task_info.labels)
            )
        prediction = Prediction(
            labelmap=from_axial_stack(labels, stack),
            labels=chosen,
            task=task_info.name,
            modality=found,
            probabilities=from_axial_stack(probs, stack) if probs is not None else None,
            backend=backend,
            through_plane_sigma_mm=float(sigma_mm),
            test_time_passes=passes,
            largest_component=cleaned,
            scan_check=scan_check,
            region=box_from_stack_slices((zs, ys, xs), stack),
        )
        if recorder is not None:
            prediction.gate_map = gate_map_image(recorder.map, stack, grid, first_slice=run.start)
            if recorder.layer_maps:
                prediction.scale_gate_maps = {
                    name: gate_map_image(array, stack, grid, first_slice=run.start)
                    for name, array in recorder.layer_maps.items()
                }
            experts = [{"name": e.name, "modality": e.modality} for e in card.experts]
            expected = [expert] if expert is not None else card.expert_index(found.modality)
            prediction.gate_summary = recorder.summary(
                experts,
                expected,
                {lab.value: lab.name for lab in chosen},
                slice_positions(stack)[run],
                gate=card.architecture.gate,
                forced=expert is not None,
            )
            prediction.gate_summary["forced_expert"] = None if expert is None else card.experts[expert].name
            prediction.gate_summary["input_modality"] = found.modality
            if prediction.gate_summary["warning"]:
                prediction.warnings["routing"] = prediction.gate_summary["warning"]
        if prediction.scan_check is not None and prediction.scan_check.warning:
            prediction.warnings["scan"] = prediction.scan_check.warning
        keys = organ_keys(chosen)
        accuracy = real_accuracy_warning(
            {"metrics": card.metrics},
            found.modality,
            {keys[lab.value]: lab.name for lab in chosen if lab.value in keys},
        )
        if accuracy:
            prediction.warnings["accuracy"] = accuracy
        if prediction.gate_summary is not None:  # the summary file names every warning, not only the gate's
            prediction.gate_summary["warning"] = prediction.warning
            prediction.gate_summary["warnings"] = dict(prediction.warnings)
            prediction.gate_summary["scan_check"] = (
                None if prediction.scan_check is None else prediction.scan_check.to_dict()
            )
        seconds["postprocess"] = time.perf_counter() - t2
        seconds["total"] = time.perf_counter() - t0
        prediction.seconds = {k: round(v, 3) for k, v in seconds.items()}
        report("postprocess", 1, 1)
        return prediction

    @staticmethod
    def _region(stack, roi: VoxelBox | None, body: VoxelBox | None, where) -> tuple[slice, slice, slice]:
        """The (slices, rows, columns) of the stack to segment: ``roi`` (a box of the stack's image)
        and ``body``, the box around the body (None: no body crop); the whole stack when neither
        narrows it."""
        box = VoxelBox.full(stack.reference)
        if roi is not None:
            box = box.intersect(roi)
            if box.empty:
                raise InputError(f"the region {roi.to_dict()} holds no voxel of this image", where)
        if body is not None and not box.intersect(body).empty:
            box = box.intersect(body)
        return stack_slices(box, stack)

    def _network(
        self,
        task: str,
        expert: int | None,
        report=None,
        queries: list[int] | None = None,
        query_gates: bool = False,
    ):
        """The forward pass for this task and routing, and the name of its runtime.

        ``queries``: a MoME model's label values to compute (None: all); others get no logits.
        ``query_gates``: a MoME model's gates per query, (B, Q, E, H_l, W_l) (Q: the queries in
        order, see :meth:`m4oe.model.mome.MoME.class_logits`).

        An export to ONNX (backend "onnx", graph not cached yet) is reported as stage "export".

        Returns ``(network, backend)``: ``network(x)`` maps the model input (B, C, S, S) to
        ``(logits (B, K, S, S), {MoE layer: gates (B, E, H_l, W_l)})``.
        """
        key = (task, expert)
        if key not in self._graphs and self.backend != "torch" and self._onnx_unsupported is None:
            graph = self._load_graph(task, expert, report)
            if graph is not None:
                self._graphs[key] = graph
        if key in self._graphs:
            return self._graphs[key], "onnx"

        def network(x: torch.Tensor):
            if query_gates:
                return self.model(
                    x, task=task, force_expert=expert, return_gates=True, queries=queries, query_gates=True
                )
            if queries is not None:
                return self.model(x, task=task, force_expert=expert, return_gates=True, queries=queries)
            return self.model(x, task=task, force_expert=expert, return_gates=True)

        return network, "torch"

    def _load_graph(self, task: str, expert: int | None, report) -> onnx_runtime.OnnxNetwork | None:
        """The ONNX Runtime session of this task and routing; None when "auto" finds no usable graph."""
        sha = self.card.weights_sha256
        if self.backend == "onnx":
            path = onnx_runtime.prepare(self.model, sha, task, expert, report)
        else:
            path = onnx_runtime.graph_path(sha, task, expert)
            if path is None or not path.is_file():
                return None
        try:
            return onnx_runtime.OnnxNetwork(path, torch.get_num_threads())
        except ModelError as error:
            if self.backend == "onnx":
                raise
            logger.warning("%s; running the network in PyTorch", error)
            return None

    def _expert_index(self, force_expert: int | str | None) -> int | None:
        if force_expert is None:
            return None
        names = [e.name for e in self.card.experts]
        if not names:
            raise InputError(f"cannot force expert {force_expert!r}: model {self.card.name!r} is dense")
        if isinstance(force_expert, str) and not force_expert.isdigit():
            if force_expert not in names:
                raise InputError(f"unknown expert {force_expert!r}; this model has {names}")
            return names.index(force_expert)
        index = int(force_expert)
        if not 0 <= index < len(names):
            raise InputError(
                f"expert index {index} out of range; this model has {len(names)} experts {names}"
            )
        return index

    def _intensity_params(self, modality: str) -> IntensityParams:
        stored = self.card.preprocessing.intensity.get(modality)
        if stored is None:
            known = sorted(self.card.preprocessing.intensity)
            raise InputError(
                f"model {self.card.name!r} has no intensity parameters for {modality}; it knows {known}"
            )
        return IntensityParams.from_dict(stored)
