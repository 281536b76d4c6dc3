"""The module's Logic: everything the M4oE Segmentation module does, usable without its panel.

``M4oESegmentationLogic`` is a Slicer-style front of this library (camelCase, the application's
event loop, the layout's views): the panel drives it, and so can the Python console, scripts and
the self-tests (``M4oESegmentation.M4oESegmentationLogic`` is this class). The module file imports
this when Slicer loads it, so at import time it needs only what a fresh Slicer has and the light
modules of this library (``dependencies``, ``models``, ``parameters``, ``sample_data``, ``status``,
``views``); the engine runner and the modules that need the engine's packages are imported by the
methods that use them. Never imports PyTorch: inference runs in a separate process.
"""

import logging
import pathlib
import shutil
import time

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from . import dependencies, models, sample_data, status, views
from .parameters import M4oESegmentationParameterNode

MODULE_DIR = pathlib.Path(__file__).resolve().parents[1]
"""The module's folder (M4oESegmentation.py, Resources/, the engine ``m4oe``), as installed."""
POLL_INTERVAL_MS = 200
"""How often the panel's timer, and :meth:`M4oESegmentationLogic.process`, poll a running engine."""
WARM_ENGINE_SETTING = "M4oESegmentation/WarmEngine"
"""Application setting: keep one engine process with the model loaded between runs (default on);
off starts a new ``m4oe segment`` process for every run."""
ENGINE_IDLE_SETTING = "M4oESegmentation/EngineIdleMinutes"
"""Application setting: minutes without a run after which the warm engine ends (default 10)."""
ENGINE_IDLE_MINUTES = 10.0


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
        path = sample_data.write_phantom_sample(sampleName, sample_data.phantom_sample_path(sampleName))
        node = slicer.util.loadVolume(str(path), {"name": sampleName})
        sample_data.set_default_window(node, sequence)
        return node
