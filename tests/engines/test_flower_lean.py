"""A lean ClientApp start, the node's partition cache, the app package, and the pieces of
the Flower deployment tooling that run without a SuperLink (the warm executor's version
guard, ``fedprune flower run``'s exit status, the Ray cluster setting).

The import checks run in fresh interpreters (``sys.modules`` of this one already holds
torch). Nothing here starts Flower's runtime.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fedprune.config import load_config
from fedprune.engines.flower import partitions
from fedprune.engines.flower.simulation import FlowerSimulationEngine
from fedprune.engines.flower.submit import FlowerCli
from fedprune.engines.flower.warm import FLOWER_VERSION, check_flower_version
from fedprune.engines.flower.warm import main as warm_main
from fedprune.experiment import load_federation

REPO = Path(__file__).resolve().parents[2]
DATA_STACK = ("sklearn", "scipy", "pandas", "pyarrow", "datasets", "matplotlib")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own partition cache (never the user's ~/.cache)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(partitions.CACHE_ENV, str(folder))
    return folder


def _python(code: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; the JSON it prints last."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


_QUERY = """
import json, sys
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
from fedprune.flower_app import client_app
msg = Message(RecordDict({"fedprune.node": ConfigRecord({"want": "partition-id"})}),
              dst_node_id=7, message_type=MessageType.QUERY, group_id="discover")
msg.metadata.__dict__["_message_id"] = "m1"
ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2},
              state=RecordDict(), run_config={})
reply = client_app(msg, ctx)
info = dict(reply.content["fedprune.node"])
print(json.dumps({"info": info, "loaded": sorted(m for m in sys.modules
      if m.split(".")[0] in ("torch", "sklearn", "scipy", "pandas", "pyarrow"))}))
"""


def test_a_query_message_does_not_import_torch() -> None:
    got = _python(_QUERY)
    assert got["info"] == {"partition-id": 1, "num-partitions": 2}
    assert got["loaded"] == []


_TRAIN = """
import json, sys
from fedprune.config import load_config
from fedprune.flower_app import build_node
cfg = load_config(values={"data.num_clients": 3, "seed": 5})
node = build_node(cfg, 1)
d = node.data
print(json.dumps({"cid": d.cid, "n": int(d.y_train.shape[0]), "clients": node.num_clients,
      "x": float(d.x_train.double().sum()), "y": int(d.y_train.sum()),
      "client": type(node.client).__name__,
      "stack": sorted({m.split(".")[0] for m in sys.modules} & set(%r))}))
"""


def test_a_node_loads_its_cached_partition_without_the_data_set_stack(_cache: Path) -> None:
    code = _TRAIN % (DATA_STACK,)
    first = _python(code)
    assert "sklearn" in first["stack"]  # the first process built the federation ...
    assert len(list(_cache.rglob("meta.json"))) == 1  # ... and cached partition 1 only
    second = _python(code)
    assert second["stack"] == []  # ... the next one reads .npy files
    fed = load_federation(load_config(values={"data.num_clients": 3, "seed": 5}))
    ref = fed.clients[1]
    for got in (first, second):
        assert (got["cid"], got["n"], got["clients"]) == (1, ref.num_train, 3)
        assert got["x"] == pytest.approx(float(ref.x_train.double().sum()), abs=1e-9)
        assert got["y"] == int(ref.y_train.sum())
    assert first["client"] == second["client"]


def _cfg(**values: object) -> object:
    return load_config(values={"data.num_clients": 3, **values})


def test_partition_cache_hits_and_keys(_cache: Path) -> None:
    cfg = _cfg()
    calls: list[int] = []

    def loader(c: object) -> object:
        calls.append(1)
        return load_federation(c)  # type: ignore[arg-type]

    a = partitions.load_partition(cfg, 2, loader)  # type: ignore[arg-type]
    b = partitions.load_partition(cfg, 2, loader)  # type: ignore[arg-type]
    assert (a.cached, b.cached, len(calls)) == (False, True, 1)
    for name in ("x_train", "y_train"):
        assert torch.equal(getattr(a.data, name), getattr(b.data, name))
    assert b.data.x_train.dtype == torch.float32 and b.data.y_train.dtype == torch.int64
    assert (b.num_clients, b.num_classes, b.input_shape) == (3, a.num_classes, a.input_shape)
    # the data keys and the seed are in the key; training keys are not
    key = partitions.partition_key(cfg)  # type: ignore[arg-type]
    assert partitions.partition_key(_cfg(seed=1)) != key  # type: ignore[arg-type]
    assert partitions.partition_key(_cfg(**{"data.partition": "dirichlet"})) != key  # type: ignore[arg-type]
    assert partitions.partition_key(_cfg(**{"train.lr": 0.5})) == key  # type: ignore[arg-type]


def test_a_damaged_cache_entry_is_rebuilt(_cache: Path) -> None:
    cfg = _cfg()
    first = partitions.load_partition(cfg, 0, load_federation)  # type: ignore[arg-type]
    (y,) = list(_cache.rglob("y_train.npy"))
    y.write_bytes(y.read_bytes()[:-8])  # truncated
    again = partitions.load_partition(cfg, 0, load_federation)  # type: ignore[arg-type]
    assert not again.cached
    assert torch.equal(again.data.y_train, first.data.y_train)
    assert partitions.load_partition(cfg, 0, load_federation).cached  # type: ignore[arg-type]


def test_the_cache_can_be_turned_off(_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(partitions.CACHE_ENV, "off")
    assert partitions.cache_root() is None
    part = partitions.load_partition(_cfg(), 0, load_federation)  # type: ignore[arg-type]
    assert not part.cached and not _cache.exists()


def test_the_app_package_carries_only_the_app_declaration() -> None:
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert sorted(names) == [".info/CONTENT", "pyproject.toml"]  # no tests, docs, benchmarks
    assert len(fab) < 20_000


# ------------------------------------------------------------------- warm executor


def test_the_warm_executor_refuses_another_flower_version(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_flower_version() is None  # the pinned version is installed here
    assert check_flower_version(FLOWER_VERSION) is None
    from fedprune.engines.flower import warm

    monkeypatch.setattr(warm, "installed_flower_version", lambda: "1.42.0")
    assert warm_main(["--insecure"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1.42.0" in err and FLOWER_VERSION in err
    assert len(err) <= 200


def test_the_fedprune_command_dispatches_to_the_flower_tools() -> None:
    from fedprune.cli import main

    assert main(["flower", "exec", "--help"]) == 0
    assert main(["flower", "run", "--help"]) == 0
    assert main(["flower", "nope"]) == 2


# ------------------------------------------------------- fedprune flower run (exit)


def _fake_flwr(tmp_path: Path, status: str, *, submit_ok: bool = True) -> Path:
    """A stand-in for the ``flwr`` CLI that answers ``run`` and ``ls`` like Flower 1.41."""
    script = tmp_path / "flwr"
    run = (
        'echo \'{"success": true, "run-id": 42}\''
        if submit_ok
        else 'echo "SuperLink unreachable" >&2; exit 1'
    )
    script.write_text(
        "#!/bin/sh\n"
        f'case "$1" in\n  run) {run} ;;\n'
        f'  ls) echo \'{{"success": true, "runs": [{{"run-id": 42, "status": "{status}"}}]}}\' ;;\n'
        "  log) echo streamed ;;\nesac\n",
        encoding="utf-8",
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.parametrize(
    ("status", "submit_ok", "code"),
    [
        ("finished:completed", True, 0),
        ("finished:failed", True, 1),
        ("finished:stopped", True, 1),
        ("finished:completed", False, 2),
    ],
)
def test_flower_run_exit_status_follows_the_final_status(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    status: str,
    submit_ok: bool,
    code: int,
) -> None:
    from fedprune.engines.flower import submit

    fake = _fake_flwr(tmp_path, status, submit_ok=submit_ok)
    monkeypatch.setattr(submit, "_flwr_executable", lambda: str(fake))
    assert submit.main([str(tmp_path), "conn", "--run-config", "x=1", "--poll", "0.01"]) == code
    out, err = capsys.readouterr()
    if submit_ok:
        assert f"run 42 {status}" in out
    else:
        assert "SuperLink unreachable" in err and err.count("\n") == 1
    assert FlowerCli(exe=str(fake)).status(42, "conn") == status


# --------------------------------------------------------------------- Ray cluster


def test_the_simulation_attaches_to_a_ray_cluster_when_given_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = FlowerSimulationEngine.__new__(FlowerSimulationEngine)
    engine.num_cpus, engine.ray_address = 2, None
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = engine.backend_config()
    assert local["init_args"]["num_cpus"] == 2 and "address" not in local["init_args"]
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    cluster = engine.backend_config()["init_args"]
    assert cluster["address"] == "10.0.0.5:6379" and "num_cpus" not in cluster
    engine.ray_address = "127.0.0.1:7000"  # an explicit address wins
    assert engine.backend_config()["init_args"]["address"] == "127.0.0.1:7000"
    assert engine.backend_config()["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
