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


def save_tiny_model(folder: Path, seed: int = 0, name: str = "m4oe-tiny") -> Path:
    """Save a seeded, untrained tiny M4oE model (64-pixel input, 3 experts) with a full card."""
    import torch

    from m4oe.checkpoint import save_checkpoint
    from m4oe.model import build_model
    from m4oe.model_card import ExpertInfo, ModelCard, Preprocessing, TaskInfo
    from m4oe.preprocessing import DEFAULT_PARAMS
    from m4oe.terminology import standard_label

    torch.manual_seed(seed)
    model = build_model(name)
    organs = ("liver", "spleen", "kidney_right")
    card = ModelCard(
        name="tiny-test-model",
        description="untrained tiny model for tests",
        architecture=model.cfg,
        experts=[ExpertInfo("ct", "ct"), ExpertInfo("mr", "mr"), ExpertInfo("mr-t2", "mr")],
        tasks=[
            TaskInfo(
                "abdomen", [standard_label(k, i + 1) for i, k in enumerate(organs)], largest_component=[1]
            ),
            TaskInfo("liver", [standard_label("liver", 1)]),
        ],
        preprocessing=Preprocessing(
            intensity={m: DEFAULT_PARAMS[m].to_dict() for m in ("ct", "mr")}, slice_batch=4
        ),
        provenance={"training": "none"},
    )
    return save_checkpoint(model, card, folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny M4oE model folder shared by the tests of one session (read-only by convention)."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """``(model, card)`` of the tiny model, loaded once per test module."""
    from m4oe.checkpoint import load_checkpoint

    return load_checkpoint(tiny_model_dir)
