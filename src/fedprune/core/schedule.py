"""Sparsification schedules: the target sparsity of each federation round.

``polynomial`` (FedSparsify, after Zhu & Gupta 2017)::

    s_t = s_F + (s_0 - s_F) * (1 - (t~ - t0) / (T - t0)) ** e,   t~ = floor(t / f) * f

held between pruning rounds (every ``f`` rounds), clamped so that ``t~ < t0`` gives
``s_0``, and equal to ``s_F`` from round ``T`` on. ``e = 3`` is the paper's cubic
default; larger ``e`` prunes more aggressively early.

``nnz_rate`` (FedSparsify v1): every ``f`` rounds from ``t0`` remove a fraction ``r`` of
the remaining non-zeros, so after ``j`` pruning events the density is ``(1 - r) ** j``;
capped at ``s_F`` (the paper's variant had no cap; ``s_F`` close to 1 recovers it).

Both are non-decreasing in ``t``, so a method that prunes to ``s_t`` never regrows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedprune.config import RunConfig


@dataclass(frozen=True)
class Schedule:
    """A sparsity schedule over ``total`` rounds."""

    final: float
    total: int
    initial: float = 0.0
    start: int = 1
    frequency: int = 1
    exponent: float = 3.0
    kind: str = "polynomial"
    rate: float = 0.02

    def __post_init__(self) -> None:
        if not 0 <= self.initial <= self.final < 1:
            raise ValueError("need 0 <= initial <= final < 1")
        if self.total < 1 or self.start < 1 or self.frequency < 1:
            raise ValueError("total, start and frequency must be >= 1")
        if self.kind not in ("polynomial", "nnz_rate"):
            raise ValueError(f"unknown schedule {self.kind!r}")

    def sparsity(self, t: int) -> float:
        """Target sparsity after round ``t`` (0 before the schedule starts)."""
        if t < self.start:
            return 0.0
        if self.kind == "nnz_rate":
            events = (t - self.start) // self.frequency + 1
            return min(self.final, 1.0 - (1.0 - self.rate) ** events)
        if t >= self.total:
            return self.final
        t_tilde = (t // self.frequency) * self.frequency
        span = self.total - self.start
        frac = 0.0 if span <= 0 else min(1.0, max(0.0, (t_tilde - self.start) / span))
        return self.final + (self.initial - self.final) * (1.0 - frac) ** self.exponent

    def prunes_at(self, t: int) -> bool:
        """Whether round ``t`` is a pruning round (schedule started, target above 0)."""
        if t < self.start or self.sparsity(t) <= 0:
            return False
        if self.kind == "nnz_rate":
            return (t - self.start) % self.frequency == 0
        return t >= self.total or t % self.frequency == 0 or self.frequency == 1

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
    return Schedule(
        final=p.final_sparsity,
        total=cfg.federation.rounds,
        initial=p.initial_sparsity,
        start=p.start_round,
        frequency=p.frequency,
        exponent=p.exponent,
        kind=p.schedule,
        rate=p.nnz_rate,
    )
