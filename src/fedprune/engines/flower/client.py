"""The fedprune ClientApp: a method's client half on a SuperNode (or a simulation actor).

The ClientApp answers two kinds of message: ``query`` (which partition this node holds,
for the strategy's discovery) and ``train`` (one task of the client half on this node's
partition). It does not know how a node's data and client half are built: the caller
passes a :data:`ClientBuilder` (``fedprune.flower_app`` passes one that reads the node's
cached partition, :mod:`~fedprune.engines.flower.partitions`; the simulation engine a
:class:`FactoryClientBuilder` around the run's own federation loader and client factory),
which keeps the engine below ``fedprune.experiment`` in the layering.

With ``engine.values_only`` a ``train`` task keeps the supports of the broadcast it
decoded in the node's ``context.state`` (which Flower carries from message to message of
a run, also across the fresh processes of a SuperNode) and names them in its reply, so
that the next broadcast can travel values-only against them; a broadcast against
supports the node does not hold is refused, never decoded against the wrong ones
(:func:`_decode_broadcast`; docs/flower.md, "Values-only broadcasts").

A deployment SuperNode starts a fresh process for every message (Flower's default
executor), so this module keeps that start lean: importing it loads Flower's app API
and fedprune's config, not torch; a ``query`` is answered without torch; torch, the
codec and the method are imported by the first ``train`` message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedprune.config import RunConfig, config_from_dict, config_to_dict
from fedprune.engines.flower.runconfig import config_from_run_config
from fedprune.engines.flower.wire import (
    HOLDS,
    NODE_KEY,
    NUM_PARTITIONS,
    PARTITION_ID,
    REFERENCE,
    FlowerEngineError,
    config_field,
    held_fingerprint,
    refusal_content,
    store_held,
)

if TYPE_CHECKING:
    from fedprune.core.codec import Payload
    from fedprune.data.federation import ClientData, Federation
    from fedprune.methods.base import ClientMethod

__all__ = ["ClientBuilder", "FactoryClientBuilder", "NodeRuntime", "make_client_app"]


@dataclass(frozen=True)
class NodeRuntime:
    """What a node needs to run tasks: its partition, the client count, the client half.

    Attributes
    ----------
    data : ClientData
        The node's partition (``data.cid`` is its partition id).
    num_clients : int
        Clients in the run's federation.
    client : ClientMethod
        The method's client half for the run's config.
    """

    data: ClientData
    num_clients: int
    client: ClientMethod


ClientBuilder = Callable[[RunConfig, int], NodeRuntime]
"""Builds a node's :class:`NodeRuntime` for a run config and a partition id. Shipped to
simulation actors, so it must pickle."""


_FEDERATION: dict[str, Federation] = {}


@dataclass(frozen=True)
class FactoryClientBuilder:
    """A :data:`ClientBuilder` from a federation loader and a client-half factory.

    The whole federation is loaded once per process and config (a simulation actor
    serves many partitions). Picklable when both are (module-level functions,
    ``functools.partial`` of classes).
    """

    load_federation: Callable[[RunConfig], Federation]
    factory: Callable[[], ClientMethod]

    def __call__(self, cfg: RunConfig, pid: int) -> NodeRuntime:
        """Partition ``pid`` of the (cached) federation, and a client half."""
        key = _config_key(cfg)
        fed = _FEDERATION.get(key)
        if fed is None:
            _FEDERATION.clear()
            fed = _FEDERATION[key] = self.load_federation(cfg)
        if not 0 <= pid < len(fed.clients):
            raise FlowerEngineError(
                f"{PARTITION_ID}={pid} is out of range: {len(fed.clients)} clients"
            )
        return NodeRuntime(fed.clients[pid], len(fed.clients), self.factory())


def _config_key(cfg: RunConfig) -> str:
    return json.dumps(config_to_dict(cfg), sort_keys=True)


_RUNTIMES: dict[tuple[str, int], NodeRuntime] = {}


def _node_runtime(cfg: RunConfig, pid: int, build: ClientBuilder) -> NodeRuntime:
    """This process's runtime for ``(cfg, pid)`` (built once, then reused).

    A simulation actor serves many messages and partitions, and the warm executor
    (:mod:`~fedprune.engines.flower.warm`) many messages of its node: both keep it. A
    SuperNode with Flower's default executor starts a fresh ClientApp process per
    message, which rebuilds it (from the node's partition cache).
    """
    key = (_config_key(cfg), pid)
    hit = _RUNTIMES.get(key)
    if hit is None:
        if cfg.engine.threads:
            import torch

            torch.set_num_threads(cfg.engine.threads)
        if any(k[0] != key[0] for k in _RUNTIMES):  # another run's config: let it go
            _RUNTIMES.clear()
        hit = _RUNTIMES[key] = build(cfg, pid)
    return hit


def _node_partition(context: Context) -> tuple[int, int | None]:
    pid = context.node_config.get(PARTITION_ID)
    num = context.node_config.get(NUM_PARTITIONS)
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise FlowerEngineError(
            f"SuperNode {context.node_id} has no valid {PARTITION_ID} in its node config "
            f"(got {pid!r}); start it with --node-config '{PARTITION_ID}=<i> "
            f"{NUM_PARTITIONS}=<clients>'"
        )
    if num is not None and (isinstance(num, bool) or not isinstance(num, int)):
        raise FlowerEngineError(f"SuperNode {context.node_id}: {NUM_PARTITIONS}={num!r}")
    return pid, num


def _remember(context: Context, pid: int, task: str, group: str) -> None:
    """Bookkeeping in ``context.state``, which persists across this node's messages.

    Client halves keep nothing between messages (the in-process engine's worker pool
    relies on that too); per-client state that must survive rounds belongs here, not
    in process memory, because a deployment SuperNode runs each message in a fresh
    process.
    """
    prev = context.state.get(NODE_KEY)
    count = prev.get("messages", 0) if isinstance(prev, ConfigRecord) else 0
    context.state[NODE_KEY] = ConfigRecord(
        {
            PARTITION_ID: pid,
            "messages": int(count) + 1 if isinstance(count, int) else 1,
            "last-task": task,
            "last-group": group,
        }
    )


def _decode_broadcast(msg: Message, context: Context) -> tuple[str, Payload] | RecordDict:
    """Decode a ``train`` message: ``(task, payload)``, or the content of a refusal.

    A broadcast that names a ``reference`` (values-only against the supports the server
    believes this node holds) is decoded against the supports in ``context.state`` only
    if they have that fingerprint; if they do not (a node that restarted, a resumed
    server, a state that was not saved), or if decoding against them fails anyway, the
    node refuses instead of guessing, and the strategy sends the payload again in full
    format. A full-format broadcast that does not decode raises (the reply is an error).
    """
    from fedprune.engines.flower.wire import decode_content, load_held
    from fedprune.errors import DecodeError

    want = config_field(msg.content, REFERENCE)
    task = config_field(msg.content, "task") or ""
    if want is None:
        task, payload, _ = decode_content(msg.content)
        return task, payload
    held = load_held(context.state)
    holds = held[0] if held is not None else None
    if held is None or holds != want:
        return refusal_content(task, f"holds {holds or 'nothing'}, not {want}", holds)
    try:
        task, payload, _ = decode_content(msg.content, references=held[1])
    except DecodeError as e:
        return refusal_content(task, f"undecodable against {want}: {e}", holds)
    return task, payload


def make_client_app(build: ClientBuilder, cfg: RunConfig | None = None) -> ClientApp:
    """The fedprune ClientApp.

    Parameters
    ----------
    build
        Builds a node's partition and the method's client half (called once per
        process, config and partition). Shipped to simulation actors, so it must pickle.
    cfg
        The run's config. ``None`` (``flwr run``): read it from the run config.
    """
    fixed = config_to_dict(cfg) if cfg is not None else None
    app = ClientApp()

    def _cfg(context: Context) -> RunConfig:
        if fixed is not None:
            return config_from_dict(fixed)
        return config_from_run_config(context.run_config)[0]

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid, num = _node_partition(context)
        info: dict[str, Any] = {PARTITION_ID: pid}
        if num is not None:
            info[NUM_PARTITIONS] = num
        holds = held_fingerprint(context.state)
        if holds is not None:  # what a resumed server may send values-only against
            info[HOLDS] = holds
        return Message(RecordDict({NODE_KEY: ConfigRecord(info)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = _cfg(context)
        pid, num = _node_partition(context)
        clients = cfg.data.num_clients
        if num is not None and num != clients:
            raise FlowerEngineError(
                f"SuperNode {context.node_id} says {NUM_PARTITIONS}={num}, but the run's "
                f"federation has {clients} clients (data.num_clients)"
            )
        if pid >= clients:
            raise FlowerEngineError(f"{PARTITION_ID}={pid} is out of range: {clients} clients")
        # torch, the codec and the method: first needed here (a query never loads them)
        from fedprune.core.codec import supports_of
        from fedprune.engines.common import FAIL_TASK, InjectedFailure
        from fedprune.engines.flower.wire import encode_for_flower, make_content
        from fedprune.engines.references import fingerprint

        node = _node_runtime(cfg, pid, build)
        got = _decode_broadcast(msg, context)
        if isinstance(got, RecordDict):  # a values-only broadcast this node cannot decode
            return Message(got, reply_to=msg)
        task, payload = got
        if task == FAIL_TASK:
            raise InjectedFailure(f"injected failure (engine.fail_rate={cfg.engine.fail_rate})")
        reply = node.client.run_task(task, payload, node.data)
        # replies are encoded as in the in-process engine (engines.references.encode_reply:
        # values-only against what this client received; fp16 applies to downloads)
        received = supports_of(payload.arrays) if cfg.engine.values_only else None
        encoded = encode_for_flower(reply, references=received, compress=cfg.engine.compress)
        holds = None
        if received is not None:  # this node now holds what it received: say which
            holds = fingerprint(received)
            store_held(context.state, received, holds)
        content = make_content(encoded, task, holds=holds)
        _remember(context, pid, task, msg.metadata.group_id)
        return Message(content, reply_to=msg)

    return app
