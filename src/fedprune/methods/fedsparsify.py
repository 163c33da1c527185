"""FedSparsify (Stripelis et al., "Federated Progressive Sparsification (Purge, Merge, Tune)+").

Progressive magnitude pruning on a sparsity schedule (:mod:`fedprune.core.schedule`).
The zeros of the global model are the mask: clients train under the non-zero pattern of
what they receive (``mask = "nonzero"``: no mask bytes on the wire), and the codec sends
the sparse tensors compactly in both directions.

``fedsparsify-global`` (Tune -> Merge -> Purge)
    Masked local training, sample-weighted FedAvg, then the server purges the global
    model to the scheduled sparsity ``s_t`` (one magnitude threshold over all prunable
    tensors by default; ``pruning.per_layer`` for one per tensor).

``fedsparsify-local`` (Tune -> Purge -> Merge)
    Masked local training, then each client purges its own model to ``s_t``; the server
    keeps a position when at least ``max(1, floor(|S|/2))`` of the round's clients kept
    it (ties kept, as in the authors' code; the ``max(1, .)`` stops a single-client round
    from reviving globally pruned weights) and merges with ``pruning.merge``:

    ``majority``
        Sample-weighted FedAvg at surviving positions, counting clients that purged the
        weight as 0 (the authors' "MergeWeightedAverageMajorityVoting").
    ``majority_nnz``
        At surviving positions, average only over the clients that kept the weight.
    ``nnz_average``
        No vote: average over the clients that kept each weight; 0 where none did.

Pruned weights never regrow: every new mask is intersected with the current one.
Not copied from the authors' code: their 2023 entry scripts wire "Local" as "Global"
(methods.md §3.7); here Local really purges on the clients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedprune.config import RunConfig
from fedprune.core.aggregation import weighted_average
from fedprune.core.codec import Payload
from fedprune.core.criteria import Magnitude
from fedprune.core.masks import Masks, apply_masks, mask_sparsity, mask_state, prunable_names
from fedprune.core.schedule import schedule_from_config
from fedprune.core.select import select_lowest
from fedprune.core.training import TrainStats
from fedprune.errors import ConfigError
from fedprune.methods.base import (
    ClientMethod,
    ClientReply,
    ModelSpec,
    ServerMethod,
    config_number,
    state_of,
)


class ScheduledPruningServer(ServerMethod):
    """Shared server logic: a schedule, a prunable scope, and a monotone global mask."""

    mask_mode = "nonzero"

    def __init__(self, cfg: RunConfig, spec: ModelSpec, model: nn.Module) -> None:
        super().__init__(cfg, spec, model)
        self.schedule = schedule_from_config(cfg)
        self.scope = prunable_names(model, cfg.pruning.scope)

    def prunable(self) -> dict[str, torch.Tensor]:
        """The global model's tensors in the pruning scope."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in self.scope}

    def set_masks(self, masks: Masks) -> None:
        """Intersect with the current mask (no regrowth) and zero the pruned weights."""
        if self.masks is not None:
            masks = {n: m & self.masks[n] for n, m in masks.items()}
        self.masks = masks
        apply_masks(self.model, masks)

    def round_config(self, rnd: int) -> dict[str, Any]:
        """Adds the round's target sparsity."""
        cfg = super().round_config(rnd)
        cfg["target_sparsity"] = self.schedule.sparsity(rnd)
        cfg["prune"] = self.schedule.prunes_at(rnd)
        return cfg


class FedSparsifyGlobalServer(ScheduledPruningServer):
    """FedAvg, then server-side magnitude purge to the scheduled sparsity."""

    name = "fedsparsify-global"

    def after_aggregate(self, rnd: int, replies: list[ClientReply]) -> dict[str, float]:
        """Purge the aggregated model to ``s_t`` on pruning rounds."""
        target = self.schedule.sparsity(rnd)
        if self.schedule.prunes_at(rnd):
            self.set_masks(
                select_lowest(
                    Magnitude()(self.prunable()),
                    target,
                    per_layer=self.cfg.pruning.per_layer,
                    current=self.masks,
                )
            )
        return {"target_sparsity": target}


class FedSparsifyLocalServer(ScheduledPruningServer):
    """Majority-vote merge of client-purged models.

    ``federation.aggregation = "fedavgm"`` applies the server momentum to the merged model
    and then zeroes the positions the vote removed again (momentum cannot revive them).
    The robust rules (``median``, ``trimmed_mean``) are refused: the merge is a weighted
    average by definition.
    """

    name = "fedsparsify-local"

    def __init__(self, cfg: RunConfig, spec: ModelSpec, model: nn.Module) -> None:
        rule = cfg.federation.aggregation
        if rule not in ("fedavg", "fedavgm"):
            raise ConfigError(
                f"method fedsparsify-local merges by a vote over weighted averages: "
                f"federation.aggregation = {rule!r} is not supported (use 'fedavg' or 'fedavgm')"
            )
        super().__init__(cfg, spec, model)

    def aggregate(self, rnd: int, replies: list[ClientReply]) -> dict[str, torch.Tensor]:
        """Merge per ``pruning.merge``; non-prunable tensors are plain FedAvg."""
        keys = list(self.model.state_dict().keys())
        weights = [float(r.num_examples) for r in replies]
        out = weighted_average([{k: r.payload.arrays[k] for k in keys} for r in replies], weights)
        merge = self.cfg.pruning.merge
        need = max(1, len(replies) // 2)
        vote_masks: Masks = {}
        for name in self.scope:
            stacked = torch.stack([r.payload.arrays[name].float() for r in replies])
            kept = stacked != 0
            if self.masks is not None:
                kept &= self.masks[name]
            w = torch.tensor(weights).view(-1, *([1] * (stacked.dim() - 1)))
            if merge == "majority":
                mv = kept.sum(0) >= need
                merged = (w * stacked).sum(0) / w.sum()
            else:
                wk = w * kept
                denom = wk.sum(0)
                merged = torch.where(denom > 0, (wk * stacked).sum(0) / denom.clamp_min(1e-30), 0.0)
                mv = kept.sum(0) >= need if merge == "majority_nnz" else denom > 0
            out[name] = torch.where(mv, merged, 0.0).to(out[name].dtype)
            vote_masks[name] = mv
        self.report(vote_sparsity=mask_sparsity(vote_masks))
        if self.momentum is not None:
            out = self.momentum.step(state_of(self.model), out)
            for name, mv in vote_masks.items():
                out[name] = torch.where(mv, out[name], 0.0).to(out[name].dtype)
        return out

    def after_aggregate(self, rnd: int, replies: list[ClientReply]) -> dict[str, float]:
        """The merged non-zero pattern becomes the global mask (intersected: no regrowth)."""
        # the merge zeroed every entry its vote removed, so the non-zero pattern is the
        # vote intersected with the previous mask (no regrowth)
        params = dict(self.model.named_parameters())
        self.set_masks({n: params[n].detach() != 0 for n in self.scope})
        return {"target_sparsity": self.schedule.sparsity(rnd)}


class FedSparsifyClient(ClientMethod):
    """Masked training; with ``prune`` in the round config, purge locally to ``s_t``."""

    local_purge = False

    def after_train(
        self,
        model: nn.Module,
        arrays: dict[str, torch.Tensor],
        masks: Masks | None,
        payload: Payload,
        stats: TrainStats,
    ) -> dict[str, float]:
        """Client-side purge (Local variant only)."""
        if not (self.local_purge and payload.config.get("prune")):
            return {}
        target = config_number(payload.config, "target_sparsity", 0.0)
        names = prunable_names(model, self.cfg.pruning.scope)
        local = select_lowest(
            Magnitude()({n: arrays[n] for n in names}),
            target,
            per_layer=self.cfg.pruning.per_layer,
            current=masks,
        )
        mask_state(arrays, local)
        return {"local_sparsity": mask_sparsity(local)}


class FedSparsifyLocalClient(FedSparsifyClient):
    """Client half of fedsparsify-local: purges before replying."""

    local_purge = True


__all__ = [
    "FedSparsifyClient",
    "FedSparsifyGlobalServer",
    "FedSparsifyLocalClient",
    "FedSparsifyLocalServer",
    "ScheduledPruningServer",
]
