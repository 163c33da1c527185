"""The in-process engine: the fast default for experiments and tests.

Each round it samples clients, encodes what the server half wants to send with the
codec (so byte counts are real buffer lengths), lets each client half decode, train and
encode its reply, decodes the replies and hands them to the server half. Clients run in
the main process, or in ``engine.workers`` forked worker processes (one torch thread
each) that receive and return encoded bytes only.

Client training is seeded per (round, client), so the result does not depend on the
number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedprune.config import RunConfig
from fedprune.core.codec import Payload, decode_payload, encode_payload
from fedprune.core.sampling import sample_clients
from fedprune.data.federation import Federation
from fedprune.engines.common import RoundAccounting, make_sampler
from fedprune.methods.base import ClientMethod, ClientReply, ServerMethod

RoundCallback = Callable[[dict[str, Any]], None]

# Worker-process globals (set by the fork initializer; never pickled).
_W_FED: Federation | None = None
_W_CLIENT: ClientMethod | None = None


def _init_worker(fed: Federation, factory: Callable[[], ClientMethod]) -> None:
    global _W_FED, _W_CLIENT
    torch.set_num_threads(1)
    _W_FED = fed
    _W_CLIENT = factory()


def _run_client(client: ClientMethod, fed: Federation, cid: int, task: str, buf: bytes) -> bytes:
    payload = decode_payload(buf)
    reply = client.handle(task, payload, fed.clients[cid])
    return encode_payload(reply)


def _worker_task(args: tuple[int, str, bytes]) -> tuple[int, bytes, float]:
    cid, task, buf = args
    assert _W_FED is not None and _W_CLIENT is not None
    t0 = time.perf_counter()
    out = _run_client(_W_CLIENT, _W_FED, cid, task, buf)
    return cid, out, time.perf_counter() - t0


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
        self.traffic = self.accounting.traffic
        self.timer = self.accounting.timer
        self.stats = self.accounting.stats
        self.dense_message_bytes = self.accounting.dense_message_bytes
        self._client: ClientMethod | None = None
        self._pool: Any = None
        self._sampler = make_sampler(cfg)

    # -- transport ------------------------------------------------------------------
    def exchange(self, task: str, payloads: Mapping[int, Payload]) -> list[ClientReply]:
        """Encode, deliver, run and decode one message per client; count the bytes."""
        fp16 = self.cfg.engine.fp16
        encoded: dict[int, bytes] = {}
        cache: dict[int, bytes] = {}
        for cid, p in payloads.items():
            buf = cache.get(id(p))
            if buf is None:  # the same broadcast payload is encoded once
                buf = encode_payload(p, fp16=fp16)
                cache[id(p)] = buf
            encoded[cid] = buf
        self.accounting.count_down(task, (len(b) for b in encoded.values()))
        replies_raw = self._run(task, encoded)
        self.accounting.count_up(task, (len(b) for b in replies_raw.values()))
        return [ClientReply(cid, decode_payload(replies_raw[cid])) for cid in sorted(replies_raw)]

    def _run(self, task: str, encoded: dict[int, bytes]) -> dict[int, bytes]:
        if self.cfg.engine.workers > 1 and len(encoded) > 1:
            if self._pool is None:
                ctx = mp.get_context("fork")
                self._pool = ctx.Pool(
                    self.cfg.engine.workers,
                    initializer=_init_worker,
                    initargs=(self.fed, self.client_factory),
                )
            results = self._pool.map(_worker_task, [(c, task, b) for c, b in encoded.items()])
            return {cid: out for cid, out, _ in results}
        if self._client is None:
            self._client = self.client_factory()
        return {
            cid: _run_client(self._client, self.fed, cid, task, buf) for cid, buf in encoded.items()
        }

    def close(self) -> None:
        """Stop worker processes, if any."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    # -- the loop -------------------------------------------------------------------
    def run(self, on_round: RoundCallback | None = None) -> list[dict[str, Any]]:
        """Run setup and every round; return one metrics record per round."""
        cfg = self.cfg
        records: list[dict[str, Any]] = []
        t_start = time.perf_counter()
        try:
            with self.timer.phase("setup"):
                self.server.setup(self)
            self.accounting.end_setup()  # setup traffic is charged to round 1
            k = cfg.clients_per_round()
            for rnd in range(1, cfg.federation.rounds + 1):
                t_round = time.perf_counter()
                self.accounting.begin_round(rnd)
                cids = sample_clients(self._sampler, self.num_clients, k)
                with self.timer.phase("train"):
                    replies = self.exchange("fit", self.server.configure_fit(rnd, cids))
                with self.timer.phase("aggregate"):
                    extra = self.server.aggregate_fit(rnd, replies)
                rec = self.accounting.record(rnd, cids, replies, extra, self.server.model)
                rec["round_s"] = time.perf_counter() - t_round
                rec["wall_s"] = time.perf_counter() - t_start
                records.append(rec)
                if on_round is not None:
                    on_round(rec)
        finally:
            self.close()
        return records
