"""Pruning baselines, as the FedSparsify authors ran them (methods.md §3.3 and §4).

Every baseline keeps one global keep-mask over the prunable scope (``pruning.scope``:
conv/linear weights by default, every trainable tensor with ``"all"``). Pruned weights
are set to exactly ``+0.0`` with ``masked_fill`` (never multiplied by 0, which leaves
``-0.0``, a non-zero bit pattern for the codec), the server re-applies the mask after
every aggregation, and clients train under it with the default masked client half.
``aggregate_fit`` reports ``target_sparsity``, the sparsity the method aims at after
the round over the prunable scope (masks prune exactly ``floor(s * N)`` entries); SNIP,
GraSP and PruneFL also report ``mask_sparsity``, the exact sparsity of the mask in force.

``omp`` (one-shot magnitude pruning + fine-tuning)
    Dense FedAvg (``mask = "none"``) until the end of round ``pruning.prune_round``
    (0 means ``max(1, round(0.9 * rounds))``, the authors' round 90 of 100), then one
    magnitude prune to ``pruning.final_sparsity`` (one global threshold, or one per
    tensor with ``pruning.per_layer``; exact count, ties by position), then FedAvg under
    the fixed mask (``mask = "nonzero"``). A ``prune_round`` beyond
    ``federation.rounds`` is a configuration error.

``random``
    FedSparsify-Global's schedule (:func:`~fedprune.methods.fedsparsify.schedule_from_config`),
    but the positions pruned at sparsity ``s_t`` are the first ``floor(s_t * N)`` entries
    of one permutation of the ``N`` prunable entries, drawn once from ``seed``. Prefixes
    of one permutation are nested, so the masks are monotone and hit the count exactly.
    With ``pruning.per_layer`` each tensor prunes ``floor(s_t * n_i)`` of its own entries,
    in the order the same permutation visits them.

``snip`` (Lee et al. 2019)
    Before round 1 the server picks one client with a seeded generator and sends it the
    initial model (task ``"snip"``). The client computes the saliency ``|g ⊙ w|`` of the
    prunable tensors on one training batch (the first ``train.batch_size`` samples of a
    seeded permutation of its training set; cross-entropy; model in training mode;
    biases and batch norm excluded unless ``scope = "all"``) and
    uploads the scores (float32, counted like any payload). The server keeps the top
    ``1 - final_sparsity`` globally (per tensor with ``per_layer``) and applies the mask
    to the initial model; the mask is fixed for all of training.

``grasp`` (Wang et al. 2020)
    The same flow with task ``"grasp"`` and scores ``(H g) ⊙ w`` from a Hessian-gradient
    product by double backward (``g = ∇L`` with a graph, ``z = Σ g · stop_grad(g)``,
    ``Hg = ∇z``), restricted to the prunable tensors (the Hessian block of the scope, as
    in the GraSP reference code, which only scores conv/linear weights). The lowest scores
    are removed, as in the authors' code (equivalent to removing the top of
    ``-Hg ⊙ w``). One batch and no softmax temperature (the GraSP paper uses T = 200 and
    several batches; the FedSparsify baseline uses one client's batch).

``prunefl`` (Jiang et al., PruneFL; the FedSparsify authors' port)
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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedprune.config import RunConfig
from fedprune.core.codec import Payload
from fedprune.core.flops import count_flops
from fedprune.core.masks import Masks, apply_masks, count_kept, mask_sparsity, prunable_names
from fedprune.core.purge import magnitude_masks, prune_count
from fedprune.core.sampling import derive_seed
from fedprune.core.training import train_local
from fedprune.errors import ConfigError
from fedprune.methods.base import (
    ClientMethod,
    ClientReply,
    FederatedIO,
    ModelSpec,
    ServerMethod,
    client_generator,
    config_int,
    config_number,
    state_of,
)
from fedprune.methods.fedsparsify import schedule_from_config

if TYPE_CHECKING:
    from fedprune.data.federation import ClientData

SCORE_PREFIX = "score/"
"""Name prefix of the saliency tensors a SNIP/GraSP client uploads."""
IMPORTANCE_PREFIX = "importance/"
"""Name prefix of the squared-gradient tensors a PruneFL client uploads."""

_SETUP_STREAM = 0x5E7
"""Seed stream of the setup client's draw (independent of the round sampler)."""
_RANDOM_STREAM = 0x7A9D
"""Seed stream of the random baseline's permutation."""


# --------------------------------------------------------------------------- helpers


def _prune_lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """A keep-mask pruning exactly the ``k`` lowest entries (ties by position, NaN first)."""
    keep = torch.ones(flat.shape, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return keep
    if flat.is_floating_point():
        flat = torch.nan_to_num(flat, nan=-math.inf)
    order = torch.argsort(flat, stable=True)
    keep[order[: min(k, flat.numel())]] = False
    return keep


def lowest_masks(
    scores: Mapping[str, torch.Tensor], sparsity: float, *, per_layer: bool = False
) -> Masks:
    """Keep-masks that prune exactly ``floor(sparsity * N)`` lowest-scored entries.

    Parameters
    ----------
    scores
        Name -> score tensor (signed; higher means more worth keeping).
    sparsity
        Fraction of entries to prune, in [0, 1).
    per_layer
        Prune ``floor(sparsity * n_i)`` of each tensor instead of one global ranking.

    Returns
    -------
    Masks
        Name -> boolean keep-mask with the score tensor's shape. Ties are broken by
        position (flat order over the tensors in ``scores`` order), NaN scores are
        pruned first.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    names = list(scores)
    out: Masks = {}
    if per_layer:
        for n in names:
            flat = scores[n].detach().flatten()
            out[n] = _prune_lowest(flat, prune_count(sparsity, flat.numel())).view_as(scores[n])
        return out
    if not names:
        return out
    flat = torch.cat([scores[n].detach().flatten() for n in names])
    keep = _prune_lowest(flat, prune_count(sparsity, flat.numel()))
    offset = 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[offset : offset + size].view_as(scores[n])
        offset += size
    return out


def _named(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    params = dict(model.named_parameters())
    return [params[n] for n in names]


def snip_scores(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """SNIP saliency ``|∂L/∂w ⊙ w|`` of the named parameters on one batch.

    ``L`` is the mean cross-entropy of ``model(x)`` against ``y``; the model's training
    flag is used as it is.
    """
    ws = _named(model, names)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, ws, allow_unused=True)
    out: dict[str, torch.Tensor] = {}
    for n, w, g in zip(names, ws, grads, strict=True):
        g = torch.zeros_like(w) if g is None else g
        out[n] = (g * w).abs().detach().float()
    return out


def grasp_scores(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """GraSP scores ``(H g) ⊙ w`` of the named parameters on one batch.

    ``g`` and ``H`` are the gradient and Hessian of the mean cross-entropy with respect
    to the named parameters only (other parameters are constants). ``Hg`` comes from a
    double backward: ``z = Σ g · stop_grad(g)``, ``Hg = ∂z/∂w``. Low scores are the ones
    to remove.
    """
    ws = _named(model, names)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, ws, create_graph=True, allow_unused=True)
    z = loss.new_zeros(())
    for g in grads:
        if g is not None:
            z = z + (g * g.detach()).sum()
    if z.requires_grad:
        hgs: tuple[torch.Tensor | None, ...] = torch.autograd.grad(z, ws, allow_unused=True)
    else:  # no curvature reaches the scope (e.g. no parameter was used)
        hgs = (None,) * len(ws)
    out: dict[str, torch.Tensor] = {}
    for n, w, hg in zip(names, ws, hgs, strict=True):
        hg = torch.zeros_like(w) if hg is None else hg
        out[n] = (hg * w).detach().float()
    return out


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


def _first_batch(data: ClientData, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch of the client's seeded permutation (the whole set if smaller)."""
    n = int(data.x_train.shape[0])
    if n == 0:
        raise ValueError(f"client {data.cid} has no training data to score the model on")
    gen = torch.Generator().manual_seed(derive_seed(seed, data.cid))
    idx = torch.randperm(n, generator=gen)[:batch_size]
    return data.x_train[idx], data.y_train[idx]


# --------------------------------------------------------------------------- servers


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
                magnitude_masks(
                    self.prunable(),
                    self.cfg.pruning.final_sparsity,
                    per_layer=self.cfg.pruning.per_layer,
                )
            )
        done = self.masks is not None
        return {"target_sparsity": self.cfg.pruning.final_sparsity if done else 0.0}


class RandomServer(BaselineServer):
    """FedSparsify-Global's schedule with a fixed random pruning order."""

    name = "random"

    def __init__(self, cfg: RunConfig, spec: ModelSpec, model: nn.Module) -> None:
        super().__init__(cfg, spec, model)
        self.schedule = schedule_from_config(cfg)
        sizes = [t.numel() for t in self.prunable().values()]
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, _RANDOM_STREAM))
        perm = torch.randperm(sum(sizes), generator=gen)
        rank = torch.empty_like(perm)
        rank[perm] = torch.arange(perm.numel())
        shapes = [t.shape for t in self.prunable().values()]
        self.ranks = {
            n: chunk.view(shape)
            for n, chunk, shape in zip(self.scope, torch.split(rank, sizes), shapes, strict=True)
        }
        """Name -> position of each entry in the pruning order (lowest pruned first)."""

    def after_aggregate(self, rnd: int, replies: list[ClientReply]) -> dict[str, float]:
        """Prune the first ``floor(s_t * N)`` entries of the permutation."""
        target = self.schedule.sparsity(rnd)
        if self.schedule.prunes_at(rnd):
            self.install_masks(
                lowest_masks(self.ranks, target, per_layer=self.cfg.pruning.per_layer)
            )
        return {"target_sparsity": target}


class SaliencyServer(BaselineServer):
    """Pruning at initialisation from one client's scores (SNIP, GraSP); fixed mask."""

    task: ClassVar[str] = "snip"

    def setup(self, io: FederatedIO) -> None:
        """Ask one client for the scores, keep the top ``1 - final_sparsity``."""
        cid = self.setup_client(io.num_clients)
        payload = Payload(
            arrays=state_of(self.model),
            config={"task": self.task, "seed": derive_seed(self.cfg.seed, 0)},
        )
        (reply,) = io.exchange(self.task, {cid: payload})
        scores = _prefixed(reply, SCORE_PREFIX, self.scope)
        self.install_masks(
            lowest_masks(
                scores, self.cfg.pruning.final_sparsity, per_layer=self.cfg.pruning.per_layer
            )
        )

    def after_aggregate(self, rnd: int, replies: list[ClientReply]) -> dict[str, float]:
        """The mask is fixed: report the target and the mask's exact sparsity."""
        return {
            "target_sparsity": self.cfg.pruning.final_sparsity,
            "mask_sparsity": self.current_sparsity(),
        }


class SNIPServer(SaliencyServer):
    """SNIP: keep the top ``1 - s_F`` of ``|g ⊙ w|`` at initialisation."""

    name = "snip"
    task = "snip"


class GraSPServer(SaliencyServer):
    """GraSP: remove the lowest ``s_F`` of ``(H g) ⊙ w`` at initialisation."""

    name = "grasp"
    task = "grasp"


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
        return lowest_masks(scores, 1.0 - density, per_layer=self.cfg.pruning.per_layer)

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
        importance = _prefixed(reply, IMPORTANCE_PREFIX, self.scope)
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


def _prefixed(reply: ClientReply, prefix: str, names: list[str]) -> dict[str, torch.Tensor]:
    missing = [n for n in names if prefix + n not in reply.payload.arrays]
    if missing:
        raise ValueError(
            f"client {reply.cid} sent no {prefix}* tensor for {', '.join(missing[:3])}"
        )
    return {n: reply.payload.arrays[prefix + n] for n in names}


# --------------------------------------------------------------------------- clients


class BaselineClient(ClientMethod):
    """Masked local training (OMP, random): the default client half."""


class SaliencyClient(ClientMethod):
    """Answers the SNIP (``"snip"``) and GraSP (``"grasp"``) setup tasks, then trains."""

    def handle(self, task: str, payload: Payload, data: ClientData) -> Payload:
        """Score tasks, or masked training."""
        if task in ("snip", "grasp"):
            return self.score(task, payload, data)
        return super().handle(task, payload, data)

    def score(self, task: str, payload: Payload, data: ClientData) -> Payload:
        """Scores of the received model on the first training batch."""
        model = self.model_for(payload)
        model.train()
        names = prunable_names(model, self.cfg.pruning.scope)
        seed = config_int(payload.config, "seed", 0)
        x, y = _first_batch(data, self.cfg.train.batch_size, seed)
        fn = snip_scores if task == "snip" else grasp_scores
        with torch.random.fork_rng(devices=[]):  # dropout draws, reproducibly
            torch.manual_seed(derive_seed(seed, data.cid))
            scores = fn(model, x, y, names)
        return Payload(
            arrays={SCORE_PREFIX + n: s for n, s in scores.items()},
            metrics={"num_examples": float(x.shape[0])},
        )


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
            masks = lowest_masks(
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


__all__ = [
    "IMPORTANCE_PREFIX",
    "SCORE_PREFIX",
    "BaselineClient",
    "BaselineServer",
    "GraSPServer",
    "OMPServer",
    "PruneFLClient",
    "PruneFLServer",
    "RandomServer",
    "SNIPServer",
    "SaliencyClient",
    "SaliencyServer",
    "collect_squared_grads",
    "grasp_scores",
    "lowest_masks",
    "param_costs",
    "snip_scores",
]
