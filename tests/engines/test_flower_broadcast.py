"""Values-only broadcasts on the Flower engine.

A Flower client keeps the supports of the last broadcast it decoded in its node's
``context.state``; the strategy encodes a broadcast values-only only against supports the
client confirmed (by fingerprint), and a node that does not hold them refuses and is
sent the payload again in full format. These tests drive the strategy and the ClientApp
through the in-memory grid of ``test_flower.py`` (one persistent context per node, as a
SuperNode keeps it) and compare with the in-process engine, whose clients never forget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_flower import MemoryGrid, _cfg

from fedprune.config import RunConfig
from fedprune.core.codec import Payload, Support, supports_of
from fedprune.engines.flower import FedpruneStrategy, encode_for_flower, make_content
from fedprune.engines.flower.wire import (
    CONFIG_KEY,
    HELD_KEY,
    HOLDS,
    REFERENCE,
    REFUSED,
    config_field,
    held_fingerprint,
    load_held,
    store_held,
)
from fedprune.engines.references import fingerprint
from fedprune.experiment import prepare_resume, prepare_run, run_experiment
from fedprune.flower_app import make_client_app

_ON = (
    "engine.values_only=true",
    "method=fedsparsify-global",
    "pruning.final_sparsity=0.9",
    "federation.rounds=4",
)


@pytest.fixture(autouse=True)
def _partition_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPRUNE_CACHE", str(tmp_path / "partition-cache"))


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's per-process identity, which the runtimes set before a ServerApp runs."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


_SAME = ("sampled", "clients", "bytes_up", "sparsity", "nonzero_params", "params")


def _same_results(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> None:
    """Same clients, models and uploads as the reference run (downloads not compared)."""
    assert len(ref) == len(got)
    for a, b in zip(ref, got, strict=True):
        for key in _SAME:
            assert a.get(key) == b.get(key), (a["round"], key)
        assert "failures" not in b
        for key in ("test_accuracy", "train_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key


def _flower(cfg: RunConfig, grid: MemoryGrid, **kw: Any) -> tuple[FedpruneStrategy, list[Any]]:
    run = prepare_run(cfg)
    strategy = FedpruneStrategy(cfg, run.fed, run.server, **kw)
    return strategy, strategy.run(grid)


def _fits(grid: MemoryGrid) -> list[Message]:
    return [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]


def test_values_only_broadcasts_send_the_inprocess_bytes(tmp_path: Path) -> None:
    """Same results and the same bytes down and up as the in-process engine with
    values-only messages; fewer bytes down than full-format broadcasts."""
    ref = run_experiment(_cfg(tmp_path, *_ON, "name=ref"))
    full = run_experiment(_cfg(tmp_path, *_ON, "engine.values_only=false", "name=full"))
    cfg = _cfg(tmp_path, "engine.name=flower", *_ON)
    grid = MemoryGrid(make_client_app(cfg), 4)
    strategy, records = _flower(cfg, grid)
    _same_results(ref.records, records)
    for a, b in zip(ref.records, records, strict=True):
        assert (a["bytes_down"], a["cum_dense_bytes_down"]) == (
            b["bytes_down"],
            b["cum_dense_bytes_down"],
        )
    assert records[-1]["cum_bytes_down"] < full.records[-1]["cum_bytes_down"]
    assert strategy.resent == 0
    # round 1 is full format (nobody holds anything); later broadcasts to a client that
    # replied before name the fingerprint of what it holds, which is in its context
    fits = _fits(grid)
    assert all(config_field(m.content, REFERENCE) is None for m in fits[:3])
    named = [m for m in fits if config_field(m.content, REFERENCE) is not None]
    assert named
    for m in named:
        state = grid.contexts[m.metadata.dst_node_id].state
        assert held_fingerprint(state) is not None
    assert len(strategy.references) >= 3


class ForgetfulGrid(MemoryGrid):
    """A memory grid whose nodes lose or replace their state before some messages."""

    def __init__(self, *args: Any, wipe: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.wipe = wipe
        self.count = 0

    def _deliver(self, m: Message) -> Message:
        if m.metadata.message_type == MessageType.TRAIN:
            self.count += 1
            self.wipe(self.count, self.contexts[m.metadata.dst_node_id])
        return super()._deliver(m)


def _wipe_every_other(count: int, ctx: Context) -> None:
    """A fresh ClientApp without state (a restarted node, a new process that lost it)."""
    if count % 2 == 0:
        ctx.state = RecordDict()


def _other_supports(count: int, ctx: Context) -> None:
    """A node holding a different, self-consistent support set (another run's)."""
    held = load_held(ctx.state)
    if held is not None:
        flipped = {k: Support(~s.mask) for k, s in held[1].items()}
        store_held(ctx.state, flipped, fingerprint(flipped))


def _damaged_record(count: int, ctx: Context) -> None:
    """A node whose stored bits were damaged but whose fingerprint was not."""
    rec = ctx.state.get(HELD_KEY)
    if isinstance(rec, ConfigRecord):
        bits = list(rec["bits"])  # type: ignore[arg-type]
        bits[0] = bytes(b ^ 0xFF for b in bits[0])  # type: ignore[union-attr]
        rec["bits"] = bits


@pytest.mark.parametrize("wipe", [_wipe_every_other, _other_supports, _damaged_record])
def test_a_node_without_the_reference_gets_full_format_and_same_results(
    tmp_path: Path, wipe: Any
) -> None:
    """A node that does not hold what the server believes refuses the values-only
    broadcast; the strategy resends it in full format in the same attempt: the run's
    results equal the in-process run's, only the bytes down grow."""
    ref = run_experiment(_cfg(tmp_path, *_ON, "name=ref"))
    cfg = _cfg(tmp_path, "engine.name=flower", *_ON)
    grid = ForgetfulGrid(make_client_app(cfg), 4, wipe=wipe)
    strategy, records = _flower(cfg, grid)
    _same_results(ref.records, records)
    assert strategy.resent > 0
    for a, b in zip(ref.records, records, strict=True):
        assert b["bytes_down"] >= a["bytes_down"]
    assert records[-1]["cum_bytes_down"] > ref.records[-1]["cum_bytes_down"]
    # the dense reference traffic does not count the messages sent again
    assert records[-1]["cum_dense_bytes_down"] == ref.records[-1]["cum_dense_bytes_down"]


def test_a_forged_holds_fingerprint_is_never_trusted(tmp_path: Path) -> None:
    """Replies whose ``holds`` is not the fingerprint of what was sent commit nothing:
    every broadcast is full format, results unchanged."""
    ref = run_experiment(_cfg(tmp_path, *_ON, "name=ref"))
    cfg = _cfg(tmp_path, "engine.name=flower", *_ON)

    class ForgingGrid(MemoryGrid):
        def _deliver(self, m: Message) -> Message:
            reply = super()._deliver(m)
            config = reply.content.get(CONFIG_KEY) if not reply.has_error() else None
            if isinstance(config, ConfigRecord) and HOLDS in config:
                config[HOLDS] = "0" * 32
            return reply

    grid = ForgingGrid(make_client_app(cfg), 4)
    strategy, records = _flower(cfg, grid)
    _same_results(ref.records, records)
    assert all(config_field(m.content, REFERENCE) is None for m in _fits(grid))
    assert strategy.resent == 0 and len(strategy.references) == 0


def _node(state: RecordDict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=7000,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=state if state is not None else RecordDict(),
        run_config={},
    )


def _broadcast(payload: Payload, against: dict[str, Support], name: str) -> Message:
    """``payload`` encoded values-only against ``against``, naming the fingerprint
    ``name``."""
    enc = encode_for_flower(payload, references=against)
    m = Message(
        make_content(enc, "fit", reference=name),
        dst_node_id=7000,
        message_type=MessageType.TRAIN,
        group_id="1.1",
    )
    m.metadata.__dict__["_message_id"] = "m1"
    return m


def _sparse_broadcast(cfg: RunConfig) -> Payload:
    """Round 1's broadcast with 70% of every array zeroed."""
    p = prepare_run(cfg).server.configure_fit(1, [0])[0]
    gen = torch.Generator().manual_seed(0)
    arrays = {
        k: torch.where(torch.rand(t.shape, generator=gen) < 0.3, t, torch.zeros_like(t))
        for k, t in p.arrays.items()
    }
    return Payload(arrays=arrays, config=p.config, metrics=p.metrics)


def _containing(payload: Payload, seed: int) -> dict[str, Support]:
    """Supports that contain every non-zero of ``payload`` and half of the rest."""
    gen = torch.Generator().manual_seed(seed)
    nonzero = supports_of(payload.arrays)
    return {
        k: Support((torch.rand(t.shape, generator=gen) < 0.5).numpy().reshape(-1) | nonzero[k].mask)
        for k, t in payload.arrays.items()
    }


def test_a_mismatched_reference_is_refused_never_decoded_wrongly(tmp_path: Path) -> None:
    """The ClientApp decodes a values-only broadcast only against supports with the
    named fingerprint, and refuses when decoding against them fails anyway (a forged
    name): it never trains on a wrongly decoded model."""
    cfg = _cfg(tmp_path, "engine.name=flower", *_ON)
    app = make_client_app(cfg)
    payload = _sparse_broadcast(cfg)
    a, b = _containing(payload, 1), _containing(payload, 2)
    assert fingerprint(a) != fingerprint(b)
    # values-only against a is smaller than the full format (so it is what is sent)
    assert encode_for_flower(payload, references=a).nbytes < encode_for_flower(payload).nbytes

    def answer(msg: Message, ctx: Context) -> Message:
        return app(msg, ctx)

    # no state at all (a fresh node): refused, nothing decoded
    reply = answer(_broadcast(payload, a, fingerprint(a)), _node())
    assert config_field(reply.content, REFUSED) is not None
    assert config_field(reply.content, HOLDS) is None
    # the node holds b, the broadcast names a: refused, says it holds b
    state = RecordDict()
    store_held(state, b, fingerprint(b))
    reply = answer(_broadcast(payload, a, fingerprint(a)), _node(state))
    assert "holds" in (config_field(reply.content, REFUSED) or "")
    assert config_field(reply.content, HOLDS) == fingerprint(b)
    # forged: encoded against a, but naming b (which the node holds): the codec's
    # count/CRC check fails, the node refuses instead of decoding against b
    reply = answer(_broadcast(payload, a, fingerprint(b)), _node(state))
    assert "undecodable" in (config_field(reply.content, REFUSED) or "")
    # the right reference decodes, trains and replies with what it now holds
    state = RecordDict()
    store_held(state, a, fingerprint(a))
    reply = answer(_broadcast(payload, a, fingerprint(a)), _node(state))
    assert config_field(reply.content, REFUSED) is None
    now = fingerprint(supports_of(payload.arrays))
    assert config_field(reply.content, HOLDS) == now == held_fingerprint(state)


@pytest.mark.parametrize("nodes", ["kept", "fresh"])
def test_a_resumed_values_only_run_gives_the_same_results(tmp_path: Path, nodes: str) -> None:
    """Stopped after round 3's checkpoint and resumed: the book comes back from the
    checkpoint, and discovery keeps only the entries the nodes confirm. Nodes that kept
    their state (``kept``) get exactly the uninterrupted bytes; fresh nodes get full
    format once; the results are the in-process run's either way."""
    ref = run_experiment(_cfg(tmp_path, *_ON, "federation.rounds=6", "name=ref"))
    cfg = _cfg(tmp_path, "engine.name=flower", *_ON, "federation.rounds=6", "name=flwr")
    run = prepare_run(cfg)
    save = run.checkpointer()
    assert save is not None
    saved: list[dict[str, Any]] = []

    def save_then_stop(rnd: int, records: list[Any], state: dict[str, Any]) -> None:
        save(rnd, records, state)
        saved.append(state)
        if rnd == 3:
            raise KeyboardInterrupt

    grid = MemoryGrid(make_client_app(cfg), 4)
    strategy = FedpruneStrategy(
        cfg, run.fed, run.server, on_round=run.on_round(), checkpoint=save_then_stop
    )
    with pytest.raises(KeyboardInterrupt):
        strategy.run(grid)
    assert saved[-1]["references"]["clients"]
    resumed, resume = prepare_resume(run.run_dir, cfg)
    assert resume is not None and resume.round == 3
    grid2 = MemoryGrid(make_client_app(cfg), 4)
    if nodes == "kept":  # the same SuperNodes, still holding what they received
        grid2.contexts = grid.contexts
    strategy = FedpruneStrategy(cfg, resumed.fed, resumed.server, resume=resume)
    records = strategy.run(grid2)
    _same_results(ref.records, records)
    assert strategy.resent == 0
    named = [m for m in _fits(grid2) if config_field(m.content, REFERENCE) is not None]
    down = [(a["bytes_down"], b["bytes_down"]) for a, b in zip(ref.records, records, strict=True)]
    if nodes == "kept":
        assert named and all(a == b for a, b in down)
    else:  # the first broadcast to each node after the resume is full format
        assert all(a <= b for a, b in down)
        assert records[-1]["cum_bytes_down"] > ref.records[-1]["cum_bytes_down"]


@pytest.mark.slow
def test_flower_simulation_sends_values_only_broadcasts(tmp_path: Path) -> None:
    """On Flower's simulation runtime (Ray actors; each node's context.state kept by
    the runtime between messages) the bytes down and up equal the in-process engine's."""
    over = (*_ON, "federation.rounds=6")
    ref = run_experiment(_cfg(tmp_path / "a", *over))
    res = run_experiment(_cfg(tmp_path / "b", "engine.name=flower", *over))
    _same_results(ref.records, res.records)
    for a, b in zip(ref.records, res.records, strict=True):
        assert a["bytes_down"] == b["bytes_down"], a["round"]
    assert res.summary["total_bytes_down"] == ref.summary["total_bytes_down"]
