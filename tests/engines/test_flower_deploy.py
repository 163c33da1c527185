"""Flower deployments on loopback, as a user runs them (``slow``, like the other
deployment tests).

- TLS with SuperNode authentication: the certificates and keys are made by the very
  commands of ``docs/flower.md`` (its ``recipe: tls`` block, run with bash); 2 SuperNodes,
  2 rounds, the in-process engine's accuracy and bytes;
- a SuperNode whose key was never registered is refused (exit status 1);
- the warm executor (``fedprune flower exec``) gives Flower's executor's result, and a
  failing task is reported as failed without stopping it;
- ``fedprune flower run`` exits 0 for a completed run and 1 for a failed one.

Every process is started by :func:`~fedprune.engines.flower_local.local_deployment` (or
the test) and stopped by PID and process group; the fixtures check that none is left.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedprune import rundir
from fedprune.config import load_config
from fedprune.engines.flower.submit import run_config_text
from fedprune.engines.flower_local import (
    LocalDeployment,
    TlsFiles,
    local_deployment,
    stop_processes,
)
from fedprune.experiment import RunResult, run_experiment

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "flower.md"
BIN = Path(sys.executable).parent

SETTINGS: dict[str, Any] = {
    "method": "fedsparsify-global",
    "federation.rounds": 2,
    "data.num_clients": 2,
    "train.local_epochs": 1,
    # full formats on both engines (values-only messages: see the warm executor's test)
    "engine.values_only": False,
}

pytestmark = pytest.mark.slow


def doc_recipe(name: str) -> str:
    """The bash block that follows ``<!-- recipe: NAME -->`` in docs/flower.md."""
    text = DOC.read_text(encoding="utf-8")
    found = re.search(
        rf"<!-- recipe: {re.escape(name)} -->\s*```bash\n(.*?)^```", text, re.DOTALL | re.M
    )
    assert found, f"docs/flower.md has no ```bash block after <!-- recipe: {name} -->"
    return found.group(1)


def _env(home: Path) -> dict[str, str]:
    return {
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25",
        "FEDPRUNE_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "FEDPRUNE_CACHE": str(home / "partition-cache"),
    }


def _all_stopped(dep: LocalDeployment) -> None:
    left = [p.pid for p in dep.procs + dep.extra if p.poll() is None]
    assert not left, f"processes still running: {left}"


@pytest.fixture(scope="module")
def tls_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """certs/ and keys/ made by docs/flower.md's recipe, plus a key nobody registers."""
    if not (shutil.which("openssl") and shutil.which("ssh-keygen")):
        pytest.skip("openssl and ssh-keygen are needed to make certificates and keys")
    folder = tmp_path_factory.mktemp("pki")
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", doc_recipe("tls")],
        cwd=folder,
        check=True,
        capture_output=True,
        timeout=300,
    )
    subprocess.run(
        [
            *("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", ""),
            *("-C", "intruder", "-f", str(folder / "keys" / "intruder")),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return folder


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, tls_folder: Path) -> Iterator[LocalDeployment]:
    """TLS + SuperNode authentication, Flower's own executor, 2 registered SuperNodes."""
    home = tmp_path_factory.mktemp("flower-tls")
    certs, keys = tls_folder / "certs", tls_folder / "keys"
    tls = TlsFiles(ca=certs / "ca.crt", cert=certs / "server.pem", key=certs / "server.key")
    with local_deployment(
        home,
        2,
        connection="fedprune-tls",
        env=_env(home),
        tls=tls,
        node_keys=[keys / "supernode0", keys / "supernode1"],
    ) as dep:
        yield dep
    _all_stopped(dep)


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    """2 SuperNodes with ``--isolation process``, each served by ``fedprune flower exec``."""
    home = tmp_path_factory.mktemp("flower-warm")
    with local_deployment(
        home, 2, connection="fedprune-warm", env=_env(home), executor="warm"
    ) as dep:
        yield dep
    _all_stopped(dep)


def _finish(dep: LocalDeployment, run_id: int, limit: float = 600.0) -> str:
    """The run's final status (a bound against a hang, not a timing check)."""
    deadline = time.monotonic() + limit
    status = "unknown"
    while time.monotonic() < deadline and dep.alive():
        status = dep.status(run_id)
        if status.startswith("finished"):
            return status
        time.sleep(2)
    raise AssertionError(f"run {run_id} did not finish (status {status}):\n{dep.log_tails()}")


def _deployed(dep: LocalDeployment, out: Path, name: str, extra: dict[str, Any]) -> Path:
    settings = {**SETTINGS, **extra, "out": str(out), "name": name, "flower.round-timeout": 120}
    status = _finish(dep, dep.submit(REPO, settings))
    assert status == "finished:completed", dep.log_tails()
    return out / name


def _inprocess(tmp_path: Path, extra: dict[str, Any]) -> RunResult:
    cfg = load_config(overrides=[f"out='{tmp_path / 'inprocess'}'"], values={**SETTINGS, **extra})
    return run_experiment(cfg)


def _same_run(run_dir: Path, records: list[Any], weights: dict[str, torch.Tensor]) -> None:
    """``run_dir`` has these records (sampling, failures, bytes; accuracy to 1e-6) and
    these final weights."""
    got = rundir.read_metrics(run_dir)
    assert [r["round"] for r in got] == [r["round"] for r in records]
    for a, b in zip(records, got, strict=True):
        for key in ("sampled", "clients", "attempts", "bytes_up", "bytes_down", "nonzero_params"):
            assert a.get(key) == b.get(key), key
        assert a.get("failed") == b.get("failed")
        assert set(a.get("failures", {})) == {int(k) for k in b.get("failures", {})}
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
        assert a["sparsity"] == pytest.approx(b["sparsity"], abs=1e-9)
    final = rundir.load_weights(run_dir)
    assert set(final) == set(weights)
    for k, v in weights.items():
        assert torch.allclose(final[k], v, atol=1e-6), k


@pytest.fixture(scope="module")
def secure_run(secure: LocalDeployment, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of SETTINGS on the TLS deployment (Flower's executor)."""
    return _deployed(secure, tmp_path_factory.mktemp("tls-runs"), "tls", {})


def test_tls_and_node_authentication_match_the_inprocess_engine(
    secure: LocalDeployment, secure_run: Path, tmp_path: Path
) -> None:
    ref = _inprocess(tmp_path, {})
    _same_run(secure_run, ref.records, ref.model.state_dict())
    summary = rundir.read_summary(secure_run)
    for key in ("final_accuracy", "total_bytes_up", "total_bytes_down"):
        assert summary[key] == pytest.approx(ref.summary[key], abs=1e-6), key
    # the CLI verified the SuperLink with the CA; both SuperNodes are registered
    config = (Path(secure.env["FLWR_HOME"]) / "config.toml").read_text(encoding="utf-8")
    assert "root-certificates" in config and "insecure" not in config
    nodes = secure.flwr("supernode", "ls", secure.connection, "--format", "json")
    assert nodes.count('"online"') == 2, nodes


def test_an_unregistered_supernode_is_refused(secure: LocalDeployment, tls_folder: Path) -> None:
    node = secure.start_supernode("intruder", 0, 2, key=tls_folder / "keys" / "intruder")
    try:
        code = node.wait(timeout=300)
    finally:
        stop_processes([node])
    log = (secure.logs / "intruder.log").read_text(errors="replace")
    assert code == 1, log[-2000:]
    assert "Failed to activate SuperNode" in log
    assert secure.alive()  # the federation is not affected


def test_the_warm_executor_gives_the_result_of_flowers_executor(
    warm: LocalDeployment, secure_run: Path, tmp_path: Path
) -> None:
    run_dir = _deployed(warm, tmp_path, "warm", {})
    _same_run(run_dir, rundir.read_metrics(secure_run), rundir.load_weights(secure_run))
    # the tasks ran in the executors (no flwr-clientapp process per message)
    for i in range(2):
        log = (warm.logs / f"supernode{i}-exec.log").read_text(errors="replace")
        assert len(re.findall(r"task \d+ completed", log)) >= 1 + SETTINGS["federation.rounds"]
    assert warm.alive()


def test_a_failing_task_does_not_stop_the_warm_executor(
    warm: LocalDeployment, tmp_path: Path
) -> None:
    extra = {
        "engine.fail_rate": 0.5,
        "federation.rounds": 4,
        "federation.min_clients": 1,
        "federation.max_retries": 3,
    }
    ref = _inprocess(tmp_path, extra)
    failures = sum(r.get("failed", 0) for r in ref.records)
    assert failures > 0  # the seed makes clients fail (the same ones on every engine)
    before = {i: _exec_log(warm, i) for i in range(2)}
    run_dir = _deployed(warm, tmp_path, "failing", extra)
    _same_run(run_dir, ref.records, ref.model.state_dict())
    for rec in rundir.read_metrics(run_dir):
        assert all("InjectedFailure" in why for why in rec.get("failures", {}).values())
    # reported to Flower as failed tasks; the executors went on and are still there
    new = {i: _exec_log(warm, i)[len(before[i]) :] for i in range(2)}
    failed = sum(len(re.findall(r"task \d+ failed in", text)) for text in new.values())
    assert failed >= failures  # a client can fail in several attempts of a round
    assert all(re.search(r"task \d+ completed", text) for text in new.values())
    assert warm.alive()


def test_the_warm_executor_keeps_what_a_node_holds_for_values_only_broadcasts(
    warm: LocalDeployment, tmp_path: Path
) -> None:
    """Values-only messages both ways: the node's context.state (the supports it holds)
    travels between the SuperNode and the executor with every task, so the bytes down
    and up are the in-process engine's."""
    extra = {"engine.values_only": True, "federation.rounds": 5}
    ref = _inprocess(tmp_path, extra)
    full = _inprocess(tmp_path / "full", {**extra, "engine.values_only": False})
    assert ref.summary["total_bytes_down"] < full.summary["total_bytes_down"]
    run_dir = _deployed(warm, tmp_path, "warm-values-only", extra)
    _same_run(run_dir, ref.records, ref.model.state_dict())


def _exec_log(dep: LocalDeployment, i: int) -> str:
    return (dep.logs / f"supernode{i}-exec.log").read_text(errors="replace")


def _flower_run(dep: LocalDeployment, settings: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(str(BIN / "fedprune"), "flower", "run", str(REPO), dep.connection),
            *("--run-config", run_config_text(settings), "--poll", "1"),
        ],
        env=dep.env,
        cwd=dep.home,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_flower_run_exit_status_says_how_the_run_ended(
    warm: LocalDeployment, tmp_path: Path
) -> None:
    base = {**SETTINGS, "federation.rounds": 1, "out": str(tmp_path)}
    ok = _flower_run(warm, {**base, "name": "ok"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "finished:completed" in ok.stdout
    assert (tmp_path / "ok" / rundir.SUMMARY).exists()
    # 3 clients on 2 SuperNodes: the ServerApp gives up after flower.node-wait
    bad = _flower_run(warm, {**base, "name": "bad", "data.num_clients": 3, "flower.node-wait": 1})
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "finished:failed" in bad.stdout
