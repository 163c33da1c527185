"""What every engine shares: the client sampler and the per-round accounting.

Principle 1 of the design ("one engine, one accounting") holds across engines because
the in-process engine and the Flower engine both draw clients, count, time, record and
checkpoint each round through one :class:`RoundAccounting` (sampling with
:func:`make_sampler`'s generator). An engine only tells it how many encoded bytes
crossed in each direction and which replies arrived.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, runtime_checkable

import numpy as np
from torch import nn

from fedprune.config import RunConfig
from fedprune.core.accounting import ModelStatsCounter, Timer, Traffic, state_numel
from fedprune.core.sampling import derive_seed, sample_clients
from fedprune.core.training import evaluate
from fedprune.data.federation import Federation
from fedprune.errors import RoundFailedError, elide
from fedprune.methods.base import ClientReply, SetupIO

if TYPE_CHECKING:
    from fedprune.methods.base import FederatedIO, ServerMethod

__all__ = [
    "FAIL_TASK",
    "SETUP_KEY",
    "Attempt",
    "CheckpointFn",
    "InjectedFailure",
    "ProgressCallback",
    "Resume",
    "RoundAccounting",
    "injected_failure",
    "injected_failures",
    "make_sampler",
]

FAIL_TASK = "fit:injected-failure"
"""The task a client receives instead of ``fit`` when failure injection picks it."""


SETUP_CHECKPOINT_BIG_BYTES = 256 * 2**20
"""Setup checkpoints at least this large may be skipped (smaller ones never are)."""
SETUP_CHECKPOINT_RATIO = 9.0
"""After a large setup checkpoint, the next one waits until this many times its writing
time has passed (at most about 10% of the setup spent writing checkpoints)."""


def _skip_setup_checkpoint(since_last: float, last_cost: float, last_bytes: int | None) -> bool:
    """Whether to skip a setup checkpoint ``since_last`` seconds after the previous one
    finished, which took ``last_cost`` seconds to write and was ``last_bytes`` large.

    Setup checkpoints are written after every step of a long setup (an AutoFLIP
    explorer or group): with a large model they grow with every step (each explorer's
    guidance is a copy of the model), and writing them after each one cost about a
    third of the exploration on FEMNIST's 13M-parameter CNN. Checkpoints under
    ``SETUP_CHECKPOINT_BIG_BYTES`` are never skipped, so small runs (and tests) write
    one after every step whatever the disk's speed; after a large one, steps are
    checkpointed again once ``SETUP_CHECKPOINT_RATIO`` times its writing time has
    passed, so a crash repeats at most about that much work. Skipping changes only
    where a resumed run restarts, never its result."""
    if last_bytes is None or last_bytes < SETUP_CHECKPOINT_BIG_BYTES:
        return False
    return since_last < SETUP_CHECKPOINT_RATIO * last_cost


class InjectedFailure(RuntimeError):
    """A client failure injected by ``engine.fail_rate``."""


@dataclass
class Attempt:
    """One try at a round's training: the clients sampled, what came back, who failed."""

    cids: list[int]
    replies: list[ClientReply]
    failures: dict[int, str]
    """Client id -> why it gave no usable reply (failed, dropped, undecodable)."""


@dataclass
class Accepted:
    """The attempt that got enough accepted replies, and what the round met on the way."""

    cids: list[int]
    """The clients sampled in the accepted attempt."""
    replies: list[ClientReply]
    """The accepted replies (sound and passing the server's validation)."""
    failures: dict[int, str]
    """Every client of every attempt that gave no usable reply."""
    rejections: dict[int, str]
    """Every reply of every attempt that validation rejected, with the reason."""
    attempts: int


def round_failed_message(
    rnd: int,
    min_clients: int,
    attempts: int,
    failures: Mapping[int, str],
    rejections: Mapping[int, str],
) -> str:
    """One short line saying why a round could not get enough accepted replies."""
    parts = []
    if failures:
        parts.append(f"{len(failures)} failed")
    if rejections:
        reasons = list(rejections.values())
        common = max(set(reasons), key=reasons.count)
        parts.append(f"{len(rejections)} rejected: {elide(common, 40)}")
    why = f" ({'; '.join(parts)})" if parts else ""
    tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
    return (
        f"round {rnd}: fewer than federation.min_clients={min_clients} accepted replies in "
        f"{tries}{why}; the {rnd - 1} finished rounds are saved"
    )


def injected_failure(fail_rate: float, attempt_seed: int, cid: int) -> bool:
    """Whether client ``cid`` fails in the attempt with seed ``attempt_seed`` (seeded draw)."""
    if fail_rate <= 0:
        return False
    u = np.random.default_rng(derive_seed(attempt_seed, cid)).random()
    return bool(u < fail_rate)


def injected_failures(cfg: RunConfig, rnd: int, attempt: int, cids: list[int]) -> frozenset[int]:
    """The clients of ``cids`` that fail on purpose in this round's ``attempt`` (from 1);
    the same in every engine."""
    seed = derive_seed(cfg.seed, rnd, attempt, 0xFA11)
    return frozenset(c for c in cids if injected_failure(cfg.engine.fail_rate, seed, c))


class RoundRecord(TypedDict, total=False):
    """One round's record: a line of ``metrics.jsonl`` and what ``on_round`` receives.

    Everything is measured by the engine (the accounting) except ``method_metrics``, the
    method's own namespace: what its server half returned from ``after_aggregate`` and
    reported through :meth:`~fedprune.methods.base.ServerMethod.report` during the round
    (and, in round 1, during setup). A method metric can therefore never overwrite an
    accounting key.
    """

    round: int
    clients: int
    """Replies accepted and aggregated."""
    sampled: list[int]
    test_loss: float | None
    test_accuracy: float | None
    local_test_accuracy: float | None
    average_test_loss: float | None
    """Of the moving average of the global models (``federation.average_decay``)."""
    average_test_accuracy: float | None
    train_loss: float | None
    sparsity: float
    params: int
    nonzero_params: int
    flops: int
    effective_flops: float
    bytes_up: int
    bytes_down: int
    cum_bytes_up: int
    cum_bytes_down: int
    dense_bytes_up: int
    dense_bytes_down: int
    cum_dense_bytes_up: int
    cum_dense_bytes_down: int
    time_setup_s: float
    time_train_s: float
    time_aggregate_s: float
    time_evaluate_s: float
    time_checkpoint_s: float
    rejected: int
    """Replies that failed validation (``rejections``: ``{cid: reason}``)."""
    rejections: dict[int, str]
    failed: int
    """Clients dropped (``failures``: ``{cid: reason}``) over ``attempts`` attempts."""
    failures: dict[int, str]
    attempts: int
    method_metrics: dict[str, Any]
    round_s: float
    wall_s: float


ACCOUNTING_KEYS = frozenset(RoundRecord.__annotations__) - {"method_metrics"}
"""Keys the engine owns; ``rejected`` and ``rejections`` come from the server half's
validation, everything else in what ``aggregate_fit`` returns is a method metric."""

CheckpointFn = Callable[[int, list[RoundRecord], dict[str, Any]], "int | None"]
"""Called after each round with ``(round, records so far, engine state)``, and with round
0 for a setup checkpoint; returns the checkpoint's size in bytes if known."""

RoundCallback = Callable[[RoundRecord], None]
"""Called with each round's record as soon as it exists."""

ProgressCallback = Callable[[str], None]
"""Called with a progress line of a long phase (a method's setup, e.g. AutoFLIP's
exploration): :meth:`~fedprune.methods.base.SetupIO.progress`."""


@runtime_checkable
class Engine(Protocol):
    """What every engine offers ``fedprune.experiment``: run setup and every round of a
    prepared run and return one :class:`RoundRecord` per round."""

    def run(
        self,
        on_round: RoundCallback | None = None,
        *,
        resume: Resume | None = None,
        checkpoint: CheckpointFn | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> list[RoundRecord]:
        """Run (or, with ``resume``, continue) the federation; ``on_round`` gets each
        record as soon as it exists, ``checkpoint`` is called after it (and, with round
        0, whenever the setup phase saves its progress); ``on_progress`` gets the setup
        phase's progress lines."""
        ...


SETUP_KEY = "in_setup"
"""Engine-state key that marks a setup checkpoint (see :class:`Resume`)."""


@dataclass
class Resume:
    """Where a resumed run continues: after ``round``, with its records and engine state.

    A checkpoint written during the setup phase has round 0, no records and
    ``engine["in_setup"]`` true (:attr:`in_setup`): the setup continues, then round 1.
    """

    round: int
    records: list[RoundRecord]
    engine: dict[str, Any]

    @property
    def in_setup(self) -> bool:
        """Whether the checkpoint was written during the setup phase."""
        return self.round == 0 and bool(self.engine.get(SETUP_KEY))


def make_sampler(cfg: RunConfig) -> np.random.Generator:
    """The run's client-sampling generator (seeded once, advanced every round).

    Every engine draws its round's clients from this generator with
    :func:`fedprune.core.sampling.sample_clients`, so two engines given the same config
    sample the same clients in the same rounds.
    """
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, 1]))


class RoundAccounting:
    """Bytes, time and model statistics of a run, and the per-round records.

    Parameters
    ----------
    cfg
        The run configuration.
    fed
        The federation (global test set, local test sets, input shape).
    model
        The initial global model; its state size fixes what one dense fp32 message
        would cost (``dense_*`` counters).

    Attributes
    ----------
    traffic : Traffic
        Encoded bytes per direction, per round and cumulated.
    timer : Timer
        Wall time per phase (``setup``, ``train``, ``aggregate``, ``evaluate``).
    stats : ModelStatsCounter
        Parameter and FLOP counter of the global model.
    dense_message_bytes : int
        Size of one dense fp32 model message (4 bytes per state value).
    sampler : numpy.random.Generator
        The run's client-sampling generator (:func:`make_sampler`).
    wall_offset : float
        Wall seconds of the rounds finished before this process (a resumed run).
    """

    def __init__(self, cfg: RunConfig, fed: Federation, model: nn.Module) -> None:
        self.cfg = cfg
        self.fed = fed
        self.traffic = Traffic()
        self.timer = Timer()
        self.stats = ModelStatsCounter(fed.input_shape)
        self.dense_message_bytes = 4 * state_numel(model)
        self.sampler = make_sampler(cfg)
        self.wall_offset = 0.0
        self._setup_up = 0
        self._setup_down = 0

    # -- the run --------------------------------------------------------------------
    def start(
        self,
        server: ServerMethod,
        io: FederatedIO,
        resume: Resume | None,
        *,
        checkpoint: CheckpointFn | None = None,
        on_progress: ProgressCallback | None = None,
        parallel: int = 0,
    ) -> list[RoundRecord]:
        """Before the first round: restore a resumed run's counters and sampler, or run
        the server half's setup phase (its traffic is charged to round 1). Returns the
        records of the rounds already finished.

        The setup phase gets a :class:`~fedprune.methods.base.SetupIO` around ``io``:
        ``parallel`` clients at once (0: all), progress lines to ``on_progress``, and
        setup checkpoints through ``checkpoint`` with round 0 and this accounting's
        state marked ``in_setup`` (the time spent so far included). A ``resume`` from
        such a checkpoint (:attr:`Resume.in_setup`; the server half already restored)
        restores the counters and calls ``setup`` again to finish it.
        """
        if resume is not None:
            self.load_state_dict(resume.engine)
            last = resume.records[-1] if resume.records else {}
            self.wall_offset = float(last.get("wall_s") or resume.engine.get("wall_s") or 0.0)
            if not resume.in_setup:
                return list(resume.records)
        t_setup = time.perf_counter()
        written: dict[str, Any] = {"end": -math.inf, "cost": 0.0, "bytes": None, "skipped": 0}

        def save_setup(force: bool = False) -> None:
            if checkpoint is None:
                return
            now = time.perf_counter()
            since = now - written["end"]
            if not force and _skip_setup_checkpoint(since, written["cost"], written["bytes"]):
                written["skipped"] += 1
                return
            elapsed = now - t_setup
            state = self.state_dict()
            timer = dict(state["timer"])
            timer["setup"] = timer.get("setup", 0.0) + elapsed  # the phase is still open
            state.update({"timer": timer, SETUP_KEY: True, "wall_s": self.wall_offset + elapsed})
            size = checkpoint(0, [], state)
            end = time.perf_counter()
            written.update(end=end, cost=end - now, bytes=size, skipped=0)

        setup_io = SetupIO(
            io,
            parallel=parallel,
            on_progress=on_progress,
            on_checkpoint=save_setup if checkpoint is not None else None,
            resumed=resume is not None,
        )
        with self.timer.phase("setup"):
            server.setup(setup_io)
            if written["skipped"]:  # the finished setup is on disk before round 1 starts
                save_setup(force=True)
        self.end_setup()
        return []

    def until_enough(
        self,
        rnd: int,
        server: ServerMethod,
        first: Attempt,
        retry: Callable[[int], Attempt] | None,
        log: logging.Logger,
    ) -> Accepted:
        """Validate a round's replies; while fewer than ``federation.min_clients`` are
        accepted, try again with a fresh sample (``retry(attempt)``, attempts numbered
        from 2), at most ``federation.max_retries`` times. Every engine goes through this
        loop, so a round means the same everywhere.

        Raises
        ------
        RoundFailedError
            Still too few accepted replies after the last attempt (or at once when
            ``retry`` is None: the engine cannot resample).
        """
        fed = self.cfg.federation
        failures: dict[int, str] = {}
        rejections: dict[int, str] = {}
        attempt, current = 1, first
        while True:
            failures.update(current.failures)
            with self.timer.phase("aggregate"):
                sound, rejected = server.validate(current.replies)
            rejections.update(rejected)
            if len(sound) >= fed.min_clients:
                return Accepted(current.cids, sound, failures, rejections, attempt)
            if attempt > fed.max_retries or retry is None:
                raise RoundFailedError(
                    round_failed_message(rnd, fed.min_clients, attempt, failures, rejections)
                )
            log.warning(
                "round %d: %d of %d clients answered, %d accepted "
                "(federation.min_clients=%d); attempt %d, sampling again",
                rnd,
                len(current.replies),
                len(current.cids),
                len(sound),
                fed.min_clients,
                attempt,
            )
            attempt += 1
            current = retry(attempt)

    def draw(self, rnd: int, attempt: int) -> tuple[list[int], frozenset[int]]:
        """The clients of this round's ``attempt`` (from 1), and those of them that
        failure injection makes fail; the same in every engine."""
        cids = sample_clients(self.sampler, len(self.fed.clients), self.cfg.clients_per_round())
        return cids, injected_failures(self.cfg, rnd, attempt, cids)

    def finish_round(
        self,
        rec: RoundRecord,
        records: list[RoundRecord],
        *,
        t_round: float,
        t_start: float,
        on_round: RoundCallback | None,
        checkpoint: CheckpointFn | None,
    ) -> None:
        """Time the round's record, append it, hand it to ``on_round``, then checkpoint
        (the write is timed as the ``checkpoint`` phase)."""
        now = time.perf_counter()
        rec["round_s"] = now - t_round
        rec["wall_s"] = self.wall_offset + now - t_start
        records.append(rec)
        if on_round is not None:
            on_round(rec)
        if checkpoint is not None:
            state = self.state_dict()
            with self.timer.phase("checkpoint"):
                checkpoint(rec["round"], records, state)

    # -- bytes ------------------------------------------------------------------------
    def count_down(self, task: str, lengths: Iterable[int], *, dense: bool = True) -> None:
        """Count server-to-client buffers (one length per delivered message).

        ``dense=False``: messages a dense run would not send either (a message sent
        again), not added to the dense reference traffic.
        """
        sizes = list(lengths)
        per = self.dense_message_bytes if task == "fit" and dense else 0
        self.traffic.add(down=sum(sizes), dense_down=per * len(sizes))

    def count_up(self, task: str, lengths: Iterable[int]) -> None:
        """Count client-to-server buffers (one length per reply)."""
        sizes = list(lengths)
        dense = self.dense_message_bytes if task == "fit" else 0
        self.traffic.add(up=sum(sizes), dense_up=dense * len(sizes))

    def end_setup(self) -> None:
        """Remember the setup phase's traffic; it is charged to round 1."""
        self._setup_up, self._setup_down = self.traffic.up, self.traffic.down

    def begin_round(self, rnd: int) -> None:
        """Reset the per-round counters (round 1 starts with the setup traffic)."""
        self.traffic.start_round()
        if rnd == 1:
            self.traffic.up, self.traffic.down = self._setup_up, self._setup_down

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The engine state a checkpoint keeps: counters, phase times, the sampler's RNG."""
        return {
            "traffic": asdict(self.traffic),
            "timer": dict(self.timer.seconds),
            "setup": [self._setup_up, self._setup_down],
            "dense_message_bytes": self.dense_message_bytes,
            "sampler": self.sampler.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (in place: engines hold references)."""
        for key, value in state["traffic"].items():
            setattr(self.traffic, key, int(value))
        self.timer.seconds.clear()
        self.timer.seconds.update(state["timer"])
        self._setup_up, self._setup_down = (int(v) for v in state["setup"])
        # of the initial model: the server's may have shrunk since
        self.dense_message_bytes = int(state["dense_message_bytes"])
        self.sampler.bit_generator.state = state["sampler"]

    # -- records ----------------------------------------------------------------------
    def aggregate_and_record(self, rnd: int, server: ServerMethod, got: Accepted) -> RoundRecord:
        """Aggregate a round's accepted replies into ``server`` (timed as the
        ``aggregate`` phase) and return the round's record (:meth:`record`; the server's
        moving average of the global models is evaluated too when it keeps one)."""
        with self.timer.phase("aggregate"):
            extra = server.aggregate_fit(rnd, got.replies, got.rejections)
        return self.record(
            rnd,
            got.cids,
            got.replies,
            extra,
            server.model,
            got.failures,
            got.attempts,
            average=server.average_model,
        )

    def record(
        self,
        rnd: int,
        cids: list[int],
        replies: list[ClientReply],
        extra: dict[str, Any],
        model: nn.Module,
        failures: Mapping[int, str] | None = None,
        attempts: int = 1,
        average: Callable[[], nn.Module | None] | None = None,
    ) -> RoundRecord:
        """The round's metrics record (evaluation included; ``round_s``/``wall_s`` not).

        Parameters
        ----------
        rnd
            Round number, from 1.
        cids
            The clients sampled this round.
        replies
            The decoded replies that reached the server half.
        extra
            What ``ServerMethod.aggregate_fit`` returned.
        model
            The global model after aggregation.
        failures, attempts
            Clients dropped this round (``{cid: reason}``) and the attempts it took;
            recorded as ``failed``, ``failures`` and ``attempts`` when there were any
            failures or retries.
        average
            Gives the moving average of the global models as a model (None: none), which
            is evaluated beside ``model`` (``average_test_loss``/``_accuracy``).
        """
        cfg = self.cfg
        rec: RoundRecord = {"round": rnd, "clients": len(replies), "sampled": cids}
        do_eval = rnd % cfg.federation.eval_every == 0 or rnd == cfg.federation.rounds
        with self.timer.phase("evaluate"):
            if do_eval:
                loss, acc = evaluate(model, self.fed.x_test, self.fed.y_test)
                rec["test_loss"], rec["test_accuracy"] = loss, acc
                if cfg.federation.local_eval:
                    rec["local_test_accuracy"] = self.local_accuracy(model)
                avg = average() if average is not None else None
                if avg is not None:
                    loss, acc = evaluate(avg, self.fed.x_test, self.fed.y_test)
                    rec["average_test_loss"], rec["average_test_accuracy"] = loss, acc
            else:
                rec["test_loss"] = rec["test_accuracy"] = None
            stats = self.stats(model)
        n = sum(r.num_examples for r in replies)
        rec["train_loss"] = (
            sum(r.payload.metrics.get("train_loss", 0.0) * r.num_examples for r in replies) / n
            if n
            else None
        )
        t = self.traffic
        rec["sparsity"] = stats.sparsity
        rec["params"] = stats.params
        rec["nonzero_params"] = stats.nonzero_params
        rec["flops"] = stats.flops
        rec["effective_flops"] = stats.effective_flops
        rec["bytes_up"], rec["bytes_down"] = t.up, t.down
        rec["cum_bytes_up"], rec["cum_bytes_down"] = t.cum_up, t.cum_down
        rec["dense_bytes_up"], rec["dense_bytes_down"] = t.dense_up, t.dense_down
        rec["cum_dense_bytes_up"] = t.cum_dense_up
        rec["cum_dense_bytes_down"] = t.cum_dense_down
        times: dict[str, Any] = {f"time_{k}_s": v for k, v in self.timer.seconds.items()}
        rec.update(times)  # type: ignore[typeddict-item]
        method = dict(extra)
        if "rejected" in method:
            rec["rejected"] = int(method.pop("rejected"))
        if "rejections" in method:
            rec["rejections"] = method.pop("rejections")
        rec["method_metrics"] = method
        if failures or attempts > 1:
            rec["failed"] = len(failures or {})
            rec["failures"] = dict(failures or {})
            rec["attempts"] = attempts
        return rec

    def local_accuracy(self, model: nn.Module) -> float | None:
        """Sample-weighted accuracy over the clients' local test splits (None if none)."""
        correct = 0.0
        total = 0
        for c in self.fed.clients:
            if c.x_test is None or c.y_test is None or len(c.y_test) == 0:
                continue
            _, acc = evaluate(model, c.x_test, c.y_test)
            correct += acc * len(c.y_test)
            total += len(c.y_test)
        return correct / total if total else None
