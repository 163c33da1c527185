"""Shared halves of the pruning baselines (OMP, random, SNIP, GraSP, PruneFL).

Not a method itself: :class:`BaselineServer` (a prunable scope and one global keep-mask),
:class:`SaliencyServer` / :class:`SaliencyClient` (the one-client scoring setup SNIP and
GraSP share) and the default masked client half. Each baseline lives in its own module
(:mod:`.omp`, :mod:`.random_pruning`, :mod:`.snip`, :mod:`.grasp`, :mod:`.prunefl`).

Every baseline keeps one global keep-mask over the prunable scope (``pruning.scope``:
conv/linear weights by default, every trainable tensor with ``"all"``). Pruned weights
are set to exactly ``+0.0`` with ``masked_fill`` (never multiplied by 0, which leaves
``-0.0``, a non-zero bit pattern for the codec), the server re-applies the mask after
every aggregation, and clients train under it with the default masked client half.
``aggregate_fit`` reports ``target_sparsity``, the sparsity the method aims at after
the round over the prunable scope (masks prune exactly ``floor(s * N)`` entries, chosen
by :func:`fedprune.core.select.select_lowest`); SNIP, GraSP and PruneFL also report
``mask_sparsity``, the exact sparsity of the mask in force.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedprune.config import RunConfig
from fedprune.core.codec import Payload
from fedprune.core.criteria import SNIP, BatchCriterion, GraSP
from fedprune.core.masks import Masks, apply_masks, mask_sparsity, prunable_names
from fedprune.core.sampling import derive_seed
from fedprune.core.select import select_lowest
from fedprune.methods.base import (
    ClientMethod,
    ClientReply,
    FederatedIO,
    ModelSpec,
    ServerMethod,
    config_int,
    state_of,
)

if TYPE_CHECKING:
    from fedprune.data.federation import ClientData

SCORE_PREFIX = "score/"
"""Name prefix of the saliency tensors a SNIP/GraSP client uploads."""

SALIENCY_CRITERIA: dict[str, BatchCriterion] = {"snip": SNIP(), "grasp": GraSP()}
"""Setup task -> the criterion the client scores the model with."""

_SETUP_STREAM = 0x5E7
"""Seed stream of the setup client's draw (independent of the round sampler)."""

__all__ = [
    "SALIENCY_CRITERIA",
    "SCORE_PREFIX",
    "BaselineClient",
    "BaselineServer",
    "SaliencyClient",
    "SaliencyServer",
    "prefixed",
]


class BaselineServer(ServerMethod):
    """Shared server logic: a prunable scope and one global keep-mask.

    Before any mask exists the clients train densely (``mask = "none"``); afterwards
    under the non-zero pattern (``"nonzero"``) or explicit masks (``"explicit"``).
    """

    mask_mode: ClassVar[str] = "nonzero"

    def __init__(self, cfg: RunConfig, spec: ModelSpec, model: nn.Module) -> None:
        super().__init__(cfg, spec, model)
        self.scope = prunable_names(model, cfg.pruning.scope)

    def prunable(self) -> dict[str, torch.Tensor]:
        """The global model's tensors in the pruning scope."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in self.scope}

    def install_masks(self, masks: Masks, *, monotone: bool = True) -> None:
        """Make ``masks`` the global mask and zero the pruned weights.

        With ``monotone`` the new mask is intersected with the current one (no regrowth).
        """
        masks = {n: m.bool() for n, m in masks.items()}
        if monotone and self.masks is not None:
            masks = {n: m & self.masks[n] for n, m in masks.items()}
        self.masks = masks
        apply_masks(self.model, masks)

    def current_sparsity(self) -> float:
        """Sparsity of the mask in force (0 without a mask)."""
        return 0.0 if self.masks is None else mask_sparsity(self.masks)

    def round_config(self, rnd: int) -> dict[str, Any]:
        """Dense training until a mask exists."""
        cfg = super().round_config(rnd)
        if self.masks is None and self.mask_mode == "nonzero":
            cfg["mask"] = "none"
        return cfg

    def setup_client(self, num_clients: int) -> int:
        """The one client a setup phase talks to (seeded by ``seed``)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, _SETUP_STREAM]))
        return int(rng.integers(num_clients))


class SaliencyServer(BaselineServer):
    """Pruning at initialisation from one client's scores (SNIP, GraSP); fixed mask.

    Subclasses name the setup ``task`` (a key of :data:`SALIENCY_CRITERIA`).
    """

    task: ClassVar[str] = "snip"

    def setup(self, io: FederatedIO) -> None:
        """Ask one client for the scores, keep the top ``1 - final_sparsity``."""
        cid = self.setup_client(io.num_clients)
        payload = Payload(
            arrays=state_of(self.model),
            config={"task": self.task, "seed": derive_seed(self.cfg.seed, 0)},
        )
        (reply,) = io.exchange(self.task, {cid: payload})
        scores = prefixed(reply, SCORE_PREFIX, self.scope)
        self.install_masks(
            select_lowest(
                scores, self.cfg.pruning.final_sparsity, per_layer=self.cfg.pruning.per_layer
            )
        )

    def after_aggregate(self, rnd: int, replies: list[ClientReply]) -> dict[str, float]:
        """The mask is fixed: report the target and the mask's exact sparsity."""
        return {
            "target_sparsity": self.cfg.pruning.final_sparsity,
            "mask_sparsity": self.current_sparsity(),
        }


def prefixed(reply: ClientReply, prefix: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The reply's ``prefix + name`` tensors by name; ValueError naming the missing ones."""
    missing = [n for n in names if prefix + n not in reply.payload.arrays]
    if missing:
        raise ValueError(
            f"client {reply.cid} sent no {prefix}* tensor for {', '.join(missing[:3])}"
        )
    return {n: reply.payload.arrays[prefix + n] for n in names}


def _first_batch(data: ClientData, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch of the client's seeded permutation (the whole set if smaller)."""
    n = int(data.x_train.shape[0])
    if n == 0:
        raise ValueError(f"client {data.cid} has no training data to score the model on")
    gen = torch.Generator().manual_seed(derive_seed(seed, data.cid))
    idx = torch.randperm(n, generator=gen)[:batch_size]
    return data.x_train[idx], data.y_train[idx]


class BaselineClient(ClientMethod):
    """Masked local training (OMP, random): the default client half."""


class SaliencyClient(ClientMethod):
    """Answers the SNIP (``"snip"``) and GraSP (``"grasp"``) setup tasks, then trains."""

    def handle(self, task: str, payload: Payload, data: ClientData) -> Payload:
        """Score tasks, or masked training."""
        if task in SALIENCY_CRITERIA:
            return self.score(task, payload, data)
        return super().handle(task, payload, data)

    def score(self, task: str, payload: Payload, data: ClientData) -> Payload:
        """Scores of the received model on the first training batch."""
        model = self.model_for(payload)
        model.train()
        names = prunable_names(model, self.cfg.pruning.scope)
        seed = config_int(payload.config, "seed", 0)
        x, y = _first_batch(data, self.cfg.train.batch_size, seed)
        with torch.random.fork_rng(devices=[]):  # dropout draws, reproducibly
            torch.manual_seed(derive_seed(seed, data.cid))
            scores = SALIENCY_CRITERIA[task](model, x, y, names)
        return Payload(
            arrays={SCORE_PREFIX + n: s for n, s in scores.items()},
            metrics={"num_examples": float(x.shape[0])},
        )
