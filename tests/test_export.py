from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedprune import rundir
from fedprune.cli import main
from fedprune.core.structured import example_input, shrunk_copy
from fedprune.errors import UserInputError
from fedprune.export import export_pte, load_final_model
from fedprune.models import build_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _run_dir(tmp_path: Path, name: str, shape: tuple[int, int, int], keep: dict) -> Path:
    """A run directory holding a shrunk model (as a finished autostructured run leaves it)."""
    model = build_model(name, shape, 62, seed=0)
    for m in model.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    small, history = shrunk_copy(model, keep, example_input(shape))
    run = tmp_path / name
    run.mkdir()
    (run / rundir.CONFIG).write_text("seed = 0\n", encoding="utf-8")
    rundir.write_json(run / rundir.SUMMARY, {"method": "autostructured"})
    arch = {"model": name, "input_shape": list(shape), "num_classes": 62, "hidden": None}
    rundir.save_model(run, small, {**arch, "history": history})
    return run


def test_onnx_export_of_a_shrunk_resnet_matches_torch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime as ort

    run = _run_dir(tmp_path, "resnet7", (1, 28, 28), {"conv1": [0, 3, 5, 9], "block1.conv1": [1]})
    model = load_final_model(run)
    assert model.conv1.out_channels == 4 and model.block2.conv2.out_channels == 4
    path = tmp_path / "out" / "small.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(path)]) == 0
    assert "ONNX model written to" in capsys.readouterr().out
    assert path.is_file() and not path.with_suffix(".onnx.data").exists()  # one file
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (1, 62)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_latency_cli_times_both_models_and_writes_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path, "gap-cnn", (1, 28, 28), {"conv1": [0, 1, 2], "conv2": [4, 5]})
    assert main(["latency", str(run), "--runs", "5", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "dense initial" in out and "speed-up" in out
    lat = json.loads((run / rundir.SUMMARY).read_text())["latency"]
    assert lat["runs"] == 5 and lat["threads"] == 1 and lat["batch_size"] == 1
    assert lat["final"]["params"] < lat["dense"]["params"]
    assert lat["final"]["onnx_bytes"] < lat["dense"]["onnx_bytes"]
    assert lat["final"]["median_ms"] > 0 and lat["dense"]["p90_ms"] >= lat["dense"]["median_ms"]
    assert lat["speedup"] == pytest.approx(lat["dense"]["median_ms"] / lat["final"]["median_ms"])


def test_latency_of_a_comparison_fills_the_speed_up_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedprune.compare import read_comparison, run_compare
    from fedprune.config import load_config

    cfg = load_config(
        overrides=[
            f"out='{tmp_path}'",
            "model.name=fc",
            "model.hidden=32",
            "data.num_clients=4",
            "federation.clients_per_round=2",
            "federation.rounds=2",
            "train.local_epochs=1",
            "structured.k=0.5",
        ]
    )
    out, rows = run_compare(cfg, ["fedavg", "autostructured"], out=tmp_path / "cmp")
    assert all(r["latency_speedup"] is None for r in rows)  # not measured yet
    assert main(["latency", str(out), "--runs", "5", "--warmup", "1"]) == 0
    assert "speed-up" in capsys.readouterr().out
    rows = read_comparison(out)["rows"]
    speed = {r["method"]: r["latency_speedup"] for r in rows}
    summary = json.loads((out / "runs" / "autostructured-seed0" / rundir.SUMMARY).read_text())
    assert speed["autostructured"] == pytest.approx(summary["latency"]["speedup"])
    assert speed["fedavg"] is not None and speed["fedavg"] > 0  # dense vs itself
    table = (out / "comparison.md").read_text()
    assert "ORT speed-up" in table and f"{speed['autostructured']:,.2f}" in table


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["export", "/nonexistent/run"], "not a directory"),
        (["export", "{tmp}"], "architecture.json"),
        (["export", "{tmp}", "--format", "tflite"], "unknown export format"),
        (["latency", "{tmp}"], "summary.json"),
        (["latency", "/nonexistent/run", "--runs", "0"], "runs must be >= 1"),
    ],
)
def test_bad_run_dir_exits_2_with_one_line(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1


def test_weights_that_do_not_fit_the_history_are_a_user_error(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "gap-cnn", (1, 28, 28), {"conv1": [0, 1]})
    arch = json.loads((run / rundir.ARCH).read_text())
    arch["history"] = []
    rundir.write_json(run / rundir.ARCH, arch)
    with pytest.raises(UserInputError, match="do not fit"):
        load_final_model(run)
    arch["history"] = [{"layer": "conv1", "width": 7, "keep": [0]}]
    rundir.write_json(run / rundir.ARCH, arch)
    with pytest.raises(UserInputError, match="replay"):
        load_final_model(run)


@pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="no executorch")
def test_executorch_export(tmp_path: Path) -> None:  # pragma: no cover - optional package
    run = _run_dir(tmp_path, "gap-cnn", (1, 28, 28), {"conv1": [0, 1, 2]})
    assert export_pte(run).stat().st_size > 0


@pytest.mark.skipif(importlib.util.find_spec("executorch") is not None, reason="executorch here")
def test_executorch_missing_is_a_user_error(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "gap-cnn", (1, 28, 28), {"conv1": [0, 1, 2]})
    with pytest.raises(UserInputError, match="pip install executorch"):
        export_pte(run)
