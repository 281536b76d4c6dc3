"""Shared pytest fixtures: the real test volumes in ../shared/data, skipped when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real CT/MRI volumes described in ../shared/data/SOURCES.md."""
    folder = SHARED_DATA / "totalsegmentator"
    if not folder.is_dir():
        pytest.skip(f"real test data not found at {folder}")
    return folder
