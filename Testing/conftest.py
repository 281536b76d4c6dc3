"""Shared pytest fixtures: the real test volumes in ../shared/data, skipped when absent."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Tests run many tiny forward passes; one thread each avoids OpenMP oversubscription on a shared
# 2-core machine (measured here: a small Linear took 15x longer with 2 threads under load).
# Set before torch is imported so that CLI subprocesses inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The user's model cache stays out of the tests: a cached ONNX graph there would switch the
# predictor's "auto" backend to ONNX Runtime (m4oe.onnx_runtime) in tests that expect PyTorch.
os.environ["M4OE_CACHE_DIR"] = tempfile.mkdtemp(prefix="m4oe-test-cache-")

import pytest
from tiny_models import save_tiny_model

atexit.register(shutil.rmtree, os.environ["M4OE_CACHE_DIR"], ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real CT/MRI volumes described in ../shared/data/SOURCES.md."""
    folder = SHARED_DATA / "totalsegmentator"
    if not folder.is_dir():
        pytest.skip(f"real test data not found at {folder}")
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny M4oE model folder shared by the tests of one session (read-only by convention)."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """``(model, card)`` of the tiny model, loaded once per test module."""
    from m4oe.checkpoint import load_checkpoint

    return load_checkpoint(tiny_model_dir)
