"""Slicer's own classes read what the module ships and the engine writes: the terminology logic
(``vtkSlicerTerminologiesModuleLogic``) loads the module's terminology file and finds every label of
every shipped card in it; the segmentation storage node (``vtkMRMLSegmentationStorageNode``) reads
the engine's ``.seg.nrrd`` with its segments' names, colours and terminology."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

try:
    import slicer
except ImportError as error:
    pytest.skip(f"slicer-core cannot be imported ({error})", allow_module_level=True)
if not hasattr(slicer, "vtkSlicerTerminologiesModuleLogic"):
    pytest.skip("the installed 'slicer' package has no terminology logic", allow_module_level=True)

import vtk
from M4oESegmentationLib import terminology, volumes

from m4oe.io import write_segmentation
from m4oe.labels import TERMINOLOGY_CONTEXT
from m4oe.model_card import ModelCard
from m4oe.terminology import standard_label

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CARDS = sorted((ROOT / "M4oESegmentation/m4oe/models").glob("*/model.json"))


def _codes(entry) -> tuple[str, str, str]:
    return (entry.GetCodingSchemeDesignator(), entry.GetCodeValue(), entry.GetCodeMeaning())


def loaded_entries(logic, context: str) -> dict[tuple, tuple]:
    """(category, type, modifier or None) codes -> (recommended RGB, 3dSlicerLabel), as Slicer's
    terminology logic lists them for a loaded context."""
    found = {}
    for c in range(logic.GetNumberOfCategoriesInTerminology(context)):
        category = slicer.vtkSlicerTerminologyCategory()
        assert logic.GetNthCategoryInTerminology(context, c, category)
        for t in range(logic.GetNumberOfTypesInTerminologyCategory(context, category)):
            type_ = slicer.vtkSlicerTerminologyType()
            assert logic.GetNthTypeInTerminologyCategory(context, category, t, type_)
            found[(_codes(category), _codes(type_), None)] = (
                type_.GetRecommendedDisplayRGBValue(),
                type_.GetSlicerLabel(),
            )
            for m in range(logic.GetNumberOfTypeModifiersInTerminologyType(context, category, type_)):
                modifier = slicer.vtkSlicerTerminologyType()
                assert logic.GetNthTypeModifierInTerminologyType(context, category, type_, m, modifier)
                found[(_codes(category), _codes(type_), _codes(modifier))] = (
                    modifier.GetRecommendedDisplayRGBValue(),
                    modifier.GetSlicerLabel(),
                )
    return found


def test_slicer_finds_every_shipped_label_in_the_module_terminology():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert terminology.load_terminology(logic) == TERMINOLOGY_CONTEXT
    held = loaded_entries(logic, TERMINOLOGY_CONTEXT)
    assert len(held) >= 24
    for path in SHIPPED_CARDS:
        for task in ModelCard.read(path).tasks:
            for label in task.labels:
                entry = slicer.vtkSlicerTerminologyEntry()
                assert logic.DeserializeTerminologyEntry(label.terminology_entry(), entry)
                assert entry.GetTerminologyContextName() == TERMINOLOGY_CONTEXT
                modifier = _codes(entry.GetTypeModifierObject())
                key = (
                    _codes(entry.GetCategoryObject()),
                    _codes(entry.GetTypeObject()),
                    modifier if modifier[1] else None,
                )
                assert key in held, f"{path.parent.name} {label.name!r}: {key}"
                rgb, name = held[key]
                assert name == label.name
                assert np.allclose(np.array(rgb) / 255.0, label.color, atol=1e-4), (label.name, rgb)


def test_a_terminology_file_of_another_context_is_refused(tmp_path, monkeypatch):
    data = json.loads(terminology.TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    data["SegmentationCategoryTypeContextName"] = "Segmentation category and type - something else"
    other = tmp_path / "other.term.json"
    other.write_text(json.dumps(data), encoding="utf-8")
    monkeypatch.setattr(terminology, "TERMINOLOGY_FILE", other)
    with pytest.raises(RuntimeError, match="holds context 'Segmentation category and type - something else'"):
        terminology.load_terminology(slicer.vtkSlicerTerminologiesModuleLogic())


LABELS = [standard_label("liver", 1), standard_label("kidney_left", 2), standard_label("spleen", 4)]


@pytest.fixture
def engine_output(scene, tmp_path):
    """A volume node and the .seg.nrrd the engine would write for it (oblique grid, labels 1, 2, 4)."""
    voxels = np.zeros((5, 6, 7), np.uint8)  # (z, y, x)
    voxels[1:3, 2:4, 1:5] = 1
    voxels[3, 1, 1] = 2
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((12.0, -30.5, 104.25))
    angle = np.deg2rad(20.0)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0))
    volume = volumes.sitk_to_volume_node(sitk.Cast(image, sitk.sitkInt16) * 40, "input", scene=scene)
    path = write_segmentation(image, LABELS, tmp_path / "segmentation.seg.nrrd")
    return volume, path, voxels


def test_slicer_reads_the_engine_segmentation_with_its_storage_node(scene, engine_output):
    volume, path, voxels = engine_output
    node = volumes.load_segmentation_file(path, LABELS, volume, name="result")
    segmentation = node.GetSegmentation()
    tag = slicer.vtkSegment.GetTerminologyEntryTagName()
    for label in LABELS:
        segment = segmentation.GetSegment(volumes.segment_id(label))
        assert segment.GetName() == label.name
        assert np.allclose(segment.GetColor(), label.color, atol=1e-6)
        terminology_entry = vtk.reference("")
        assert segment.GetTag(tag, terminology_entry)
        assert str(terminology_entry) == label.terminology_entry()
    # The voxels, on the input volume's grid (the spleen is an empty segment).
    labelmap = volumes.segmentation_to_labelmap(node, volume, LABELS)
    assert np.array_equal(sitk.GetArrayFromImage(labelmap), voxels)
    # Reading into an existing node replaces its segments.
    again = volumes.load_segmentation_file(path, LABELS[:1] + LABELS[1:], volume, segmentation_node=node)
    assert again is node and segmentation.GetNumberOfSegments() == 3
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_a_segmentation_file_that_does_not_fit_is_refused_and_adds_nothing(scene, engine_output, tmp_path):
    volume, path, _ = engine_output
    with pytest.raises(ValueError, match="the task's labels are"):
        volumes.load_segmentation_file(path, LABELS[:2], volume)
    renamed = [LABELS[0], standard_label("kidney_right", 2), LABELS[2]]
    with pytest.raises(ValueError, match="not the task's 'right kidney'"):
        volumes.load_segmentation_file(path, renamed, volume)
    other = volumes.sitk_to_volume_node(sitk.Image(7, 6, 4, sitk.sitkInt16), "other grid", scene=scene)
    with pytest.raises(ValueError, match="is not that of volume 'other grid'"):
        volumes.load_segmentation_file(path, LABELS, other)
    # (A truncated .seg.nrrd aborts the process inside Slicer's reader: the engine writes atomically.)
    with pytest.raises(ValueError, match="Slicer could not read the segmentation"):
        volumes.load_segmentation_file(tmp_path / "missing.seg.nrrd", LABELS, volume)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
