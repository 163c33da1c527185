"""The fedprune ClientApp: a method's client half on a SuperNode (or a simulation actor).

The ClientApp answers two kinds of message: ``query`` (which partition this node holds,
for the strategy's discovery) and ``train`` (one task of the client half on this node's
partition). It does not know how a run's data set and client half are built: the caller
passes a :data:`ClientBuilder` (``fedprune.flower_app`` passes the experiment's loader;
the simulation engine a :class:`FactoryClientBuilder` around the run's own client
factory), which keeps the engine below ``fedprune.experiment`` in the layering.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedprune.config import RunConfig, config_from_dict, config_to_dict
from fedprune.data.federation import Federation
from fedprune.engines.common import FAIL_TASK, InjectedFailure
from fedprune.engines.flower.runconfig import config_from_run_config
from fedprune.engines.flower.wire import (
    NODE_KEY,
    NUM_PARTITIONS,
    PARTITION_ID,
    FlowerEngineError,
    decode_content,
    encode_for_flower,
    make_content,
)
from fedprune.methods.base import ClientMethod

__all__ = ["ClientBuilder", "FactoryClientBuilder", "make_client_app"]

ClientBuilder = Callable[[RunConfig], tuple[Federation, ClientMethod]]
"""Builds a client process's federation (the run's split of its data set) and the
method's client half for a run config. Shipped to simulation actors, so it must pickle."""


@dataclass(frozen=True)
class FactoryClientBuilder:
    """A :data:`ClientBuilder` from a federation loader and a client-half factory.

    Picklable when both are (module-level functions, ``functools.partial`` of classes).
    """

    load_federation: Callable[[RunConfig], Federation]
    factory: Callable[[], ClientMethod]

    def __call__(self, cfg: RunConfig) -> tuple[Federation, ClientMethod]:
        """Load the federation, then build the client half."""
        fed = self.load_federation(cfg)
        return fed, self.factory()


_CLIENT_CACHE: dict[str, tuple[Federation, ClientMethod]] = {}


def _client_runtime(cfg: RunConfig, build: ClientBuilder) -> tuple[Federation, ClientMethod]:
    """This process's federation and client half for ``cfg`` (built once, then reused).

    A simulation actor serves many messages and keeps both; a deployment SuperNode
    starts a fresh ClientApp process per message and rebuilds them.
    """
    key = json.dumps(config_to_dict(cfg), sort_keys=True)
    hit = _CLIENT_CACHE.get(key)
    if hit is None:
        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)
        fed, client = build(cfg)
        _CLIENT_CACHE.clear()
        hit = _CLIENT_CACHE[key] = (fed, client)
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


def make_client_app(build: ClientBuilder, cfg: RunConfig | None = None) -> ClientApp:
    """The fedprune ClientApp.

    Parameters
    ----------
    build
        Builds the run's federation and the method's client half (called once per
        process and config). Shipped to simulation actors, so it must pickle.
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
        return Message(RecordDict({NODE_KEY: ConfigRecord(info)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = _cfg(context)
        pid, num = _node_partition(context)
        fed, client = _client_runtime(cfg, build)
        if num is not None and num != len(fed.clients):
            raise FlowerEngineError(
                f"SuperNode {context.node_id} says {NUM_PARTITIONS}={num}, but the run's "
                f"federation has {len(fed.clients)} clients (data.num_clients)"
            )
        if pid >= len(fed.clients):
            raise FlowerEngineError(
                f"{PARTITION_ID}={pid} is out of range: {len(fed.clients)} clients"
            )
        task, payload, _ = decode_content(msg.content)
        if task == FAIL_TASK:
            raise InjectedFailure(f"injected failure (engine.fail_rate={cfg.engine.fail_rate})")
        reply = client.run_task(task, payload, fed.clients[pid])
        # replies are encoded as in the in-process engine (fp16 applies to downloads)
        content = make_content(encode_for_flower(reply), task)
        _remember(context, pid, task, msg.metadata.group_id)
        return Message(content, reply_to=msg)

    return app
