"""The Logic-level self-test of the module, ``M4oESegmentationTest``; runs only inside a real 3D Slicer.

Slicer finds a scripted module's test as the class ``<ModuleName>Test`` in the module file's
namespace (``ScriptedLoadableModule.runTest``: *Reload and Test*, the Self Tests module), and CTest
runs the module file through ``slicer.testing.runUnitTest``, which collects the TestCase classes
of that namespace; so M4oESegmentation.py imports this class under that name. Imported when Slicer
loads the module: ``slicer`` and the light modules of this library only (the test's own imports
are inside its methods). The widget-level self-test is Testing/Python/M4oESegmentationSelfTest.py.
"""

import pathlib
import time

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from . import models, status
from .logic import M4oESegmentationLogic


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
