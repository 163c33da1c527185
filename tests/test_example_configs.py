"""Every shipped example config loads and validates (no data needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedprune.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def test_there_are_example_configs() -> None:
    names = {p.name for p in CONFIGS}
    for expected in (
        "digits.toml",
        "fedsparsify-fmnist-10c-noniid.toml",
        "fedsparsify-fmnist-100c-iid.toml",
        "fedsparsify-cifar10.toml",
        "autoflip-mnist.toml",
    ):
        assert expected in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.federation.rounds >= 1
