"""One segmentation at a time: from an input volume node to a result segmentation in its scene.

:class:`Segmenter` writes the input volume to a private temporary folder, runs ``m4oe segment
--progress json`` in a separate process (:mod:`.process`), forwards the engine's progress from
:meth:`Segmenter.poll` (which the module's ``qt.QTimer`` calls, or :meth:`Segmenter.run` when the
caller waits), and when the process has ended loads its outputs into the scene: the ``.seg.nrrd``
through Slicer's segmentation storage node (:func:`.volumes.load_segmentation_file`) and the gate
views (:mod:`.gate_review`). Cancel kills the
engine's process tree and adds nothing to the scene. The temporary folder is removed in every case.

A result is a segmentation node that carries what produced it, so it can be reviewed, edited and
exported after the scene is saved and loaded again: attributes ``M4oESegmentation.*`` (Labels,
Modality, ModalitySource, Model, Task, ForcedExpert, TestTimePasses, ThroughPlaneSigmaMm,
KeepAllComponents, LargestComponentLabels, Backend, ScanWarning, AccuracyWarning, Structures,
Region, GateSummary: the settings, the scan check's warning and the real-scan accuracy warning as
the engine reports them in its final record) and node references
``M4oEGate{Table,Chart,Overlay,Colors}`` to its gate views (a MoME result also
``M4oEGateOverlay.{layer}``, one map per decoder scale) and ``M4oEComparison.{expert}`` to its
forced-expert comparisons.

Needs a MRML scene (Slicer, or the ``slicer-core`` package) but no application, Qt or widget.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk
import slicer

from m4oe.labels import Label

from . import feedback, gate_review, models, process, views, volumes
from .status import CANCELLED
from .status import RESULT_ATTRIBUTE as ATTRIBUTE

logger = logging.getLogger(__name__)

GATE_REFERENCE = "M4oEGate"
GATE_ROLES = ("Table", "Chart", "Overlay", "Colors")
"""Node reference roles ``M4oEGate{role}`` from a result segmentation to its gate views."""
SCALE_OVERLAY_ROLE = GATE_REFERENCE + "Overlay."
"""``M4oEGateOverlay.{layer}``: a MoME result's dominant-expert map of one decoder scale."""
COMPARISON_ROLE = "M4oEComparison."
MODALITIES = {"auto": "auto", "ct": "ct", "mr": "mr"}
DICOM_MODALITIES = {"CT": "ct", "MR": "mr"}
POLL_INTERVAL_S = 0.2


@dataclass
class SegmentationResult:
    """What one run produced: the segmentation node and how it was made.

    ``modality``: "ct" or "mr", the one the engine used; ``modality_source``: how it was decided.
    ``seconds``: the engine's timings (load, preprocess, inference, total...). ``warning``: the
    engine's routing warning, or None. ``scan_warning``: the engine's warning that the scan may
    not show an abdomen (see ``m4oe.ood``), or None. ``compared_with``: the segmentation a
    forced-expert run is compared with, else None. ``accuracy_warning``: the structures of the
    result that scored low, or were not measured, on the real scans of this modality in the
    model's card (``m4oe.card_summary.real_accuracy_warning``), or None.
    """

    segmentation: object
    modality: str
    modality_source: str
    task: str
    seconds: dict
    warning: str | None = None
    compared_with: object = None
    scan_warning: str | None = None
    accuracy_warning: str | None = None


@dataclass
class GateReview:
    """A result's gate views: the summary dict, its table, chart, map and colour nodes, the warning;
    ``scale_overlays`` {layer: dominant-expert map} of a MoME result's decoder scales (else empty)."""

    summary: dict
    table: object
    chart: object
    overlay: object
    colors: object
    warning: str | None
    scale_overlays: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[tuple[str, str]]:
        """(layer, text) of the layers the views can show one at a time (empty: only the mean)."""
        return gate_review.layer_choices(self.summary) if self.scale_overlays else []

    def show_layer(self, layer: str):
        """Show ``layer`` ("" the mean) in the table and chart; return the dominant-expert map of it."""
        if layer and layer not in self.scale_overlays:
            raise ValueError(
                f"this result has no gate map of layer {layer!r}; it has {list(self.scale_overlays)}"
            )
        if gate_review.shown_layer(self.chart) != layer:
            gate_review.show_layer(self.summary, self.chart, self.table, layer)
        return self.scale_overlays[layer] if layer else self.overlay


@dataclass
class _Job:
    """A running segmentation: its process, temporary folder, and what to do with the result."""

    process: process.InferenceProcess
    workspace: process.TemporaryWorkspace
    input_volume: object
    segmentation: object  # the node to fill, or None for a new one named segmentation_name
    segmentation_name: str
    labels: list[Label]
    model: str
    task: str
    modality_source: str | None  # overrides the engine's when this module chose the modality
    force_expert: str | None
    compared_with: object
    on_progress: Callable[[dict], None] | None
    on_finished: Callable[[SegmentationResult | None, str | None], None] | None
    cancel_requested: bool = field(default=False)


class Segmenter:
    """Runs the engine on volume nodes and loads its outputs into their scene; one run at a time.

    Args:
        python_executable: the interpreter that runs ``-m m4oe.cli``: ``PythonSlicer`` in Slicer,
            ``sys.executable`` elsewhere.
        engine_dir: the folder holding the ``m4oe`` package (the module's folder).
        environment: the environment to start the engine in (default ``os.environ``); the engine
            folder is put first on its ``PYTHONPATH``.
        engine: a :class:`~.engine.WarmEngine` to send the runs to (the model stays loaded between
            runs); None starts one ``m4oe segment`` process per run.
    """

    def __init__(
        self,
        python_executable: str | Path,
        engine_dir: str | Path,
        environment: Mapping[str, str] | None = None,
        engine=None,
    ) -> None:
        self.python_executable = str(python_executable)
        self.engine_dir = Path(engine_dir)
        self.environment = environment
        self.engine = engine
        self._job: _Job | None = None

    @property
    def running(self) -> bool:
        """Whether a segmentation has started and its end has not been reported yet."""
        return self._job is not None

    # ------------------------------------------------------------------ run

    def start(
        self,
        input_volume,
        output_segmentation=None,
        *,
        modality: str = "auto",
        model: str | None = None,
        task: str | None = None,
        device: str = "auto",
        force_expert: str | None = None,
        compared_with=None,
        replace_existing: bool = False,
        test_time_passes: int | None = None,
        through_plane_sigma_mm: float | None = None,
        keep_all_components: bool = False,
        backend: str = "torch",
        structures: list[str] | None = None,
        roi=None,
        body_crop: bool = True,
        extra_args: tuple[str, ...] = (),
        on_progress: Callable[[dict], None] | None = None,
        on_finished: Callable[[SegmentationResult | None, str | None], None] | None = None,
    ):
        """Start segmenting ``input_volume`` in a separate process; return the running process
        (an :class:`~.process.InferenceProcess`, or an :class:`~.engine.EngineRun` of the warm engine).

        Args:
            input_volume: scalar volume node (CT in HU, or MR), in a scene.
            output_segmentation: segmentation node whose segments the result replaces when
                ``replace_existing``; otherwise a new segmentation node is added to the input's
                scene and study, so earlier results and edits are kept.
            modality: "auto" (the DICOM Modality tag of the input's series, else the engine's
                detection), "ct" or "mr"; any case.
            model: model name or path; None or "" is the embedded default.
            task: the model's label set; None or "" is its first.
            device: "auto", "cpu", "cuda" or "cuda:N".
            force_expert: route every token to this expert (name); no gate views.
            compared_with: for a forced-expert run, the result it is compared with: the comparison
                is kept in that segmentation's ``M4oEComparison.{expert}`` reference and replaced
                when the same expert is compared again.
            test_time_passes: forward passes averaged per slice (test-time augmentation), 1-5;
                None is the model card's, 1 the fastest.
            through_plane_sigma_mm: sigma in mm of the Gaussian that averages class probabilities
                over neighbouring slices before the argmax; 0 is off, None the model card's.
            keep_all_components: keep every connected component of each segment instead of the
                model card's clean-up (which keeps the largest one of single organs).
            backend: network runtime, "torch", "onnx" (ONNX Runtime on the CPU) or "auto".
            structures: segment only these structures of the task (keys such as "kidney_right",
                or names); None is all. Only they become segments.
            roi: a markups ROI node: segment only inside it (its axis-aligned box in the input's
                LPS frame, see :func:`.volumes.roi_lps_bounds`); None is everywhere.
            body_crop: segment only the box around the body (the engine's default).
            extra_args: further ``m4oe segment`` arguments (e.g. ``("--batch-size", "2")``).
            on_progress(record): each progress record of the engine (see :mod:`.process`).
            on_finished(result, error): once, from :meth:`poll`, with a :class:`SegmentationResult`
                or an error message (the engine's own one-line message; :data:`CANCELLED` after
                :meth:`cancel`).

        Raises RuntimeError while another segmentation runs; ValueError for a missing input, an
        unknown modality, model, task or expert; OSError when the engine cannot be started.
        Nothing is added to the scene before the engine has finished.
        """
        if self._job is not None:
            raise RuntimeError("a segmentation is already running; cancel it or wait for it")
        if input_volume is None or input_volume.GetScene() is None:
            raise ValueError("select an input volume (a volume node in the scene)")
        chosen = MODALITIES.get(str(modality).lower())
        if chosen is None:
            raise ValueError(f"modality must be Auto, CT or MR, got {modality!r}")
        card = models.model_card(model)
        if card is None:
            raise ValueError(f"model {model} is not downloaded yet")
        task_name, labels = models.task_labels(card, task)
        labels = models.chosen_labels(labels, structures)
        roi_mm = None if roi is None else volumes.roi_lps_bounds(roi, input_volume)
        if force_expert and force_expert not in models.expert_names(card):
            raise ValueError(f"model {card.get('name')!r} has no expert {force_expert!r}")
        segmentation = output_segmentation if replace_existing else None
        if force_expert and compared_with is not None:
            segmentation = compared_with.GetNodeReference(COMPARISON_ROLE + force_expert)
        name = ""
        if segmentation is None:
            base = f"{input_volume.GetName()} M4oE" + (f" {force_expert} expert only" if force_expert else "")
            name = input_volume.GetScene().GenerateUniqueName(base)
        modality_source = None
        if chosen == "auto":
            tag = dicom_modality(input_volume)
            if tag:
                # The file written for the engine has no DICOM tags; pass on what the series says.
                chosen, modality_source = tag, "DICOM Modality tag"

        workspace = process.TemporaryWorkspace()
        try:
            sitk.WriteImage(volumes.volume_node_to_sitk(input_volume), str(workspace.input_path), False)
            request = process.InferenceRequest(
                workspace.input_path,
                workspace.output_path,
                model=model or None,
                modality=chosen,
                task=task_name,
                device=device,
                gates_dir=None if force_expert else workspace.gates_dir,
                force_expert=force_expert or None,
                test_time_passes=test_time_passes,
                through_plane_sigma_mm=through_plane_sigma_mm,
                keep_all_components=keep_all_components,
                backend=backend,
                structures=None if structures is None else [models.structure_key(x) for x in labels],
                roi_mm=roi_mm,
                body_crop=body_crop,
                extra_args=extra_args,
            )
            if self.engine is not None:
                inference = self.engine.submit(process.segment_arguments(request))
            else:
                inference = process.InferenceProcess()
                inference.start(
                    process.build_command(request, self.python_executable),
                    env=process.engine_environment(self.engine_dir, self.environment),
                )
        except BaseException:
            workspace.cleanup()
            raise
        self._job = _Job(
            process=inference,
            workspace=workspace,
            input_volume=input_volume,
            segmentation=segmentation,
            segmentation_name=name,
            labels=labels,
            model=model or models.default_model(),
            task=task_name,
            modality_source=modality_source,
            force_expert=force_expert or None,
            compared_with=compared_with,
            on_progress=on_progress,
            on_finished=on_finished,
        )
        return inference

    def poll(self) -> bool:
        """Forward the running segmentation's new progress; load its result once it has ended.

        Returns whether it is still running. Call every :data:`POLL_INTERVAL_S` or so; never blocks
        (except to load a finished result). ``on_finished`` is called from here, once.
        """
        job = self._job
        if job is None:
            return False
        for record in job.process.poll():
            if record.get("stage") == "log":
                logger.info("m4oe: %s", record.get("message", ""))
            elif job.on_progress is not None and record.get("stage") not in ("done", "error"):
                job.on_progress(record)
        if job.process.running:
            return True
        self._job = None
        result, error = None, None
        try:
            if job.cancel_requested or job.process.cancelled:
                error = CANCELLED
            elif job.process.returncode != 0 or job.process.result is None:
                error = job.process.error or f"the engine stopped with exit code {job.process.returncode}"
            else:
                result = self._load_results(job)
        except Exception as exc:
            logger.exception("M4oE segmentation: loading the result failed")
            error = str(exc)
        finally:
            job.workspace.cleanup()
        if job.on_finished is not None:
            job.on_finished(result, error)
        return False

    def cancel(self, wait: bool = False) -> None:
        """Stop the running segmentation: kill the engine's process tree (the warm engine: ask it to
        stop the run, and kill it if it does not); nothing reaches the scene.

        The next :meth:`poll` reports :data:`CANCELLED` to ``on_finished``, even when the engine
        had already finished; with ``wait`` that happens here.
        """
        if self._job is not None:
            self._job.cancel_requested = True
            self._job.process.cancel()
        while wait and self.poll():
            time.sleep(0.05)

    def run(
        self,
        input_volume,
        output_segmentation=None,
        *,
        process_events: Callable[[], None] | None = None,
        **options,
    ) -> SegmentationResult:
        """Segment ``input_volume`` and wait for the result (options as :meth:`start`).

        ``process_events``: called while waiting (in Slicer, ``slicer.app.processEvents``).
        Raises RuntimeError with the engine's message when the segmentation fails or is cancelled.
        """
        outcome: dict = {}
        user_finished = options.pop("on_finished", None)

        def finished(result, error):
            outcome.update(result=result, error=error)
            if user_finished is not None:
                user_finished(result, error)

        self.start(input_volume, output_segmentation, on_finished=finished, **options)
        while self.poll():
            if process_events is not None:
                process_events()
            time.sleep(POLL_INTERVAL_S)
        if outcome["error"]:
            raise RuntimeError(outcome["error"])
        return outcome["result"]

    # ------------------------------------------------------------------ results

    def _load_results(self, job: _Job) -> SegmentationResult:
        """The finished job's label map as a segmentation (and its gate views), made visible."""
        done = job.process.result
        outputs = done["outputs"]
        modality_source = job.modality_source or done.get("modality_source", "")
        # The engine's .seg.nrrd, read by Slicer's segmentation storage node: segments, names,
        # colours and terminology as the engine wrote them.
        segmentation = volumes.load_segmentation_file(
            outputs["segmentation"],
            job.labels,
            job.input_volume,
            segmentation_node=job.segmentation,
            name=job.segmentation_name,
        )
        attributes = {
            "Labels": json.dumps([label.to_dict() for label in job.labels]),
            "Modality": done.get("modality", ""),
            "ModalitySource": modality_source,
            "Model": job.model,
            "Task": job.task,
            "ForcedExpert": job.force_expert or "",
            "TestTimePasses": str(done.get("test_time_passes", "")),
            "ThroughPlaneSigmaMm": str(done.get("through_plane_sigma_mm", "")),
            # From the engine's record: the labels it cut down to their largest piece (none: all kept).
            "KeepAllComponents": str(not done.get("largest_component")).lower(),
            "LargestComponentLabels": json.dumps(done.get("largest_component", [])),
            "Backend": str(done.get("backend", "")),
            "ScanWarning": done.get("warnings", {}).get("scan") or "",
            "AccuracyWarning": done.get("warnings", {}).get("accuracy") or "",
            "Structures": json.dumps(done.get("structures", [])),
            "Region": json.dumps(done.get("region")),
        }
        for key, value in attributes.items():
            segmentation.SetAttribute(ATTRIBUTE + key, value)
        remove_gate_views(segmentation)
        if "gate_summary" in outputs:
            _attach_gate_views(segmentation, job.input_volume, outputs)
        if job.compared_with is not None:
            job.compared_with.SetNodeReferenceID(COMPARISON_ROLE + job.force_expert, segmentation.GetID())
        views.show_segmentation(segmentation, outlines_only=job.compared_with is not None)
        return SegmentationResult(
            segmentation,
            done.get("modality", ""),
            modality_source,
            job.task,
            done.get("seconds", {}),
            done.get("warnings", {}).get("routing"),
            job.compared_with,
            done.get("warnings", {}).get("scan"),
            done.get("warnings", {}).get("accuracy"),
        )


def dicom_modality(volume) -> str | None:
    """The modality ("ct" or "mr") of the DICOM series a volume was loaded from, else None.

    Read from the subject hierarchy item's ``DICOM.Modality`` attribute, which Slicer's DICOM
    import sets; a volume loaded from a file has none.
    """
    scene = volume.GetScene()
    hierarchy_class = getattr(slicer, "vtkMRMLSubjectHierarchyNode", None)
    if scene is None or hierarchy_class is None:
        return None
    hierarchy = hierarchy_class.GetSubjectHierarchyNode(scene)
    item = hierarchy.GetItemByDataNode(volume) if hierarchy else 0
    if not item:
        return None
    name = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
    return DICOM_MODALITIES.get(hierarchy.GetItemAttribute(item, name).strip().upper())


def _attach_gate_views(segmentation, input_volume, outputs: dict) -> None:
    """Add the gate table, chart and dominant-expert map of a run, referenced from the segmentation."""
    summary_text = Path(outputs["gate_summary"]).read_text(encoding="utf-8")
    summary = json.loads(summary_text)
    scene = segmentation.GetScene()
    name = segmentation.GetName()
    table = gate_review.expert_table(summary, scene=scene)
    chart = gate_review.expert_plot(summary, scene=scene)
    overlay, colors = gate_review.gate_overlay(sitk.ReadImage(outputs["gate_map"]), summary, scene=scene)
    table.SetName(f"{name} expert per segment")
    chart.SetName(f"{name} gate weight per slice")
    overlay.SetName(f"{name} dominant expert")
    views.mark_gate_map(overlay)
    for node in (table, overlay):
        volumes.place_in_study(node, input_volume)
    segmentation.SetAttribute(ATTRIBUTE + "GateSummary", summary_text)
    for role, node in zip(GATE_ROLES, (table, chart, overlay, colors), strict=True):
        segmentation.SetNodeReferenceID(GATE_REFERENCE + role, node.GetID())
    for layer in summary.get("scale_gate_maps", {}):
        scale = gate_review.gate_overlay(
            sitk.ReadImage(outputs[f"gate_map_{layer}"]),
            summary,
            scene=scene,
            colors=colors,
            name=f"{name} dominant expert {layer}",
        )[0]
        views.mark_gate_map(scale)
        volumes.place_in_study(scale, input_volume)
        segmentation.SetNodeReferenceID(SCALE_OVERLAY_ROLE + layer, scale.GetID())


def remove_gate_views(segmentation) -> None:
    """Remove the gate views a result segmentation references (before its result is replaced)."""
    scene = segmentation.GetScene()
    chart = segmentation.GetNodeReference(GATE_REFERENCE + "Chart")
    if chart is not None:
        gate_review.remove_gate_nodes(chart)
    scales = [SCALE_OVERLAY_ROLE[len(GATE_REFERENCE) :] + layer for layer in _scale_layers(segmentation)]
    for role in (*GATE_ROLES, *scales):
        node = segmentation.GetNodeReference(GATE_REFERENCE + role)
        if node is not None and node.GetScene() is not None:
            # Removing a volume leaves its display node in the scene: remove that too.
            if node.IsA("vtkMRMLDisplayableNode"):
                displays = [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())]
                for display in filter(None, displays):
                    scene.RemoveNode(display)
            scene.RemoveNode(node)
        segmentation.RemoveNodeReferenceIDs(GATE_REFERENCE + role)
    segmentation.RemoveAttribute(ATTRIBUTE + "GateSummary")


def _scale_layers(segmentation) -> list[str]:
    """The decoder scales whose gate maps a MoME result lists (from its gate summary attribute)."""
    text = segmentation.GetAttribute(ATTRIBUTE + "GateSummary")
    return list(json.loads(text).get("scale_gate_maps", {})) if text else []


def gate_review_of(segmentation) -> GateReview | None:
    """The gate views of a result segmentation, or None (no segmentation, forced run, other origin)."""
    if segmentation is None or not segmentation.GetAttribute(ATTRIBUTE + "GateSummary"):
        return None
    nodes = [segmentation.GetNodeReference(GATE_REFERENCE + role) for role in GATE_ROLES]
    if nodes[0] is None or nodes[1] is None:
        return None
    summary = json.loads(segmentation.GetAttribute(ATTRIBUTE + "GateSummary"))
    scales = {
        layer: segmentation.GetNodeReference(SCALE_OVERLAY_ROLE + layer)
        for layer in _scale_layers(segmentation)
    }
    if any(node is None for node in scales.values()):  # a scale map removed by the user: no selector
        scales = {}
    return GateReview(summary, *nodes, gate_review.routing_warning(summary), scales)


def comparison_of(segmentation, expert: str):
    """The forced-expert comparison of a result for ``expert``, or None."""
    return segmentation.GetNodeReference(COMPARISON_ROLE + expert) if segmentation is not None else None


def export_case(
    input_volume,
    segmentation,
    dataset_dir: str | Path,
    *,
    modality: str | None = None,
    model: str | None = None,
    task: str | None = None,
    case_name: str | None = None,
) -> str:
    """Save the volume and the (edited) segmentation as a new case of a training dataset.

    Labels and modality come from the segmentation when M4oE made it; otherwise from the model card
    (``model``, ``task``) and ``modality`` ("CT" or "MR", any case). The segmentation is rasterised
    on the volume's grid (see :func:`.volumes.segmentation_to_labelmap`). Returns the case name;
    raises ValueError (as :func:`.feedback.export_case`) when the case cannot be written.
    """
    if not dataset_dir:
        raise ValueError("choose the dataset folder to export to")
    if input_volume is None or segmentation is None:
        raise ValueError("select the input volume and the segmentation to export")
    labels_text = segmentation.GetAttribute(ATTRIBUTE + "Labels")
    if labels_text:
        labels = [Label.from_dict(label) for label in json.loads(labels_text)]
    else:
        card = models.model_card(model)
        if card is None:
            raise ValueError(f"model {model} is not downloaded yet")
        labels = models.task_labels(card, task)[1]
    chosen = segmentation.GetAttribute(ATTRIBUTE + "Modality") or (modality or "").lower()
    if chosen not in feedback.CHANNEL_NAMES:
        raise ValueError("select the modality (CT or MR) of the exported volume")
    return feedback.export_case(
        volumes.volume_node_to_sitk(input_volume),
        volumes.segmentation_to_labelmap(segmentation, input_volume, labels),
        labels,
        dataset_dir,
        modality=chosen,
        case_name=case_name,
    )
