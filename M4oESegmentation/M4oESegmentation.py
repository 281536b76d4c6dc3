"""M4oE Segmentation: abdominal organs on CT and MRI with a mixture of modality experts, in 3D Slicer.

The GUI layer only (DESIGN.md, "The Slicer module"): the module's description, its start-up hooks
and the panel. The panel's parameter node, the Logic and the Logic-level self-test are in
``M4oESegmentationLib`` (``parameters``, ``logic``, ``logic_selftest``) and imported here under
their usual names. Inference runs in a separate ``PythonSlicer -m m4oe.cli segment`` process that
a ``qt.QTimer`` polls, so the GUI never waits on PyTorch. At load time this file imports only what
a fresh Slicer has and the light modules of ``M4oESegmentationLib`` (Testing/test_packaging.py
checks it); PyTorch and the engine's pip packages are installed on first use, after the user
agrees, and the rest of the library is imported after that.
"""

import importlib
import logging
import sys

import qt
import slicer
import vtk
from M4oESegmentationLib import models, sample_data, status, terminology, views
from M4oESegmentationLib.logic import MODULE_DIR, POLL_INTERVAL_MS, M4oESegmentationLogic

# Not used here, but looked up here: Slicer runs the class <ModuleName>Test of this namespace, and
# scripts know the module's classes as M4oESegmentation.<ClassName>.
from M4oESegmentationLib.logic_selftest import M4oESegmentationTest  # noqa: F401
from M4oESegmentationLib.parameters import M4oESegmentationParameterNode  # noqa: F401
from M4oESegmentationLib.widgets import fill_combo_box, select_item_data
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

CONTRIBUTORS = ["M4oE Segmentation contributors (SlicerM4oESegmentation)"]
"""The module's authors, as Slicer's module docs ask ("Name (Organization)"); the extension's
EXTENSION_CONTRIBUTORS (CMakeLists.txt) says the same (Testing/test_packaging.py)."""
LIBRARY_MODULES = (
    "widgets",
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
    "parameters",
    "logic",
    "logic_selftest",
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
you agree. Not a medical device. The embedded model is a research demonstration, weak on real
scans (trained on phantoms, 27 real CTs and 16 real MRIs); its weights are CC BY-NC-SA 4.0, for
non-commercial use only, because of the CHAOS MRIs it learnt from. See the <a href="https://github.com/m4oe-segmentation/SlicerM4oESegmentation">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
M4oE is described in Yufeng Jiang and Yiqing Shen, "M4oE: A Foundation Model for Medical Multimodal
Image Segmentation with Mixture of Experts", MICCAI 2024. The Swin-UNet backbone is from Cao et al.,
"Swin-Unet: Unet-like Pure Transformer for Medical Image Segmentation", ECCV Workshops 2022.
The module follows the design of SlicerTotalSegmentator and SlicerMONAIAuto3DSeg. The embedded
model learnt from the CHAOS challenge's MRIs (Kavur et al., Medical Image Analysis 2021; CC BY-NC-SA
4.0) and the BTCV challenge's CTs (Landman et al., MICCAI 2015 Multi-Atlas Labeling Beyond the
Cranial Vault).
""")
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", terminology.register_terminology)


def registerSampleData():
    """Phantom CT and MR volumes in the Sample Data module, generated locally when first loaded."""
    icon = MODULE_DIR / "Resources" / "Icons" / "M4oESegmentation.png"
    sample_data.register_samples(icon, _loadPhantomSample)


def _loadPhantomSample(source):
    with slicer.util.tryWithErrorDisplay(_("Failed to generate the phantom sample."), waitCursor=True):
        return M4oESegmentationLogic().loadPhantomSample(source.sampleName)


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
            select_item_data(self.ui.modelComboBox, p.model or models.default_model())
            if self._shownModel != p.model:
                self._showModelDetails(p.model)
            select_item_data(self.ui.taskComboBox, p.task)
            self._showStructures(p.model, p.task, p.skippedStructures)
            select_item_data(self.ui.forceExpertComboBox, p.forcedExpert)
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
        self.ui.accuracyWarningLabel.text = status.accuracy_warning_text(segmentation)
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
        fill_combo_box(self.ui.gateLayerComboBox, layers)
        self.ui.gateLayerLabel.visible = self.ui.gateLayerComboBox.visible = bool(layers)
        if not layers:
            return review.overlay if review else None
        layer = self._parameterNode.gateLayer if self._parameterNode.gateLayer in dict(layers) else ""
        select_item_data(self.ui.gateLayerComboBox, layer)
        return review.show_layer(layer)

    # ------------------------------------------------------------------ models

    def populateModels(self) -> None:
        """Fill the model list: embedded, downloaded and registered models, plus a chosen card."""
        if self._parameterNode is None:
            return
        try:
            entries, error = models.available_models(), None
        except ValueError as exc:  # a broken model registry
            entries, error = [], str(exc)
        fill_combo_box(self.ui.modelComboBox, models.model_choices(entries, self._parameterNode.model))
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
        fill_combo_box(self.ui.taskComboBox, models.task_choices(card))
        fill_combo_box(self.ui.forceExpertComboBox, models.expert_choices(card))
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
            self.ui.statusLabel.text = status.done_text(result)
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
