"""``--engine flower`` on an existing Ray cluster (``slow``, like the other Flower tests).

The test starts a Ray head and one worker node on this machine (``ray start --block``,
private ports, one CPU each, so Flower's pool has one ClientApp actor per node), points
the simulation engine at the head with ``RAY_ADDRESS`` (Ray's own variable, as a user
would), and checks that clients trained on both nodes and that the result equals the
in-process engine's. Both ``ray start`` processes and everything they started are
stopped by PID and process group (never ``ray stop``, which stops every Ray process of
the user on the machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedprune import rundir
from fedprune.config import load_config
from fedprune.data.federation import Federation
from fedprune.engines.flower import FactoryClientBuilder, FlowerSimulationEngine
from fedprune.engines.flower_local import _descendants, free_ports, stop_processes, wait_port
from fedprune.experiment import finish_run, load_federation, prepare_run, run_experiment

BIN = Path(sys.executable).parent
NODES_ENV = "FEDPRUNE_TEST_RAY_NODES"

pytestmark = pytest.mark.slow


def _node_ports() -> list[str]:
    """Private ports for one Ray node (Ray's defaults are shared machine-wide)."""
    p = free_ports(22)
    return [
        "--node-ip-address=127.0.0.1",
        f"--object-manager-port={p[0]}",
        f"--node-manager-port={p[1]}",
        f"--dashboard-agent-listen-port={p[2]}",
        f"--dashboard-agent-grpc-port={p[3]}",
        f"--runtime-env-agent-port={p[4]}",
        f"--metrics-export-port={p[5]}",
        "--worker-port-list=" + ",".join(str(v) for v in p[6:22]),
    ]


def _alive_nodes(address: str) -> int:
    import ray

    ray.init(address=address, logging_level="ERROR")
    try:
        return sum(1 for n in ray.nodes() if n["Alive"])
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, Path]]:
    """A head and one worker on this machine; the head's address and the folder where
    the recording loader leaves one file per (node, process)."""
    if not (BIN / "ray").exists():
        pytest.skip("the ray CLI is not installed (flwr[simulation] brings it)")
    # Ray puts Unix sockets under its temp dir: keep the path short
    tmp = Path(tempfile.mkdtemp(prefix="fpray-", dir="/tmp"))
    seen = tmp / "nodes"
    seen.mkdir()
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        NODES_ENV: str(seen),
    }
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--block"]
    gcs, client = free_ports(2)
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str]) -> None:
        with open(tmp / f"{name}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [str(BIN / "ray"), "start", *args, *common, *_node_ports()],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    try:
        start(
            "head",
            [
                *("--head", f"--port={gcs}", f"--ray-client-server-port={client}"),
                *("--include-dashboard=false", f"--temp-dir={tmp / 'session'}"),
            ],
        )
        wait_port(gcs, 120)
        address = f"127.0.0.1:{gcs}"
        start("worker", [f"--address={address}"])
        deadline = time.monotonic() + 180  # a bound against a hang, not a timing check
        while _alive_nodes(address) < 2:
            assert time.monotonic() < deadline, (tmp / "worker.log").read_text()[-3000:]
            assert all(p.poll() is None for p in procs), (tmp / "worker.log").read_text()
            time.sleep(2)
        yield address, seen
    finally:
        family = {p.pid for p in procs} | _descendants(p.pid for p in procs)
        stop_processes(procs)
        left = [pid for pid in family if Path(f"/proc/{pid}").exists()]
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes still running: {left}"


def recording_loader(cfg: object) -> Federation:
    """``load_federation``, leaving a file named after the Ray node and the process that
    called it (each ClientApp actor loads the federation once)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    (Path(os.environ[NODES_ENV]) / f"{node}-{os.getpid()}").touch()
    return load_federation(cfg)  # type: ignore[arg-type]


def test_the_simulation_runs_on_a_ray_cluster(
    ray_cluster: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, seen = ray_cluster
    values = {
        "method": "fedsparsify-global",
        "data.num_clients": 4,
        "federation.rounds": 2,
        "engine.values_only": False,  # full formats (values-only: test_flower_broadcast.py)
    }
    ref = run_experiment(load_config(overrides=[f"out='{tmp_path / 'ref'}'"], values=values))
    cfg = load_config(
        overrides=[f"out='{tmp_path / 'flower'}'"], values={**values, "engine.name": "flower"}
    )
    run = prepare_run(cfg)
    monkeypatch.setenv("RAY_ADDRESS", address)  # what a user sets; no ray_address given
    engine = FlowerSimulationEngine(
        run.cfg, run.fed, run.server, FactoryClientBuilder(recording_loader, run.client_factory)
    )
    assert engine.backend_config()["init_args"]["address"] == address
    records = engine.run(run.on_round(), checkpoint=run.checkpointer())
    result = finish_run(run, records)
    # one ClientApp actor per node (one CPU each), and both trained clients
    nodes = {f.name.rsplit("-", 1)[0] for f in seen.iterdir()}
    assert len(nodes) == 2, sorted(f.name for f in seen.iterdir())
    for a, b in zip(ref.records, records, strict=True):
        assert (a["sampled"], a["bytes_up"], a["bytes_down"]) == (
            b["sampled"],
            b["bytes_up"],
            b["bytes_down"],
        )
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
    assert result.summary["final_accuracy"] == pytest.approx(
        ref.summary["final_accuracy"], abs=1e-6
    )
    assert len(rundir.read_metrics(result.run_dir)) == 2
    import ray

    assert not ray.is_initialized()  # disconnected; the cluster is left running
    assert _alive_nodes(address) == 2
