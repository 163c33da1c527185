"""The Flower engine: wire format, strategy, simulation runtime and deployment runtime.

Fast tests drive the strategy and the ClientApp through an in-memory grid (no Ray, no
network). The ``slow`` tests start Ray (``run_simulation``) and a real SuperLink with
two SuperNodes on loopback; every process they start is stopped by PID or process group.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import tomllib
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedprune import rundir
from fedprune.config import RunConfig, load_config
from fedprune.core.codec import Payload, encode_arrays, encode_payload
from fedprune.core.masks import weight_sparsity
from fedprune.engines.flower import (
    ARRAYS_KEY,
    CONFIG_KEY,
    STYPE,
    FedpruneStrategy,
    FlowerEngineError,
    FlowerOptions,
    config_from_run_config,
    decode_content,
    encode_for_flower,
    make_content,
    run_config_defaults,
    run_config_from_config,
)
from fedprune.engines.flower_local import LocalDeployment, local_deployment
from fedprune.errors import ConfigError, DecodeError, RoundFailedError
from fedprune.experiment import (
    RunResult,
    load_federation,
    model_spec,
    prepare_resume,
    prepare_run,
    run_experiment,
)
from fedprune.flower_app import make_client_app
from fedprune.methods.registry import get_method, list_methods

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _partition_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ClientApps cache their partition here, not in the user's ~/.cache."""
    monkeypatch.setenv("FEDPRUNE_CACHE", str(tmp_path / "partition-cache"))


# Most reference runs here compare with values-only messages (engine.values_only) off:
# every tensor travels with its support. test_flower_broadcast.py covers them on.
_FULL = "engine.values_only=false"


def _cfg(tmp_path: Path, *extra: str) -> RunConfig:
    return load_config(
        overrides=[
            f"out='{tmp_path}'",
            "federation.rounds=3",
            "data.num_clients=4",
            "federation.clients_per_round=3",
            _FULL,
            *extra,
        ]
    )


# ------------------------------------------------------------------------------ wire


def _payload() -> Payload:
    w = torch.randn(6, 5)
    w[w.abs() < 0.8] = 0.0  # sparse enough for a non-dense format
    return Payload(
        arrays={"fc.weight": w, "fc.bias": torch.randn(6), "mask/fc.weight": w != 0},
        config={"task": "fit", "round": 3, "arch": [{"layer": "conv1", "keep": [0, 2]}]},
        metrics={"num_examples": 17.0, "train_loss": float("nan")},
    )


def test_wire_carries_the_codec_buffers_and_counts_their_length() -> None:
    p = _payload()
    enc = encode_for_flower(p)
    content = make_content(enc, "fit")
    arrays = content[ARRAYS_KEY]
    assert isinstance(arrays, ArrayRecord)
    # one Array per tensor, byte for byte the codec's per-tensor buffers
    assert {n: a.data for n, a in arrays.items()} == encode_arrays(p.arrays)
    assert all(a.stype == STYPE for a in arrays.values())
    assert arrays["fc.weight"].shape == (6, 5) and arrays["fc.weight"].dtype == "float32"
    assert arrays["mask/fc.weight"].dtype == "bool"
    # counted bytes = what the in-process engine counts for the same payload
    assert enc.nbytes == len(encode_payload(p))
    task, q, nbytes = decode_content(content)
    assert (task, nbytes) == ("fit", enc.nbytes)
    assert list(q.arrays) == list(p.arrays)
    for k in p.arrays:
        assert torch.equal(q.arrays[k], p.arrays[k])
    assert q.config == p.config
    assert q.metrics["num_examples"] == 17.0


def _tampered(kind: str) -> RecordDict:
    content = make_content(encode_for_flower(_payload()), "fit")
    arrays = content[ARRAYS_KEY]
    assert isinstance(arrays, ArrayRecord)
    a = arrays["fc.bias"]
    if kind == "truncated":
        arrays["fc.bias"] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data[:-3])
    elif kind == "stype":
        arrays["fc.bias"] = Array(dtype=a.dtype, shape=a.shape, stype="numpy.ndarray", data=a.data)
    elif kind == "shape":
        arrays["fc.bias"] = Array(dtype=a.dtype, shape=(2, 3), stype=a.stype, data=a.data)
    elif kind == "missing":
        del arrays["fc.bias"]
    elif kind == "no-config":
        del content[CONFIG_KEY]
    return content


@pytest.mark.parametrize("kind", ["truncated", "stype", "shape", "missing", "no-config"])
def test_malformed_messages_raise_decode_error(kind: str) -> None:
    with pytest.raises(DecodeError):
        decode_content(_tampered(kind))


# ------------------------------------------------------------------------ run config


def test_run_config_round_trips_and_rejects_unknown_keys() -> None:
    cfg = load_config(
        overrides=["method=fedavg", "pruning.final_sparsity=0.5", "data.num_clients=3"]
    )
    back, options = config_from_run_config({**run_config_from_config(cfg), "flower.node-wait": 7})
    assert back.method == "fedavg" and back.pruning.final_sparsity == 0.5
    assert back.data.num_clients == 3 and back.engine.name == "flower"
    assert options.node_wait == 7.0
    partial, _ = config_from_run_config({"federation.rounds": 4})  # the rest: defaults
    assert partial.federation.rounds == 4 and partial.method == RunConfig().method
    with pytest.raises(ConfigError, match=r"pruning\.final_sparsty"):
        config_from_run_config({"pruning.final_sparsty": 0.5})
    with pytest.raises(ConfigError, match=r"flower\.nope"):
        config_from_run_config({"flower.nope": 1})


def test_pyproject_declares_the_app_and_mirrors_every_config_key() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    app = data["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedprune.flower_app:server_app",
        "clientapp": "fedprune.flower_app:client_app",
    }
    assert "federations" not in data["tool"]["flwr"]  # 1.41 would rewrite pyproject.toml
    expected = run_config_defaults()
    got = app["config"]
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    assert not missing and not extra, (
        f"[tool.flwr.app.config] is out of date (missing {missing}, unknown {extra}); "
        "regenerate it with `python -m fedprune.flower_app`"
    )
    assert got == expected


# ------------------------------------------------------------- strategy, in memory


class MemoryGrid(Grid):
    """Delivers messages by calling the ClientApp directly, one context per node."""

    def __init__(
        self, app: ClientApp, n: int, *, tamper: dict[int, str] | None = None, nodes: int = 0
    ) -> None:
        self.app = app
        self.tamper = tamper or {}
        self.contexts = {
            7000 + i: Context(
                run_id=1,
                node_id=7000 + i,
                node_config={"partition-id": i, "num-partitions": n},
                state=RecordDict(),
                run_config={},
            )
            for i in range(nodes or n)
        }
        self.sent: list[Message] = []
        self.replies: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:  # pragma: no cover - unused
        pass

    @property
    def run(self) -> Any:  # pragma: no cover - unused
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            msg_id = m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(m)
            pid = self.contexts[m.metadata.dst_node_id].node_config["partition-id"]
            if m.metadata.message_type == "train" and self.tamper.get(int(pid)) == "silent":
                ids.append(msg_id)  # a node that never answers
                continue
            self.replies[msg_id] = self._deliver(m)
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, m: Message) -> Message:
        ctx = self.contexts[m.metadata.dst_node_id]
        try:
            reply = self.app(m, ctx)
        except Exception as e:  # the runtimes turn exceptions into error replies
            reply = Message(Error(code=0, reason=repr(e)), reply_to=m)
        pid = ctx.node_config["partition-id"]
        if m.metadata.message_type == "train" and self.tamper.get(int(pid)) == "corrupt":
            arrays = reply.content[ARRAYS_KEY]
            assert isinstance(arrays, ArrayRecord)
            name = next(iter(arrays))
            a = arrays[name]
            arrays[name] = Array(
                dtype=a.dtype, shape=a.shape, stype=a.stype, data=b"FPT" + a.data[3:-1]
            )
        return reply


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's per-process identity, which the runtimes set before a ServerApp runs."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.mark.usefixtures("task_identity")
def test_strategy_on_memory_grid_matches_the_inprocess_engine(tmp_path: Path) -> None:
    ref = run_experiment(_cfg(tmp_path, "federation.average_decay=0.5"))
    cfg = _cfg(tmp_path, "engine.name=flower", "federation.average_decay=0.5")
    run = prepare_run(cfg)
    seen: list[int] = []
    strategy = FedpruneStrategy(
        cfg,
        run.fed,
        run.server,
        on_round=lambda r: seen.append(r["round"]),
        checkpoint=run.checkpointer(),
    )
    grid = MemoryGrid(make_client_app(cfg), 4)
    records = strategy.run(grid)
    assert seen == [1, 2, 3]
    assert strategy.node_of == {i: 7000 + i for i in range(4)}
    for a, b in zip(ref.records, records, strict=True):
        assert set(a) == set(b)
        for key in ("sampled", "clients", "bytes_up", "bytes_down", "cum_dense_bytes_up"):
            assert a[key] == b[key], key
        for key in ("test_accuracy", "average_test_accuracy", "sparsity", "train_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    # every train message carries one Array per tensor with fedprune's stype
    fits = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(fits) == 9
    assert all(a.stype == STYPE for m in fits for a in m.content[ARRAYS_KEY].values())  # type: ignore[union-attr]
    # client bookkeeping lives in context.state
    state = grid.contexts[7000].state["fedprune.node"]
    assert state["partition-id"] == 0 and state["messages"] >= 2  # type: ignore[index]


@pytest.mark.usefixtures("task_identity")
def test_undecodable_reply_is_dropped_with_a_logged_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(tmp_path, "engine.name=flower", "federation.rounds=2", "method=fedavg")
    run = prepare_run(cfg)
    strategy = FedpruneStrategy(cfg, run.fed, run.server)
    grid = MemoryGrid(make_client_app(cfg), 4, tamper={1: "corrupt"})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        records = strategy.run(grid)
    for rec in records:
        if 1 in rec["sampled"]:
            assert rec["failed"] == 1 and "undecodable" in rec["failures"][1]
            assert rec["clients"] == len(rec["sampled"]) - 1
        else:  # pragma: no cover - depends on the seed's draw
            assert "failed" not in rec
    assert any("failed" in rec for rec in records)
    assert any("dropping the reply of client 1" in r.getMessage() for r in caplog.records)
    assert records[-1]["test_accuracy"] is not None


@pytest.mark.usefixtures("task_identity")
def test_a_client_that_times_out_is_dropped(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "engine.name=flower", "federation.rounds=2", "method=fedavg")
    run = prepare_run(cfg)
    options = FlowerOptions(round_timeout=0.3, poll_interval=0.05)
    strategy = FedpruneStrategy(cfg, run.fed, run.server, options=options)
    records = strategy.run(MemoryGrid(make_client_app(cfg), 4, tamper={2: "silent"}))
    assert len(records) == 2
    for rec in records:
        if 2 in rec["sampled"]:
            assert rec["failures"] == {2: "no reply within flower.round-timeout"}
            assert rec["clients"] == len(rec["sampled"]) - 1
    assert any("failures" in rec for rec in records)


@pytest.mark.usefixtures("task_identity")
def test_injected_failures_match_the_inprocess_engine(tmp_path: Path) -> None:
    """``engine.fail_rate`` fails the same clients as in-process, as error replies that
    the strategy drops with their reason; the rounds complete."""
    extra = ("engine.fail_rate=0.3", "federation.rounds=4", "data.num_clients=6")
    ref = run_experiment(_cfg(tmp_path, *extra, "name='ref'"))
    cfg = _cfg(tmp_path, "engine.name=flower", *extra)
    run = prepare_run(cfg)
    records = FedpruneStrategy(cfg, run.fed, run.server).run(MemoryGrid(make_client_app(cfg), 6))
    assert sum(r.get("failed", 0) for r in records) > 0
    for a, b in zip(ref.records, records, strict=True):
        assert a.get("failed") == b.get("failed") and a["clients"] == b["clients"]
        assert set(a.get("failures", {})) == set(b.get("failures", {}))
        assert all("InjectedFailure" in why for why in b.get("failures", {}).values())
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)


@pytest.mark.usefixtures("task_identity")
def test_too_few_replies_retry_then_stop_cleanly_on_flower(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        "engine.name=flower",
        "engine.fail_rate=0.9",
        "federation.min_clients=3",
        "federation.max_retries=1",
    )
    run = prepare_run(cfg)
    strategy = FedpruneStrategy(cfg, run.fed, run.server)
    grid = MemoryGrid(make_client_app(cfg), 4)
    with pytest.raises(RoundFailedError, match=r"in 2 attempts"):
        strategy.run(grid)
    groups = {m.metadata.group_id for m in grid.sent if m.metadata.message_type == "train"}
    assert groups == {"1.1", "1.2"}  # round 1, attempts 1 and 2
    assert strategy.records == []


@pytest.mark.usefixtures("task_identity")
def test_flower_strategy_resumes_from_a_checkpoint(tmp_path: Path) -> None:
    """Crash after round 2's record, resume on Flower: the end equals an uninterrupted
    in-process run (the checkpoint is engine-independent)."""
    extra = ("federation.rounds=4", "federation.aggregation=fedavgm")
    ref = run_experiment(_cfg(tmp_path, *extra, "name='ref'"))
    cfg = _cfg(tmp_path, "engine.name=flower", *extra, "name='flwr'")
    run = prepare_run(cfg)

    def crash(rec: dict[str, Any]) -> None:
        run.on_round()(rec)
        if rec["round"] == 2:
            raise KeyboardInterrupt

    strategy = FedpruneStrategy(
        cfg, run.fed, run.server, on_round=crash, checkpoint=run.checkpointer()
    )
    with pytest.raises(KeyboardInterrupt):
        strategy.run(MemoryGrid(make_client_app(cfg), 4))
    resumed, resume = prepare_resume(run.run_dir, cfg)
    assert resume is not None and resume.round == 1
    strategy = FedpruneStrategy(
        cfg,
        resumed.fed,
        resumed.server,
        resume=resume,
        checkpoint=resumed.checkpointer(),
    )
    records = strategy.run(MemoryGrid(make_client_app(cfg), 4))
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    for a, b in zip(ref.records, records, strict=True):
        for key in ("sampled", "clients", "bytes_up", "bytes_down", "cum_bytes_up"):
            assert a[key] == b[key], key
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
    for k, v in ref.model.state_dict().items():
        assert torch.allclose(v, resumed.server.model.state_dict()[k], atol=1e-6), k


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("compat", ["paper", "authors-code"])
def test_flower_strategy_resumes_a_run_killed_during_exploration(
    tmp_path: Path, compat: str
) -> None:
    """AutoFLIP's exploration on Flower in groups of two (``parallel``), stopped after the
    first group's setup checkpoint, resumed: only the remaining explorers run and the
    end equals an uninterrupted Flower run bit for bit."""
    extra = (
        "method=autoflip",
        "model.name=fc",
        "autoflip.explore_epochs=2",
        "autoflip.explore_patience=1",
        f"autoflip.compat={compat}",
        "engine.name=flower",
    )

    def strategy_for(run: Any, **kw: Any) -> FedpruneStrategy:
        return FedpruneStrategy(
            run.cfg, run.fed, run.server, checkpoint=run.checkpointer(), parallel=2, **kw
        )

    ref_run = prepare_run(_cfg(tmp_path, *extra, "name='ref'"))
    ref_lines: list[str] = []
    ref = strategy_for(ref_run, on_progress=ref_lines.append).run(
        MemoryGrid(make_client_app(ref_run.cfg), 4)
    )
    step = 1 if compat == "authors-code" else 2
    assert ref_lines[1].startswith(f"exploration: {step}/4 explorers done")

    def stop(text: str) -> None:
        if text.startswith(f"exploration: {step}/4"):
            raise KeyboardInterrupt

    cfg = _cfg(tmp_path, *extra, "name='flwr'")
    run = prepare_run(cfg)
    with pytest.raises(KeyboardInterrupt):
        strategy_for(run, on_progress=stop).run(MemoryGrid(make_client_app(cfg), 4))
    resumed, resume = prepare_resume(run.run_dir, cfg)
    assert resume is not None and resume.in_setup
    grid = MemoryGrid(make_client_app(cfg), 4)
    records = strategy_for(resumed, resume=resume).run(grid)
    explored = [m for m in grid.sent if m.metadata.group_id == "setup-explore"]
    assert len(explored) == 4 - step
    assert [_untimed(r) for r in records] == [_untimed(r) for r in ref]
    for k, v in ref_run.server.model.state_dict().items():
        assert torch.equal(v, resumed.server.model.state_dict()[k]), k


def _untimed(rec: Any) -> dict[str, Any]:
    return {
        k: v for k, v in rec.items() if k not in ("round_s", "wall_s") and not k.startswith("time_")
    }


@pytest.mark.usefixtures("task_identity")
def test_server_app_resumes_a_run_with_flower_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployed ServerApp: stopped after round 2's record, then started again with
    ``flower.resume``; it finishes the run like an uninterrupted in-process run."""
    from fedprune.flower_app import make_server_app

    keys = {
        "out": str(tmp_path),
        "federation.rounds": 4,
        "data.num_clients": 4,
        "federation.clients_per_round": 3,
        "federation.aggregation": "fedavgm",
    }
    ref = run_experiment(_cfg(tmp_path, "federation.aggregation=fedavgm", "federation.rounds=4"))
    cfg = _cfg(tmp_path, "engine.name=flower", "federation.aggregation=fedavgm")
    real_append = rundir.append_metrics

    def append_then_stop(run_dir: Path, rec: dict[str, Any]) -> None:
        real_append(run_dir, rec)
        if rec["round"] == 2:
            raise KeyboardInterrupt

    def context(run_config: dict[str, Any]) -> Context:
        return Context(
            run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
        )

    monkeypatch.setattr(rundir, "append_metrics", append_then_stop)
    app = make_server_app()
    with pytest.raises(KeyboardInterrupt):
        app(MemoryGrid(make_client_app(cfg), 4), context({**keys, "name": "dep"}))
    monkeypatch.setattr(rundir, "append_metrics", real_append)
    run_dir = tmp_path / "dep"
    assert len(rundir.read_metrics(run_dir)) == 2 and not (run_dir / "summary.json").exists()
    app(MemoryGrid(make_client_app(cfg), 4), context({"flower.resume": str(run_dir)}))
    summary = rundir.read_summary(run_dir)
    assert summary["rounds"] == 4
    for key in ("total_bytes_up", "total_bytes_down", "final_nonzero_params"):
        assert summary[key] == ref.summary[key], key
    assert summary["final_accuracy"] == pytest.approx(ref.summary["final_accuracy"], abs=1e-6)
    assert [r["round"] for r in rundir.read_metrics(run_dir)] == [1, 2, 3, 4]
    weights = rundir.load_weights(run_dir)
    for k, v in ref.model.state_dict().items():
        assert torch.allclose(v, weights[k], atol=1e-6), k


@pytest.mark.usefixtures("task_identity")
def test_discovery_names_the_missing_partition(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "engine.name=flower", "federation.rounds=1")
    run = prepare_run(cfg)
    strategy = FedpruneStrategy(cfg, run.fed, run.server)
    grid = MemoryGrid(make_client_app(cfg), 4, nodes=4)
    del grid.contexts[7002]  # partition 2 has no node ...
    grid.contexts[7009] = Context(  # ... and a fourth node claims partition 1 again
        run_id=1,
        node_id=7009,
        node_config={"partition-id": 1, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )
    with pytest.raises(FlowerEngineError, match="both have partition-id=1"):
        strategy.discover(grid)
    grid.contexts[7009].node_config["partition-id"] = 9  # out of range: ignored
    with pytest.raises(FlowerEngineError, match=r"client\(s\) \[2\]"):
        strategy.discover(grid)


# ------------------------------------------------------------- simulation runtime


def _run_files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


@pytest.mark.slow
def test_flower_simulation_matches_the_inprocess_engine(tmp_path: Path) -> None:
    ref = run_experiment(_cfg(tmp_path / "a"))
    rounds: list[int] = []
    res = run_experiment(
        _cfg(tmp_path / "b", "engine.name=flower"), on_round=lambda r: rounds.append(r["round"])
    )
    assert rounds == [1, 2, 3]  # the per-round callback fired (the CLI prints lines)
    assert res.summary["final_accuracy"] == pytest.approx(ref.summary["final_accuracy"], abs=1e-6)
    for a, b in zip(ref.records, res.records, strict=True):
        assert set(a) == set(b)
        assert (a["sampled"], a["bytes_up"], a["bytes_down"]) == (
            b["sampled"],
            b["bytes_up"],
            b["bytes_down"],
        )
        assert a["sparsity"] == pytest.approx(b["sparsity"], abs=1e-9)
    for key in ("total_bytes_up", "total_bytes_down", "dense_bytes_up", "final_nonzero_params"):
        assert res.summary[key] == ref.summary[key], key
    assert _run_files(res.run_dir) == _run_files(ref.run_dir)
    assert len(rundir.read_metrics(res.run_dir)) == 3
    import ray

    assert not ray.is_initialized()


# ------------------------------------------------------------- deployment runtime


def _wait(dep: LocalDeployment, run_id: int, marker: Path, limit: float = 300.0) -> str:
    """Wait (bounded) until ``marker`` exists and the run is finished; its status.

    The file is checked every second; the (CPU-hungry) CLI only every 20 s, so the poll
    does not slow the run down on a small machine.
    """
    deadline = time.monotonic() + limit
    status = "unknown"
    last_cli = time.monotonic()
    while time.monotonic() < deadline and dep.alive():
        if marker.exists() or time.monotonic() - last_cli > 20:
            status = dep.status(run_id)
            last_cli = time.monotonic()
            if status.startswith("finished"):
                return status
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not finish (status {status}):\n{dep.log_tails()}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    """A SuperLink with two SuperNodes on loopback; every process is gone afterwards."""
    home = tmp_path_factory.mktemp("flower")
    env = {
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25",
        "FEDPRUNE_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "FEDPRUNE_CACHE": str(home / "partition-cache"),
    }
    with local_deployment(home, 2, connection="fedprune-test", env=env) as dep:
        yield dep
    left = [p.pid for p in dep.procs if p.poll() is None]
    assert not left, f"processes still running: {left}"


def _deployed_vs_inprocess(
    deployment: LocalDeployment, tmp_path: Path, name: str, extra: dict[str, Any]
) -> tuple[Path, RunResult, RunConfig]:
    """Run one 2-round config on the deployment and in process; return both and the config."""
    settings: dict[str, Any] = {
        "federation.rounds": 2,
        "data.num_clients": 2,
        "train.local_epochs": 1,
        "engine.values_only": False,
        **extra,
    }
    out = tmp_path / "deployed"
    # a lost reply ends the round after 120 s instead of an hour
    run_id = deployment.submit(
        REPO, {**settings, "out": str(out), "name": name, "flower.round-timeout": 120}
    )
    cfg = load_config(overrides=[f"out='{tmp_path / 'inprocess'}'"], values=settings)
    ref = run_experiment(cfg)  # while the deployment runs
    run_dir = out / name
    assert _wait(deployment, run_id, run_dir / rundir.SUMMARY) == "finished:completed"
    return run_dir, ref, cfg


@pytest.mark.slow
def test_deployment_fedsparsify_global(deployment: LocalDeployment, tmp_path: Path) -> None:
    run_dir, ref, cfg = _deployed_vs_inprocess(
        deployment, tmp_path, "fsg", {"method": "fedsparsify-global"}
    )
    records = rundir.read_metrics(run_dir)
    summary = rundir.read_summary(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["clients"] == 2 for r in records)
    # the global model has the scheduled sparsity (final_sparsity at the last round)
    model = copy.deepcopy(ref.model)
    model.load_state_dict(rundir.load_weights(run_dir))
    assert weight_sparsity(model) == pytest.approx(cfg.pruning.final_sparsity, abs=1e-3)
    assert weight_sparsity(model) == pytest.approx(records[-1]["sparsity"], abs=1e-12)
    for k, v in ref.model.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k
    assert summary["final_accuracy"] == pytest.approx(ref.summary["final_accuracy"], abs=1e-6)
    # bytes: the codec's buffer lengths, as the in-process engine counts them ...
    for a, b in zip(ref.records, records, strict=True):
        assert (a["bytes_up"], a["bytes_down"]) == (b["bytes_up"], b["bytes_down"])
    # ... and round 1's download is the encoded initial broadcast, once per client
    spec = model_spec(cfg, load_federation(cfg))
    server = get_method(cfg.method).server(cfg, spec, spec.build(seed=cfg.seed))
    broadcast = server.configure_fit(1, [0, 1])[0]
    assert records[0]["bytes_down"] == 2 * len(encode_payload(broadcast))


@pytest.mark.slow
def test_deployment_values_only_broadcasts(deployment: LocalDeployment, tmp_path: Path) -> None:
    """Flower's own executor (a new flwr-clientapp process per message): the supports a
    node holds survive in its context.state, so values-only broadcasts and replies count
    the in-process engine's bytes."""
    extra = {"method": "fedsparsify-global", "engine.values_only": True, "federation.rounds": 5}
    run_dir, ref, cfg = _deployed_vs_inprocess(deployment, tmp_path, "vo", extra)
    full_engine = replace(cfg.engine, values_only=False)
    full = run_experiment(replace(cfg, out=str(tmp_path / "full"), engine=full_engine))
    assert ref.summary["total_bytes_down"] < full.summary["total_bytes_down"]
    records = rundir.read_metrics(run_dir)
    for a, b in zip(ref.records, records, strict=True):
        assert (a["bytes_up"], a["bytes_down"]) == (b["bytes_up"], b["bytes_down"])
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
    assert len(records) == 5 and not any("failures" in r for r in records)


@pytest.mark.slow
def test_deployment_autostructured(deployment: LocalDeployment, tmp_path: Path) -> None:
    if "autostructured" not in {m.name for m in list_methods()}:
        pytest.skip("the autostructured method is not registered yet")
    run_dir, ref, _ = _deployed_vs_inprocess(
        deployment,
        tmp_path,
        "auto",
        {"method": "autostructured", "model.name": "resnet7", "structured.k": 0.5},
    )
    records = rundir.read_metrics(run_dir)
    arch = json.loads((run_dir / rundir.ARCH).read_text(encoding="utf-8"))
    # the architecture shrank after round 1 and travelled as JSON to the SuperNodes
    assert arch["history"], "no structured pruning happened"
    assert records[1]["params"] < ref.summary["dense_params"]
    assert records[1]["bytes_down"] < records[0]["bytes_down"]
    for a, b in zip(ref.records, records, strict=True):
        assert (a["params"], a["bytes_up"], a["bytes_down"]) == (
            b["params"],
            b["bytes_up"],
            b["bytes_down"],
        )
    weights = rundir.load_weights(run_dir)
    assert {k: list(v.shape) for k, v in weights.items()} == arch["shapes"]
    for k, v in ref.model.state_dict().items():
        assert torch.allclose(weights[k], v, atol=1e-6), k


@pytest.mark.usefixtures("task_identity")
def test_values_only_replies_and_schema_on_flower(tmp_path: Path) -> None:
    """With engine.values_only (the default) Flower clients reply values-only against
    what they received and receive broadcasts values-only against what they confirmed
    holding, as in-process clients do, and the strategy decodes each reply against the
    global model's schema: same results, the same bytes up and down."""
    over = ("engine.values_only=true", "method=fedsparsify-global", "pruning.final_sparsity=0.8")
    ref = run_experiment(_cfg(tmp_path, *over, "name=ref"))
    cfg = _cfg(tmp_path, "engine.name=flower", *over)
    run = prepare_run(cfg)
    strategy = FedpruneStrategy(cfg, run.fed, run.server)
    records = strategy.run(MemoryGrid(make_client_app(cfg), 4))
    for a, b in zip(ref.records, records, strict=True):
        assert a["bytes_up"] == b["bytes_up"]  # replies: values-only on both engines
        assert a["bytes_down"] == b["bytes_down"]  # broadcasts too
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
        assert a["sparsity"] == pytest.approx(b["sparsity"], abs=1e-6)
    assert records[-1]["cum_bytes_up"] < records[-1]["cum_dense_bytes_up"]
