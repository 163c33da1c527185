from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import mentions
from fedprune.cli import main


def test_run_writes_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--rounds", "2", "--clients", "3", "--out", str(tmp_path), "--name", "r"])
    assert code == 0
    out = capsys.readouterr().out
    assert "round   2/2" in out and "sparsity" in out and "MB" in out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["rounds"] == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--set", "pruning.final_sparsty=0.9"], "did you mean 'pruning.final_sparsity'"),
        (["run", "--set", "train.lr=-1"], "train.lr must be in (0, 1000]"),
        (["run", "--method", "nope"], "method: unknown value 'nope'"),
        (["run", "--model", "resnet99"], "resnet99"),
        (["run", "--dataset", "mnist", "--data-dir", "/nonexistent/folder"], "mnist"),
        (["run", "/nonexistent/config.toml"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    args: list[str],
    needle: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FEDPRUNE_DATA", raising=False)
    code = main([*args, "--out", str(tmp_path)] if args[0] == "run" else args)
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert needle in lines[0]
    assert "Traceback" not in err


def test_missing_data_message_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDPRUNE_DATA", str(tmp_path / "nodata"))
    code = main(["run", "--dataset", "fashion-mnist", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert mentions(err, str(tmp_path / "nodata" / "fashion_mnist")), err


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--rounds", "notanumber"]) == 2


@pytest.mark.parametrize("command", ["models", "methods", "datasets"])
def test_listing_commands(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command]) == 0
    out = capsys.readouterr().out
    expected = {"models": "gap-cnn", "methods": "fedsparsify-global", "datasets": "digits"}
    assert expected[command] in out
