"""One accounting for every method: parameters, FLOPs, bytes and time.

Nothing here is estimated by formula where a measurement exists: bytes are the lengths
of the codec's real buffers (the engine feeds them in), FLOPs come from
:mod:`fedprune.core.flops` (``torch.utils.flop_counter``), parameter counts from the
tensors themselves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from fedprune.core.flops import FlopReport, count_flops, effective_flops
from fedprune.core.masks import layer_densities, weight_sparsity


@dataclass(frozen=True)
class ModelStats:
    """Size and cost of a model as it stands."""

    params: int
    """Trainable parameters of the (possibly shrunk) dense architecture."""
    nonzero_params: int
    flops: int
    """Dense FLOPs: 2 x MACs of conv and linear layers, forward, one sample."""
    effective_flops: float
    """FLOPs with each layer weighted by the density of its weight."""
    sparsity: float
    """Fraction of exact zeros over the conv/linear weights."""


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_nonzero_params(model: nn.Module) -> int:
    """Number of non-zero trainable parameters."""
    return sum(int((p != 0).sum()) for p in model.parameters() if p.requires_grad)


def state_numel(model: nn.Module) -> int:
    """Number of values in the state dict (what a dense payload carries)."""
    return sum(t.numel() for t in model.state_dict().values())


class ModelStatsCounter:
    """Computes :class:`ModelStats`, caching FLOP reports per architecture (shapes)."""

    def __init__(self, input_shape: tuple[int, int, int]) -> None:
        self.input_shape = input_shape
        self._cache: dict[tuple[tuple[str, tuple[int, ...]], ...], FlopReport] = {}

    def flop_report(self, model: nn.Module) -> FlopReport:
        """The FLOP report of ``model``'s architecture (cached by parameter shapes)."""
        key = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
        rep = self._cache.get(key)
        if rep is None:
            rep = count_flops(model, self.input_shape)
            self._cache[key] = rep
        return rep

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> ModelStats:
        rep = self.flop_report(model)
        return ModelStats(
            params=count_params(model),
            nonzero_params=count_nonzero_params(model),
            flops=rep.total,
            effective_flops=effective_flops(rep, layer_densities(model)),
            sparsity=weight_sparsity(model),
        )


@dataclass
class Traffic:
    """Bytes on the wire, per direction, for the current round and cumulated."""

    up: int = 0
    down: int = 0
    dense_up: int = 0
    dense_down: int = 0
    cum_up: int = 0
    cum_down: int = 0
    cum_dense_up: int = 0
    cum_dense_down: int = 0

    def start_round(self) -> None:
        """Reset the per-round counters."""
        self.up = self.down = self.dense_up = self.dense_down = 0

    def add(self, *, up: int = 0, down: int = 0, dense_up: int = 0, dense_down: int = 0) -> None:
        """Count encoded bytes (and their dense-fp32 equivalents)."""
        self.up += up
        self.down += down
        self.dense_up += dense_up
        self.dense_down += dense_down
        self.cum_up += up
        self.cum_down += down
        self.cum_dense_up += dense_up
        self.cum_dense_down += dense_down


@dataclass
class Timer:
    """Wall time split into named phases (train / aggregate / evaluate / setup)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the time spent inside the block to ``seconds[name]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
