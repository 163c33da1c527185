"""A complete fedprune method written outside fedprune: one-shot magnitude pruning.

FedAvg until round ``[oneshot] at_round``; then the server prunes the ``sparsity`` share
of the smallest weights (one global threshold) and every later round trains and sends
the sparse model (the zeros of the global model are the mask, so no mask bytes travel).

Use it with ``FEDPRUNE_PLUGINS=oneshot_plugin fedprune run --method oneshot`` (this file's
folder on ``PYTHONPATH``), or publish it with an entry point in the ``fedprune.methods``
group (see docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedprune.core.masks import apply_masks, prunable_names
from fedprune.errors import ConfigError
from fedprune.methods.base import ClientMethod, ServerMethod
from fedprune.params import key
from fedprune.registry import MethodInfo, register


@dataclass
class OneShotConfig:
    """``[oneshot]``: what to prune, and when."""

    sparsity: float = key(0.5, "share of the prunable weights removed", ge=0, lt=1)
    at_round: int = key(2, "prune after this round's aggregation", ge=1, le=1_000_000)


class OneShotServer(ServerMethod):
    """FedAvg, then one global magnitude prune."""

    name = "oneshot"
    mask_mode = "nonzero"  # clients keep the zeros of what they receive

    def __init__(self, cfg: Any, spec: Any, model: torch.nn.Module) -> None:
        super().__init__(cfg, spec, model)
        self.opts: OneShotConfig = cfg.section("oneshot")
        if self.opts.at_round > cfg.federation.rounds:
            raise ConfigError(
                f"oneshot.at_round is {self.opts.at_round} but there are only "
                f"{cfg.federation.rounds} rounds"
            )

    def after_aggregate(self, rnd: int, replies: list[Any]) -> dict[str, float]:
        if rnd != self.opts.at_round:
            return {}
        params = dict(self.model.named_parameters())
        names = prunable_names(self.model, "weights")
        scores = torch.cat([params[n].detach().abs().flatten() for n in names])
        k = int(self.opts.sparsity * scores.numel())
        if k == 0:
            return {"pruned": 0.0}
        threshold = scores.kthvalue(k).values
        self.masks = {n: params[n].detach().abs() > threshold for n in names}
        apply_masks(self.model, self.masks)
        return {"pruned": float(k)}


METHOD = MethodInfo(
    "oneshot",
    OneShotServer,
    ClientMethod,  # the default client half: masked local training
    "FedAvg, then one global magnitude prune at [oneshot] at_round.",
    "docs/methods.md example",
    section="oneshot",
    config=OneShotConfig,
)
register(METHOD, replace=True)  # importing the module registers it (FEDPRUNE_PLUGINS)
