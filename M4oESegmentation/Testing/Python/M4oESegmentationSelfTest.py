"""Widget-level self-test of the M4oE Segmentation module; runs only inside a real 3D Slicer.

It drives the panel as a user would (Apply, Cancel, gate review, Compare, Export) and checks what
the panel shows. The Logic-level test is ``M4oESegmentationTest`` in
``M4oESegmentationLib/logic_selftest.py`` (imported by the module file, where *Reload and Test*
finds it). Needs the PyTorch extension, the engine's Python packages and the embedded model; CTest
runs it through CMakeLists.txt, and Slicer's Python console through ``slicer.testing.runUnitTest``.
"""

import pathlib
import tempfile
import time
import unittest

import slicer

TIMEOUT_S = 600


class M4oESegmentationSelfTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()
        slicer.util.selectModule("M4oESegmentation")
        self.widget = slicer.modules.m4oesegmentation.widgetRepresentation().self()
        self.ui = self.widget.ui
        self.logic = self.widget.logic
        self.logic.setupPythonRequirements(confirm=False)

    def waitUntilIdle(self):
        deadline = time.monotonic() + TIMEOUT_S
        while self.logic.isRunning:
            self.assertLess(time.monotonic(), deadline, "the segmentation did not finish in time")
            slicer.app.processEvents()
            time.sleep(0.05)
        slicer.app.processEvents()

    def test_ApplyReviewCompareExport(self):
        ui = self.ui
        volume = self.logic.createPhantomVolume("ct", seed=5, maxSize=64)
        ui.inputVolumeSelector.setCurrentNode(volume)
        ui.deviceComboBox.currentText = "cpu"
        self.assertTrue(ui.applyButton.enabled)

        ui.applyButton.click()
        self.assertEqual(ui.applyButton.text, "Cancel")
        self.assertFalse(ui.progressBar.isHidden())
        statusLines = set()
        deadline = time.monotonic() + TIMEOUT_S
        while self.logic.isRunning and time.monotonic() < deadline:
            slicer.app.processEvents()
            statusLines.add(ui.statusLabel.text)
            time.sleep(0.05)
        self.waitUntilIdle()
        stages = ("Loading the model", "Preparing slices", "Segmenting", "Assembling the result")
        self.assertTrue(any(line.startswith(stages) for line in statusLines), statusLines)
        self.assertEqual(ui.applyButton.text, "Apply")
        self.assertEqual(ui.errorLabel.text, "")
        segmentation = ui.outputSegmentationSelector.currentNode()
        self.assertIsNotNone(segmentation)
        self.assertGreater(segmentation.GetSegmentation().GetNumberOfSegments(), 0)
        self.assertTrue(ui.detectedModalityLabel.text.startswith("CT"))
        # The scan check's warning (none expected on the phantom CT, an abdomen) under Outputs.
        warning = segmentation.GetAttribute("M4oESegmentation.ScanWarning") or ""
        self.assertEqual(ui.scanWarningLabel.text, f"Warning: {warning}" if warning else "")
        self.assertEqual(self.widget.segmentEditorWidget.segmentationNode(), segmentation)

        # Gate review: table, chart, slice readout following the red slice, map overlay, warning.
        review = self.logic.gateReview(segmentation)
        self.assertEqual(ui.routingWarningLabel.text, review.warning or "")
        self.assertIn("(CT)", ui.gateLegendLabel.text)
        self.assertIsNotNone(ui.expertTableView.mrmlTableNode())
        self.assertTrue(ui.gatePlotWidget.mrmlPlotViewNode().GetPlotChartNodeID())
        red = slicer.app.layoutManager().sliceWidget("Red")
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        red.sliceLogic().SetSliceOffset((bounds[4] + bounds[5]) / 2)
        slicer.app.processEvents()
        self.assertIn("mm", ui.gateSliceLabel.text)
        ui.showGateOverlayCheckBox.checked = True
        slicer.app.processEvents()
        overlayID = red.mrmlSliceCompositeNode().GetForegroundVolumeID()
        self.assertEqual(overlayID, segmentation.GetNodeReferenceID("M4oEGateOverlay"))
        ui.showGateOverlayCheckBox.checked = False
        slicer.app.processEvents()
        self.assertIsNone(red.mrmlSliceCompositeNode().GetForegroundVolumeID())

        # Compare with the first expert alone: a second segmentation, the result stays selected.
        self.assertTrue(ui.compareButton.enabled)
        ui.compareButton.click()
        self.waitUntilIdle()
        self.assertEqual(ui.errorLabel.text, "")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 2)
        self.assertEqual(ui.outputSegmentationSelector.currentNode(), segmentation)

        with tempfile.TemporaryDirectory() as folder:
            ui.datasetPathLineEdit.currentPath = str(pathlib.Path(folder) / "reviewed")
            self.assertTrue(ui.exportButton.enabled)
            ui.exportButton.click()
            self.assertIn("Saved case", ui.exportStatusLabel.text)
            self.assertTrue((pathlib.Path(folder) / "reviewed" / "dataset.json").is_file())

    def test_CancelAndErrors(self):
        ui = self.ui
        volume = self.logic.createPhantomVolume("t2", seed=6)
        ui.inputVolumeSelector.setCurrentNode(volume)
        ui.applyButton.click()
        ui.applyButton.click()  # now "Cancel"
        self.waitUntilIdle()
        self.assertEqual(ui.statusLabel.text, "Cancelled.")
        self.assertEqual(ui.errorLabel.text, "")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 0)

        # A model that is not there: the panel names it instead of failing silently.
        self.widget._parameterNode.model = "/nonexistent/model.json"
        self.widget.populateModels()
        ui.applyButton.click()
        self.assertFalse(self.logic.isRunning)
        self.assertIn("nonexistent", ui.errorLabel.text)
