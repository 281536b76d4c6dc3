"""M4oE Segmentation: abdominal organs on CT and MRI with a mixture of modality experts, in 3D Slicer.

Scene and GUI glue only (DESIGN.md, "The Slicer module"). Inference runs in a separate
``PythonSlicer -m m4oe.cli segment`` process (``M4oESegmentationLib.process``) that a ``qt.QTimer``
polls, so the GUI never waits on PyTorch; node conversions and gate views live in
``M4oESegmentationLib``. This file imports only what Slicer bundles at load time: the engine's pip
dependencies (timm, safetensors, slicerio) and PyTorch are installed on first use, after the
user agrees, and ``M4oESegmentationLib`` is imported after that, inside the functions that use it.

A result is a segmentation node that carries what produced it, so it can be reviewed, edited and
exported after the scene is saved and loaded again: attributes ``M4oESegmentation.*`` (labels,
modality, model, task, gate summary) and node references to its gate views (table, chart,
dominant-expert map and its colours) and to its forced-expert comparisons.
"""

import importlib
import importlib.metadata
import json
import logging
import os
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = pathlib.Path(__file__).resolve().parent

TORCH_REQUIREMENT = ">=2.1"
PYTHON_REQUIREMENTS = ("timm>=1.0,<2", "safetensors>=0.4", "slicerio>=1.1", "psutil>=5.9")
"""pip packages ``m4oe segment`` needs beyond what Slicer bundles (numpy, scipy, SimpleITK) and
PyTorch (from the PyTorch extension). Testing/test_packaging.py keeps them in step with pyproject.toml."""
PIP_SKIP_PACKAGES = ("torch", "torchvision", "SimpleITK")
"""Never replaced by pip: torch must be the build the PyTorch extension chose for this GPU, and
Slicer's SimpleITK carries Slicer's own image IO."""

MODALITY_CHOICES = ("Auto", "CT", "MR")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
POLL_INTERVAL_MS = 200
OVERLAY_OPACITY = 0.4
SLICE_VIEWS = ("Red", "Yellow", "Green")
SEGMENT_EDITOR_SINGLETON = "SegmentEditor"
SAMPLE_CATEGORY = "M4oE Segmentation"
PHANTOM_SAMPLES = {"M4oEPhantomCT": ("ct", 11), "M4oEPhantomMR": ("t1", 11)}
"""Sample data generated on this computer by ``m4oe.phantom`` (no download): name -> (sequence, seed)."""

ATTRIBUTE = "M4oESegmentation."
"""Prefix of the attributes a result segmentation carries: Labels (JSON list of label dicts),
Modality ("ct" | "mr"), ModalitySource, Model, Task, ForcedExpert, GateSummary (JSON)."""
GATE_ROLES = ("Table", "Chart", "Overlay", "Colors")
"""Node reference roles ``M4oEGate{role}`` from a result segmentation to its gate views."""
COMPARISON_ROLE = "M4oEComparison."
GATE_MAP_ROLE = "gate map"

STAGE_SPANS = {
    "load": (0.0, 0.1),
    "preprocess": (0.1, 0.15),
    "inference": (0.15, 0.95),
    "postprocess": (0.95, 1.0),
}
"""Share of the whole run (start, end) each engine stage covers on the progress bar."""


def overallFraction(record: dict) -> float | None:
    """Fraction of the whole run done after a progress record of the engine, or None if unknown."""
    span = STAGE_SPANS.get(record.get("stage"))
    fraction = record.get("fraction")
    if span is None or fraction is None:
        return 1.0 if record.get("stage") == "done" else None
    return span[0] + (span[1] - span[0]) * min(max(float(fraction), 0.0), 1.0)


def humanDuration(seconds: float) -> str:
    if seconds < 1:
        return _("less than 1 s")
    seconds = round(seconds)
    if seconds < 60:
        return _("{s} s").format(s=seconds)
    return _("{m} min {s:02d} s").format(m=seconds // 60, s=seconds % 60)


def progressText(record: dict) -> str:
    """Status line for a progress record: stage, units done of the stage, estimated time left."""
    names = {
        "load": _("Loading the model"),
        "preprocess": _("Preparing slices"),
        "inference": _("Segmenting"),
        "postprocess": _("Assembling the result"),
    }
    stage = record.get("stage", "")
    text = names.get(stage, stage.replace("_", " ").capitalize())
    if record.get("total"):
        text += f" {record.get('done', 0)}/{record['total']}"
    if record.get("eta_s"):
        text += ", " + _("about {duration} left").format(duration=humanDuration(record["eta_s"]))
    return text


def labelsFromCard(card: dict, task: str | None) -> tuple[str, list]:
    """(task name, its ``m4oe.labels.Label`` list) from a model card dict; None task = the first."""
    from m4oe.labels import Label

    tasks = card.get("tasks") or []
    if not tasks:
        raise ValueError(f"model {card.get('name')!r} lists no tasks")
    chosen = tasks[0] if not task else next((t for t in tasks if t.get("name") == task), None)
    if chosen is None:
        names = ", ".join(t.get("name", "?") for t in tasks)
        raise ValueError(f"model {card.get('name')!r} has no task {task!r}; it has: {names}")
    return chosen["name"], [Label.from_dict(label) for label in chosen["labels"]]


#
# M4oESegmentation
#


class M4oESegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("M4oE Segmentation")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["M4oE Segmentation contributors"]
        self.parent.helpText = _("""
Segments abdominal organs on CT and MRI with M4oE, a Swin-UNet whose feed-forward layers are a
mixture of modality experts chosen per token by a gate. <b>Gate review</b> shows how the gate
routed each organ and slice and warns when the routing disagrees with the modality;
<b>Compare</b> segments again with one expert alone. Correct the result in <b>Mask editing</b> and
<b>Export for training</b> to add the case to a training dataset.
PyTorch comes from the PyTorch extension; other Python packages are installed on first use, after
you agree. Not a medical device: the embedded model is trained on synthetic phantoms.
See the <a href="https://github.com/m4oe-segmentation/SlicerM4oESegmentation">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
M4oE is described in Yufeng Jiang and Yiqing Shen, "M4oE: A Foundation Model for Medical Multimodal
Image Segmentation with Mixture of Experts", MICCAI 2024. The Swin-UNet backbone is from Cao et al.,
"Swin-Unet: Unet-like Pure Transformer for Medical Image Segmentation", ECCV Workshops 2022.
The module follows the design of SlicerTotalSegmentator and SlicerMONAIAuto3DSeg.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Phantom CT and MR volumes in the Sample Data module, generated locally when first loaded."""
    import SampleData

    icon = str(MODULE_DIR / "Resources" / "Icons" / "M4oESegmentation.png")
    for sampleName in PHANTOM_SAMPLES:
        # SampleData's own loader reuses a file already in its cache folder, so once generated
        # the sample also loads through SampleData.downloadSample(); the file:// URI is never fetched.
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=SAMPLE_CATEGORY,
            sampleName=sampleName,
            uris=phantomSamplePath(sampleName).as_uri(),
            fileNames=f"{sampleName}.nrrd",
            nodeNames=sampleName,
            thumbnailFileName=icon,
            loadFileType="VolumeFile",
            customDownloader=_loadPhantomSample,
        )


def phantomSamplePath(sampleName: str) -> pathlib.Path:
    return pathlib.Path(slicer.mrmlScene.GetCacheManager().GetRemoteCacheDirectory()) / f"{sampleName}.nrrd"


def _loadPhantomSample(source):
    with slicer.util.tryWithErrorDisplay(_("Failed to generate the phantom sample."), waitCursor=True):
        return M4oESegmentationLogic().loadPhantomSample(source.sampleName)


#
# M4oESegmentationParameterNode
#


@parameterNodeWrapper
class M4oESegmentationParameterNode:
    """The module's state in the scene.

    model: a model name (``m4oe models``) or a model card path; "" is the embedded default.
    task: the model's label set; "" is its first. forcedExpert: the expert that Compare uses.
    datasetPath: the training dataset folder that Export writes to.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modality: Annotated[str, Choice(list(MODALITY_CHOICES))] = "Auto"
    model: str = ""
    task: str = ""
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode
    replaceExisting: bool = False
    showGateOverlay: bool = False
    forcedExpert: str = ""
    datasetPath: str = ""


#
# M4oESegmentationWidget
#


class M4oESegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._gateReview = None
        self._redSliceNode = None
        self._shownModel = None
        self._updatingGUI = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/M4oESegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = M4oESegmentationLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._onTimer)
        self.ui.progressBar.hide()

        self.segmentEditorWidget = slicer.qMRMLSegmentEditorWidget()
        self.segmentEditorWidget.setMaximumNumberOfUndoStates(10)
        self.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentEditorContainer.layout().addWidget(self.segmentEditorWidget)
        self.ui.gatePlotWidget.setMRMLPlotViewNode(self.logic.gatePlotViewNode())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.modelFileButton.connect("clicked(bool)", self.onModelFileButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.taskComboBox.connect("currentIndexChanged(int)", self.onTaskSelected)
        self.ui.forceExpertComboBox.connect("currentIndexChanged(int)", self.onForcedExpertSelected)
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", self.onDatasetPathChanged)

        self.initializeParameterNode()
        self.populateModels()

    def cleanup(self) -> None:
        self._timer.stop()
        if self.logic is not None:
            self.logic.cancel(wait=True)
        self.removeObservers()

    def enter(self) -> None:
        self.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.segmentEditorWidget.setupViewObservations()
        self._observeRedSlice(True)
        self.initializeParameterNode()
        self.populateModels()

    def exit(self) -> None:
        self.segmentEditorWidget.setActiveEffect(None)
        self.segmentEditorWidget.removeViewObservations()
        self._observeRedSlice(False)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
            )

    def onReload(self) -> None:
        self.logic.cancel(wait=True)
        for name in ("volumes", "gate_review", "process", "feedback"):
            module = sys.modules.get(f"M4oESegmentationLib.{name}")
            if module is not None:
                importlib.reload(module)
        super().onReload()

    def onSceneStartClose(self, caller, event) -> None:
        # Results would land in a scene that no longer holds their input.
        self.logic.cancel(wait=True)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
            self.ui.gatePlotWidget.setMRMLPlotViewNode(self.logic.gatePlotViewNode())

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a SlicerParameterName property in the .ui are bound here; the model, task,
            # expert and dataset widgets have contents that depend on the model, so they are synced below.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
            )
            self.updateGUIFromParameterNode()

    # ------------------------------------------------------------------ GUI state

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self._parameterNode
            self._selectItemData(self.ui.modelComboBox, p.model or self.logic.defaultModel())
            if self._shownModel != p.model:
                self._showModelDetails(p.model)
            self._selectItemData(self.ui.taskComboBox, p.task)
            self._selectItemData(self.ui.forceExpertComboBox, p.forcedExpert)
            if self.ui.datasetPathLineEdit.currentPath != p.datasetPath:
                self.ui.datasetPathLineEdit.currentPath = p.datasetPath
            self.segmentEditorWidget.setSegmentationNode(p.outputSegmentation)
            self.segmentEditorWidget.setSourceVolumeNode(p.inputVolume)
            self._updateResultViews()
            self._updateButtons()
        finally:
            self._updatingGUI = False

    def _updateButtons(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self.logic.isRunning
        haveModel = self.ui.modelComboBox.currentIndex >= 0
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = running or bool(p.inputVolume and haveModel)
        self.ui.applyButton.toolTip = (
            _("Stop the segmentation.")
            if running
            else _("Segment the input volume.")
            if p.inputVolume
            else _("Select an input volume.")
        )
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.outputsCollapsibleButton.enabled = not running
        self.ui.compareButton.enabled = not running and bool(
            p.inputVolume and p.outputSegmentation and self.ui.forceExpertComboBox.currentData
        )
        self.ui.exportButton.enabled = not running and bool(
            p.inputVolume and p.outputSegmentation and p.datasetPath
        )

    def _updateResultViews(self) -> None:
        """Detected modality, gate table, chart, map and warning of the selected output segmentation."""
        segmentation = self._parameterNode.outputSegmentation
        self._gateReview = self.logic.gateReview(segmentation)
        review = self._gateReview
        modality = segmentation.GetAttribute(ATTRIBUTE + "Modality") if segmentation else None
        source = segmentation.GetAttribute(ATTRIBUTE + "ModalitySource") if segmentation else None
        self.ui.detectedModalityLabel.text = f"{modality.upper()} ({source})" if modality else ""
        self.ui.expertTableView.setMRMLTableNode(review.table if review else None)
        self.ui.gatePlotWidget.mrmlPlotViewNode().SetPlotChartNodeID(review.chart.GetID() if review else None)
        self.ui.routingWarningLabel.text = (review.warning or "") if review else ""
        self.ui.gateLegendLabel.text = self._legendHtml(review)
        self.ui.showGateOverlayCheckBox.enabled = bool(review and review.overlay)
        self.logic.showGateOverlay(review.overlay if review else None, self._parameterNode.showGateOverlay)
        self._onRedSliceModified()

    @staticmethod
    def _legendHtml(review) -> str:
        if review is None:
            return ""
        from M4oESegmentationLib import gate_review

        swatches = []
        for n, text in enumerate(gate_review.expert_legend(review.summary)):
            r, g, b = (int(255 * c) for c in gate_review.expert_color(n))
            swatches.append(f'<span style="color: rgb({r},{g},{b});">&#9632;</span>&nbsp;{text}')
        return "&nbsp;&nbsp;".join(swatches)

    @staticmethod
    def _selectItemData(comboBox, value) -> None:
        index = comboBox.findData(value)
        if index >= 0 and comboBox.currentIndex != index:
            comboBox.currentIndex = index

    # ------------------------------------------------------------------ models

    def populateModels(self) -> None:
        """Fill the model list: embedded, downloaded and registered models, plus a chosen card."""
        if self._parameterNode is None:
            return
        try:
            entries = self.logic.availableModels()
            error = None
        except ValueError as exc:  # a broken model registry
            entries, error = [], str(exc)
        items = [
            (e.name, e.name if e.downloaded else _("{name} (downloads when used)").format(name=e.name))
            for e in entries
        ]
        model = self._parameterNode.model
        if model and model not in [data for data, _text in items]:
            path = pathlib.Path(model)  # a model folder, or its card
            items.append((model, (path.parent.name if path.suffix == ".json" else path.name) or model))
        self._fillComboBox(self.ui.modelComboBox, items)
        self._shownModel = None
        self.updateGUIFromParameterNode()
        if error:
            self.ui.modelInfoLabel.text = error

    def _showModelDetails(self, model) -> None:
        """Task and expert lists and the description, from the model card (not the parameters)."""
        self._shownModel = model
        try:
            card = self.logic.modelCard(model)
            error = None
        except ValueError as exc:
            card, error = None, str(exc)
        tasks = [(t["name"], t["name"]) for t in card.get("tasks", [])] if card else []
        experts = (
            [(e["name"], f"{e['name']} ({e['modality'].upper()})") for e in card.get("experts", [])]
            if card
            else []
        )
        self._fillComboBox(self.ui.taskComboBox, tasks)
        self._fillComboBox(self.ui.forceExpertComboBox, experts)
        if card is None:
            info = error or _("The model is downloaded and verified when you click Apply.")
        else:
            info = card.get("description", "")
            if card.get("notes"):
                info += f"<br><b>{card['notes']}</b>"
        self.ui.modelInfoLabel.text = info

    def onModelFileButton(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Select a model card"), "", _("M4oE model card (*.json)")
        )
        if path:
            self._parameterNode.model = path
            self.populateModels()

    def onModelSelected(self, index=None) -> None:
        if self._parameterNode is None or self._updatingGUI:
            return
        model = self.ui.modelComboBox.currentData or ""
        if model == self.logic.defaultModel():
            model = ""
        if self._parameterNode.model != model:
            # Another model has other tasks and experts: start from its first ones.
            with slicer.util.NodeModify(self._parameterNode.parameterNode):
                self._parameterNode.model = model
                self._parameterNode.task = ""
                self._parameterNode.forcedExpert = ""

    def onTaskSelected(self, index=None) -> None:
        if self._parameterNode is not None and not self._updatingGUI:
            self._parameterNode.task = self.ui.taskComboBox.currentData or ""

    def onForcedExpertSelected(self, index=None) -> None:
        if self._parameterNode is not None and not self._updatingGUI:
            self._parameterNode.forcedExpert = self.ui.forceExpertComboBox.currentData or ""
        self._updateButtons()

    def onDatasetPathChanged(self, path) -> None:
        if self._parameterNode is not None and not self._updatingGUI:
            self._parameterNode.datasetPath = path

    @staticmethod
    def _fillComboBox(comboBox, items) -> None:
        current = comboBox.currentData
        wasBlocked = comboBox.blockSignals(True)
        try:
            comboBox.clear()
            for data, text in items:
                comboBox.addItem(text, data)
            comboBox.currentIndex = max(comboBox.findData(current), 0) if items else -1
        finally:
            comboBox.blockSignals(wasBlocked)

    # ------------------------------------------------------------------ run

    def onApplyButton(self) -> None:
        if self.logic.isRunning:
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        self._start(forceExpert=None)

    def onCompareButton(self) -> None:
        self._start(forceExpert=self.ui.forceExpertComboBox.currentData)

    def _start(self, forceExpert) -> None:
        p = self._parameterNode
        self.ui.errorLabel.text = ""
        self.ui.statusLabel.text = _("Starting...")
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        try:
            self.logic.setupPythonRequirements(confirm=True)
            self.logic.ensureModel(p.model, onProgress=self._onDownloadProgress)
            self.logic.startSegmentation(
                p.inputVolume,
                None if forceExpert else p.outputSegmentation,
                modality=p.modality,
                model=p.model,
                task=p.task,
                device=p.device,
                forceExpert=forceExpert,
                comparedWith=p.outputSegmentation if forceExpert else None,
                replaceExisting=p.replaceExisting,
                onProgress=self._onProgress,
                onFinished=self._onFinished,
            )
        except Exception as error:
            logging.exception("M4oE segmentation could not start")
            self._showError(str(error))
            return
        self._timer.start()
        self._updateButtons()

    def _onTimer(self) -> None:
        if not self.logic.poll():
            self._timer.stop()

    def _onDownloadProgress(self, done, total) -> None:
        if total:
            self.ui.progressBar.value = int(100 * done / total)
        self.ui.statusLabel.text = _("Downloading the model: {mb:.0f} MB").format(mb=done / 1e6)
        slicer.app.processEvents()

    def _onProgress(self, record) -> None:
        if record.get("stage") == "log":
            return
        fraction = overallFraction(record)
        if fraction is not None:
            self.ui.progressBar.value = round(100 * fraction)
        self.ui.statusLabel.text = progressText(record)

    def _onFinished(self, result, error) -> None:
        self.ui.progressBar.hide()
        if error:
            self._showError(error)
        elif result.comparedWith is not None:
            self.ui.statusLabel.text = _("{name}: shown as outlines over the result.").format(
                name=result.segmentation.GetName()
            )
        else:
            self.ui.statusLabel.text = _("Done in {duration}.").format(
                duration=humanDuration(result.seconds.get("total", 0.0))
            )
            if self._parameterNode is not None:
                self._parameterNode.outputSegmentation = result.segmentation
        self._updateButtons()
        self.updateGUIFromParameterNode()

    def _showError(self, message) -> None:
        self.ui.progressBar.hide()
        cancelled = message == M4oESegmentationLogic.CANCELLED
        self.ui.statusLabel.text = _("Cancelled.") if cancelled else _("Failed.")
        self.ui.errorLabel.text = "" if cancelled else message
        self._updateButtons()

    # ------------------------------------------------------------------ gate review

    def _observeRedSlice(self, observe) -> None:
        if self._redSliceNode is not None:
            self.removeObserver(self._redSliceNode, vtk.vtkCommand.ModifiedEvent, self._onRedSliceModified)
            self._redSliceNode = None
        layoutManager = slicer.app.layoutManager()
        if observe and layoutManager and layoutManager.sliceWidget("Red"):
            self._redSliceNode = layoutManager.sliceWidget("Red").mrmlSliceNode()
            self.addObserver(self._redSliceNode, vtk.vtkCommand.ModifiedEvent, self._onRedSliceModified)

    def _onRedSliceModified(self, caller=None, event=None) -> None:
        """Move the chart's marker to the red slice, and show that slice's expert weights."""
        review = self._gateReview
        if review is None or self._redSliceNode is None:
            self.ui.gateSliceLabel.text = ""
            return
        from M4oESegmentationLib import gate_review

        # The center of an axial slice view: RAS S, which is the summary's LPS z.
        position = self._redSliceNode.GetSliceToRAS().GetElement(2, 3)
        try:
            index = gate_review.update_slice_marker(review.chart, review.summary, position)
        except ValueError as error:  # the user removed the chart's marker
            self.ui.gateSliceLabel.text = str(error)
            return
        entry = next(s for s in review.summary["per_slice"] if int(s["index"]) == index)
        weights = ", ".join(f"{name} {w:.2f}" for name, w in entry["mean_weights"].items())
        self.ui.gateSliceLabel.text = _("Slice {index} (S {position:.1f} mm): {weights}").format(
            index=index, position=float(entry["position_mm"]), weights=weights
        )

    # ------------------------------------------------------------------ export

    def onExportButton(self) -> None:
        p = self._parameterNode
        self.ui.exportStatusLabel.text = ""
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            case = self.logic.exportCase(
                p.inputVolume,
                p.outputSegmentation,
                p.datasetPath,
                modality=None if p.modality == "Auto" else p.modality,
                model=p.model,
                task=p.task,
            )
            message = _("Saved case {case} in {folder}.")
            self.ui.exportStatusLabel.text = message.format(case=case, folder=p.datasetPath)


#
# M4oESegmentationLogic
#


@dataclass
class SegmentationResult:
    """What one run produced: the segmentation node and how it was made.

    ``modality``: "ct" or "mr", the one the engine used; ``modalitySource``: how it was decided.
    ``seconds``: the engine's timings (load, preprocess, inference, total...). ``comparedWith``:
    the segmentation a forced-expert run is compared with, else None.
    """

    segmentation: object
    modality: str
    modalitySource: str
    task: str
    seconds: dict
    comparedWith: object = None


@dataclass
class GateReview:
    """A result's gate views: the summary dict and its table, chart, map and colour nodes."""

    summary: dict
    table: object
    chart: object
    overlay: object
    colors: object
    warning: str | None


@dataclass
class _Job:
    """A running segmentation: its process, temporary folder, and what to do with the result."""

    process: object
    workspace: object
    inputVolume: object
    segmentation: object  # the node to fill, or None for a new one named segmentationName
    segmentationName: str
    labels: list
    model: str
    task: str
    modalitySource: str | None  # overrides the engine's when the module chose the modality
    forceExpert: str | None
    comparedWith: object
    onProgress: object
    onFinished: object


class M4oESegmentationLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable without its GUI (e.g. from the Python console).

    One segmentation runs at a time: :meth:`startSegmentation` starts it, :meth:`poll` (from a
    timer, or the loop of :meth:`process`) forwards progress and loads the result when it ends.
    """

    CANCELLED = "cancelled"

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._job = None

    def getParameterNode(self):
        return M4oESegmentationParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        return self._job is not None

    # ------------------------------------------------------------------ Python packages

    def setupPythonRequirements(self, confirm: bool = True) -> None:
        """Install PyTorch (through the PyTorch extension) and the engine's packages if missing.

        ``confirm``: ask the user before installing. Raises RuntimeError when the PyTorch
        extension is missing or the user declines.
        """
        self._ensureTorch(confirm)
        self._ensurePackages(confirm)

    @staticmethod
    def _ensureTorch(confirm: bool) -> None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError(
                _("M4oE Segmentation needs the PyTorch extension: install it from the Extensions Manager.")
            ) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            if (
                torchLogic.installTorch(askConfirmation=confirm, torchVersionRequirement=TORCH_REQUIREMENT)
                is None
            ):
                raise RuntimeError(_("PyTorch is needed for M4oE Segmentation and was not installed."))
            return
        from packaging.specifiers import SpecifierSet

        version = importlib.metadata.version("torch")
        if version not in SpecifierSet(TORCH_REQUIREMENT, prereleases=True):
            raise RuntimeError(
                _(
                    "PyTorch {version} is installed; M4oE Segmentation needs torch{required}. "
                    "Use the PyTorch Utils module to install a matching version."
                ).format(version=version, required=TORCH_REQUIREMENT)
            )

    @staticmethod
    def _ensurePackages(confirm: bool) -> None:
        """The engine's pip packages (:data:`PYTHON_REQUIREMENTS`), never replacing Slicer's or torch."""
        for moduleName in ("slicer.packaging", "slicer.pydeps"):  # Slicer >= 5.11 names it either way
            try:
                pipEnsure = importlib.import_module(moduleName).pip_ensure
            except (ImportError, AttributeError):
                continue
            pipEnsure(
                list(PYTHON_REQUIREMENTS),
                skip_packages=list(PIP_SKIP_PACKAGES),
                prompt_install=confirm,
                requester="M4oE Segmentation",
            )
            return
        from packaging.requirements import Requirement

        def satisfied(text):
            requirement = Requirement(text)
            try:
                installed = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                return False
            return requirement.specifier.contains(installed, prereleases=True)

        missing = [text for text in PYTHON_REQUIREMENTS if not satisfied(text)]
        if not missing:
            return
        if confirm and not slicer.util.confirmOkCancelDisplay(
            _(
                "M4oE Segmentation needs these Python packages: {packages}. Install them now? "
                "This needs a network connection and may take a few minutes."
            ).format(packages=", ".join(missing)),
            _("Install Python packages"),
        ):
            raise RuntimeError(_("The Python packages M4oE Segmentation needs were not installed."))
        slicer.util.pip_install(missing)

    # ------------------------------------------------------------------ models

    @staticmethod
    def defaultModel() -> str:
        from m4oe.hub import DEFAULT_MODEL

        return DEFAULT_MODEL

    @staticmethod
    def availableModels() -> list:
        """``m4oe.hub.ModelEntry`` of every embedded, downloaded and registered model.

        Raises ValueError (``m4oe.errors.ModelError``) for an unreadable model registry."""
        from m4oe import hub

        return hub.list_models()

    def modelCard(self, model: str | None) -> dict | None:
        """The model card (``model.json``) of a model name or card path as a dict; None when the
        model is registered but not downloaded yet. Raises ValueError for an unknown model."""
        from m4oe import hub
        from m4oe.errors import ModelError

        name = model or self.defaultModel()
        if any(e.name == name and not e.downloaded for e in self.availableModels()):
            return None
        try:
            path = pathlib.Path(hub.resolve_model(model or None))
        except ModelError as error:
            raise ValueError(str(error)) from None
        cardPath = path / "model.json" if path.is_dir() else path.with_suffix(".json")
        try:
            return json.loads(cardPath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read the model card {cardPath}: {error}") from None

    def ensureModel(self, model: str | None, onProgress=None) -> None:
        """Download and verify a registered model that is not downloaded yet (blocking).

        ``onProgress(bytesDone, bytesTotal or None)`` is called as data arrives.
        """
        from m4oe import hub

        name = model or self.defaultModel()
        if any(e.name == name and not e.downloaded for e in self.availableModels()):
            hub.download_model(name, progress=onProgress)

    # ------------------------------------------------------------------ segmentation

    def startSegmentation(
        self,
        inputVolume,
        outputSegmentation=None,
        *,
        modality: str = "auto",
        model: str | None = None,
        task: str | None = None,
        device: str = "auto",
        forceExpert: str | None = None,
        comparedWith=None,
        replaceExisting: bool = False,
        onProgress=None,
        onFinished=None,
    ):
        """Start segmenting ``inputVolume`` in a separate process; return the ``InferenceProcess``.

        Args:
            inputVolume: scalar volume node (CT in HU, or MR).
            outputSegmentation: segmentation node whose segments the result replaces when
                ``replaceExisting``; otherwise a new segmentation node is created in the input's study.
            modality: "auto" (detected), "ct" or "mr" (any case).
            model: model name or card path; None or "" is the embedded default.
            task: the model's label set; None or "" is its first.
            device: "auto", "cpu", "cuda" or "cuda:N".
            forceExpert: route every token to this expert (name), without gate views.
            comparedWith: for a forced-expert run, the result it is compared with: the comparison
                is kept in that segmentation's ``M4oEComparison.{expert}`` reference, replaced on rerun.
            onProgress(record): each progress record of the engine (see ``M4oESegmentationLib.process``).
            onFinished(result, error): once, with a :class:`SegmentationResult` or an error message
                (:attr:`CANCELLED` after :meth:`cancel`).
        Raises RuntimeError while another segmentation runs, ValueError for bad arguments.
        """
        from M4oESegmentationLib import process, volumes

        if self._job is not None:
            raise RuntimeError(_("A segmentation is already running."))
        if inputVolume is None:
            raise ValueError(_("Select an input volume."))
        card = self.modelCard(model)
        if card is None:
            raise ValueError(_("Model {model} is not downloaded yet.").format(model=model))
        taskName, labels = labelsFromCard(card, task)
        if forceExpert and forceExpert not in [e["name"] for e in card.get("experts", [])]:
            raise ValueError(f"model {card.get('name')!r} has no expert {forceExpert!r}")
        segmentation = outputSegmentation if replaceExisting else None
        if forceExpert and comparedWith is not None:
            segmentation = comparedWith.GetNodeReference(COMPARISON_ROLE + forceExpert)
        name = ""
        if segmentation is None:
            base = f"{inputVolume.GetName()} M4oE" + (f" {forceExpert} expert only" if forceExpert else "")
            name = slicer.mrmlScene.GenerateUniqueName(base)
        modality, modalitySource = modality.lower(), None
        dicomModality = self.dicomModality(inputVolume) if modality == "auto" else None
        if dicomModality:
            # The volume file written for the engine has no DICOM tags; pass on what the study says.
            modality, modalitySource = dicomModality, "DICOM Modality tag"

        import SimpleITK as sitk

        workspace = process.TemporaryWorkspace()
        try:
            sitk.WriteImage(volumes.volume_node_to_sitk(inputVolume), str(workspace.input_path), False)
            request = process.InferenceRequest(
                workspace.input_path,
                workspace.output_path,
                model=model or None,
                modality=modality,
                task=taskName,
                device=device,
                gates_dir=None if forceExpert else workspace.gates_dir,
                force_expert=forceExpert or None,
            )
            inference = process.InferenceProcess()
            inference.start(
                process.build_command(request, process.default_python()),
                env=process.engine_environment(MODULE_DIR),
            )
        except BaseException:
            workspace.cleanup()
            raise
        self._job = _Job(
            process=inference,
            workspace=workspace,
            inputVolume=inputVolume,
            segmentation=segmentation,
            segmentationName=name,
            labels=labels,
            model=model or self.defaultModel(),
            task=taskName,
            modalitySource=modalitySource,
            forceExpert=forceExpert or None,
            comparedWith=comparedWith,
            onProgress=onProgress,
            onFinished=onFinished,
        )
        return inference

    @staticmethod
    def dicomModality(volume) -> str | None:
        """The modality ("ct" or "mr") of the DICOM series a volume was loaded from, else None."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        item = shNode.GetItemByDataNode(volume) if shNode else 0
        if not item:
            return None
        tag = shNode.GetItemAttribute(
            item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
        )
        return {"CT": "ct", "MR": "mr"}.get(tag.strip().upper())

    def poll(self) -> bool:
        """Forward the running segmentation's new progress; load its result once it has ended.

        Returns whether it is still running. Call every :data:`POLL_INTERVAL_MS` ms.
        """
        job = self._job
        if job is None:
            return False
        for record in job.process.poll():
            if record.get("stage") == "log":
                logging.info("m4oe: %s", record.get("message", ""))
            elif job.onProgress is not None and record.get("stage") not in ("done", "error"):
                job.onProgress(record)
        if job.process.running:
            return True
        self._job = None
        result, error = None, None
        try:
            if job.process.cancelled:
                error = self.CANCELLED
            elif job.process.returncode != 0 or job.process.result is None:
                error = job.process.error or f"the engine stopped with exit code {job.process.returncode}"
            else:
                result = self.loadResults(job)
        except Exception as exc:
            logging.exception("M4oE segmentation: loading the result failed")
            error = str(exc)
        finally:
            job.workspace.cleanup()
        if job.onFinished is not None:
            job.onFinished(result, error)
        return False

    def cancel(self, wait: bool = False) -> None:
        """Stop the running segmentation (kills the engine's process tree).

        The next :meth:`poll` reports it to ``onFinished``; with ``wait`` that happens here.
        """
        if self._job is not None:
            self._job.process.cancel()
        while wait and self.poll():
            time.sleep(0.05)

    def process(self, inputVolume, outputSegmentation=None, *, waitForCompletion: bool = True, **options):
        """Segment ``inputVolume`` (options as :meth:`startSegmentation`).

        Returns the :class:`SegmentationResult`, or the ``InferenceProcess`` when not
        ``waitForCompletion`` (then call :meth:`poll` until it returns False). Raises RuntimeError
        with the engine's message when the segmentation fails.
        """
        outcome = {}
        options["onFinished"] = lambda result, error: outcome.update(result=result, error=error)
        inference = self.startSegmentation(inputVolume, outputSegmentation, **options)
        if not waitForCompletion:
            return inference
        while self.poll():
            slicer.app.processEvents()
            time.sleep(POLL_INTERVAL_MS / 1000)
        if outcome["error"]:
            raise RuntimeError(outcome["error"])
        return outcome["result"]

    def loadResults(self, job) -> SegmentationResult:
        """The finished job's label map as a segmentation (and its gate views), shown in 2D and 3D."""
        import SimpleITK as sitk
        from M4oESegmentationLib import volumes

        done = job.process.result
        outputs = done["outputs"]
        modalitySource = job.modalitySource or done.get("modality_source", "")
        labelmap = sitk.ReadImage(outputs["segmentation"])
        segmentation = volumes.labelmap_to_segmentation(
            labelmap,
            job.labels,
            job.inputVolume,
            segmentation_node=job.segmentation,
            name=job.segmentationName,
        )
        attributes = {
            "Labels": json.dumps([label.to_dict() for label in job.labels]),
            "Modality": done.get("modality", ""),
            "ModalitySource": modalitySource,
            "Model": job.model,
            "Task": job.task,
            "ForcedExpert": job.forceExpert or "",
        }
        for key, value in attributes.items():
            segmentation.SetAttribute(ATTRIBUTE + key, value)
        self._removeGateViews(segmentation)
        if "gate_summary" in outputs:
            self._loadGateViews(segmentation, job.inputVolume, outputs)
        if job.comparedWith is not None:
            job.comparedWith.SetNodeReferenceID(COMPARISON_ROLE + job.forceExpert, segmentation.GetID())
            segmentation.GetDisplayNode().SetVisibility2DFill(False)  # outlines over the result's fill
        self.showSegmentation(segmentation, job.inputVolume)
        return SegmentationResult(
            segmentation,
            done.get("modality", ""),
            modalitySource,
            job.task,
            done.get("seconds", {}),
            job.comparedWith,
        )

    def _loadGateViews(self, segmentation, inputVolume, outputs) -> None:
        import SimpleITK as sitk
        from M4oESegmentationLib import gate_review, volumes

        summaryText = pathlib.Path(outputs["gate_summary"]).read_text(encoding="utf-8")
        summary = json.loads(summaryText)
        name = segmentation.GetName()
        table = gate_review.expert_table(summary, scene=slicer.mrmlScene)
        chart = gate_review.expert_plot(summary, scene=slicer.mrmlScene)
        overlay, colors = gate_review.gate_overlay(
            sitk.ReadImage(outputs["gate_map"]), summary, scene=slicer.mrmlScene
        )
        table.SetName(f"{name} expert per segment")
        chart.SetName(f"{name} gate weight per slice")
        overlay.SetName(f"{name} dominant expert")
        overlay.SetAttribute(ATTRIBUTE + "Role", GATE_MAP_ROLE)
        for node in (table, overlay):
            volumes.place_in_study(node, inputVolume)
        segmentation.SetAttribute(ATTRIBUTE + "GateSummary", summaryText)
        for role, node in zip(GATE_ROLES, (table, chart, overlay, colors), strict=True):
            segmentation.SetNodeReferenceID("M4oEGate" + role, node.GetID())

    @staticmethod
    def _removeGateViews(segmentation) -> None:
        """Remove the gate views of a previous result in this segmentation node (it is replaced)."""
        from M4oESegmentationLib import gate_review

        chart = segmentation.GetNodeReference("M4oEGateChart")
        if chart is not None:
            gate_review.remove_gate_nodes(chart)
        for role in GATE_ROLES:
            node = segmentation.GetNodeReference("M4oEGate" + role)
            if node is not None and node.GetScene() is not None:
                # Removing a volume leaves its display node in the scene: remove that too.
                if node.IsA("vtkMRMLDisplayableNode"):
                    displays = [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())]
                    for display in filter(None, displays):
                        slicer.mrmlScene.RemoveNode(display)
                slicer.mrmlScene.RemoveNode(node)
            segmentation.RemoveNodeReferenceIDs("M4oEGate" + role)
        segmentation.RemoveAttribute(ATTRIBUTE + "GateSummary")

    @staticmethod
    def gateReview(segmentation) -> GateReview | None:
        """The gate views of a result segmentation, or None (no segmentation, forced run, other origin)."""
        if segmentation is None or not segmentation.GetAttribute(ATTRIBUTE + "GateSummary"):
            return None
        nodes = [segmentation.GetNodeReference("M4oEGate" + role) for role in GATE_ROLES]
        if nodes[0] is None or nodes[1] is None:
            return None
        try:
            from M4oESegmentationLib import gate_review
        except ImportError as error:  # a saved result opened before the engine's packages are installed
            logging.warning("M4oE gate review needs the engine's Python packages: %s", error)
            return None

        summary = json.loads(segmentation.GetAttribute(ATTRIBUTE + "GateSummary"))
        return GateReview(summary, *nodes, gate_review.routing_warning(summary))

    # ------------------------------------------------------------------ views

    @staticmethod
    def showSegmentation(segmentation, inputVolume) -> None:
        """Show the input with the segmentation in the slice views and as surfaces in 3D."""
        slicer.util.setSliceViewerLayers(background=inputVolume, fit=False)
        segmentation.CreateClosedSurfaceRepresentation()
        segmentation.GetDisplayNode().SetVisibility(True)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.threeDWidget(0) is not None:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    @staticmethod
    def showGateOverlay(overlay, show: bool) -> None:
        """Show (or hide) a dominant-expert map as the foreground of the red, yellow, green views.

        Hiding clears the foreground only where it is a M4oE gate map, not another volume.
        """
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            if composite.GetLayoutName() not in SLICE_VIEWS:
                continue
            if show and overlay is not None:
                composite.SetForegroundVolumeID(overlay.GetID())
                composite.SetForegroundOpacity(OVERLAY_OPACITY)
                continue
            foreground = slicer.mrmlScene.GetNodeByID(composite.GetForegroundVolumeID() or "")
            if foreground is not None and foreground.GetAttribute(ATTRIBUTE + "Role") == GATE_MAP_ROLE:
                composite.SetForegroundVolumeID(None)

    @staticmethod
    def gatePlotViewNode():
        """The plot view node of the module's embedded chart (one per scene)."""
        node = slicer.mrmlScene.GetSingletonNode("M4oESegmentationGatePlot", "vtkMRMLPlotViewNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLPlotViewNode")
            node.UnRegister(None)
            node.SetSingletonTag("M4oESegmentationGatePlot")
            node = slicer.mrmlScene.AddNode(node)
        return node

    @staticmethod
    def segmentEditorNode():
        """The scene's Segment Editor node, shared with the Segment Editor module."""
        node = slicer.mrmlScene.GetSingletonNode(SEGMENT_EDITOR_SINGLETON, "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag(SEGMENT_EDITOR_SINGLETON)
            node = slicer.mrmlScene.AddNode(node)
        return node

    # ------------------------------------------------------------------ export

    def exportCase(
        self, inputVolume, segmentation, datasetPath, *, modality=None, model=None, task=None, caseName=None
    ):
        """Save the volume and the (edited) segmentation as a new case of a training dataset.

        Labels and modality come from the segmentation when M4oE made it; otherwise from the model
        card (``model``, ``task``) and ``modality`` ("CT" or "MR"). Returns the case name.
        """
        from M4oESegmentationLib import feedback, volumes

        if not datasetPath:
            raise ValueError(_("Choose the dataset folder to export to."))
        labelsText = segmentation.GetAttribute(ATTRIBUTE + "Labels")
        if labelsText:
            from m4oe.labels import Label

            labels = [Label.from_dict(label) for label in json.loads(labelsText)]
        else:
            card = self.modelCard(model)
            if card is None:
                raise ValueError(_("Model {model} is not downloaded yet.").format(model=model))
            labels = labelsFromCard(card, task)[1]
        modality = segmentation.GetAttribute(ATTRIBUTE + "Modality") or (modality or "").lower()
        if modality not in ("ct", "mr"):
            raise ValueError(_("Select the modality (CT or MR) of the exported volume."))
        return feedback.export_case(
            volumes.volume_node_to_sitk(inputVolume),
            volumes.segmentation_to_labelmap(segmentation, inputVolume, labels),
            labels,
            datasetPath,
            modality=modality,
            case_name=caseName,
        )

    # ------------------------------------------------------------------ sample data

    def createPhantomVolume(self, sequence: str = "ct", seed: int = 0, maxSize: int | None = None, name=None):
        """A synthetic abdomen from ``m4oe.phantom`` as a volume node (sequence "ct", "t1" or "t2")."""
        self._ensurePackages(confirm=True)
        from M4oESegmentationLib import volumes

        from m4oe.phantom import generate_case

        image, _labels = generate_case(sequence, seed, max_size=maxSize)
        node = volumes.sitk_to_volume_node(
            image, name or f"M4oEPhantom{sequence.upper()}", scene=slicer.mrmlScene
        )
        self._setDefaultWindow(node, sequence)
        return node

    def loadPhantomSample(self, sampleName: str):
        """Load a :data:`PHANTOM_SAMPLES` volume, generating it into the Sample Data cache first."""
        sequence, seed = PHANTOM_SAMPLES[sampleName]
        path = phantomSamplePath(sampleName)
        if not path.exists():
            self._ensurePackages(confirm=True)
            import SimpleITK as sitk

            from m4oe.phantom import generate_case

            image, _labels = generate_case(sequence, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial.nrrd")
            sitk.WriteImage(image, str(partial), True)
            os.replace(partial, path)  # never leaves a half-written file for the cache to reuse
        node = slicer.util.loadVolume(str(path), {"name": sampleName})
        self._setDefaultWindow(node, sequence)
        return node

    @staticmethod
    def _setDefaultWindow(node, sequence) -> None:
        if sequence == "ct":  # abdomen soft-tissue window
            node.GetDisplayNode().SetAutoWindowLevel(False)
            node.GetDisplayNode().SetWindowLevel(400, 40)


#
# M4oESegmentationTest
#


class M4oESegmentationTest(ScriptedLoadableModuleTest):
    """The whole workflow on a small phantom CT with the embedded model, in a real Slicer.

    Needs the PyTorch extension, the engine's pip packages and the embedded model
    (``m4oe/models/m4oe-phantom``); runs on the CPU in well under a minute.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentReviewExport()
        self.setUp()
        self.test_Cancel()

    def test_SegmentReviewExport(self):
        self.delayDisplay("Segmenting a phantom CT")
        logic = M4oESegmentationLogic()
        logic.setupPythonRequirements(confirm=False)
        volume = logic.createPhantomVolume("ct", seed=3, maxSize=64)
        fractions = []
        result = logic.process(
            volume, modality="auto", device="cpu", onProgress=lambda r: fractions.append(overallFraction(r))
        )
        segmentation = result.segmentation
        self.assertEqual(result.modality, "ct")
        self.assertTrue(fractions and max(f for f in fractions if f is not None) > 0.9)
        card = logic.modelCard(None)
        _task, labels = labelsFromCard(card, None)
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), len(labels))
        self.assertEqual(
            segmentation.GetSegmentation().GetNthSegment(0).GetName(),
            labels[0].name,
            "segments follow the card",
        )
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        self.assertEqual(
            shNode.GetItemParent(shNode.GetItemByDataNode(segmentation)),
            shNode.GetItemParent(shNode.GetItemByDataNode(volume)),
            "result in the input's study",
        )

        self.delayDisplay("Gate review")
        review = logic.gateReview(segmentation)
        self.assertIsNotNone(review)
        self.assertEqual(review.chart.GetNumberOfPlotSeriesNodes(), len(review.summary["experts"]) + 1)
        logic.showGateOverlay(review.overlay, True)
        red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(red.GetForegroundVolumeID(), review.overlay.GetID())
        logic.showGateOverlay(review.overlay, False)
        self.assertIsNone(red.GetForegroundVolumeID())

        self.delayDisplay("Forced-expert comparison")
        expert = card["experts"][0]["name"]
        comparison = logic.process(
            volume, modality="auto", device="cpu", forceExpert=expert, comparedWith=segmentation
        )
        self.assertEqual(
            segmentation.GetNodeReferenceID(COMPARISON_ROLE + expert), comparison.segmentation.GetID()
        )
        self.assertIsNone(logic.gateReview(comparison.segmentation))

        self.delayDisplay("Export for training")
        datasetDir = pathlib.Path(slicer.app.temporaryPath) / f"M4oESegmentationTest-{os.getpid()}"
        case = logic.exportCase(volume, segmentation, str(datasetDir))
        self.assertTrue((datasetDir / "labelsTr" / f"{case}.nii.gz").is_file())
        self.assertEqual(json.loads((datasetDir / "dataset.json").read_text())["modality"], "ct")
        self.delayDisplay("Test passed")

    def test_Cancel(self):
        logic = M4oESegmentationLogic()
        volume = logic.createPhantomVolume("t1", seed=4)
        finished = []
        logic.startSegmentation(volume, device="cpu", onFinished=lambda result, error: finished.append(error))
        logic.cancel()
        while logic.poll():
            time.sleep(0.05)
        self.assertEqual(finished, [M4oESegmentationLogic.CANCELLED])
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 0)
