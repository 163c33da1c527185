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


def mentions(message: str, text: str, keep: int = 8) -> bool:
    """Whether ``message`` quotes ``text``, whole or elided in the middle with '...'.

    One-line errors elide long paths in the middle (``fedprune.errors.elide``), so how
    much of a temporary path survives depends on how long the machine's temp folder is.
    An elided quote counts when at least ``keep`` characters of each end survive.
    """
    if text in message:
        return True
    start = message.find("...")
    while start >= 0:
        before, after = message[:start], message[start + 3 :]
        head = max((a for a in range(len(text) + 1) if before.endswith(text[:a])), default=0)
        tail = max(b for b in range(len(text) + 1) if after.startswith(text[len(text) - b :]))
        if head >= keep and tail >= keep and head + tail < len(text):
            return True
        start = message.find("...", start + 1)
    return False
