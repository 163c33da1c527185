"""The Flower ``Strategy`` that drives a fedprune server half.

Nothing here re-implements a method: :class:`FedpruneStrategy` drives any
:class:`~fedprune.methods.base.ServerMethod` and moves codec buffers
(:mod:`fedprune.engines.flower.wire`) inside Flower ``Message`` objects. It samples,
counts, times and records rounds with the code the in-process engine uses
(:class:`~fedprune.engines.common.RoundAccounting`).

Client ``i`` of the federation is the SuperNode whose node config has
``partition-id = i`` (``num-partitions`` must equal the number of clients; the
simulation runtime sets both). Before round 1 the strategy sends every node a
``query`` message and builds the client-to-node map from the replies
(:meth:`FedpruneStrategy.discover`). Sampling is the in-process engine's
(:meth:`~fedprune.engines.common.RoundAccounting.draw`), so both engines train the same
clients in the same rounds.

With ``engine.values_only`` a broadcast tensor travels values-only against the supports
its client holds, as in the in-process engine
(:class:`~fedprune.engines.references.ReferenceBook`, saved in checkpoints), but only
against supports the client *confirmed*: each ``train`` reply names the fingerprint of
what its node now holds (kept in the node's ``context.state``), and a client's entry is
committed only when that fingerprint is the one of what it was sent; a reply that names
something else removes the entry (the next broadcast is full format). A resumed run
restores the book and keeps only the entries whose nodes say, in discovery, that they
still hold them. A node that receives a broadcast against supports it does not hold
refuses it (:func:`~fedprune.engines.flower.wire.refusal_content`) and is sent the same
payload again in full format, once, in the same attempt: results never depend on what a
node remembers, only the bytes do.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedprune.config import RunConfig
from fedprune.core.codec import Payload, Support, supports_of
from fedprune.core.validation import reply_schema
from fedprune.data.federation import Federation
from fedprune.engines.common import (
    FAIL_TASK,
    Accepted,
    Attempt,
    CheckpointFn,
    ProgressCallback,
    Resume,
    RoundAccounting,
    RoundCallback,
    RoundRecord,
)
from fedprune.engines.flower.grid import PollingGrid
from fedprune.engines.flower.runconfig import FlowerOptions
from fedprune.engines.flower.wire import (
    HOLDS,
    NODE_KEY,
    NUM_PARTITIONS,
    PARTITION_ID,
    REFUSED,
    EncodedPayload,
    FlowerEngineError,
    config_field,
    content_nbytes,
    decode_content,
    encode_for_flower,
    make_content,
)
from fedprune.engines.references import ENGINE_KEY as REFERENCES_KEY
from fedprune.engines.references import ReferenceBook, fingerprint
from fedprune.errors import DecodeError
from fedprune.methods.base import ClientReply, ServerMethod

__all__ = ["FedpruneStrategy"]

_LOG = logging.getLogger("flwr.fedprune")


def _numeric_metrics(rec: Mapping[str, Any]) -> MetricRecord:
    out: dict[str, int | float] = {}
    method = {f"method/{k}": v for k, v in (rec.get("method_metrics") or {}).items()}
    for k, v in [*rec.items(), *method.items()]:
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = v
    return MetricRecord(out)  # type: ignore[arg-type]


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
        engine state; also with round 0 when the setup phase saves its progress.
    on_progress
        Called with the setup phase's progress lines.
    parallel
        Clients a setup phase may send one exchange at a time (0: all at once; the
        simulation engine passes its Ray CPUs, a deployment's nodes all run at once).
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
        on_progress: ProgressCallback | None = None,
        parallel: int = 0,
    ) -> None:
        self.cfg = cfg
        self.fed = fed
        self.server = server
        self.on_round = on_round
        self.options = options or FlowerOptions()
        self.num_clients = len(fed.clients)
        self.accounting = RoundAccounting(cfg, fed, server.model)
        self.resume = resume
        self.references = ReferenceBook()
        """Per client, the supports of the last broadcast it confirmed holding."""
        self._held_fp: dict[int, str] = {}
        """Fingerprints of the book's entries."""
        if resume is not None:
            self._load_references(resume.engine.get(REFERENCES_KEY))
        self.checkpoint = self.references.saving(checkpoint)
        self.on_progress = on_progress
        self.parallel = parallel
        self.records: list[RoundRecord] = []
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
        self._sent: dict[int, dict[str, Support]] = {}
        """Supports of the last payload each client was sent (what its reply may be
        values-only against)."""
        self._sent_fp: dict[int, str] = {}
        self._pending: dict[int, tuple[Payload, str, str]] = {}
        """Per client of the last messages: ``(payload, task, group)`` (for a resend)."""
        self.resent = 0
        """Broadcasts sent again in full format after a refusal."""

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

    def _retry_until_enough(self, rnd: int, decoded: list[ClientReply]) -> Accepted:
        """Validate the replies; resample while too few are accepted
        (:meth:`RoundAccounting.until_enough`, as the in-process engine does; without a
        grid to send on, the first attempt is the only one)."""
        grid = self._grid

        def attempt(n: int) -> Attempt:
            assert grid is not None
            replies = grid.send_and_receive(
                self._fit_messages(rnd, n), timeout=self.options.round_timeout
            )
            return Attempt(
                self._cids, self._decode_replies("fit", replies, self._cids), dict(self._drops)
            )

        first = Attempt(self._cids, decoded, dict(self._drops))
        return self.accounting.until_enough(
            rnd, self.server, first, None if grid is None else attempt, _LOG
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the replies, let the server half aggregate, record the round."""
        rnd = server_round + self._offset
        acct = self.accounting
        decoded = self._decode_replies("fit", replies, self._cids)
        got = self._retry_until_enough(rnd, decoded)
        acct.timer.seconds["train"] = (
            acct.timer.seconds.get("train", 0.0) + time.perf_counter() - self._t_train
        )
        rec = acct.aggregate_and_record(rnd, self.server, got)
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
    def run(self, grid: Grid) -> list[RoundRecord]:
        """Map clients to nodes, run the setup phase and every round; return the records."""
        grid = PollingGrid(grid, self.options.poll_interval)
        self._grid = grid
        self._t_start = time.perf_counter()
        try:
            self.discover(grid)
            self.records = self.accounting.start(
                self.server,
                self,
                self.resume,
                checkpoint=self.checkpoint,
                on_progress=self.on_progress,
                parallel=self.parallel,
            )
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
        holds: dict[int, str | None] = {}
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
            held = info.get(HOLDS) if isinstance(info, ConfigRecord) else None
            holds[pid] = held if isinstance(held, str) else None
        missing = sorted(set(range(n)) - set(node_of))
        if missing:
            raise FlowerEngineError(
                f"no SuperNode answered for client(s) {missing[:10]}: each of the {n} "
                f"clients needs a SuperNode started with --node-config "
                f"'{PARTITION_ID}=<i> {NUM_PARTITIONS}={n}'"
            )
        self.node_of = node_of
        self._cid_of = {node: cid for cid, node in node_of.items()}
        self._reconcile(holds)
        return node_of

    # -- references (values-only broadcasts) ------------------------------------------
    def _load_references(self, state: Mapping[str, Any] | None) -> None:
        """Restore the book from a checkpoint's engine state (discovery then keeps only
        the entries that the nodes confirm)."""
        self.references.load_state_dict(state)
        fps: dict[int, str] = {}
        for cid in self.references.clients():
            held = self.references.of(cid)
            assert held is not None
            if id(held) not in fps:
                fps[id(held)] = fingerprint(held)
            self._held_fp[cid] = fps[id(held)]

    def _reconcile(self, holds: Mapping[int, str | None]) -> None:
        """Keep a client's entry only if its node holds those supports (a resumed run:
        nodes of a new run, or that restarted, hold other supports or none)."""
        book = self.references.clients()
        for cid in book:
            if holds.get(cid) != self._held_fp.get(cid):
                self._forget(cid)
        if book:
            _LOG.info(
                "fedprune: %d of %d client(s) still hold the supports the checkpoint says",
                len(self.references),
                len(book),
            )

    def _commit(self, cid: int, holds: str | None) -> None:
        """A reply from ``cid`` says its node holds the supports ``holds``."""
        if holds is not None and holds == self._sent_fp.get(cid):
            self.references.commit(cid, self._sent[cid])
            self._held_fp[cid] = holds
        elif holds is None or holds != self._held_fp.get(cid):
            self._forget(cid)

    def _forget(self, cid: int) -> None:
        self.references.forget(cid)
        self._held_fp.pop(cid, None)

    # -- helpers ----------------------------------------------------------------------
    def _messages(
        self,
        task: str,
        payloads: Mapping[int, Payload],
        group: str,
        fail: frozenset[int] = frozenset(),
    ) -> list[Message]:
        """One message per client (clients in ``fail`` get :data:`FAIL_TASK`), values-only
        against the supports each client confirmed holding (``engine.values_only``)."""
        eng = self.cfg.engine
        cache: dict[tuple[int, int], EncodedPayload] = {}
        supports: dict[int, tuple[dict[str, Support], str]] = {}
        messages: list[Message] = []
        sizes: list[int] = []
        self._pending = {}
        for cid, p in payloads.items():
            if cid not in self.node_of:
                raise FlowerEngineError(f"client {cid} has no SuperNode")
            held = self.references.of(cid) if eng.values_only else None
            key = (id(p), id(held))
            enc = cache.get(key)
            if enc is None:  # a payload is encoded once per distinct reference
                enc = cache[key] = encode_for_flower(
                    p, fp16=eng.fp16, wire_dtype=eng.wire_dtype, references=held,
                    compress=eng.compress,
                )  # fmt: skip
            if id(p) not in supports:
                # what the client will hold: its reply may be values-only against it
                sent = supports_of(p.arrays, fp16=eng.fp16, wire_dtype=eng.wire_dtype)
                supports[id(p)] = (sent, fingerprint(sent) if eng.values_only else "")
            self._sent[cid], self._sent_fp[cid] = supports[id(p)]
            sent_task = FAIL_TASK if cid in fail else task
            self._pending[cid] = (p, sent_task, group)
            reference = self._held_fp[cid] if held is not None else None
            messages.append(
                Message(
                    make_content(enc, sent_task, reference=reference),
                    dst_node_id=self.node_of[cid],
                    message_type=MessageType.TRAIN,
                    group_id=group,
                )
            )
            sizes.append(enc.nbytes)
        self.accounting.count_down(task, sizes)
        return messages

    def _resend_in_full(self, task: str, cids: list[int]) -> list[Message]:
        """The messages of ``cids`` again, in full format (their nodes refused the
        values-only ones); counted as sent, not as extra dense traffic."""
        eng = self.cfg.engine
        pending = self._pending
        cache: dict[int, EncodedPayload] = {}
        messages: list[Message] = []
        sizes: list[int] = []
        for cid in cids:
            p, sent_task, group = pending[cid]
            enc = cache.get(id(p))
            if enc is None:
                enc = cache[id(p)] = encode_for_flower(
                    p, fp16=eng.fp16, wire_dtype=eng.wire_dtype, compress=eng.compress
                )
            messages.append(
                Message(
                    make_content(enc, sent_task),
                    dst_node_id=self.node_of[cid],
                    message_type=MessageType.TRAIN,
                    group_id=group,
                )
            )
            sizes.append(enc.nbytes)
        self.accounting.count_down(task, sizes, dense=False)
        self.resent += len(messages)
        return messages

    def _decode_replies(
        self, task: str, replies: Iterable[Message], expected: list[int]
    ) -> list[ClientReply]:
        """Decoded replies sorted by client id; drops (with reasons) in ``self._drops``.

        Clients that refused a values-only broadcast are sent it again in full format
        (once) and their replies to that are decoded with the others.
        """
        self._drops = {}
        sizes: list[int] = []
        out, refused = self._decode_some(task, replies, expected, sizes)
        if refused and self._grid is not None:
            again = self._grid.send_and_receive(
                self._resend_in_full(task, refused), timeout=self.options.round_timeout
            )
            more, still = self._decode_some(task, again, refused, sizes)
            out += more
            for cid in still:
                self._drop(cid, "refused a full-format message")
        else:
            for cid in refused:
                self._drop(cid, "refused a values-only message (no grid to resend on)")
        for cid in sorted(set(expected) - {r.cid for r in out} - set(self._drops)):
            self._drop(cid, "no reply within flower.round-timeout")
        self.accounting.count_up(task, sizes)
        return sorted(out, key=lambda r: r.cid)

    def _decode_some(
        self, task: str, replies: Iterable[Message], expected: list[int], sizes: list[int]
    ) -> tuple[list[ClientReply], list[int]]:
        """Decode replies from ``expected`` clients (sizes appended to ``sizes``, drops
        in ``self._drops``); also the clients that refused their broadcast, sorted."""
        out: list[ClientReply] = []
        refused: list[int] = []
        expect = reply_schema(self.server.model.state_dict(), task)
        values_only = self.cfg.engine.values_only
        for msg in replies:
            cid = self._cid_of.get(msg.metadata.src_node_id)
            if cid is None or cid not in expected:
                _LOG.warning("dropping a reply from unexpected node %d", msg.metadata.src_node_id)
                continue
            if msg.has_error():
                self._drop(cid, f"the client failed: {msg.error.reason}")
                continue
            why = config_field(msg.content, REFUSED)
            if why is not None:
                self._forget(cid)
                _LOG.info("fedprune: client %d refused a values-only message (%s)", cid, why)
                refused.append(cid)
                continue
            if values_only:  # the client replied: it holds what it says it holds
                self._commit(cid, config_field(msg.content, HOLDS))
            refs = self._sent.get(cid) if values_only else None
            try:  # against the global model's schema: nothing forged is allocated
                got, payload, nbytes = decode_content(msg.content, expect=expect, references=refs)
            except DecodeError as e:
                sizes.append(content_nbytes(msg.content))  # it crossed all the same
                self._drop(cid, f"undecodable reply: {e}")
                continue
            sizes.append(nbytes)
            if got != task:
                self._drop(cid, f"reply to task {got!r}, expected {task!r}")
                continue
            out.append(ClientReply(cid, payload))
        return out, sorted(refused)

    def _drop(self, cid: int, reason: str) -> None:
        self._drops[cid] = reason
        _LOG.warning("fedprune: dropping the reply of client %d: %s", cid, reason)
