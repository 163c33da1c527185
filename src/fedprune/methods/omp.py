"""OMP: one-shot magnitude pruning + fine-tuning (a FedSparsify baseline, methods.md §3.3).

Dense FedAvg (``mask = "none"``) until the end of round ``pruning.prune_round`` (0 means
``max(1, round(0.9 * rounds))``, the authors' round 90 of 100), then one magnitude prune
to ``pruning.final_sparsity`` (one global threshold, or one per tensor with
``pruning.per_layer``; exact count, ties by position), then FedAvg under the fixed mask
(``mask = "nonzero"``). A ``prune_round`` beyond ``federation.rounds`` is a
configuration error. Shared baseline machinery: :mod:`fedprune.methods.masked`.
"""

from __future__ import annotations

from torch import nn

from fedprune.config import RunConfig
from fedprune.core.criteria import Magnitude
from fedprune.core.select import select_lowest
from fedprune.errors import ConfigError
from fedprune.methods.base import ClientReply, ModelSpec
from fedprune.methods.masked import BaselineClient, BaselineServer

__all__ = ["BaselineClient", "OMPServer"]


class OMPServer(BaselineServer):
    """Dense FedAvg, one magnitude prune at ``prune_round``, then masked fine-tuning."""

    name = "omp"

    def __init__(self, cfg: RunConfig, spec: ModelSpec, model: nn.Module) -> None:
        super().__init__(cfg, spec, model)
        rounds = cfg.federation.rounds
        p = cfg.pruning.prune_round or max(1, round(0.9 * rounds))
        if p > rounds:
            raise ConfigError(f"pruning.prune_round is {p} but federation.rounds is only {rounds}")
        self.prune_round = p

    def after_aggregate(self, rnd: int, replies: list[ClientReply]) -> dict[str, float]:
        """Prune once, at the end of ``prune_round``."""
        if rnd == self.prune_round:
            self.install_masks(
                select_lowest(
                    Magnitude()(self.prunable()),
                    self.cfg.pruning.final_sparsity,
                    per_layer=self.cfg.pruning.per_layer,
                )
            )
        done = self.masks is not None
        return {"target_sparsity": self.cfg.pruning.final_sparsity if done else 0.0}
