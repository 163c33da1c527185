"""Shared fixtures: never touch the network; find the shared data when it is there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPRUNE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def shared_data() -> Path:
    """The real data sets (FEDPRUNE_DATA or ../shared/data), or skip."""
    env = os.environ.get("FEDPRUNE_DATA")
    path = Path(env) if env else SHARED_DATA
    if not path.is_dir():
        pytest.skip("real data not available (set FEDPRUNE_DATA)")
    return path
