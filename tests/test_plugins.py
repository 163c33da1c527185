"""Issue 12: a method written outside fedprune works through the registry everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedprune import registry
from fedprune.config import config_to_toml, load_config
from fedprune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), env.get("PYTHONPATH", "")])
    env["FEDPRUNE_OFFLINE"] = "1"
    env.update(extra)
    return env


def _fedprune(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedprune.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


@pytest.fixture
def oneshot():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(EXAMPLES))
    try:
        import oneshot_plugin

        registry.register(oneshot_plugin.METHOD, replace=True)
        yield oneshot_plugin
    finally:
        registry.unregister("oneshot")
        sys.path.remove(str(EXAMPLES))


def test_cli_run_and_compare_with_a_plugin_module(tmp_path: Path) -> None:
    env = _env(FEDPRUNE_PLUGINS="oneshot_plugin")
    proc = _fedprune(
        ["run", "--method", "oneshot", "--rounds", "4", "--set", "oneshot.sparsity=0.7",
         "--out", str(tmp_path), "--name", "r", "--quiet"],
        env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["method"] == "oneshot"
    assert abs(summary["final_sparsity"] - 0.7) < 0.01
    assert "[oneshot]\nsparsity = 0.7" in (tmp_path / "r" / "config.toml").read_text()
    proc = _fedprune(
        ["compare", "--methods", "fedavg,oneshot", "--rounds", "3", "--out", str(tmp_path / "c"),
         "--quiet"],
        env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "c" / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fedavg", "oneshot"]
    assert rows[1]["final_sparsity"] > 0.45 and rows[0]["final_sparsity"] < 0.01
    # its own section is validated like a built-in one
    bad = _fedprune(["run", "--method", "oneshot", "--set", "oneshot.sparsity=1"], env)
    assert bad.returncode == 2 and "oneshot.sparsity must be in [0, 1)" in bad.stderr
    late = _fedprune(["run", "--method", "oneshot", "--rounds", "1", "--out", str(tmp_path)], env)
    assert late.returncode == 2 and "oneshot.at_round" in late.stderr


def test_without_the_plugin_the_method_is_unknown() -> None:
    with pytest.raises(ConfigError, match="method: unknown value 'oneshot'"):
        load_config(overrides=["method='oneshot'"])


def test_entry_point_discovery(tmp_path: Path) -> None:
    dist = tmp_path / "oneshot_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: oneshot-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedprune.methods]\noneshot = oneshot_plugin:METHOD\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = _fedprune(["methods"], env)
    assert proc.returncode == 0 and "oneshot" in proc.stdout, proc.stderr
    proc = _fedprune(
        ["run", "--method", "oneshot", "--rounds", "2", "--out", str(tmp_path), "--quiet"], env
    )
    assert proc.returncode == 0, proc.stderr


def test_plugin_run_resumes_bit_identically(tmp_path: Path, oneshot) -> None:  # type: ignore[no-untyped-def]
    from fedprune.experiment import resume_experiment, run_experiment

    def cfg(name: str):  # type: ignore[no-untyped-def]
        return load_config(
            overrides=[f"out='{tmp_path}'", f"name='{name}'", "method='oneshot'",
                       "federation.rounds=4", "oneshot.at_round=2"]
        )  # fmt: skip

    full = run_experiment(cfg("full"))

    class Stop(Exception):
        pass

    def stop(rec: dict[str, object]) -> None:
        if rec["round"] == 3:
            raise Stop

    with pytest.raises(Stop):
        run_experiment(cfg("cut"), on_round=stop)
    resumed = resume_experiment(tmp_path / "cut")
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert "[oneshot]" in config_to_toml(cfg("x"))


def test_registry_refuses_bad_registrations() -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get_method("fedavg"))
    with pytest.raises(ValueError, match="reserved"):
        registry.MethodInfo("x", "a:b", "a:c", section="train", config=object)
    with pytest.raises(ValueError, match="must match"):
        registry.MethodInfo("Bad Name", "a:b", "a:c")


def test_plugin_on_the_flower_simulation_engine(tmp_path: Path) -> None:
    env = _env(
        FEDPRUNE_PLUGINS="oneshot_plugin",
        FLWR_HOME=str(tmp_path / "flwr"),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )
    # full-format tensors on both engines (values-only: tests/engines/test_flower_broadcast.py)
    args = ["--method", "oneshot", "--rounds", "3", "--clients", "3", "--quiet",
            "--set", "engine.values_only=false"]  # fmt: skip
    flower = _fedprune(
        ["run", *args, "--engine", "flower", "--out", str(tmp_path), "--name", "f"], env
    )
    assert flower.returncode == 0, flower.stderr[-2000:]
    local = _fedprune(["run", *args, "--out", str(tmp_path), "--name", "l"], env)
    assert local.returncode == 0, local.stderr
    f = json.loads((tmp_path / "f" / "summary.json").read_text())
    lo = json.loads((tmp_path / "l" / "summary.json").read_text())
    assert f["final_accuracy"] == lo["final_accuracy"]
    assert f["total_bytes_up"] == lo["total_bytes_up"] and f["final_sparsity"] > 0.45


def test_flower_run_config_names_the_plugin_module(oneshot) -> None:  # type: ignore[no-untyped-def]
    from fedprune.engines.flower import config_from_run_config, run_config_from_config

    cfg = load_config(overrides=["method='oneshot'", "oneshot.sparsity=0.6"])
    rc = run_config_from_config(cfg)
    assert rc["flower.plugins"] == "oneshot_plugin" and rc["oneshot.sparsity"] == 0.6
    back, _ = config_from_run_config(rc)
    assert back.method == "oneshot" and back.section("oneshot").sparsity == 0.6
    assert "flower.plugins" not in run_config_from_config(load_config())
