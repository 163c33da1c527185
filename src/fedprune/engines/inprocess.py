"""The in-process engine: the fast default for experiments and tests.

Each round it samples clients, encodes what the server half wants to send with the
codec (so byte counts are real buffer lengths), lets each client half decode, train and
encode its reply, decodes the replies and hands them to the server half. Clients run in
the main process, or in ``engine.workers`` forked worker processes (one torch thread
each) that receive and return encoded bytes only.

With ``engine.values_only`` (the default) a broadcast tensor travels values-only against
the support its client already holds (:class:`~fedprune.engines.references.ReferenceBook`:
the same array of the last broadcast the client acknowledged by replying), and a reply
tensor against the support of what the client just received. The client's memory is
handed to it beside the counted buffer (:func:`~fedprune.core.codec.pack_delivery`);
only the buffer is counted. Replies are decoded against the schema of the global model
(:func:`~fedprune.core.validation.reply_schema`): an unexpected, missing or mis-shaped
array makes the reply undecodable, which drops that client like a failure.

Client training is seeded per (round, client), so the result does not depend on the
number of workers.

With ``engine.cohort`` on (or ``auto``), the ``fit`` tasks of a round are trained as one
batched computation (:mod:`fedprune.engines.cohort`), on ``engine.device``; with
``engine.workers > 1`` each worker trains a contiguous sub-cohort.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from fedprune.config import RunConfig
from fedprune.core.codec import (
    Payload,
    References,
    Support,
    decode_payload,
    encode_payload,
    pack_delivery,
    supports_of,
)
from fedprune.core.validation import reply_schema
from fedprune.data.federation import Federation
from fedprune.engines.cohort import cohort_refusal, resolve_device, run_cohort
from fedprune.engines.cohort import split as split_cohort
from fedprune.engines.common import (
    FAIL_TASK,
    Accepted,
    Attempt,
    CheckpointFn,
    InjectedFailure,
    ProgressCallback,
    Resume,
    RoundAccounting,
    RoundCallback,
    RoundRecord,
)
from fedprune.engines.references import ENGINE_KEY as REFERENCES_KEY
from fedprune.engines.references import ReferenceBook, encode_reply
from fedprune.errors import DecodeError
from fedprune.methods.base import ClientMethod, ClientReply, ServerMethod

log = logging.getLogger(__name__)

# Worker-process globals (set by the fork initializer; never pickled).
_W_FED: Federation | None = None
_W_CLIENT: ClientMethod | None = None


def _init_worker(fed: Federation, factory: Callable[[], ClientMethod]) -> None:
    global _W_FED, _W_CLIENT
    torch.set_num_threads(1)
    _W_FED = fed
    _W_CLIENT = factory()


MessageTap = Callable[[str, str, int, bytes, "References | None"], None]
"""Sees every counted message: ``(direction "down"/"up", task, cid, buffer, the
receiver's references)`` (measurement only; see :func:`tap_messages`)."""
_TAPS: list[MessageTap] = []


@contextmanager
def tap_messages(tap: MessageTap) -> Iterator[None]:
    """Call ``tap`` with every message the engine counts while the block runs (one call
    per delivered broadcast, one per reply). For measurements such as benchmarks/wire.py."""
    _TAPS.append(tap)
    try:
        yield
    finally:
        _TAPS.remove(tap)


def _tap(direction: str, task: str, cid: int, buf: bytes, refs: References | None) -> None:
    for tap in _TAPS:
        tap(direction, task, cid, buf, refs)


def _run_client(client: ClientMethod, fed: Federation, cid: int, task: str, buf: bytes) -> bytes:
    """The client end: decode the delivered buffer against the client's memory, run the
    task, encode the reply (values-only against what it just received, when enabled)."""
    payload = decode_payload(buf)  # a delivery: decoded against the client's memory
    if task == FAIL_TASK:
        raise InjectedFailure(f"injected failure (engine.fail_rate={client.cfg.engine.fail_rate})")
    reply = client.run_task(task, payload, fed.clients[cid])
    if reply is None:
        raise RuntimeError("the client returned nothing")
    return encode_reply(reply, payload, client.cfg.engine)


def _guarded(
    client: ClientMethod, fed: Federation, cid: int, task: str, buf: bytes
) -> tuple[bytes | None, str | None]:
    """Run a client; a failure becomes ``(None, one-line reason)`` instead of an exception."""
    try:
        return _run_client(client, fed, cid, task, buf), None
    except Exception as exc:  # any client-side failure drops only that client
        text = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _worker_task(args: tuple[int, str, bytes]) -> tuple[int, bytes | None, str | None]:
    cid, task, buf = args
    assert _W_FED is not None and _W_CLIENT is not None
    out, reason = _guarded(_W_CLIENT, _W_FED, cid, task, buf)
    return cid, out, reason


def _reply_bytes(client: ClientMethod, payload: Payload, reply: Payload) -> bytes:
    """A reply's bytes on the cohort path: what ``_run_client`` sends (keep them equal)."""
    return encode_reply(reply, payload, client.cfg.engine)


def _worker_cohort(
    args: tuple[list[tuple[int, str, bytes]], int, str],
) -> list[tuple[int, bytes | None, str | None]]:
    """A worker trains its sub-cohort (the cohort path with ``engine.workers > 1``)."""
    items, chunk, device = args
    assert _W_FED is not None and _W_CLIENT is not None
    return run_cohort(_W_CLIENT, _W_FED, items, _guarded, _reply_bytes, chunk=chunk, device=device)


class InProcessEngine:
    """Runs a method's halves over a :class:`Federation` in this process (or a fork pool).

    Parameters
    ----------
    cfg
        The run configuration.
    fed
        Clients' data and the global test set.
    server
        The method's server half, holding the initial global model.
    client_factory
        Builds the method's client half (called once per process).
    """

    def __init__(
        self,
        cfg: RunConfig,
        fed: Federation,
        server: ServerMethod,
        client_factory: Callable[[], ClientMethod],
    ) -> None:
        self.cfg = cfg
        self.fed = fed
        self.server = server
        self.client_factory = client_factory
        self.num_clients = len(fed.clients)
        self.accounting = RoundAccounting(cfg, fed, server.model)
        self.timer = self.accounting.timer
        self._client: ClientMethod | None = None
        self._pool: Any = None
        self.failures: dict[int, str] = {}
        self.references = ReferenceBook()
        self._fallbacks: set[str] = set()

    # -- transport ------------------------------------------------------------------
    def exchange(
        self, task: str, payloads: Mapping[int, Payload], fail: frozenset[int] = frozenset()
    ) -> list[ClientReply]:
        """Encode, deliver, run and decode one message per client; count the bytes.

        Clients in ``fail`` fail on purpose (failure injection); a failed client's reply
        is missing and the reason is in ``self.failures``.
        """
        deliveries, sent = self._encode_down(task, payloads)
        replies_raw = self._run(task, deliveries, fail)
        self.accounting.count_up(task, (len(b) for b in replies_raw.values()))
        return self._decode_up(task, replies_raw, sent)

    def _encode_down(
        self, task: str, payloads: Mapping[int, Payload]
    ) -> tuple[dict[int, bytes], dict[int, dict[str, Support]]]:
        """Encode and count one message per client: the delivery for each client and the
        supports it will hold once it has decoded it.

        A payload is encoded once per distinct reference (all clients holding the same
        broadcast share one buffer); each delivered buffer is counted once per client.
        """
        eng = self.cfg.engine
        deliveries: dict[int, bytes] = {}
        sent: dict[int, dict[str, Support]] = {}
        sizes: list[int] = []
        supports: dict[int, dict[str, Support]] = {}
        groups: dict[tuple[int, int], tuple[bytes, bytes]] = {}
        for cid, p in payloads.items():
            held = self.references.of(cid) if eng.values_only else None
            key = (id(p), id(held))
            group = groups.get(key)
            if group is None:
                wire = encode_payload(
                    p, fp16=eng.fp16, wire_dtype=eng.wire_dtype, references=held,
                    compress=eng.compress,
                )  # fmt: skip
                group = groups[key] = (wire, pack_delivery(wire, held))
            if id(p) not in supports:
                supports[id(p)] = supports_of(p.arrays, fp16=eng.fp16, wire_dtype=eng.wire_dtype)
            deliveries[cid], sent[cid] = group[1], supports[id(p)]
            sizes.append(len(group[0]))
            _tap("down", task, cid, group[0], held)
        self.accounting.count_down(task, sizes)
        return deliveries, sent

    def _decode_up(
        self, task: str, replies_raw: Mapping[int, bytes], sent: Mapping[int, dict[str, Support]]
    ) -> list[ClientReply]:
        """Decode the replies against the global model's schema and what each client was
        sent; an undecodable reply drops its client (reason in ``self.failures``)."""
        expect = reply_schema(self.server.model.state_dict(), task)
        values_only = self.cfg.engine.values_only
        replies: list[ClientReply] = []
        for cid in sorted(replies_raw):
            refs = sent[cid] if values_only else None
            if values_only:  # the client replied: it holds what it was sent
                self.references.commit(cid, sent[cid])
            _tap("up", task, cid, replies_raw[cid], refs)
            try:
                payload = decode_payload(replies_raw[cid], expect=expect, references=refs)
            except DecodeError as exc:
                self.failures[cid] = f"undecodable reply: {exc}"
                log.warning("client %d dropped from the %s task: undecodable reply", cid, task)
                continue
            replies.append(ClientReply(cid, payload))
        return replies

    def _run(
        self, task: str, encoded: dict[int, bytes], fail: frozenset[int] = frozenset()
    ) -> dict[int, bytes]:
        jobs = [(c, FAIL_TASK if c in fail else task, b) for c, b in encoded.items()]
        device = self._cohort_device(task, encoded, fail)
        if device is not None:
            results = self._run_cohort(jobs, device)
        elif self.cfg.engine.workers > 1 and len(encoded) > 1:
            results = self._worker_pool().map(_worker_task, jobs)
        else:
            client = self._main_client()
            results = [(c, *_guarded(client, self.fed, c, t, b)) for c, t, b in jobs]
        out: dict[int, bytes] = {}
        for cid, buf, reason in results:
            if buf is None:
                self.failures[cid] = reason or "failed"
                log.warning("client %d dropped from the %s task: %s", cid, task, reason)
            else:
                out[cid] = buf
        return out

    def _main_client(self) -> ClientMethod:
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    def _worker_pool(self) -> Any:
        if self._pool is None:
            ctx = mp.get_context("fork")
            self._pool = ctx.Pool(
                self.cfg.engine.workers,
                initializer=_init_worker,
                initargs=(self.fed, self.client_factory),
            )
        return self._pool

    def _fallback(self, why: str) -> None:
        """Log, once per reason, why a ``fit`` round trains client by client."""
        if why not in self._fallbacks:
            self._fallbacks.add(why)
            level = logging.WARNING if self.cfg.engine.cohort == "on" else logging.INFO
            log.log(
                level, "engine.cohort=%s: per-client training (%s)", self.cfg.engine.cohort, why
            )

    def _cohort_device(
        self, task: str, encoded: dict[int, bytes], fail: frozenset[int]
    ) -> str | None:
        """The device the cohort path trains this task on, or None: the per-client path."""
        if self.cfg.engine.cohort == "off" or task != "fit":
            return None
        live = [b for c, b in encoded.items() if c not in fail]
        if not live:
            return None
        try:
            device = str(resolve_device(self.cfg.engine.device))
        except RuntimeError as exc:
            self._fallback(str(exc))
            return None
        why = cohort_refusal(self._main_client(), live[0])
        if why is not None:
            self._fallback(why)
            return None
        return device

    def _run_cohort(
        self, jobs: list[tuple[int, str, bytes]], device: str
    ) -> list[tuple[int, bytes | None, str | None]]:
        """The cohort path: one batched computation, or one per worker (sub-cohorts)."""
        chunk = self.cfg.engine.cohort_size
        workers = self.cfg.engine.workers
        if workers > 1 and len(jobs) > 1 and device == "cpu":
            parts = [(part, chunk, device) for part in split_cohort(jobs, workers)]
            return [r for rs in self._worker_pool().map(_worker_cohort, parts) for r in rs]
        return run_cohort(
            self._main_client(), self.fed, jobs, _guarded, _reply_bytes, chunk=chunk, device=device
        )

    def _train_round(self, rnd: int) -> Accepted:
        """Sample, train and validate, resampling while too few replies are accepted
        (:meth:`RoundAccounting.until_enough`)."""

        def attempt(n: int) -> Attempt:
            cids, fail = self.accounting.draw(rnd, n)
            self.failures = {}
            with self.timer.phase("train"):
                replies = self.exchange("fit", self.server.configure_fit(rnd, cids), fail)
            return Attempt(cids, replies, dict(self.failures))

        return self.accounting.until_enough(rnd, self.server, attempt(1), attempt, log)

    def close(self) -> None:
        """Stop worker processes, if any."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    # -- the loop -------------------------------------------------------------------
    def run(
        self,
        on_round: RoundCallback | None = None,
        *,
        resume: Resume | None = None,
        checkpoint: CheckpointFn | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> list[RoundRecord]:
        """Run setup and every round; return one metrics record per round.

        Parameters
        ----------
        on_round
            Called with each round's record as soon as it exists.
        resume
            Continue after ``resume.round`` (the server half already restored): setup is
            skipped (or, from a setup checkpoint, finished) and the sampler, counters and
            records are those of the checkpoint.
        checkpoint
            Called after ``on_round`` with the round, the records and the engine state;
            also with round 0 when the setup phase saves its progress.
        on_progress
            Called with the setup phase's progress lines. Setup tasks run
            ``engine.workers`` clients at a time (setup tasks never take the cohort path).
        """
        t_start = time.perf_counter()
        try:
            checkpoint = self.references.saving(checkpoint)
            if resume is not None:
                self.references.load_state_dict(resume.engine.get(REFERENCES_KEY))
            records = self.accounting.start(
                self.server,
                self,
                resume,
                checkpoint=checkpoint,
                on_progress=on_progress,
                parallel=max(1, self.cfg.engine.workers),
            )
            for rnd in range(len(records) + 1, self.cfg.federation.rounds + 1):
                t_round = time.perf_counter()
                self.accounting.begin_round(rnd)
                got = self._train_round(rnd)
                rec = self.accounting.aggregate_and_record(rnd, self.server, got)
                self.accounting.finish_round(
                    rec,
                    records,
                    t_round=t_round,
                    t_start=t_start,
                    on_round=on_round,
                    checkpoint=checkpoint,
                )
        finally:
            self.close()
        return records
