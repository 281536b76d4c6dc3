"""The segments' standard terminology: TERMS, the module's Slicer terminology file, every shipped
model card, the ``.seg.nrrd`` the engine writes, and Slicer's own terminology files agree.

Slicer's files are not here: ``Testing/data/slicer_terminology/slicer_terminology_excerpt.json``
holds their entries for our codes, copied unchanged with their source, commit and licence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from m4oe.io import write_segmentation
from m4oe.labels import TERMINOLOGY_CONTEXT, Code, Label
from m4oe.model_card import ModelCard
from m4oe.terminology import GENERIC_RGB, GENERIC_STRUCTURE, SOURCES, TERMS, generic_label, standard_label

ROOT = Path(__file__).resolve().parents[1]
TERM_FILE = (
    ROOT
    / "M4oESegmentation/Resources/Terminology/SegmentationCategoryTypeModifier-M4oESegmentation.term.json"
)
SHIPPED_CARDS = sorted((ROOT / "M4oESegmentation/m4oe/models").glob("*/model.json"))
SLICER_EXCERPT = ROOT / "Testing/data/slicer_terminology/slicer_terminology_excerpt.json"
SOURCE_FILES = {
    "general-anatomy": "SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json",
    "dicom-master": "SegmentationCategoryTypeModifier-DICOM-Master.json",
    "totalsegmentator": "SegmentationCategoryTypeModifier-TotalSegmentator.term.json",
}


def code_of(entry: dict) -> Code:
    return Code(entry["CodingSchemeDesignator"], entry["CodeValue"], entry["CodeMeaning"])


def entries(context: dict) -> dict[tuple, dict]:
    """Every (category, type, modifier or None) of a terminology context, with its type or modifier
    entry (the one that carries the recommended colour and the 3dSlicerLabel)."""
    found = {}
    for category in context["SegmentationCodes"]["Category"]:
        for entry in category.get("Type", []):
            found[(code_of(category), code_of(entry), None)] = entry
            for modifier in entry.get("Modifier", []):
                found[(code_of(category), code_of(entry), code_of(modifier))] = modifier
    return found


@pytest.fixture(scope="module")
def shipped() -> dict:
    return json.loads(TERM_FILE.read_text(encoding="utf-8"))


def test_the_shipped_terminology_holds_exactly_our_structures(shipped):
    assert shipped["SegmentationCategoryTypeContextName"] == TERMINOLOGY_CONTEXT
    assert shipped["@schema"].endswith("segment-context-schema.json#")
    held = entries(shipped)
    ours = {(t.category, t.type, t.modifier): (t.rgb, t.name) for t in TERMS.values()}
    generic = generic_label("anatomical structure", 1)
    ours[(generic.category, GENERIC_STRUCTURE, None)] = (GENERIC_RGB, "anatomical structure")
    # A paired organ is a type whose modifiers are the entries; the type alone names no structure.
    paired = {(c, t) for (c, t, m) in held if m is not None}
    named = {key: entry for key, entry in held.items() if key[2] is not None or key[:2] not in paired}
    assert set(named) == set(ours)
    for key, (rgb, name) in ours.items():
        assert tuple(named[key]["recommendedDisplayRGBValue"]) == rgb, key
        assert named[key]["3dSlicerLabel"] == name, key


def test_every_label_of_every_shipped_card_is_in_the_shipped_terminology(shipped):
    assert SHIPPED_CARDS, "no model card is shipped"
    held = entries(shipped)
    paired = {(c, t) for (c, t, m) in held if m is not None}
    for path in SHIPPED_CARDS:
        card = ModelCard.read(path)
        for task in card.tasks:
            for label in task.labels:
                where = f"{path.parent.name} {task.name} {label.name!r}"
                key = (label.category, label.type, label.modifier)
                assert key in held, f"{where}: {key} is not in {TERM_FILE.name}"
                # Kidneys and adrenal glands: the laterality modifier is required.
                assert label.modifier is not None or key[:2] not in paired, f"{where} lacks its laterality"
                assert label.terminology_entry().split("~")[0] == TERMINOLOGY_CONTEXT


def test_our_codes_are_slicers_where_slicer_has_them(shipped):
    """Every code (category, type, modifier) and meaning of ours is in the Slicer file its TERMS
    entry names; the colours of General Anatomy structures are that list's recommended colours."""
    excerpt = json.loads(SLICER_EXCERPT.read_text(encoding="utf-8"))
    for source in excerpt["sources"]:
        assert len(source["commit"]) == 40 and source["license"] and source["repository"]
    files = {s["file"]: entries(s["excerpt"]) for s in excerpt["sources"]}
    general = files[SOURCE_FILES["general-anatomy"]]
    for key, term in TERMS.items():
        assert term.source in SOURCES
        source = files[SOURCE_FILES[term.source]]
        code = (term.category, term.type, term.modifier)
        assert code in source, f"{key}: {code} is not in {SOURCE_FILES[term.source]}"
        if term.source == "general-anatomy":
            assert tuple(source[code]["recommendedDisplayRGBValue"]) == term.rgb, key
        else:  # the General Anatomy list lacks it: that is why it comes from elsewhere
            assert not any(k[1].value == term.type.value for k in general), key
    # Our own file's codes are these, so it names no code Slicer gives another meaning.
    meanings = {k[1].value: k[1].meaning for f in files.values() for k in f}
    for _category, type_, _modifier in entries(shipped):
        if type_.value in meanings:
            assert meanings[type_.value] == type_.meaning, type_


def test_the_engine_segmentation_names_the_shipped_terminology(tmp_path, shipped):
    labels = [standard_label("liver", 1), standard_label("kidney_left", 2), standard_label("vertebrae", 3)]
    image = sitk.GetImageFromArray(np.array([[[0, 1, 2, 3]]], np.uint8))
    path = write_segmentation(image, labels, tmp_path / "out.seg.nrrd")
    segments = {s["name"]: s for s in slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]}
    held = entries(shipped)
    for label in labels:
        terminology = segments[label.name]["terminology"]
        assert terminology["contextName"] == TERMINOLOGY_CONTEXT
        assert terminology["anatomicContextName"] == "Anatomic codes - DICOM master list"
        category, type_ = (Code(*terminology[k]) for k in ("category", "type"))
        modifier = Code(*terminology["typeModifier"]) if "typeModifier" in terminology else None
        assert (category, type_, modifier) == (label.category, label.type, label.modifier)
        assert (category, type_, modifier) in held


def test_terminology_entry_string():
    label = Label(
        2,
        "left kidney",
        (0.5, 0.4, 0.3),
        TERMS["kidney_left"].category,
        TERMS["kidney_left"].type,
        TERMS["kidney_left"].modifier,
    )
    assert label.terminology_entry() == (
        "Segmentation category and type - M4oE Segmentation~SCT^123037004^Anatomical Structure"
        "~SCT^64033007^Kidney~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^"
    )
