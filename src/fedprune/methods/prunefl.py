"""PruneFL (Jiang et al. 2022), as ported by the FedSparsify authors (methods.md §3.3, §4).

Explicit masks travel every round (``mask = "explicit"``), because a regrown weight
starts at zero and would look pruned under the non-zero convention.

*Initial mask*: one seeded client (task ``"prunefl_init"``) runs
:attr:`PruneFLServer.init_iterations` (5) iterations of
:attr:`PruneFLServer.init_epochs` (10) local epochs, as in the authors' port. Each
iteration trains under the current local mask while accumulating the squared
gradients of every prunable entry (pruned ones included), then re-selects the mask at
the initial density. It uploads the last iteration's importance; the server selects
the same mask from it and applies it to the *initial* global weights (the port
applies the one client's mask to a fresh model; the client's trained weights are not
used).

*Readjustment*: on rounds ``r`` with ``r % pruning.readjust_every == 0`` (not the last
round: a mask chosen after the last aggregation would never be trained) the round's
clients upload ``"importance/<param>"``: the sum over their local steps of the
squared dense gradient (taken before the mask zeroes it). The server sums them over
clients and keeps the entries with the highest ``importance / cost`` at density
``d_r = 1 - 0.3 * 0.5 ** (r / R)`` (``R = federation.rounds``; ``d_0 = 0.7`` for the
initial mask), exactly ``N - floor((1 - d_r) * N)`` of them. The new mask is *not*
intersected with the old one: pruned weights can come back (at zero).

``cost`` is the per-parameter time of the original (its measured per-layer
computation time plus a per-parameter communication time). By default it is
*omitted* (1 for every entry): in this toolkit masked training runs dense kernels, so
a pruned weight saves only its bytes on the wire, the same in every layer (and the
authors' port divided by whole-layer training times, which the shared forward pass
makes nearly uniform). :attr:`PruneFLServer.flops_costs` switches to the layer's
forward FLOPs per weight (``2 * H_out * W_out`` for a convolution, 2 for a linear
layer, normalised so that the cheapest layer costs 1; batch norm costs 1), the cost
on hardware with real sparse kernels. That ranking is much steeper than the
original's measured one (1024x between a 32x32 convolution and a linear layer,
against about 9x in PruneFL's VGG-11 coefficients), hence not the default.

Departures from the sources, on purpose: the density schedule is the authors' port's
``1 - 0.3 * 0.5 ** (r / R)``, hit exactly (the port keeps *at least* that many and
grows further by PruneFL's ratio rule; the original PruneFL uses ``0.3 * 0.5 **
(r / half-life)`` as the largest fraction of kept weights one readjustment may
remove); ``pruning.final_sparsity`` is not used; the port sorted raw summed gradients
and read the wrong clients' data, here squared gradients of the round's clients rank.

Shared baseline machinery: :mod:`fedprune.methods.masked`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from fedprune.config import RunConfig
from fedprune.core.codec import Payload
from fedprune.core.flops import count_flops
from fedprune.core.masks import Masks, count_kept, prunable_names
from fedprune.core.sampling import derive_seed
from fedprune.core.select import select_lowest
from fedprune.core.training import train_local
from fedprune.methods.base import (
    ClientMethod,
    ClientReply,
    FederatedIO,
    ModelSpec,
    client_generator,
    config_number,
    state_of,
)
from fedprune.methods.masked import BaselineServer, prefixed

if TYPE_CHECKING:
    from fedprune.data.federation import ClientData

IMPORTANCE_PREFIX = "importance/"
"""Name prefix of the squared-gradient tensors a PruneFL client uploads."""

__all__ = [
    "IMPORTANCE_PREFIX",
    "PruneFLClient",
    "PruneFLServer",
    "collect_squared_grads",
    "param_costs",
]


def _named(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    params = dict(model.named_parameters())
    return [params[n] for n in names]


def param_costs(
    model: nn.Module, input_shape: tuple[int, int, int], names: list[str]
) -> dict[str, float]:
    """PruneFL's per-parameter time, approximated by forward FLOPs per weight of its layer.

    A parameter of a conv/linear layer costs that layer's FLOPs (one sample, forward)
    divided by the number of entries of its weight; the result is normalised so that
    the cheapest such layer costs 1. Parameters of other modules (batch norm) cost 1.
    """
    report = count_flops(model, input_shape)
    modules = dict(model.named_modules())
    raw: dict[str, float | None] = {}
    for n in names:
        mod_name = n.rpartition(".")[0]
        weight = getattr(modules.get(mod_name), "weight", None)
        flops = report.per_layer.get(mod_name)
        if flops and isinstance(weight, torch.Tensor) and weight.numel() > 0:
            raw[n] = flops / weight.numel()
        else:
            raw[n] = None
    known = [c for c in raw.values() if c is not None and c > 0]
    base = min(known) if known else 1.0
    return {n: (c / base if c is not None and c > 0 else 1.0) for n, c in raw.items()}


@contextmanager
def collect_squared_grads(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Accumulate ``g ** 2`` of the named parameters over every backward pass inside.

    Tensor hooks see the dense gradient before masked training zeroes the pruned
    entries, so pruned weights get an importance too (what lets PruneFL regrow them).
    """
    acc = {
        n: torch.zeros_like(p, dtype=torch.float32)
        for n, p in zip(names, _named(model, names), strict=True)
    }
    handles = []
    for n, p in zip(names, _named(model, names), strict=True):

        def hook(g: torch.Tensor, n: str = n) -> None:
            acc[n].add_(g.detach().float().square())

        handles.append(p.register_hook(hook))
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()


class PruneFLServer(BaselineServer):
    """PruneFL: initial mask from one client, importance-driven readjustment with regrowth."""

    name = "prunefl"
    mask_mode = "explicit"
    checkpoint_attrs: ClassVar[tuple[str, ...]] = ("density",)
    prune_rate: ClassVar[float] = 0.3
    """``p`` of the density schedule ``1 - p * 0.5 ** (r / R)`` (the authors' port)."""
    init_iterations: ClassVar[int] = 5
    """Train-then-reselect iterations of the initial pruning at one client."""
    init_epochs: ClassVar[int] = 10
    """Local epochs per initial-pruning iteration."""
    flops_costs: ClassVar[bool] = False
    """Divide importance by FLOPs per weight (:func:`param_costs`) instead of 1."""

    def __init__(self, cfg: RunConfig, spec: ModelSpec, model: nn.Module) -> None:
        super().__init__(cfg, spec, model)
        self.costs = (
            param_costs(model, spec.input_shape, self.scope)
            if self.flops_costs
            else dict.fromkeys(self.scope, 1.0)
        )
        self.density = 1.0

    def target_density(self, rnd: int) -> float:
        """``1 - prune_rate * 0.5 ** (rnd / rounds)``: 0.7 at round 0, 0.85 at the end."""
        return 1.0 - self.prune_rate * 0.5 ** (rnd / self.cfg.federation.rounds)

    def readjusts_at(self, rnd: int) -> bool:
        """Every ``readjust_every`` rounds, except the last round."""
        return rnd % self.cfg.pruning.readjust_every == 0 and rnd < self.cfg.federation.rounds

    def select(self, importance: Mapping[str, torch.Tensor], density: float) -> Masks:
        """Keep exactly ``N - floor((1 - density) * N)`` entries of highest importance/cost."""
        scores = {n: importance[n].float() / self.costs[n] for n in self.scope}
        return select_lowest(scores, 1.0 - density, per_layer=self.cfg.pruning.per_layer)

    def setup(self, io: FederatedIO) -> None:
        """Initial pruning at one seeded client, at density ``target_density(0)``."""
        cid = self.setup_client(io.num_clients)
        density = self.target_density(0)
        payload = Payload(
            arrays=state_of(self.model),
            config={
                "task": "prunefl_init",
                "seed": derive_seed(self.cfg.seed, 0),
                "lr": self.cfg.train.lr,
                "density": density,
                "iterations": self.init_iterations,
                "epochs": self.init_epochs,
                "flops_costs": self.flops_costs,
            },
        )
        (reply,) = io.exchange("prunefl_init", {cid: payload})
        importance = prefixed(reply, IMPORTANCE_PREFIX, self.scope)
        self.install_masks(self.select(importance, density), monotone=False)
        self.density = density

    def round_config(self, rnd: int) -> dict[str, Any]:
        """Asks for importance on readjustment rounds."""
        cfg = super().round_config(rnd)
        cfg["importance"] = self.readjusts_at(rnd)
        return cfg

    def after_aggregate(self, rnd: int, replies: list[ClientReply]) -> dict[str, float]:
        """On readjustment rounds, re-select the mask from the summed importance."""
        metrics: dict[str, float] = {}
        with_imp = [
            r for r in replies if all(IMPORTANCE_PREFIX + n in r.payload.arrays for n in self.scope)
        ]
        if self.readjusts_at(rnd) and self.scope and with_imp:
            total = {
                n: torch.stack(
                    [r.payload.arrays[IMPORTANCE_PREFIX + n].float() for r in with_imp]
                ).sum(0)
                for n in self.scope
            }
            density = self.target_density(rnd)
            new = self.select(total, density)
            old = self.masks
            self.install_masks(new, monotone=False)
            self.density = density
            if old is not None:
                metrics["regrown"] = float(sum(int((new[n] & ~old[n]).sum()) for n in self.scope))
                metrics["newly_pruned"] = float(
                    sum(int((old[n] & ~new[n]).sum()) for n in self.scope)
                )
        metrics["target_sparsity"] = 1.0 - self.density
        metrics["mask_sparsity"] = self.current_sparsity()
        return metrics


class PruneFLClient(ClientMethod):
    """Masked training that reports squared gradients when asked; initial pruning."""

    def handle(self, task: str, payload: Payload, data: ClientData) -> Payload:
        """``"prunefl_init"`` or ``"fit"``."""
        if task == "prunefl_init":
            return self.initial_pruning(payload, data)
        return super().handle(task, payload, data)

    def _generator(self, payload: Payload, data: ClientData) -> torch.Generator:
        return client_generator(payload, data.cid)

    def fit(self, payload: Payload, data: ClientData) -> Payload:
        """Masked training; with ``importance`` set, also upload ``importance/<param>``."""
        if not payload.config.get("importance"):
            return super().fit(payload, data)
        model = self.model_for(payload)
        masks = self.masks_for(model, payload)
        names = prunable_names(model, self.cfg.pruning.scope)
        with collect_squared_grads(model, names) as acc:
            stats = train_local(
                model,
                data.x_train,
                data.y_train,
                self.settings(payload),
                masks=masks,
                generator=self._generator(payload, data),
            )
        arrays = state_of(model)
        arrays.update({IMPORTANCE_PREFIX + n: t for n, t in acc.items()})
        return Payload(
            arrays=arrays,
            metrics={"num_examples": float(stats.num_examples), "train_loss": stats.loss},
        )

    def initial_pruning(self, payload: Payload, data: ClientData) -> Payload:
        """Iterate: train under the local mask, accumulate ``g ** 2``, re-select the mask."""
        model = self.model_for(payload)
        names = prunable_names(model, self.cfg.pruning.scope)
        costs = (
            param_costs(model, self.spec.input_shape, names)
            if payload.config.get("flops_costs")
            else dict.fromkeys(names, 1.0)
        )
        density = config_number(payload.config, "density", 1.0)
        iterations = max(1, int(config_number(payload.config, "iterations", 1)))
        settings = dataclasses.replace(
            self.settings(payload), epochs=max(1, int(config_number(payload.config, "epochs", 1)))
        )
        gen = self._generator(payload, data)
        masks: Masks | None = None
        acc: dict[str, torch.Tensor] = {n: torch.zeros(0) for n in names}
        loss = float("nan")
        for _ in range(iterations):
            with collect_squared_grads(model, names) as sq:
                stats = train_local(
                    model, data.x_train, data.y_train, settings, masks=masks, generator=gen
                )
            acc = sq
            loss = stats.loss
            masks = select_lowest(
                {n: acc[n] / costs[n] for n in names},
                1.0 - density,
                per_layer=self.cfg.pruning.per_layer,
            )
        kept = count_kept(masks) if masks else 0
        return Payload(
            arrays={IMPORTANCE_PREFIX + n: t for n, t in acc.items()},
            metrics={
                "num_examples": float(data.x_train.shape[0]),
                "train_loss": loss,
                "kept": float(kept),
            },
        )
