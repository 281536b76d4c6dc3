"""Scene-glue tests: a real MRML scene from the ``slicer-core`` package, without the Slicer application.

``slicer-core`` (PyPI) installs the ``slicer`` package with Slicer's MRML, segmentation, table and
plot classes (``slicer.vtkMRMLScene``, ``slicer.vtkMRMLSegmentationNode``, ...) and ``slicer.util``,
but no application: no ``slicer.app``, ``slicer.modules``, Qt, CTK or widgets, and no
``slicer.mrmlScene``. The ``scene`` fixture sets ``slicer.mrmlScene`` to a fresh scene and does
the one piece of start-up the Segmentations module does in Slicer that the library relies on:
registering the segmentation converter rules (without them no binary labelmap can be created).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "M4oESegmentation"
# Slicer puts a scripted module's folder on sys.path; M4oESegmentationLib is found there.
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

try:
    import slicer
except ImportError:
    slicer = None

SLICER_CORE = slicer is not None and hasattr(slicer, "vtkMRMLScene")
SKIP_REASON = (
    "slicer-core is not installed (pip install slicer-core==5.13.31053.0): "
    "the Slicer glue needs a real MRML scene"
)


def _register_converter_rules() -> None:
    """Register the converter rules Slicer's Segmentations module registers at start-up."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()):
        return
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
    ):
        factory.RegisterConverterRule(rule())


@pytest.fixture
def scene():
    """A fresh MRML scene, also set as ``slicer.mrmlScene``; cleared afterwards."""
    if not SLICER_CORE:
        pytest.skip(SKIP_REASON)
    _register_converter_rules()
    previous = getattr(slicer, "mrmlScene", None)
    fresh = slicer.vtkMRMLScene()
    slicer.mrmlScene = fresh
    yield fresh
    fresh.Clear(1)
    slicer.mrmlScene = previous


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """The folder a run's temporary workspace is made in (``tempfile.tempdir``), for tests that
    check it is left empty."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root
