"""The module's terminology context, loaded into Slicer's terminologies at start-up.

Every segment the engine writes names the context :data:`m4oe.labels.TERMINOLOGY_CONTEXT` in its
``TerminologyEntry`` tag. :data:`TERMINOLOGY_FILE` is that context, a Slicer terminology file in the
standard (dcmqi segment context) schema holding exactly the structures of
:data:`m4oe.terminology.TERMS`: their SNOMED CT category, type and laterality codes, recommended
colours and names. Once loaded, Slicer's terminology selector and segment list show our segments
with their standard meaning, as SlicerTotalSegmentator does with its own file.

Standard library and the torch-free engine only: the module file imports this when Slicer loads it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from m4oe.labels import TERMINOLOGY_CONTEXT

TERMINOLOGY_FILE = (
    Path(__file__).resolve().parents[1]
    / "Resources"
    / "Terminology"
    / "SegmentationCategoryTypeModifier-M4oESegmentation.term.json"
)


def load_terminology(terminologies_logic) -> str:
    """Load :data:`TERMINOLOGY_FILE` into Slicer's terminologies; return its context name.

    ``terminologies_logic``: Slicer's ``vtkSlicerTerminologiesModuleLogic``
    (``slicer.modules.terminologies.logic()`` in Slicer). Loading again replaces the context.
    Raises RuntimeError naming the file when Slicer cannot read it or it names another context.
    """
    name = terminologies_logic.LoadTerminologyFromFile(str(TERMINOLOGY_FILE))
    if name != TERMINOLOGY_CONTEXT:
        problem = "Slicer could not read it" if not name else f"it holds context {name!r}"
        raise RuntimeError(
            f"{TERMINOLOGY_FILE}: the terminology context {TERMINOLOGY_CONTEXT!r} was not loaded: {problem}"
        )
    return name


def register_terminology() -> None:
    """Load :data:`TERMINOLOGY_FILE` into the running Slicer's Terminologies module (at Slicer's
    start-up), so that Slicer shows the engine's segments with their meaning; a failure is logged,
    not raised (the module still loads)."""
    import slicer

    try:
        load_terminology(slicer.modules.terminologies.logic())
    except RuntimeError as error:
        logging.error(str(error))
