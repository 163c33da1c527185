"""AutoFLIP (Internò et al., arXiv 2405.10271): loss exploration, then hybrid pruning.

The method of the paper (methods.md §2.2) by default; ``autoflip.compat =
"authors-code"`` reproduces where the authors' code departs from it (§2.7, see the end).

**Exploration** (:meth:`AutoFlipServer.setup`, before round 1; its bytes are counted and
charged to round 1 by the engine). A seeded choice of ``max(1, floor(f * K))`` clients
(``f = autoflip.explore_fraction``) receive the *same* initial weights ``theta_0`` (task
``"explore"``). Each trains from ``theta_0`` with a fresh ``train.optimizer`` at
``autoflip.explore_lr`` (0 = ``train.lr``), batch ``train.batch_size``, for at most
``autoflip.explore_epochs`` epochs, stopping early when the mean training loss of an epoch
has not fallen below its best for ``autoflip.explore_patience`` epochs (the authors use
the last mini-batch's loss; the epoch mean is less noisy). The explorer uploads
``G_k = (theta_k - theta_0) ** 2`` for every trainable tensor, weights *and* biases
(``"guidance/<param>"``, float32, or float16 on the wire with ``engine.fp16``). The
server validates and keeps every explorer's ``G_k`` (needed again for the per-round
refresh) and averages them. Explorers are sent in groups of at most the engine's
parallelism (:attr:`~fedprune.methods.base.SetupIO.parallel`); after each group a
progress line (explorers done, mean epochs, time elapsed and left) and a setup
checkpoint, from which ``--resume`` continues with the remaining explorers. Explorer
``k``'s batches are seeded by the payload's seed and ``k`` only, so grouping and
resuming change no result. An in-process explorer logs every
:data:`EPOCH_REPORT_EVERY` epochs on :data:`~fedprune.methods.base.PROGRESS_LOGGER`.

**Pruning** (:mod:`fedprune.core.guidance`). With ``autoflip.structured`` the server first
removes, in every layer but the output layer, the ``floor(T_p * n)`` units (conv filters,
hidden linear neurons) of lowest mean normalised guidance, never all of a layer:
physically, through :mod:`fedprune.core.structured` (convolutions with
:func:`~fedprune.core.structured.shrink`, hidden linear layers with history entries
applied by :func:`~fedprune.core.structured.replay`). The history travels to the clients in
``config["arch"]``; the model and its FLOPs shrink. Every stored ``G_k`` is cut to the
new shapes by replaying the same history on a model holding ``G_k`` as its weights. Then
the unstructured mask keeps the entries whose per-tensor-normalised guidance exceeds the
global ``T_p``-quantile (weights and biases of every layer, first and output included).
The structured step happens once: removed units cannot come back, and repeating a
per-layer quantile every round would remove ``T_p`` of the remaining units each time.

**Training.** Plain rounds of the base class (FedAvg, or FedAvgM with
``federation.aggregation = "fedavgm"``; ``train.lr_decay`` per round). Clients train
under the mask, which travels explicitly (``mask = "explicit"``): the mask covers biases
(the ``"nonzero"`` convention only covers ``pruning.scope``), survives ``engine.fp16``
flushing tiny weights to zero, and allows regrowth (a regrown weight restarts at 0,
which the non-zero convention would read as pruned). It costs one bit per parameter on
the way down, counted like every byte.

**Per-round refresh** (``autoflip.refresh``, from round 2, in :meth:`configure_fit`, before
the broadcast): the round's mask is computed from the mean guidance of the round's
sampled clients that explored (none: the mask is kept), re-normalised and thresholded the
same way. With ``autoflip.regrow`` it replaces the mask in force (the authors' code path:
a new ``T_p``-quantile mask every round; regrown weights restart at 0). Without (the
default), the mask is monotone *under the same budget*: pruned weights stay pruned and
count towards the ``floor(T_p * N)`` pruned entries, so after the initial mask nothing
changes, and ``refresh_disagreement`` reports how much the round's own mask would have
pruned of the kept weights. Intersecting with each round's independent mask instead
(``PG_r & PG_{r-1}``, methods.md §2.2's optional monotone variant) prunes another
``T_p`` of the survivors every round: in a 30-round MNIST run (docs/autoflip.md) the
unstructured sparsity climbed to 93% and accuracy collapsed, so it is not offered. The
mask is applied to the global model and to the server momentum before it is sent.

Round metrics (``after_aggregate``): ``structured_sparsity`` (fraction of the units of
the prunable layers removed), ``structured_param_reduction`` (fraction of the initial
parameters removed by shrinking), ``unstructured_sparsity`` (masked fraction of the
current model's parameters), ``total_sparsity`` (1 - kept parameters / initial
parameters), ``train_flops`` and ``train_effective_flops`` (forward FLOPs per sample of
the model the round's clients trained: dense, and weighted by weight density), the
refresh counts, and in round 1 the exploration figures (``explorers``,
``explore_epochs_mean``, ``explore_sample_epochs`` = sum over explorers of training
samples x epochs run; ``explore_failed`` when explorers did not reply).

**``compat = "authors-code"``** (methods.md §2.7), everything counted as usual:

- *Chained explorers* (§2.7.1): one at a time in explorer order, explorer ``i`` starting
  from the weights explorer ``i - 1`` ended with (``theta_0`` for the first) and
  uploading its trained weights (``config["reply"] = "weights"``); the server computes
  each movement. Since the code's scouts all alias the final model and its base is
  re-saved before each explorer, every explorer's guidance then becomes the last sound
  explorer's movement ``(theta_final - theta_before_last) ** 2``.
- *Pre-training* (§2.7.2): the global model, from ``theta_0``, goes through the explorers
  in order (task ``"pretrain"``, :data:`PRETRAIN_EPOCHS` = 1 warm-up + 1 exploration epoch
  each, one optimiser); the result is round 1's global model. The server has no data, so
  each step costs the weights down and up.
- *No structured step*; the mask is applied to the pre-trained model once and *not
  enforced* (§2.7.3): clients train dense (``mask = "none"``), the server keeps no mask,
  refresh and regrowth do nothing; pruned weights regrow once a gradient reaches them
  (a filter zeroed whole with its bias never does: ReLU's gradient at 0 is 0;
  docs/autoflip.md).
  ``pretrain_clients``, ``pretrain_sample_epochs`` and ``initial_mask_sparsity`` are
  reported in round 1.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedprune.config import RunConfig
from fedprune.core import structured
from fedprune.core.accounting import ModelStatsCounter, count_params
from fedprune.core.codec import Payload
from fedprune.core.criteria import Guidance as GuidanceScore
from fedprune.core.guidance import (
    Guidance,
    squared_deviation,
    unit_layers,
    unit_scores,
    units_to_remove,
)
from fedprune.core.masks import Masks, apply_masks, count_kept, mask_sparsity
from fedprune.core.sampling import derive_seed
from fedprune.core.select import Ties, select_lowest
from fedprune.core.training import TrainSettings, make_optimizer
from fedprune.core.validation import check_reply
from fedprune.methods.base import (
    PROGRESS_LOGGER,
    ClientMethod,
    ClientReply,
    FederatedIO,
    ModelSpec,
    ServerMethod,
    SetupIO,
    client_generator,
    config_number,
    state_of,
)

if TYPE_CHECKING:
    from fedprune.data.federation import ClientData

GUIDANCE_PREFIX = "guidance/"
"""Name prefix of the guidance tensors an explorer uploads."""

_EXPLORE_STREAM = 0xA7F1
"""Seed stream of the explorer choice (independent of the round sampler)."""

_PRETRAIN_STREAM = 0xA7F2
"""Seed stream of the authors-code pre-training's batch order."""

PRETRAIN_EPOCHS = 2
"""authors-code pre-training epochs per explorer: the warm-up epoch and the one
exploration epoch of the authors' main-phase call (methods.md §2.7.2)."""

__all__ = [
    "EPOCH_REPORT_EVERY",
    "GUIDANCE_PREFIX",
    "PRETRAIN_EPOCHS",
    "AutoFlipClient",
    "AutoFlipServer",
    "explore_train",
    "trainable_names",
]


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters (what AutoFLIP guides and masks)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def explore_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    *,
    max_epochs: int,
    patience: int,
    generator: torch.Generator | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[int, float]:
    """Train in place with one optimiser for up to ``max_epochs``, early-stopped.

    Stops after ``patience`` consecutive epochs whose mean training loss is not below
    the best so far. Returns ``(epochs run, mean loss of the last epoch)``. ``on_epoch``
    is called after every epoch with the epochs run so far and that epoch's mean loss.
    """
    n = int(x.shape[0])
    if n == 0:
        return 0, float("nan")
    model.train()
    opt = make_optimizer(model, settings)
    bs = settings.batch_size
    batches = math.ceil(n / bs)
    best = math.inf
    stale = 0
    loss_epoch = math.nan
    epochs = 0
    for _ in range(max_epochs):
        perm = torch.randperm(n, generator=generator)
        total = torch.zeros((), dtype=torch.float64)
        for b in range(batches):
            idx = perm[b * bs : (b + 1) * bs]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.detach()
        epochs += 1
        loss_epoch = float(total) / batches
        if on_epoch is not None:
            on_epoch(epochs, loss_epoch)
        if loss_epoch < best:
            best, stale = loss_epoch, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return epochs, loss_epoch


class AutoFlipServer(ServerMethod):
    """Exploration, guidance-driven structured + unstructured pruning, per-round refresh."""

    name = "autoflip"
    mask_mode: ClassVar[str] = "explicit"
    checkpoint_attrs: ClassVar[tuple[str, ...]] = (
        "guidance",
        "explorers",
        "exploration",
        "explore_rejections",
        "unit_totals",
        "removed_units",
        "explore_failures",
        "explore_chain",
        "pretraining",
        "pretrain_skipped",
    )

    def __init__(self, cfg: RunConfig, spec: ModelSpec, model: nn.Module) -> None:
        super().__init__(cfg, spec, model)
        self.af = cfg.autoflip
        self.ties: Ties = "position" if self.af.threshold_rule == "share" else "threshold"
        """How the T_p quantile treats ties (``autoflip.threshold_rule``)."""
        self.example = structured.example_input(spec.input_shape)
        self.initial_params = count_params(model)
        self.guidance: dict[int, Guidance] = {}
        """Explorer id -> its guidance, cut to the current architecture."""
        self.explorers: list[int] = []
        self.exploration: dict[int, dict[str, float]] = {}
        """Explorer id -> ``num_examples``, ``epochs`` and ``loss`` of its exploration."""
        self.explore_rejections: dict[int, str] = {}
        self.explore_failures: dict[int, str] = {}
        """Explorer id -> why no reply came back (the engine dropped the client)."""
        self.authors = self.af.compat == "authors-code"
        """``autoflip.compat = "authors-code"`` (see the module docstring)."""
        self.explore_chain: dict[str, torch.Tensor] | None = None
        """authors-code: the weights the next chained explorer starts from."""
        self.pretraining: dict[int, dict[str, float]] = {}
        """authors-code: explorer id -> ``num_examples``, ``epochs``, ``loss`` of its
        pre-training step of the global model."""
        self.pretrain_skipped: dict[int, str] = {}
        """authors-code: explorer id -> why its pre-training step was not applied."""
        self.unit_totals: dict[str, int] = {}
        """Prunable layer -> units it had initially."""
        self.removed_units: dict[str, list[int]] = {}
        """Prunable layer -> indices (in the initial layer) of the units removed."""
        self._stats = ModelStatsCounter(spec.input_shape)
        self._index: dict[str, torch.Tensor] = {}
        self._index_key = ""

    # -- exploration -----------------------------------------------------------------
    def choose_explorers(self, num_clients: int) -> list[int]:
        """``max(1, floor(f * K))`` distinct clients, seeded by ``seed`` (sorted)."""
        k = max(1, min(num_clients, math.floor(self.af.explore_fraction * num_clients + 1e-9)))
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, _EXPLORE_STREAM]))
        return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))

    def setup(self, io: FederatedIO) -> None:
        """Exploration from ``theta_0``, then the initial structured and unstructured pruning.

        Explorers are sent in groups of at most the engine's parallelism
        (:attr:`SetupIO.parallel`); after each group a progress line and a setup
        checkpoint. On a resume from a setup checkpoint the explorers already done (their
        guidance, figures, rejections and failures are restored) are skipped. Explorer
        ``k`` trains with seeds from the payload's seed and ``k`` only, so the grouping
        and a resume do not change any result. With ``compat = "authors-code"`` the
        explorers are chained and the global model is pre-trained (module docstring).
        """
        ctl = SetupIO.of(io)
        self.explorers = self.choose_explorers(io.num_clients)
        if self.authors:
            self.explore_chained(ctl)
            self.pretrain(ctl)
        else:
            self.explore(ctl)
        self.report(**self.exploration_figures())
        if not self.guidance:  # nobody explored soundly: stay dense, say so
            return
        if self.authors:  # §2.7.3: applied to the global model once, never enforced
            masks = self.mask_from(list(self.guidance.values()))
            apply_masks(self.model, masks)
            self.report(initial_mask_sparsity=mask_sparsity(masks))
            return
        if self.af.structured:
            self.structured_step(self.guidance_scores(list(self.guidance.values())))
        self.install(self.mask_from(list(self.guidance.values())), monotone=False)

    def explored(self) -> set[int]:
        """Explorers whose exploration is over: sound, rejected or failed."""
        return {*self.exploration, *self.explore_rejections, *self.explore_failures}

    def _explore_payload(self, arrays: dict[str, torch.Tensor], *, weights: bool) -> Payload:
        config: dict[str, Any] = {
            "task": "explore",
            "seed": derive_seed(self.cfg.seed, 0),
            "lr": self.af.explore_lr or self.cfg.train.lr,
            "epochs": self.af.explore_epochs,
            "patience": self.af.explore_patience,
        }
        if weights:
            config["reply"] = "weights"
        return Payload(arrays=arrays, config=config)

    def _meter(self, ctl: SetupIO, phase: str, todo: int, epochs: int, how: str) -> _Meter:
        """A progress meter over the explorers, after its first line."""
        total = len(self.explorers)
        if todo and todo < total:
            ctl.progress(f"{phase}: resuming with {total - todo}/{total} explorers done")
        elif todo:
            ctl.progress(f"{phase}: {total} explorers, up to {epochs} epochs each, {how}")
        return _Meter(ctl, phase, total, total - todo)

    def _epochs_note(self) -> str:
        if not self.exploration:
            return ""
        mean = float(np.mean([e["epochs"] for e in self.exploration.values()]))
        return f" (mean {mean:.0f} epochs)"

    def explore(self, ctl: SetupIO) -> None:
        """The paper's exploration: every explorer trains from ``theta_0`` (the global
        model, untouched) and uploads its guidance; groups of ``ctl.group_size``."""
        names = trainable_names(self.model)
        shapes = {n: p.shape for n, p in self.model.named_parameters()}
        payload = self._explore_payload(state_of(self.model), weights=False)
        done = self.explored()
        todo = [c for c in self.explorers if c not in done]
        size = ctl.group_size(len(todo))
        meter = self._meter(
            ctl, "exploration", len(todo), self.af.explore_epochs, f"{size} at a time"
        )
        for i in range(0, len(todo), size):
            group = todo[i : i + size]
            replies = ctl.exchange("explore", dict.fromkeys(group, payload))
            for r in replies:
                reason = _check_guidance(r, names, shapes)
                if reason is not None:
                    self.explore_rejections[r.cid] = reason
                    continue
                self.guidance[r.cid] = {
                    n: r.payload.arrays[GUIDANCE_PREFIX + n].float() for n in names
                }
                self._note_exploration(r)
            self._note_failures(group, replies)
            ctl.checkpoint()
            meter.step(len(group), self._epochs_note())

    def _note_exploration(self, r: ClientReply) -> None:
        m = r.payload.metrics
        self.exploration[r.cid] = {
            "num_examples": float(m.get("num_examples", 0.0)),
            "epochs": float(m.get("explore_epochs", 0.0)),
            "loss": float(m.get("train_loss", math.nan)),
        }

    def _note_failures(self, group: list[int], replies: list[ClientReply]) -> None:
        got = {r.cid for r in replies}
        for c in group:
            if c not in got:
                self.explore_failures[c] = "no reply (the client failed or was dropped)"

    def explore_chained(self, ctl: SetupIO) -> None:
        """authors-code (§2.7.1): explorer ``i`` starts from the weights explorer ``i-1``
        ended with (one at a time, in explorer order; a rejected or failed explorer
        leaves the chain where it was) and uploads those weights; the server computes
        each explorer's own movement. At the end every explorer's guidance becomes the
        last sound explorer's movement, as the authors' aliased scouts make it."""
        names = trainable_names(self.model)
        if self.explore_chain is None:
            self.explore_chain = state_of(self.model)
        done = self.explored()
        todo = [c for c in self.explorers if c not in done]
        meter = self._meter(
            ctl, "exploration", len(todo), self.af.explore_epochs, "one at a time, chained"
        )
        for cid in todo:
            start = self.explore_chain
            replies = ctl.exchange("explore", {cid: self._explore_payload(start, weights=True)})
            self._note_failures([cid], replies)
            for r in replies:
                reason = check_reply(r.payload, start, None, self.validation_policy())
                if reason is not None:
                    self.explore_rejections[cid] = reason
                    continue
                trained = {k: r.payload.arrays[k].clone() for k in start}
                self.guidance[cid] = squared_deviation(trained, start, names)
                self._note_exploration(r)
                self.explore_chain = trained
            ctl.checkpoint()
            meter.step(1, self._epochs_note())
        if self.guidance:  # idempotent: a resume may pass here twice
            last = self.guidance[next(reversed(self.guidance))]
            self.guidance = dict.fromkeys(self.guidance, last)

    def pretrain(self, ctl: SetupIO) -> None:
        """authors-code (§2.7.2): the global model, from ``theta_0``, is trained in place
        through the explorers in order, :data:`PRETRAIN_EPOCHS` epochs each (the warm-up
        epoch and the exploration epoch, one optimiser): a chain of ``"pretrain"`` tasks
        whose result becomes the global model. The server has no data, so each step
        costs the weights down and up, counted like every byte."""
        todo = [c for c in self.explorers if c not in self.pretraining]
        todo = [c for c in todo if c not in self.pretrain_skipped]
        meter = self._meter(ctl, "pre-training", len(todo), PRETRAIN_EPOCHS, "chained")
        config: dict[str, Any] = {
            "task": "pretrain",
            "seed": derive_seed(self.cfg.seed, 0, _PRETRAIN_STREAM),
            "lr": self.af.explore_lr or self.cfg.train.lr,
            "epochs": PRETRAIN_EPOCHS,
        }
        for cid in todo:
            start = state_of(self.model)
            replies = ctl.exchange("pretrain", {cid: Payload(arrays=start, config=config)})
            if not replies:
                self.pretrain_skipped[cid] = "no reply (the client failed or was dropped)"
            for r in replies:
                reason = check_reply(r.payload, start, None, self.validation_policy())
                if reason is not None:
                    self.pretrain_skipped[cid] = reason
                    continue
                self.model.load_state_dict({k: r.payload.arrays[k] for k in start})
                m = r.payload.metrics
                self.pretraining[cid] = {
                    "num_examples": float(m.get("num_examples", 0.0)),
                    "epochs": float(m.get("pretrain_epochs", 0.0)),
                    "loss": float(m.get("train_loss", math.nan)),
                }
            ctl.checkpoint()
            meter.step(1)

    def exploration_figures(self) -> dict[str, float]:
        """Round 1's exploration (and, authors-code, pre-training) figures."""
        out: dict[str, float] = {
            "explorers": float(len(self.guidance)),
            "explore_rejected": float(len(self.explore_rejections)),
        }
        if self.explore_failures:
            out["explore_failed"] = float(len(self.explore_failures))
        if self.exploration:
            ex = self.exploration.values()
            out["explore_epochs_mean"] = float(np.mean([e["epochs"] for e in ex]))
            out["explore_sample_epochs"] = float(sum(e["epochs"] * e["num_examples"] for e in ex))
            out["explore_loss"] = float(np.mean([e["loss"] for e in ex]))
        if self.authors:
            pre = self.pretraining.values()
            out["pretrain_clients"] = float(len(self.pretraining))
            out["pretrain_sample_epochs"] = float(sum(e["epochs"] * e["num_examples"] for e in pre))
        return out

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """As the base class; checkpoints written before the setup checkpoints existed
        lack the failure and authors-code attributes (empty then)."""
        defaults: dict[str, Any] = {
            "explore_failures": {},
            "explore_chain": None,
            "pretraining": {},
            "pretrain_skipped": {},
        }
        super().restore_state({**defaults, **state})

    # -- pruning ----------------------------------------------------------------------
    def structured_step(self, normalised: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
        """Remove the lowest-scoring ``floor(T_p * n)`` units of every prunable layer.

        Convolution groups are shrunk with :func:`structured.shrink` (a group's unit score
        is the mean over its member convolutions); hidden linear layers with history
        entries replayed by :func:`structured.replay`. Stored guidance is cut to the new
        shapes. Returns the history entries applied (also appended to ``self.history``).
        """
        prunable, _ = structured.structure(self.model, self.example)
        modules = dict(self.model.named_modules())
        by_module = {u.module: u for u in unit_layers(self.model)}
        conv_members = {m for g in prunable for m in g.members}
        linear = [
            u
            for name, u in by_module.items()
            if isinstance(modules[name], nn.Linear) and name not in conv_members
        ]
        scores: dict[str, torch.Tensor] = {}
        for g in prunable:
            members = [by_module[m] for m in g.members if m in by_module]
            if not members:
                continue
            per = unit_scores(normalised, members)
            scores[g.layer] = torch.stack([per[m.module] for m in members]).mean(0)
        scores.update(unit_scores(normalised, linear))
        removed = units_to_remove(scores, self.af.threshold)
        self.unit_totals = {name: int(s.numel()) for name, s in scores.items()}
        self.removed_units = {name: idx for name, idx in removed.items() if idx}
        keep = {
            name: [i for i in range(self.unit_totals[name]) if i not in set(idx)]
            for name, idx in self.removed_units.items()
        }
        conv_keep = {k: v for k, v in keep.items() if k not in {u.module for u in linear}}
        entries = structured.shrink(self.model, conv_keep, self.example)
        linear_entries: list[dict[str, Any]] = [
            {"layer": u.module, "width": self.unit_totals[u.module], "keep": keep[u.module]}
            for u in linear
            if u.module in keep
        ]
        if linear_entries:
            structured.replay(self.model, linear_entries, self.example)
        applied = [*entries, *linear_entries]
        if applied:
            self.history = [*self.history, *applied]
            self.guidance = {cid: self.cut(g) for cid, g in self.guidance.items()}
            if self.momentum is not None:
                self.momentum.velocity = {}
        return applied

    def cut(self, guidance: Mapping[str, torch.Tensor]) -> Guidance:
        """Initial-architecture guidance cut to the current architecture (same history)."""
        if not self.history:
            return dict(guidance)
        index = self.index_map()
        return {n: t.flatten()[index[n]].clone() for n, t in guidance.items()}

    def index_map(self) -> dict[str, torch.Tensor]:
        """Parameter -> for each entry of the current tensor, its flat index in the initial one.

        Found by replaying ``self.history`` once on a float64 copy of the initial
        architecture whose every parameter holds its own flat positions (exact below
        2**53), so cutting a tensor set to the current shapes is one gather per tensor.
        """
        key = structured.history_key(self.history)
        if self._index_key != key:
            holder = self.spec.build(seed=0).double()
            with torch.no_grad():
                for p in holder.parameters():
                    p.copy_(torch.arange(p.numel(), dtype=torch.float64).view_as(p))
            structured.replay(holder, self.history, self.example.double())
            self._index = {n: p.detach().round().long() for n, p in holder.named_parameters()}
            self._index_key = key
        return self._index

    def guidance_scores(self, guidances: list[Guidance]) -> dict[str, torch.Tensor]:
        """The mean guidance, normalised per tensor (``autoflip.normalisation``)."""
        return GuidanceScore(self.af.normalisation)(guidances)

    def mask_from(self, guidances: list[Guidance]) -> Masks:
        """Normalise the mean guidance per tensor, keep what exceeds the ``T_p``-quantile."""
        return select_lowest(self.guidance_scores(guidances), self.af.threshold, ties=self.ties)

    def install(self, masks: Masks, *, monotone: bool) -> tuple[int, int]:
        """Make ``masks`` the mask in force; return ``(regrown, newly pruned)`` counts."""
        masks = {n: m.bool() for n, m in masks.items()}
        old = self.masks
        if monotone and old is not None:
            masks = {n: m & old[n] for n, m in masks.items()}
        regrown = newly = 0
        if old is not None:
            regrown = sum(int((masks[n] & ~old[n]).sum()) for n in masks)
            newly = sum(int((old[n] & ~masks[n]).sum()) for n in masks)
        self.masks = masks
        apply_masks(self.model, masks)
        if self.momentum is not None:
            self.momentum.mask_velocity(masks)
        return regrown, newly

    def refresh(self, cids: list[int]) -> None:
        """Recompute the mask from the guidance of the round's clients that explored.

        With ``regrow`` the round's mask replaces the one in force. Without, the mask is
        monotone under the ``T_p`` budget (:func:`~fedprune.core.select.select_lowest`
        with ``current``): the pruned entries stay pruned and already make up the
        ``floor(T_p * N)`` pruned entries, so the mask only changes when it prunes fewer
        (never, after the initial mask). ``refresh_disagreement`` reports the fraction of
        the kept entries the round's own mask would have pruned.
        """
        have = [c for c in cids if c in self.guidance]
        self.report(explorers_in_round=float(len(have)))
        if not have or self.masks is None:
            self.report(mask_refreshed=0.0)
            return
        values = self.guidance_scores([self.guidance[c] for c in have])
        own = select_lowest(values, self.af.threshold, ties=self.ties)
        kept = count_kept(self.masks)
        would = sum(int((self.masks[n] & ~own[n]).sum()) for n in own)
        new = (
            own
            if self.af.regrow
            else select_lowest(values, self.af.threshold, current=self.masks, ties=self.ties)
        )
        regrown, newly = self.install(new, monotone=not self.af.regrow)
        self.report(
            mask_refreshed=1.0,
            regrown=float(regrown),
            newly_pruned=float(newly),
            refresh_disagreement=would / kept if kept else 0.0,
        )

    # -- rounds -------------------------------------------------------------------------
    def configure_fit(self, rnd: int, cids: list[int]) -> dict[int, Payload]:
        """Refresh the mask (from round 2), apply it, then broadcast model and mask."""
        if self.af.refresh and rnd > 1 and not self.authors:
            self.refresh(cids)
        stats = self._stats(self.model)
        self.report(
            train_flops=float(stats.flops), train_effective_flops=float(stats.effective_flops)
        )
        return super().configure_fit(rnd, cids)

    def round_config(self, rnd: int) -> dict[str, Any]:
        """The base class's, with ``mask = "none"`` in authors-code (clients train dense)."""
        config = super().round_config(rnd)
        if self.authors:
            config["mask"] = "none"
        return config

    def after_aggregate(self, rnd: int, replies: list[ClientReply]) -> dict[str, float]:
        """The round's pruning metrics (see the module docstring)."""
        return self.sparsity_report()

    def sparsity_report(self) -> dict[str, float]:
        """Structured, unstructured and total sparsity of the global model now."""
        total_units = sum(self.unit_totals.values())
        removed = sum(len(v) for v in self.removed_units.values())
        params = count_params(self.model)
        kept = count_kept(self.masks) if self.masks is not None else params
        return {
            "structured_sparsity": removed / total_units if total_units else 0.0,
            "structured_param_reduction": 1.0 - params / self.initial_params,
            "unstructured_sparsity": mask_sparsity(self.masks) if self.masks else 0.0,
            "total_sparsity": 1.0 - kept / self.initial_params,
        }


def _check_guidance(
    reply: ClientReply, names: list[str], shapes: Mapping[str, torch.Size]
) -> str | None:
    """Why an explorer's reply is unusable (None if it is sound)."""
    n = reply.payload.metrics.get("num_examples")
    if n is None or not math.isfinite(n) or n < 1:
        return f"num_examples {n!r} is not a positive count"
    for name in names:
        t = reply.payload.arrays.get(GUIDANCE_PREFIX + name)
        if t is None:
            return f"{GUIDANCE_PREFIX}{name} is missing"
        if t.shape != shapes[name]:
            want = tuple(shapes[name])
            return f"{GUIDANCE_PREFIX}{name} has shape {tuple(t.shape)}, expected {want}"
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            return f"{GUIDANCE_PREFIX}{name} is not finite floating point"
        if bool((t < 0).any()):
            return f"{GUIDANCE_PREFIX}{name} has negative values"
    return None


class AutoFlipClient(ClientMethod):
    """Answers ``"explore"`` (guidance from ``theta_0``, or the trained weights when the
    config says ``reply = "weights"``) and ``"pretrain"`` (authors-code); trains masked
    otherwise."""

    def handle(self, task: str, payload: Payload, data: ClientData) -> Payload:
        """``"explore"``, ``"pretrain"`` or masked ``"fit"``."""
        if task == "explore":
            return self.explore(payload, data)
        if task == "pretrain":
            return self.pretrain(payload, data)
        return super().handle(task, payload, data)

    def explore(self, payload: Payload, data: ClientData) -> Payload:
        """Train from the received weights, early-stopped; upload ``(theta_k - theta_0)**2``
        (or ``theta_k`` itself with ``config["reply"] = "weights"``: the chained explorers
        of authors-code). Every :data:`EPOCH_REPORT_EVERY` epochs a line on the
        :data:`~fedprune.methods.base.PROGRESS_LOGGER` logger (INFO)."""
        model = self.model_for(payload)
        base = state_of(model)
        settings = self.settings(payload)  # lr from the payload: the exploration lr
        gen = client_generator(payload, data.cid)
        max_epochs = max(1, int(config_number(payload.config, "epochs", 1)))
        epochs, loss = explore_train(
            model,
            data.x_train,
            data.y_train,
            settings,
            max_epochs=max_epochs,
            patience=max(1, int(config_number(payload.config, "patience", 1))),
            generator=gen,
            on_epoch=_epoch_reporter(f"explorer {data.cid}", max_epochs),
        )
        metrics = {
            "num_examples": float(data.x_train.shape[0]),
            "train_loss": loss,
            "explore_epochs": float(epochs),
        }
        if payload.config.get("reply") == "weights":
            return Payload(arrays=state_of(model), metrics=metrics)
        names = trainable_names(model)
        g = squared_deviation(state_of(model), base, names)
        return Payload(arrays={GUIDANCE_PREFIX + n: t for n, t in g.items()}, metrics=metrics)

    def pretrain(self, payload: Payload, data: ClientData) -> Payload:
        """authors-code: train the received global model ``config["epochs"]`` epochs with
        one optimiser (no early stop) and upload the weights."""
        model = self.model_for(payload)
        epochs = max(1, int(config_number(payload.config, "epochs", 1)))
        ran, loss = explore_train(
            model,
            data.x_train,
            data.y_train,
            self.settings(payload),
            max_epochs=epochs,
            patience=epochs,
            generator=client_generator(payload, data.cid),
        )
        return Payload(
            arrays=state_of(model),
            metrics={
                "num_examples": float(data.x_train.shape[0]),
                "train_loss": loss,
                "pretrain_epochs": float(ran),
            },
        )


EPOCH_REPORT_EVERY = 10
"""An explorer reports its progress every this many epochs (when anyone listens)."""

_progress_log = logging.getLogger(PROGRESS_LOGGER)


def _epoch_reporter(label: str, total: int) -> Callable[[int, float], None] | None:
    """An ``on_epoch`` that logs every :data:`EPOCH_REPORT_EVERY` epochs (None when the
    progress logger would drop INFO records: library use)."""
    if not _progress_log.isEnabledFor(logging.INFO):
        return None

    def report(epoch: int, loss: float) -> None:
        if epoch % EPOCH_REPORT_EVERY == 0 and epoch < total:
            _progress_log.info("  %s: epoch %d/%d, loss %.4f", label, epoch, total, loss)

    return report


class _Meter:
    """Progress lines of a setup phase: done/total, elapsed, and the time left estimated
    from the time per explorer so far (in this process)."""

    def __init__(self, ctl: SetupIO, phase: str, total: int, done: int) -> None:
        self.ctl, self.phase, self.total, self.done = ctl, phase, total, done
        self.t0 = time.perf_counter()
        self.new = 0

    def step(self, n: int, note: str = "") -> None:
        self.done += n
        self.new += n
        elapsed = time.perf_counter() - self.t0
        text = (
            f"{self.phase}: {self.done}/{self.total} explorers done{note}, "
            f"{duration(elapsed)} elapsed"
        )
        left = self.total - self.done
        if left > 0:
            text += f", about {duration(elapsed / self.new * left)} left"
        self.ctl.progress(text)


def duration(seconds: float) -> str:
    """``42s``, ``2m10s`` or ``1h02m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
