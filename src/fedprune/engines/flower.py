"""Flower engine: the same method halves on Flower's simulation and deployment runtimes.

Nothing here re-implements a method. A :class:`FedpruneStrategy` (a Flower
``Strategy``) drives any fedprune :class:`~fedprune.methods.base.ServerMethod`, and the
``ClientApp`` built by :func:`make_client_app` runs the matching
:class:`~fedprune.methods.base.ClientMethod` on a SuperNode. The engine only moves codec
buffers inside Flower ``Message`` objects, and it samples, counts, times and records
rounds with the code the in-process engine uses (:mod:`fedprune.engines.common`).

Wire format
-----------
A fedprune :class:`~fedprune.core.codec.Payload` is encoded once with
:func:`~fedprune.core.codec.encode_payload`. That buffer is an 8-byte head, a JSON header
(config, metrics, and the name and length of every tensor buffer), then the tensor
buffers. The Flower message carries the buffer cut along those lines, with no byte added
or re-encoded:

- ``content["fedprune.arrays"]``: an ``ArrayRecord`` with one ``Array`` per tensor.
  ``data`` is the tensor's codec buffer (byte for byte what
  :func:`~fedprune.core.codec.encode_arrays` makes: dense, bitmask or COO, picked per
  tensor). ``stype`` is :data:`STYPE`. ``dtype`` and ``shape`` describe the decoded
  tensor and are checked against it.
- ``content["fedprune.config"]``: a ``ConfigRecord`` with ``task`` (``"fit"`` or a
  setup task), ``head`` (the 8 head bytes) and ``header`` (the JSON header, as text).

The receiver joins head, header and buffers in the header's order and decodes them with
:func:`~fedprune.core.codec.decode_payload`, so every check of the codec applies (a
malformed message raises :class:`~fedprune.errors.DecodeError`; the strategy drops such
a reply and logs why). The bytes counted for a message are
``len(head) + len(header) + sum(len(array.data))``: exactly ``len(encode_payload(p))``,
what the in-process engine counts for the same payload. Flower's own framing
(protobuf, HTTP) is not counted, in either engine.

One ``Array`` per tensor, rather than the whole buffer in one ``Array``, keeps the
message readable with Flower's tools (names, shapes, dtypes, per-tensor sizes), lets
Flower's object store deduplicate and chunk tensors individually, and costs nothing:
the bytes are the same.

Client ids and SuperNodes
-------------------------
Client ``i`` of the federation is the SuperNode whose node config has
``partition-id = i`` (``num-partitions`` must equal the number of clients; the
simulation runtime sets both). Before round 1 the strategy sends every node a
``query`` message and builds the client-to-node map from the replies. Sampling is the
in-process engine's (:meth:`~fedprune.engines.common.RoundAccounting.draw`), so both
engines train the same clients in the same rounds.

Run configuration
-----------------
``flwr run`` passes the app's run config (``[tool.flwr.app.config]`` in
``pyproject.toml`` plus ``--run-config`` overrides): fedprune's config keys with dotted
names (``"data.dataset" = "digits"``, ``"federation.rounds" = 2``) and the engine's own
``flower.*`` keys (:class:`FlowerOptions`). :func:`config_from_run_config` turns it into
a validated :class:`~fedprune.config.RunConfig`; keys left out keep their defaults.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedprune.config import RunConfig, config_from_dict, config_to_dict
from fedprune.core.codec import Payload, decode_payload, encode_payload
from fedprune.data.federation import Federation
from fedprune.engines.common import (
    FAIL_TASK,
    CheckpointFn,
    InjectedFailure,
    Resume,
    RoundAccounting,
    RoundCallback,
)
from fedprune.errors import ConfigError, DecodeError, FedpruneError, RoundFailedError
from fedprune.methods.base import ClientMethod, ClientReply, ServerMethod

__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "STYPE",
    "EncodedPayload",
    "FedpruneStrategy",
    "FlowerEngineError",
    "FlowerOptions",
    "FlowerSimulationEngine",
    "config_from_run_config",
    "decode_content",
    "encode_for_flower",
    "make_client_app",
    "make_server_app",
    "run_config_defaults",
    "run_config_from_config",
]

STYPE = "fedprune.codec.v1"
"""``Array.stype`` of a tensor buffer made by fedprune's codec (format version 1)."""
ARRAYS_KEY = "fedprune.arrays"
CONFIG_KEY = "fedprune.config"
NODE_KEY = "fedprune.node"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
_HEAD_SIZE = 8  # codec message head: magic (3), version (1), JSON header length (uint32)
_FLOWER_PREFIX = "flower."

_LOG = logging.getLogger("flwr.fedprune")


class FlowerEngineError(FedpruneError, RuntimeError):
    """The Flower runtime cannot run the federation as configured (nodes, partitions)."""


# ------------------------------------------------------------------------------ wire


@dataclass(frozen=True)
class EncodedPayload:
    """A payload's codec buffer, cut into what a Flower message carries.

    Attributes
    ----------
    head : bytes
        The 8-byte codec message head.
    header : str
        The JSON header (config, metrics, tensor index).
    arrays : list of tuple
        ``(name, buffer, dtype, shape)`` per tensor, in the header's order.
    nbytes : int
        ``len(encode_payload(payload))``: what the engine counts for this message.
    """

    head: bytes
    header: str
    arrays: list[tuple[str, bytes, str, tuple[int, ...]]]
    nbytes: int


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def encode_for_flower(payload: Payload, *, fp16: bool = False) -> EncodedPayload:
    """Encode ``payload`` with the codec and cut the buffer along its own framing."""
    buf = encode_payload(payload, fp16=fp16)
    hlen = int.from_bytes(buf[4:_HEAD_SIZE], "little")
    header_bytes = buf[_HEAD_SIZE : _HEAD_SIZE + hlen]
    index = json.loads(header_bytes)["arrays"]
    pos = _HEAD_SIZE + hlen
    arrays: list[tuple[str, bytes, str, tuple[int, ...]]] = []
    for name, length in index:
        t = payload.arrays[name]
        arrays.append((name, buf[pos : pos + length], _dtype_name(t), tuple(t.shape)))
        pos += length
    if pos != len(buf):  # pragma: no cover - the codec's own framing
        raise AssertionError("codec buffer does not match its header")
    return EncodedPayload(buf[:_HEAD_SIZE], header_bytes.decode("utf-8"), arrays, len(buf))


def _content(enc: EncodedPayload, task: str) -> RecordDict:
    """A message's content for one encoded payload (new record objects per message)."""
    arrays = ArrayRecord(
        {
            name: Array(dtype=dtype, shape=shape, stype=STYPE, data=data)
            for name, data, dtype, shape in enc.arrays
        }
    )
    config = ConfigRecord({"task": task, "head": enc.head, "header": enc.header})
    return RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})


def _content_nbytes(content: RecordDict) -> int:
    """The fedprune bytes in a message content, as far as they can be read."""
    n = 0
    arrays = content.get(ARRAYS_KEY)
    if isinstance(arrays, ArrayRecord):
        n += sum(len(a.data) for a in arrays.values())
    config = content.get(CONFIG_KEY)
    if isinstance(config, ConfigRecord):
        head, header = config.get("head"), config.get("header")
        n += len(head) if isinstance(head, bytes) else 0
        n += len(header.encode("utf-8", "replace")) if isinstance(header, str) else 0
    return n


def decode_content(content: RecordDict) -> tuple[str, Payload, int]:
    """Rebuild and decode the payload a message carries.

    Returns
    -------
    tuple
        ``(task, payload, nbytes)`` with ``nbytes`` the codec buffer's length.

    Raises
    ------
    DecodeError
        Records missing or of the wrong type, an ``Array`` that is not a fedprune codec
        buffer, names that disagree with the header, dtype or shape metadata that
        disagree with the buffer, or any malformed codec buffer.
    """
    config = content.get(CONFIG_KEY)
    arrays = content.get(ARRAYS_KEY)
    if not isinstance(config, ConfigRecord) or not isinstance(arrays, ArrayRecord):
        raise DecodeError(f"message lacks the {CONFIG_KEY!r}/{ARRAYS_KEY!r} records")
    task, head, header = config.get("task"), config.get("head"), config.get("header")
    if not isinstance(task, str) or not isinstance(head, bytes) or not isinstance(header, str):
        raise DecodeError(f"{CONFIG_KEY!r} needs task (str), head (bytes), header (str)")
    try:
        header_bytes = header.encode("utf-8")
        index = json.loads(header_bytes)["arrays"]
        names = [str(entry[0]) for entry in index]
    except (UnicodeEncodeError, ValueError, TypeError, KeyError, IndexError) as e:
        raise DecodeError(f"message header is not a codec header: {e}") from e
    if sorted(names) != sorted(arrays.keys()):
        raise DecodeError("message arrays do not match the names in its header")
    for name in names:
        if arrays[name].stype != STYPE:
            raise DecodeError(f"array {name[:80]!r} has stype {arrays[name].stype!r}")
    buf = b"".join([head, header_bytes, *(arrays[name].data for name in names)])
    payload = decode_payload(buf)
    for name in names:
        a, t = arrays[name], payload.arrays[name]
        if a.dtype != _dtype_name(t) or tuple(a.shape) != tuple(t.shape):
            raise DecodeError(
                f"array {name[:80]!r}: metadata {a.dtype}{list(a.shape)} disagrees with "
                f"its buffer ({_dtype_name(t)}{list(t.shape)})"
            )
    return task, payload, len(buf)


# ------------------------------------------------------------------------ run config


@dataclass
class FlowerOptions:
    """Engine settings (run-config keys ``flower.<name>``, dashes for underscores)."""

    round_timeout: float = 3600.0
    """Seconds to wait for a round's (or a setup phase's) replies."""
    node_wait: float = 300.0
    """Seconds to wait for all SuperNodes to connect before round 1."""
    poll_interval: float = 0.5
    """Seconds between two pulls for replies (Flower's deployment grid waits 3 s)."""
    resume: str = ""
    """ServerApp: continue the unfinished run in this run directory (a path on the
    ServerApp's machine) from its checkpoint, with its own ``config.toml``."""


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_config_from_config(cfg: RunConfig) -> dict[str, bool | int | float | str]:
    """A config as Flower run-config values (dotted keys)."""
    return _flatten(config_to_dict(cfg))


def run_config_defaults() -> dict[str, bool | int | float | str]:
    """What ``[tool.flwr.app.config]`` holds: every fedprune key and ``flower.*`` key."""
    out = run_config_from_config(RunConfig())
    out["engine.name"] = "flower"
    for f in fields(FlowerOptions):
        default = f.default
        key = _FLOWER_PREFIX + f.name.replace("_", "-")
        out[key] = default if isinstance(default, str) else float(default)  # type: ignore[arg-type]
    return out


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """The validated fedprune config and engine options from a Flower run config.

    Keys are dotted fedprune keys (``"pruning.final_sparsity"``) or ``flower.*``; keys
    not given keep their defaults; ``engine.name`` is always ``"flower"``.

    Raises
    ------
    ConfigError
        An unknown key, a wrong type or an impossible value (the message names the key).
    """
    nested: dict[str, Any] = {}
    options = FlowerOptions()
    known = {f.name for f in fields(FlowerOptions)}
    for key, value in run_config.items():
        if key.startswith(_FLOWER_PREFIX):
            name = key[len(_FLOWER_PREFIX) :].replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown Flower run-config key {key!r}")
            if name == "resume":
                if not isinstance(value, str):
                    raise ConfigError(f"{key} must be a run directory path, got {value!r}")
                options.resume = value
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{key} must be a positive number of seconds, got {value!r}")
            setattr(options, name, float(value))
            continue
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part!r} is a value, not a table")
            node = child
        node[last] = value
    engine = nested.setdefault("engine", {})
    if isinstance(engine, dict):
        engine["name"] = "flower"
    return config_from_dict(nested), options


# ---------------------------------------------------------------------------- client

_CLIENT_CACHE: dict[str, tuple[Federation, ClientMethod]] = {}


def _client_runtime(
    cfg: RunConfig, factory: Callable[[], ClientMethod] | None
) -> tuple[Federation, ClientMethod]:
    """This process's federation and client half for ``cfg`` (built once, then reused).

    A simulation actor serves many messages and keeps both; a deployment SuperNode
    starts a fresh ClientApp process per message and rebuilds them.
    """
    key = json.dumps(config_to_dict(cfg), sort_keys=True)
    hit = _CLIENT_CACHE.get(key)
    if hit is None:
        from fedprune.experiment import load_federation, model_spec
        from fedprune.methods.registry import get_method

        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)
        fed = load_federation(cfg)
        client = (
            factory()
            if factory is not None
            else get_method(cfg.method).client(cfg, model_spec(cfg, fed))
        )
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


def make_client_app(
    cfg: RunConfig | None = None, factory: Callable[[], ClientMethod] | None = None
) -> ClientApp:
    """The fedprune ClientApp.

    Parameters
    ----------
    cfg
        The run's config. ``None`` (``flwr run``): read it from the run config.
    factory
        Builds the method's client half; default: the registered method's client for
        ``cfg`` and the model spec of its data set. Shipped to simulation actors, so it
        must pickle.
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
        fed, client = _client_runtime(cfg, factory)
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
        content = _content(encode_for_flower(reply), task)
        _remember(context, pid, task, msg.metadata.group_id)
        return Message(content, reply_to=msg)

    return app


# ---------------------------------------------------------------------------- server


def _numeric_metrics(rec: Mapping[str, Any]) -> MetricRecord:
    out: dict[str, int | float] = {}
    for k, v in rec.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = v
    return MetricRecord(out)  # type: ignore[arg-type]


class _PollingGrid(Grid):
    """A grid that pulls replies every ``interval`` seconds; all else is delegated.

    Flower 1.41's deployment grid sleeps 3 s between two pulls, which adds 1.5 s on
    average to every exchange; on loopback or a LAN a client round trip takes a few
    seconds, so the wait is a large share of a round.
    """

    def __init__(self, grid: Grid, interval: float) -> None:
        self.grid = grid
        self.interval = interval

    def set_run(self, run: Any) -> None:
        """Delegated."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """Delegated."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegated (deprecated in Flower)."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull every ``interval`` s until all replies or ``timeout``."""
        pending = {i for i in self.grid.push_messages(list(messages)) if i}
        end = None if timeout is None else time.monotonic() + timeout
        out: list[Message] = []
        while pending:
            replies = list(self.grid.pull_messages(pending))
            out.extend(replies)
            pending -= {m.metadata.reply_to_message_id for m in replies}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.interval)
        return out


class FedpruneStrategy(Strategy):
    """A Flower strategy that drives a fedprune server half.

    It is also the server half's :class:`~fedprune.methods.base.FederatedIO`: setup
    phases exchange messages through :meth:`exchange`. Records are built and counted
    exactly as in the in-process engine.

    Parameters
    ----------
    cfg
        The run configuration.
    fed
        The federation (the server uses the global test set and the client count).
    server
        The method's server half, holding the initial global model.
    on_round
        Called with each round's record as soon as it exists.
    options
        Timeouts.
    resume
        Continue after ``resume.round`` (the server half already restored).
    checkpoint
        Called after each round (after ``on_round``) with the round, the records and the
        engine state.
    """

    def __init__(
        self,
        cfg: RunConfig,
        fed: Federation,
        server: ServerMethod,
        *,
        on_round: RoundCallback | None = None,
        options: FlowerOptions | None = None,
        resume: Resume | None = None,
        checkpoint: CheckpointFn | None = None,
    ) -> None:
        self.cfg = cfg
        self.fed = fed
        self.server = server
        self.on_round = on_round
        self.options = options or FlowerOptions()
        self.num_clients = len(fed.clients)
        self.accounting = RoundAccounting(cfg, fed, server.model)
        self.resume = resume
        self.checkpoint = checkpoint
        self.records: list[dict[str, Any]] = []
        self._offset = 0
        """Rounds finished before this process started (Flower counts from 1 again)."""
        self.node_of: dict[int, int] = {}
        """Client id -> SuperNode id."""
        self._cid_of: dict[int, int] = {}
        self._grid: Grid | None = None
        self._t_start = 0.0
        self._t_round = 0.0
        self._t_train = 0.0
        self._cids: list[int] = []
        self._drops: dict[int, str] = {}

    # -- Flower Strategy --------------------------------------------------------------
    def summary(self) -> None:
        """Log the strategy's configuration."""
        cfg = self.cfg
        _LOG.info(
            "\t├── fedprune method %s: %d clients, %d per round, %d rounds",
            cfg.method,
            self.num_clients,
            cfg.clients_per_round(),
            cfg.federation.rounds,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample this round's clients and build one message per client."""
        rnd = server_round + self._offset
        self._t_round = time.perf_counter()
        self.accounting.begin_round(rnd)
        self._t_train = time.perf_counter()
        return self._fit_messages(rnd, 1)

    def _fit_messages(self, rnd: int, attempt: int) -> list[Message]:
        """Sample the clients of this attempt and build their messages (some set to
        fail on purpose by ``engine.fail_rate``)."""
        self._cids, fail = self.accounting.draw(rnd, attempt)
        payloads = self.server.configure_fit(rnd, self._cids)
        return self._messages("fit", payloads, f"{rnd}.{attempt}", fail)

    def _retry_until_enough(
        self, rnd: int, decoded: list[ClientReply]
    ) -> tuple[list[ClientReply], dict[int, str], int]:
        """Resample while fewer than ``federation.min_clients`` replies are usable.

        Raises
        ------
        RoundFailedError
            Still too few after ``federation.max_retries`` retries.
        """
        fed_cfg = self.cfg.federation
        drops = dict(self._drops)
        attempt = 1
        while len(decoded) < fed_cfg.min_clients:
            if attempt > fed_cfg.max_retries or self._grid is None:
                raise RoundFailedError(
                    f"round {rnd}: fewer than federation.min_clients={fed_cfg.min_clients} "
                    f"clients answered in {attempt} attempts; the {rnd - 1} finished rounds "
                    "are saved"
                )
            _LOG.warning(
                "fedprune round %d: %d of %d clients answered (federation.min_clients=%d); "
                "attempt %d",
                rnd,
                len(decoded),
                len(self._cids),
                fed_cfg.min_clients,
                attempt,
            )
            attempt += 1
            messages = self._fit_messages(rnd, attempt)
            replies = self._grid.send_and_receive(messages, timeout=self.options.round_timeout)
            decoded = self._decode_replies("fit", replies, self._cids)
            drops.update(self._drops)
        return decoded, drops, attempt

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the replies, let the server half aggregate, record the round."""
        rnd = server_round + self._offset
        acct = self.accounting
        decoded = self._decode_replies("fit", replies, self._cids)
        decoded, drops, attempts = self._retry_until_enough(rnd, decoded)
        acct.timer.seconds["train"] = (
            acct.timer.seconds.get("train", 0.0) + time.perf_counter() - self._t_train
        )
        with acct.timer.phase("aggregate"):
            extra = self.server.aggregate_fit(rnd, decoded)
        rec = acct.record(rnd, self._cids, decoded, extra, self.server.model, drops, attempts)
        acct.finish_round(
            rec,
            self.records,
            t_round=self._t_round,
            t_start=self._t_start,
            on_round=self.on_round,
            checkpoint=self.checkpoint,
        )
        _LOG.info(
            "fedprune round %d: accuracy %s, sparsity %.3f, %d B up, %d B down",
            rnd,
            rec.get("test_accuracy"),
            rec["sparsity"],
            rec["bytes_up"],
            rec["bytes_down"],
        )
        return None, _numeric_metrics(rec)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the server evaluates on the global test set."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    # -- FederatedIO ------------------------------------------------------------------
    def exchange(self, task: str, payloads: Mapping[int, Payload]) -> list[ClientReply]:
        """Send ``payloads[cid]`` with ``task`` to each client's node; return the replies."""
        if self._grid is None:
            raise RuntimeError("exchange() is only available while the strategy runs")
        messages = self._messages(task, payloads, f"setup-{task}")
        replies = self._grid.send_and_receive(messages, timeout=self.options.round_timeout)
        return self._decode_replies(task, replies, list(payloads))

    # -- the run ----------------------------------------------------------------------
    def run(self, grid: Grid) -> list[dict[str, Any]]:
        """Map clients to nodes, run the setup phase and every round; return the records."""
        grid = _PollingGrid(grid, self.options.poll_interval)
        self._grid = grid
        self._t_start = time.perf_counter()
        try:
            self.discover(grid)
            self.records = self.accounting.start(self.server, self, self.resume)
            self._offset = len(self.records)
            remaining = self.cfg.federation.rounds - self._offset
            if remaining > 0:
                self.start(
                    grid=grid,
                    initial_arrays=ArrayRecord(),
                    num_rounds=remaining,
                    timeout=self.options.round_timeout,
                )
        finally:
            self._grid = None
        return self.records

    def discover(self, grid: Grid) -> dict[int, int]:
        """Wait for the SuperNodes, ask each for its partition id, map clients to nodes.

        Raises
        ------
        FlowerEngineError
            Too few nodes within ``options.node_wait``, two nodes with one partition, a
            node whose ``num-partitions`` differs from the client count, or a client
            without a node.
        """
        n = self.num_clients
        deadline = time.monotonic() + self.options.node_wait
        while True:
            node_ids = sorted(grid.get_node_ids())
            if len(node_ids) >= n:
                break
            if time.monotonic() > deadline:
                raise FlowerEngineError(
                    f"only {len(node_ids)} of {n} SuperNodes connected within "
                    f"{self.options.node_wait:g} s (flower.node-wait)"
                )
            time.sleep(0.2)
        query = [
            Message(
                RecordDict({NODE_KEY: ConfigRecord({"want": PARTITION_ID})}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
                group_id="discover",
            )
            for node in node_ids
        ]
        node_of: dict[int, int] = {}
        for reply in grid.send_and_receive(query, timeout=self.options.node_wait):
            node = reply.metadata.src_node_id
            if reply.has_error():
                _LOG.warning("SuperNode %d did not say its partition: %s", node, reply.error)
                continue
            info = reply.content.get(NODE_KEY)
            pid = info.get(PARTITION_ID) if isinstance(info, ConfigRecord) else None
            num = info.get(NUM_PARTITIONS) if isinstance(info, ConfigRecord) else None
            if not isinstance(pid, int) or isinstance(pid, bool):
                _LOG.warning("SuperNode %d sent no partition id; ignored", node)
                continue
            if num is not None and (not isinstance(num, int) or num != n):
                raise FlowerEngineError(
                    f"SuperNode {node} has {NUM_PARTITIONS}={num!r} but the federation has "
                    f"{n} clients: give every SuperNode {NUM_PARTITIONS}={n}"
                )
            if not 0 <= pid < n:
                _LOG.warning("SuperNode %d holds partition %d of %d; ignored", node, pid, n)
                continue
            if pid in node_of:
                raise FlowerEngineError(
                    f"SuperNodes {node_of[pid]} and {node} both have {PARTITION_ID}={pid}"
                )
            node_of[pid] = node
        missing = sorted(set(range(n)) - set(node_of))
        if missing:
            raise FlowerEngineError(
                f"no SuperNode answered for client(s) {missing[:10]}: each of the {n} "
                f"clients needs a SuperNode started with --node-config "
                f"'{PARTITION_ID}=<i> {NUM_PARTITIONS}={n}'"
            )
        self.node_of = node_of
        self._cid_of = {node: cid for cid, node in node_of.items()}
        return node_of

    # -- helpers ----------------------------------------------------------------------
    def _messages(
        self,
        task: str,
        payloads: Mapping[int, Payload],
        group: str,
        fail: frozenset[int] = frozenset(),
    ) -> list[Message]:
        """One message per client (clients in ``fail`` get :data:`FAIL_TASK`)."""
        fp16 = self.cfg.engine.fp16
        cache: dict[int, EncodedPayload] = {}
        messages: list[Message] = []
        sizes: list[int] = []
        for cid, p in payloads.items():
            enc = cache.get(id(p))
            if enc is None:  # the same broadcast payload is encoded once
                enc = cache[id(p)] = encode_for_flower(p, fp16=fp16)
            if cid not in self.node_of:
                raise FlowerEngineError(f"client {cid} has no SuperNode")
            messages.append(
                Message(
                    _content(enc, FAIL_TASK if cid in fail else task),
                    dst_node_id=self.node_of[cid],
                    message_type=MessageType.TRAIN,
                    group_id=group,
                )
            )
            sizes.append(enc.nbytes)
        self.accounting.count_down(task, sizes)
        return messages

    def _decode_replies(
        self, task: str, replies: Iterable[Message], expected: list[int]
    ) -> list[ClientReply]:
        """Decoded replies sorted by client id; drops (with reasons) in ``self._drops``."""
        self._drops = {}
        out: list[ClientReply] = []
        sizes: list[int] = []
        for msg in replies:
            cid = self._cid_of.get(msg.metadata.src_node_id)
            if cid is None or cid not in expected:
                _LOG.warning("dropping a reply from unexpected node %d", msg.metadata.src_node_id)
                continue
            if msg.has_error():
                self._drop(cid, f"the client failed: {msg.error.reason}")
                continue
            try:
                got, payload, nbytes = decode_content(msg.content)
            except DecodeError as e:
                sizes.append(_content_nbytes(msg.content))  # it crossed all the same
                self._drop(cid, f"undecodable reply: {e}")
                continue
            sizes.append(nbytes)
            if got != task:
                self._drop(cid, f"reply to task {got!r}, expected {task!r}")
                continue
            out.append(ClientReply(cid, payload))
        for cid in sorted(set(expected) - {r.cid for r in out} - set(self._drops)):
            self._drop(cid, "no reply within flower.round-timeout")
        self.accounting.count_up(task, sizes)
        return sorted(out, key=lambda r: r.cid)

    def _drop(self, cid: int, reason: str) -> None:
        self._drops[cid] = reason
        _LOG.warning("fedprune: dropping the reply of client %d: %s", cid, reason)


def make_server_app() -> ServerApp:
    """The fedprune ServerApp for ``flwr run``: config from the run config.

    It writes a run directory exactly like ``fedprune run`` (under ``out``, relative to
    the ServerApp process's working directory: pass an absolute ``out`` in deployment).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedprune.experiment import finish_run, prepare_resume, prepare_run

        cfg, options = config_from_run_config(context.run_config)
        resume: Resume | None = None
        if options.resume:
            _LOG.info("fedprune: resuming %s with its own config.toml", options.resume)
            run, resume = prepare_resume(Path(options.resume))
            _LOG.info("fedprune: continuing after round %d", resume.round if resume else 0)
        else:
            run = prepare_run(cfg)
        strategy = FedpruneStrategy(
            run.cfg,
            run.fed,
            run.server,
            on_round=run.on_round(),
            options=options,
            resume=resume,
            checkpoint=run.checkpointer(),
        )
        records = strategy.run(grid)
        result = finish_run(run, records)
        _LOG.info(
            "fedprune run finished: %s (final accuracy %s, sparsity %.3f)",
            result.run_dir,
            result.summary.get("final_accuracy"),
            result.summary.get("final_sparsity"),
        )

    return app


# ------------------------------------------------------------------------ simulation


def _set_flower_env() -> None:
    """Environment defaults for an in-process Flower run (only where unset)."""
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning


@dataclass
class FlowerSimulationEngine:
    """Runs a method's halves on Flower's simulation runtime (Ray), in this process.

    The ServerApp runs in a thread of this process around the very ``server`` object
    given (so records are collected here and ``server.model`` is the final model); the
    ClientApp runs in Ray actors (one CPU each, Ray limited to 2 CPUs), one virtual
    SuperNode per client.

    Parameters
    ----------
    cfg, fed, server, client_factory
        As for :class:`~fedprune.engines.inprocess.InProcessEngine`.
    options
        Timeouts.
    """

    cfg: RunConfig
    fed: Federation
    server: ServerMethod
    client_factory: Callable[[], ClientMethod] | None = None
    options: FlowerOptions = field(default_factory=FlowerOptions)
    num_cpus: int = 2

    def run(
        self,
        on_round: RoundCallback | None = None,
        *,
        resume: Resume | None = None,
        checkpoint: CheckpointFn | None = None,
    ) -> list[dict[str, Any]]:
        """Run setup and every round on Flower; return one metrics record per round
        (``resume`` and ``checkpoint`` as for the in-process engine)."""
        _set_flower_env()
        from flwr.simulation import run_simulation

        strategy = FedpruneStrategy(
            self.cfg,
            self.fed,
            self.server,
            on_round=on_round,
            options=self.options,
            resume=resume,
            checkpoint=checkpoint,
        )
        server_app = ServerApp()

        errors: list[RoundFailedError] = []

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                strategy.run(grid)
            except RoundFailedError as exc:  # stopped cleanly; raised again below
                errors.append(exc)

        client_app = make_client_app(self.cfg, self.client_factory)
        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        flwr_logger.setLevel(logging.WARNING)
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=len(self.fed.clients),
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {"num_cpus": self.num_cpus, "include_dashboard": False},
                },
            )
        finally:
            flwr_logger.setLevel(level)
            _shutdown_ray()
        if errors:
            raise errors[0]
        if len(strategy.records) != self.cfg.federation.rounds:
            raise FlowerEngineError(
                f"Flower simulation ended after {len(strategy.records)} of "
                f"{self.cfg.federation.rounds} rounds (see the log above)"
            )
        return strategy.records


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:  # pragma: no cover - flwr[simulation] brings ray
        return
    if ray.is_initialized():
        ray.shutdown()
