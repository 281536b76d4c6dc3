"""M4oE Segmentation: abdominal organs on CT and MRI with a mixture of modality experts, in 3D Slicer.

The GUI layer only (DESIGN.md, "The Slicer module"): the panel, its parameter node, and a Logic
that adapts ``M4oESegmentationLib`` to Slicer's conventions (camelCase, the application's event
loop, the layout's views). Inference runs in a separate ``PythonSlicer -m m4oe.cli segment``
process that a ``qt.QTimer`` polls (``M4oESegmentationLib.segmenter``), so the GUI never waits on
PyTorch. At load time this file imports only what a fresh Slicer has, and the parts of
``M4oESegmentationLib`` that need nothing more (``dependencies``, ``models``, ``sample_data``,
``status``, ``views``; Testing/test_packaging.py checks it). PyTorch and the engine's pip packages
(timm, safetensors, slicerio, psutil) are installed on first use, after the user agrees, and the
rest of the library is imported after that.
"""

import importlib
import logging
import pathlib
import shutil
import sys
import time
from typing import Annotated

import qt
import slicer
import vtk
from M4oESegmentationLib import dependencies, models, sample_data, status, terminology, views
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = pathlib.Path(__file__).resolve().parent
CONTRIBUTORS = ["M4oE Segmentation contributors (SlicerM4oESegmentation)"]
"""The module's authors, as Slicer's module docs ask ("Name (Organization)"); the extension's
EXTENSION_CONTRIBUTORS (CMakeLists.txt) says the same (Testing/test_packaging.py)."""
MODALITY_CHOICES = ("Auto", "CT", "MR")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
BACKEND_CHOICES = ("torch", "onnx", "auto")
MODEL_SMOOTHING = -1.0
"""``smoothingMm`` value (the spin box's minimum, shown as its special text) for the model card's."""
POLL_INTERVAL_MS = 200
WARM_ENGINE_SETTING = "M4oESegmentation/WarmEngine"
"""Application setting: keep one engine process with the model loaded between runs (default on);
off starts a new ``m4oe segment`` process for every run."""
ENGINE_IDLE_SETTING = "M4oESegmentation/EngineIdleMinutes"
"""Application setting: minutes without a run after which the warm engine ends (default 10)."""
ENGINE_IDLE_MINUTES = 10.0
SAMPLE_CATEGORY = "M4oE Segmentation"
LIBRARY_MODULES = (
    "status",
    "models",
    "dependencies",
    "terminology",
    "views",
    "volumes",
    "gate_review",
    "process",
    "engine",
    "feedback",
    "sample_data",
    "segmenter",
    "batch",
)
"""M4oESegmentationLib modules, in the order Reload re-imports them (a module after those it uses)."""


#
# M4oESegmentation
#


class M4oESegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("M4oE Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Terminologies"]
        self.parent.contributors = CONTRIBUTORS
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
        slicer.app.connect("startupCompleted()", registerTerminology)


def registerTerminology():
    """Load the module's terminology context (the codes, colours and names of its segments) into
    Slicer's Terminologies module, so that Slicer shows the engine's segments with their meaning."""
    try:
        terminology.load_terminology(slicer.modules.terminologies.logic())
    except RuntimeError as error:
        logging.error(str(error))


def registerSampleData():
    """Phantom CT and MR volumes in the Sample Data module, generated locally when first loaded."""
    import SampleData

    icon = str(MODULE_DIR / "Resources" / "Icons" / "M4oESegmentation.png")
    for sampleName in sample_data.PHANTOM_SAMPLES:
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
    datasetPath: the training dataset folder that Export writes to. fastInference: one forward
    pass per slice instead of the model card's test-time augmentation. smoothingMm: sigma in mm of
    the Gaussian that averages class probabilities over neighbouring slices (0: off;
    MODEL_SMOOTHING: the model card's). keepAllPieces: keep every connected component of each
    segment instead of the card's clean-up. backend: the engine's network runtime. severalVolumes:
    Apply segments every volume checked in the batch list, each result next to its volume.
    skippedStructures: the task's structures left unchecked (comma-separated keys; "": all are
    segmented). roi: segment only inside this markups ROI (none: everywhere). bodyCrop: segment
    only the box around the body. gateLayer: the layer the gate review shows (a MoME model's
    decoder scale, e.g. "router.0"; "": the mean over them).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modality: Annotated[str, Choice(list(MODALITY_CHOICES))] = "Auto"
    model: str = ""
    task: str = ""
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    fastInference: bool = False
    smoothingMm: Annotated[float, WithinRange(MODEL_SMOOTHING, 20.0)] = MODEL_SMOOTHING
    keepAllPieces: bool = False
    backend: Annotated[str, Choice(list(BACKEND_CHOICES))] = "torch"
    skippedStructures: str = ""
    roi: vtkMRMLMarkupsROINode
    bodyCrop: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    replaceExisting: bool = False
    showGateOverlay: bool = False
    gateLayer: str = ""
    forcedExpert: str = ""
    datasetPath: str = ""
    severalVolumes: bool = False


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
        self.segmentEditorWidget.setMRMLSegmentEditorNode(views.segment_editor_node())
        self.ui.segmentEditorContainer.layout().addWidget(self.segmentEditorWidget)
        self.ui.gatePlotWidget.setMRMLPlotViewNode(views.gate_plot_view_node())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.modelFileButton.connect("clicked(bool)", self.onModelFileButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.taskComboBox.connect("currentIndexChanged(int)", self.onTaskSelected)
        self.ui.forceExpertComboBox.connect("currentIndexChanged(int)", self.onForcedExpertSelected)
        self.ui.gateLayerComboBox.connect("currentIndexChanged(int)", self.onGateLayerSelected)
        self.ui.structuresListWidget.connect("itemChanged(QListWidgetItem*)", self.onStructureToggled)
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", self.onDatasetPathChanged)
        self.ui.studyVolumesButton.connect("clicked(bool)", self.onStudyVolumesButton)
        self.ui.batchVolumesComboBox.connect("checkedNodesChanged()", self._updateButtons)
        # The warm engine process ends with Slicer (it would also end by itself when idle).
        slicer.app.connect("aboutToQuit()", self.logic.stopEngine)

        self.initializeParameterNode()
        self.populateModels()

    def cleanup(self) -> None:
        self._timer.stop()
        if self.logic is not None:
            self.logic.cancel(wait=True)
            self.logic.stopEngine()
        self.removeObservers()

    def enter(self) -> None:
        self.segmentEditorWidget.setMRMLSegmentEditorNode(views.segment_editor_node())
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
        self.logic.stopEngine()
        for name in LIBRARY_MODULES:
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
            self.segmentEditorWidget.setMRMLSegmentEditorNode(views.segment_editor_node())
            self.ui.gatePlotWidget.setMRMLPlotViewNode(views.gate_plot_view_node())

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
            self._selectItemData(self.ui.modelComboBox, p.model or models.default_model())
            if self._shownModel != p.model:
                self._showModelDetails(p.model)
            self._selectItemData(self.ui.taskComboBox, p.task)
            self._showStructures(p.model, p.task, p.skippedStructures)
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
        several = p.severalVolumes
        checked = len(self.ui.batchVolumesComboBox.checkedNodes()) if several else 0
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = running or bool((checked if several else p.inputVolume) and haveModel)
        self.ui.applyButton.toolTip = (
            _("Stop the segmentation.")
            if running
            else _("Segment the {n} checked volumes, one after another.").format(n=checked)
            if several
            else _("Segment the input volume.")
            if p.inputVolume
            else _("Select an input volume.")
        )
        self.ui.batchVolumesComboBox.enabled = several and not running
        self.ui.studyVolumesButton.enabled = several and not running and bool(p.inputVolume)
        self.ui.severalVolumesCheckBox.enabled = not running
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.outputsCollapsibleButton.enabled = not running
        self.ui.regionCollapsibleButton.enabled = not running
        self.ui.compareButton.enabled = not running and bool(
            p.inputVolume and p.outputSegmentation and self.ui.forceExpertComboBox.currentData
        )
        self.ui.exportButton.enabled = not running and bool(
            p.inputVolume and p.outputSegmentation and p.datasetPath
        )

    def _updateResultViews(self) -> None:
        """Modality, scan warning, gate table, chart, map and routing warning of the selected output."""
        segmentation = self._parameterNode.outputSegmentation
        self._gateReview = self.logic.gateReview(segmentation)
        review = self._gateReview
        self.ui.detectedModalityLabel.text = status.detected_modality_text(segmentation)
        self.ui.scanWarningLabel.text = status.scan_warning_text(segmentation)
        self.ui.expertTableView.setMRMLTableNode(review.table if review else None)
        self.ui.gatePlotWidget.mrmlPlotViewNode().SetPlotChartNodeID(review.chart.GetID() if review else None)
        self.ui.routingWarningLabel.text = (review.warning or "") if review else ""
        self.ui.gateLegendLabel.text = self.logic.gateLegend(review)
        self.ui.showGateOverlayCheckBox.enabled = bool(review and review.overlay)
        overlay = self._showGateLayer(review)
        views.show_gate_overlay(overlay, self._parameterNode.showGateOverlay)
        self._onRedSliceModified()

    def _showGateLayer(self, review):
        """Fill the router-scale list (MoME only, else hidden), show the chosen scale; return its map."""
        layers = review.layers if review else []
        self._fillComboBox(self.ui.gateLayerComboBox, layers)
        self.ui.gateLayerLabel.visible = self.ui.gateLayerComboBox.visible = bool(layers)
        if not layers:
            return review.overlay if review else None
        layer = self._parameterNode.gateLayer if self._parameterNode.gateLayer in dict(layers) else ""
        self._selectItemData(self.ui.gateLayerComboBox, layer)
        return review.show_layer(layer)

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
            entries, error = models.available_models(), None
        except ValueError as exc:  # a broken model registry
            entries, error = [], str(exc)
        self._fillComboBox(self.ui.modelComboBox, models.model_choices(entries, self._parameterNode.model))
        self._shownModel = None
        self.updateGUIFromParameterNode()
        if error:
            self.ui.modelInfoLabel.text = error

    def _showModelDetails(self, model) -> None:
        """Task and expert lists and the description, from the model card (not the parameters)."""
        self._shownModel = model
        try:
            card, error = models.model_card(model), None
        except ValueError as exc:
            card, error = None, str(exc)
        self._fillComboBox(self.ui.taskComboBox, models.task_choices(card))
        self._fillComboBox(self.ui.forceExpertComboBox, models.expert_choices(card))
        self.ui.modelInfoLabel.text = models.model_info(card, error)

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
        if model == models.default_model():
            model = ""
        if self._parameterNode.model != model:
            # Another model has other tasks and experts: start from its first ones.
            with slicer.util.NodeModify(self._parameterNode.parameterNode):
                self._parameterNode.model = model
                self._parameterNode.task = ""
                self._parameterNode.forcedExpert = ""
                self._parameterNode.skippedStructures = ""

    def onTaskSelected(self, index=None) -> None:
        if self._parameterNode is not None and not self._updatingGUI:
            task = self.ui.taskComboBox.currentData or ""
            if self._parameterNode.task != task:
                with slicer.util.NodeModify(self._parameterNode.parameterNode):
                    self._parameterNode.task = task
                    self._parameterNode.skippedStructures = ""

    def _showStructures(self, model, task, skipped) -> None:
        """The task's structures as a checkable list, the skipped ones unchecked."""
        try:
            choices = models.structure_choices(models.model_card(model), task or None)
        except ValueError:
            choices = []
        left_out = set(skipped.split(","))
        listWidget = self.ui.structuresListWidget
        wasBlocked = listWidget.blockSignals(True)
        try:
            listWidget.clear()
            for key, name in choices:
                item = qt.QListWidgetItem(name)
                item.setData(qt.Qt.UserRole, key)
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Unchecked if key in left_out else qt.Qt.Checked)
                listWidget.addItem(item)
        finally:
            listWidget.blockSignals(wasBlocked)

    def _structureKeys(self) -> tuple[list, list]:
        """(every structure key of the list, the checked ones)."""
        items = [self.ui.structuresListWidget.item(n) for n in range(self.ui.structuresListWidget.count)]
        keys = [item.data(qt.Qt.UserRole) for item in items]
        return keys, [k for k, item in zip(keys, items, strict=True) if item.checkState() == qt.Qt.Checked]

    def onStructureToggled(self, item=None) -> None:
        if self._parameterNode is not None and not self._updatingGUI:
            self._parameterNode.skippedStructures = models.skipped_text(*self._structureKeys())

    def onGateLayerSelected(self, index=None) -> None:
        if self._parameterNode is not None and not self._updatingGUI:
            self._parameterNode.gateLayer = self.ui.gateLayerComboBox.currentData or ""

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
        if self._parameterNode.severalVolumes:
            self._startBatch()
            return
        self._start(forceExpert=None)

    def onStudyVolumesButton(self) -> None:
        """Check the volumes of the input volume's study, and only those."""
        combo = self.ui.batchVolumesComboBox
        chosen = {node.GetID() for node in self.logic.studyVolumes(self._parameterNode.inputVolume)}
        for index in range(combo.nodeCount()):
            node = combo.nodeFromIndex(index)
            combo.setCheckState(node, qt.Qt.Checked if node.GetID() in chosen else qt.Qt.Unchecked)
        self._updateButtons()

    def _startBatch(self) -> None:
        p = self._parameterNode
        self.ui.errorLabel.text = ""
        self.ui.statusLabel.text = _("Starting...")
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        try:
            self.logic.setupPythonRequirements(confirm=True)
            self.logic.ensureModel(p.model, onProgress=self._onDownloadProgress)
            self.logic.startBatch(
                list(self.ui.batchVolumesComboBox.checkedNodes()),
                modality=p.modality,
                model=p.model,
                task=p.task,
                device=p.device,
                testTimePasses=1 if p.fastInference else None,
                throughPlaneSigmaMm=None if p.smoothingMm < 0 else p.smoothingMm,
                keepAllComponents=p.keepAllPieces,
                backend=p.backend,
                onProgress=self._onProgress,
                onFinished=self._onBatchFinished,
            )
        except Exception as error:
            logging.exception("M4oE segmentation of several volumes could not start")
            self._showError(str(error))
            return
        self._timer.start()
        self._updateButtons()

    def _onBatchFinished(self, outcomes) -> None:
        self.ui.progressBar.hide()
        done = [o for o in outcomes if o.result is not None]
        failed = [o for o in outcomes if o.error and o.error != status.CANCELLED]
        skipped = len(outcomes) - len(done) - len(failed)
        text = _("Segmented {done} of {n} volumes.").format(done=len(done), n=len(outcomes))
        if skipped:
            text += " " + _("{n} cancelled.").format(n=skipped)
        self.ui.statusLabel.text = text
        self.ui.errorLabel.text = "\n".join(f"{o.volume.GetName()}: {o.error}" for o in failed)
        if done and self._parameterNode is not None:
            self._parameterNode.outputSegmentation = done[-1].result.segmentation
        self._updateButtons()
        self.updateGUIFromParameterNode()

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
                testTimePasses=1 if p.fastInference else None,
                throughPlaneSigmaMm=None if p.smoothingMm < 0 else p.smoothingMm,
                keepAllComponents=p.keepAllPieces,
                backend=p.backend,
                structures=models.checked_structures(self._structureKeys()[0], p.skippedStructures),
                roi=p.roi,
                bodyCrop=p.bodyCrop,
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
        fraction = status.overall_fraction(record)
        if fraction is not None:
            self.ui.progressBar.value = round(100 * fraction)
        self.ui.statusLabel.text = status.progress_text(record)

    def _onFinished(self, result, error) -> None:
        self.ui.progressBar.hide()
        if error:
            self._showError(error)
        elif result.compared_with is not None:
            self.ui.statusLabel.text = _("{name}: shown as outlines over the result.").format(
                name=result.segmentation.GetName()
            )
        else:
            self.ui.statusLabel.text = _("Done in {duration}.").format(
                duration=status.human_duration(result.seconds.get("total", 0.0))
            )
            if result.scan_warning:
                self.ui.statusLabel.text += " " + _("The scan may not be one the model knows: see Outputs.")
            if result.warning:
                self.ui.statusLabel.text += " " + _("The gate's routing needs a look: see Gate review.")
            if self._parameterNode is not None:
                self._parameterNode.outputSegmentation = result.segmentation
        self._updateButtons()
        self.updateGUIFromParameterNode()

    def _showError(self, message) -> None:
        self.ui.progressBar.hide()
        cancelled = message == status.CANCELLED
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
        # The center of an axial slice view: RAS S, which is the summary's LPS z.
        position = self._redSliceNode.GetSliceToRAS().GetElement(2, 3)
        try:
            self.ui.gateSliceLabel.text = self.logic.followSlice(
                review, position, self._parameterNode.gateLayer
            )
        except ValueError as error:  # the user removed the chart's marker
            self.ui.gateSliceLabel.text = str(error)

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


class M4oESegmentationLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable without its GUI (e.g. from the Python console).

    A Slicer-style front of ``M4oESegmentationLib``: one segmentation runs at a time;
    :meth:`startSegmentation` starts it, :meth:`poll` (from a timer, or the loop of :meth:`process`
    with ``waitForCompletion``) forwards progress and loads the result when it ends.
    """

    CANCELLED = status.CANCELLED

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmenter = None
        self._batch = None

    def getParameterNode(self):
        return M4oESegmentationParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        batch = self._batch is not None and self._batch.running
        return batch or (self._segmenter is not None and self._segmenter.running)

    def setupPythonRequirements(self, confirm: bool = True) -> None:
        """Install PyTorch (through the PyTorch extension) and the engine's packages if missing.

        ``confirm``: ask the user before installing. Raises RuntimeError when the PyTorch
        extension is missing or the user declines.
        """
        dependencies.ensure_torch(confirm)
        dependencies.ensure_packages(confirm)

    # ------------------------------------------------------------------ models

    @staticmethod
    def modelCard(model: str | None) -> dict | None:
        """The model card of a model name or path; None when registered but not downloaded."""
        return models.model_card(model)

    @staticmethod
    def ensureModel(model: str | None, onProgress=None) -> None:
        """Download and verify a registered model that is not downloaded yet (blocking)."""
        models.ensure_model(model, onProgress)

    # ------------------------------------------------------------------ segmentation

    def _getSegmenter(self):
        if self._segmenter is None:
            from M4oESegmentationLib.engine import WarmEngine
            from M4oESegmentationLib.segmenter import Segmenter

            # PythonSlicer is on Slicer's PATH; sys.executable would start a second Slicer.
            pythonSlicer = shutil.which("PythonSlicer")
            if not pythonSlicer:
                raise RuntimeError(_("PythonSlicer was not found: the engine cannot be started."))
            warm = slicer.util.settingsValue(WARM_ENGINE_SETTING, True, converter=slicer.util.toBool)
            minutes = float(slicer.util.settingsValue(ENGINE_IDLE_SETTING, ENGINE_IDLE_MINUTES))
            idle_s = max(minutes, 1.0) * 60
            engine = WarmEngine(pythonSlicer, MODULE_DIR, idle_timeout_s=idle_s) if warm else None
            self._segmenter = Segmenter(pythonSlicer, MODULE_DIR, engine=engine)
        return self._segmenter

    def stopEngine(self) -> None:
        """End the warm engine process, if one runs (a later run starts a new one)."""
        if self._segmenter is not None and self._segmenter.engine is not None:
            self._segmenter.engine.stop()

    @staticmethod
    def studyVolumes(volume) -> list:
        """The scalar volumes of ``volume``'s study (its subject hierarchy folder), itself included."""
        if volume is None:
            return []
        from M4oESegmentationLib import volumes

        return volumes.study_volumes(volume)

    def startBatch(
        self,
        volumes,
        *,
        modality: str = "auto",
        model: str | None = None,
        task: str | None = None,
        device: str = "auto",
        testTimePasses: int | None = None,
        throughPlaneSigmaMm: float | None = None,
        keepAllComponents: bool = False,
        backend: str = "torch",
        onProgress=None,
        onVolumeFinished=None,
        onFinished=None,
    ):
        """Segment several volumes one after another; return the ``BatchSegmentation``.

        Each result is a new segmentation named after its volume, in its volume's study. Progress
        records carry ``case``/``cases``/``volume``; ``onVolumeFinished(outcome)`` per volume,
        ``onFinished(outcomes)`` once (a failed volume is in them and does not stop the others).
        :meth:`poll` drives it, :meth:`cancel` stops the current volume and skips the rest.
        """
        from M4oESegmentationLib.batch import BatchSegmentation

        if self.isRunning:
            raise RuntimeError(_("A segmentation is already running; cancel it or wait for it."))
        self._batch = BatchSegmentation(
            self._getSegmenter(),
            volumes,
            modality=modality,
            model=model,
            task=task,
            device=device,
            test_time_passes=testTimePasses,
            through_plane_sigma_mm=throughPlaneSigmaMm,
            keep_all_components=keepAllComponents,
            backend=backend,
            on_progress=onProgress,
            on_volume_finished=onVolumeFinished,
            on_finished=onFinished,
        )
        return self._batch.start()

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
        testTimePasses: int | None = None,
        throughPlaneSigmaMm: float | None = None,
        keepAllComponents: bool = False,
        backend: str = "torch",
        structures=None,
        roi=None,
        bodyCrop: bool = True,
        onProgress=None,
        onFinished=None,
    ):
        """Start segmenting ``inputVolume`` in a separate process; return the ``InferenceProcess``.

        Arguments as ``M4oESegmentationLib.segmenter.Segmenter.start``. ``onFinished(result,
        error)`` is called once, from :meth:`poll`, after a result is shown in the views.
        """

        def finished(result, error):
            if result is not None:
                self.showSegmentation(result.segmentation, inputVolume)
            if onFinished is not None:
                onFinished(result, error)

        return self._getSegmenter().start(
            inputVolume,
            outputSegmentation,
            modality=modality,
            model=model,
            task=task,
            device=device,
            force_expert=forceExpert,
            compared_with=comparedWith,
            replace_existing=replaceExisting,
            test_time_passes=testTimePasses,
            through_plane_sigma_mm=throughPlaneSigmaMm,
            keep_all_components=keepAllComponents,
            backend=backend,
            structures=structures,
            roi=roi,
            body_crop=bodyCrop,
            on_progress=onProgress,
            on_finished=finished,
        )

    def poll(self) -> bool:
        """Forward progress; load the result once the engine has ended. Returns whether it runs."""
        if self._batch is not None and self._batch.running:
            return self._batch.poll()
        return self._segmenter is not None and self._segmenter.poll()

    def cancel(self, wait: bool = False) -> None:
        """Stop the running segmentation (of several volumes: also skip the rest); the scene
        stays as it was."""
        if self._batch is not None and self._batch.running:
            self._batch.cancel(wait=wait)
        elif self._segmenter is not None:
            self._segmenter.cancel(wait=wait)

    def process(self, inputVolume, outputSegmentation=None, *, waitForCompletion: bool = True, **options):
        """Segment ``inputVolume`` (options as :meth:`startSegmentation`).

        Returns the ``SegmentationResult``, or the ``InferenceProcess`` when not
        ``waitForCompletion`` (then call :meth:`poll` until it returns False). Raises RuntimeError
        with the engine's message when the segmentation fails.
        """
        outcome = {}
        userFinished = options.pop("onFinished", None)

        def finished(result, error):
            outcome.update(result=result, error=error)
            if userFinished is not None:
                userFinished(result, error)

        inference = self.startSegmentation(inputVolume, outputSegmentation, onFinished=finished, **options)
        if not waitForCompletion:
            return inference
        while self.poll():
            slicer.app.processEvents()
            time.sleep(POLL_INTERVAL_MS / 1000)
        if outcome["error"]:
            raise RuntimeError(outcome["error"])
        return outcome["result"]

    # ------------------------------------------------------------------ views

    @staticmethod
    def showSegmentation(segmentation, inputVolume) -> None:
        """Show the input with the segmentation in the slice views and as surfaces in 3D."""
        slicer.util.setSliceViewerLayers(background=inputVolume, fit=False)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.threeDWidget(0) is not None:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    @staticmethod
    def showGateOverlay(overlay, show: bool) -> None:
        """Show (or hide) a dominant-expert map over the image in the red, yellow and green views."""
        views.show_gate_overlay(overlay, show)

    @staticmethod
    def gateReview(segmentation):
        """The ``GateReview`` of a result segmentation, or None (none, forced run, other origin)."""
        if segmentation is None or not segmentation.GetAttribute(status.RESULT_ATTRIBUTE + "GateSummary"):
            return None
        try:
            from M4oESegmentationLib import segmenter
        except ImportError as error:  # a saved result opened before the engine's packages are installed
            logging.warning("M4oE gate review needs the engine's Python packages: %s", error)
            return None
        return segmenter.gate_review_of(segmentation)

    @staticmethod
    def gateLegend(review) -> str:
        """The gate map legend (rich text) of a ``GateReview``, "" for None."""
        if review is None:
            return ""
        from M4oESegmentationLib import gate_review

        return gate_review.legend_html(review.summary)

    @staticmethod
    def followSlice(review, positionMm: float, layer: str = "") -> str:
        """Move the chart's marker to the slice nearest ``positionMm`` (RAS S); return its weights
        (at ``layer``, a MoME decoder scale, when the review has it; else the mean)."""
        from M4oESegmentationLib import gate_review

        index = gate_review.update_slice_marker(review.chart, review.summary, positionMm)
        layer = layer if layer in dict(review.layers) else ""
        return gate_review.slice_weights_text(review.summary, index, layer)

    # ------------------------------------------------------------------ export

    @staticmethod
    def exportCase(
        inputVolume, segmentation, datasetPath, *, modality=None, model=None, task=None, caseName=None
    ):
        """Save the volume and the (edited) segmentation as a new case of a training dataset."""
        from M4oESegmentationLib import segmenter

        return segmenter.export_case(
            inputVolume,
            segmentation,
            datasetPath,
            modality=modality,
            model=model,
            task=task,
            case_name=caseName,
        )

    # ------------------------------------------------------------------ sample data

    def createPhantomVolume(self, sequence: str = "ct", seed: int = 0, maxSize: int | None = None, name=None):
        """A synthetic abdomen from ``m4oe.phantom`` as a volume node (sequence "ct", "t1" or "t2")."""
        dependencies.ensure_packages(confirm=True)
        return sample_data.create_phantom_volume(sequence, seed, max_size=maxSize, name=name)

    def loadPhantomSample(self, sampleName: str):
        """Load a phantom sample volume, generating it into the Sample Data cache first."""
        dependencies.ensure_packages(confirm=True)
        sequence, _seed = sample_data.sample_sequence(sampleName)
        path = sample_data.write_phantom_sample(sampleName, phantomSamplePath(sampleName))
        node = slicer.util.loadVolume(str(path), {"name": sampleName})
        sample_data.set_default_window(node, sequence)
        return node


#
# M4oESegmentationTest
#


class M4oESegmentationTest(ScriptedLoadableModuleTest):
    """The whole workflow on a small phantom CT with the embedded model, in a real Slicer.

    Needs the PyTorch extension, the engine's pip packages and the embedded model
    (``m4oe/models/m4oe-phantom``); runs on the CPU in well under a minute. The same steps run
    outside Slicer on the ``slicer-core`` scene in Testing/slicer/test_segmenter.py.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentReviewExport()
        self.setUp()
        self.test_Cancel()

    def test_SegmentReviewExport(self):
        import json
        import tempfile

        from M4oESegmentationLib.segmenter import COMPARISON_ROLE

        self.delayDisplay("Segmenting a phantom CT")
        logic = M4oESegmentationLogic()
        logic.setupPythonRequirements(confirm=False)
        volume = logic.createPhantomVolume("ct", seed=3, maxSize=64)
        fractions = []
        result = logic.process(
            volume,
            modality="Auto",
            device="cpu",
            onProgress=lambda record: fractions.append(status.overall_fraction(record)),
        )
        segmentation = result.segmentation
        self.assertEqual(result.modality, "ct")
        self.assertTrue(fractions and max(f for f in fractions if f is not None) > 0.9)
        card = logic.modelCard(None)
        _task, labels = models.task_labels(card, None)
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
        red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(red.GetBackgroundVolumeID(), volume.GetID(), "the input is shown")

        self.delayDisplay("Gate review")
        review = logic.gateReview(segmentation)
        self.assertIsNotNone(review)
        self.assertEqual(review.chart.GetNumberOfPlotSeriesNodes(), len(review.summary["experts"]) + 1)
        logic.showGateOverlay(review.overlay, True)
        self.assertEqual(red.GetForegroundVolumeID(), review.overlay.GetID())
        logic.showGateOverlay(review.overlay, False)
        self.assertIsNone(red.GetForegroundVolumeID())
        self.assertIn("mm", logic.followSlice(review, review.summary["per_slice"][0]["position_mm"]))

        self.delayDisplay("Forced-expert comparison")
        expert = card["experts"][0]["name"]
        comparison = logic.process(
            volume, modality="Auto", device="cpu", forceExpert=expert, comparedWith=segmentation
        )
        self.assertEqual(
            segmentation.GetNodeReferenceID(COMPARISON_ROLE + expert), comparison.segmentation.GetID()
        )
        self.assertIsNone(logic.gateReview(comparison.segmentation))

        self.delayDisplay("Export for training")
        with tempfile.TemporaryDirectory() as folder:
            datasetDir = pathlib.Path(folder) / "Dataset900_Reviewed"
            case = logic.exportCase(volume, segmentation, str(datasetDir))
            self.assertTrue((datasetDir / "labelsTr" / f"{case}.nii.gz").is_file())
            self.assertEqual(json.loads((datasetDir / "dataset.json").read_text())["modality"], "ct")
        self.delayDisplay("Test passed")

    def test_Cancel(self):
        logic = M4oESegmentationLogic()
        logic.setupPythonRequirements(confirm=False)
        volume = logic.createPhantomVolume("t1", seed=4)
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        finished = []
        logic.startSegmentation(volume, device="cpu", onFinished=lambda result, error: finished.append(error))
        logic.cancel()
        while logic.poll():
            time.sleep(0.05)
        self.assertEqual(finished, [M4oESegmentationLogic.CANCELLED])
        self.assertFalse(logic.isRunning)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore, "the scene is as it was")
