"""``random``: FedSparsify's schedule with a fixed random pruning order (a FedSparsify baseline).

FedSparsify-Global's schedule (:func:`~fedprune.core.schedule.schedule_from_config`), but
the positions pruned at sparsity ``s_t`` are the first ``floor(s_t * N)`` entries of one
permutation of the ``N`` prunable entries, drawn once from ``seed``
(:class:`~fedprune.core.criteria.RandomOrder`). Prefixes of one permutation are nested,
so the masks are monotone and hit the count exactly. With ``pruning.per_layer`` each
tensor prunes ``floor(s_t * n_i)`` of its own entries, in the order the same permutation
visits them. Shared baseline machinery: :mod:`fedprune.methods.masked`.
"""

from __future__ import annotations

from torch import nn

from fedprune.config import RunConfig
from fedprune.core.criteria import RandomOrder
from fedprune.core.sampling import derive_seed
from fedprune.core.schedule import schedule_from_config
from fedprune.core.select import select_lowest
from fedprune.methods.base import ClientReply, ModelSpec
from fedprune.methods.masked import BaselineClient, BaselineServer

_RANDOM_STREAM = 0x7A9D
"""Seed stream of the random baseline's permutation."""

__all__ = ["BaselineClient", "RandomServer"]


class RandomServer(BaselineServer):
    """FedSparsify-Global's schedule with a fixed random pruning order."""

    name = "random"

    def __init__(self, cfg: RunConfig, spec: ModelSpec, model: nn.Module) -> None:
        super().__init__(cfg, spec, model)
        self.schedule = schedule_from_config(cfg)
        self.ranks = RandomOrder(derive_seed(cfg.seed, _RANDOM_STREAM))(self.prunable())
        """Name -> position of each entry in the pruning order (lowest pruned first)."""

    def after_aggregate(self, rnd: int, replies: list[ClientReply]) -> dict[str, float]:
        """Prune the first ``floor(s_t * N)`` entries of the permutation."""
        target = self.schedule.sparsity(rnd)
        if self.schedule.prunes_at(rnd):
            self.install_masks(
                select_lowest(self.ranks, target, per_layer=self.cfg.pruning.per_layer)
            )
        return {"target_sparsity": target}
