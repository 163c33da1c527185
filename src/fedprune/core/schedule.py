"""Sparsification schedules: the target sparsity of each federation round.

``polynomial`` (FedSparsify, after Zhu & Gupta 2017)::

    s_t = s_F + (s_0 - s_F) * (1 - (t~ - t0) / (T - t0)) ** e,   t~ = floor(t / f) * f

held between pruning rounds (every ``f`` rounds), clamped so that ``t~ < t0`` gives
``s_0``, and equal to ``s_F`` from round ``T`` on. ``T`` is the last round of the run
unless ``end_round`` sets it earlier (Zhu & Gupta's ``t0 + n*dt``), which leaves the
rounds after it to train the final mask. ``e = 3`` is the paper's cubic
default; larger ``e`` prunes more aggressively early.

``nnz_rate`` (FedSparsify v1): every ``f`` rounds from ``t0`` remove a fraction ``r`` of
the remaining non-zeros, so after ``j`` pruning events the density is ``(1 - r) ** j``;
capped at ``s_F`` (the paper's variant had no cap; ``s_F`` close to 1 recovers it).

Both are non-decreasing in ``t``, so a method that prunes to ``s_t`` never regrows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedprune.config import RunConfig


@dataclass(frozen=True)
class Schedule:
    """A sparsity schedule over ``total`` rounds.

    The fields are named as the ``[pruning]`` keys they come from (``final_sparsity``,
    ``start_round``...), so :func:`schedule_from_config` copies them by name and a test
    keeps the two from drifting apart; ``total`` is ``federation.rounds``.
    """

    final_sparsity: float
    total: int
    initial_sparsity: float = 0.0
    start_round: int = 1
    frequency: int = 1
    exponent: float = 3.0
    schedule: str = "polynomial"
    nnz_rate: float = 0.02
    end_round: int = 0
    """Round from which the polynomial schedule holds ``s_F`` (0: ``total``)."""

    def __post_init__(self) -> None:
        if not 0 <= self.initial_sparsity <= self.final_sparsity < 1:
            raise ValueError("need 0 <= initial <= final < 1")
        if self.total < 1 or self.start_round < 1 or self.frequency < 1:
            raise ValueError("total, start and frequency must be >= 1")
        if self.end_round and not self.start_round <= self.end_round <= self.total:
            raise ValueError("need start_round <= end_round <= total (or end_round 0)")
        if self.schedule not in ("polynomial", "nnz_rate"):
            raise ValueError(f"unknown schedule {self.schedule!r}")

    @property
    def end(self) -> int:
        """T: the round from which the polynomial schedule holds ``s_F``."""
        return self.end_round or self.total

    def sparsity(self, t: int) -> float:
        """Target sparsity after round ``t`` (0 before the schedule starts)."""
        if t < self.start_round:
            return 0.0
        if self.schedule == "nnz_rate":
            events = (t - self.start_round) // self.frequency + 1
            return min(self.final_sparsity, 1.0 - (1.0 - self.nnz_rate) ** events)
        if t >= self.end:
            return self.final_sparsity
        t_tilde = (t // self.frequency) * self.frequency
        span = self.end - self.start_round
        frac = 0.0 if span <= 0 else min(1.0, max(0.0, (t_tilde - self.start_round) / span))
        return (
            self.final_sparsity
            + (self.initial_sparsity - self.final_sparsity) * (1.0 - frac) ** self.exponent
        )

    def prunes_at(self, t: int) -> bool:
        """Whether round ``t`` is a pruning round (schedule started, target above 0)."""
        if t < self.start_round or self.sparsity(t) <= 0:
            return False
        if self.schedule == "nnz_rate":
            return (t - self.start_round) % self.frequency == 0
        return t >= self.end or t % self.frequency == 0 or self.frequency == 1

    def values(self) -> list[float]:
        """``sparsity(t)`` for t = 1..total."""
        return [self.sparsity(t) for t in range(1, self.total + 1)]


def rounds_to_reach(values: list[float], target: float) -> int | None:
    """First 1-based round whose value reaches ``target`` (None if never)."""
    for i, v in enumerate(values, 1):
        if v >= target - 1e-12:
            return i
    return None


def _isclose(a: float, b: float) -> bool:  # pragma: no cover - helper for doctests
    return math.isclose(a, b, abs_tol=1e-12)


def schedule_from_config(cfg: RunConfig) -> Schedule:
    """The sparsity schedule described by the ``pruning`` section (and the round count)."""
    p = cfg.pruning
    names = [f.name for f in fields(Schedule) if f.name != "total"]
    return Schedule(total=cfg.federation.rounds, **{n: getattr(p, n) for n in names})
