"""Automatic structured pruning (Nguyen, Le, Avila 2024), methods.md §1, with the
hardware-aware widths, linear units and accuracy guard of issue 16.

After each round's FedAvg the server looks at every prunable layer of the global model
(:func:`fedprune.core.structured.structure`: convolutions, and hidden linear layers unless
``structured.prune_linear = false``), scores its output units by L1 norm ``n_j = sum
|W_j|`` (a unit's incoming weights) and keeps the units inside the band ``mu - k*sigma <=
n_j <= mu + k*sigma`` (``mu``, ``sigma``: mean and population standard deviation of the
layer's scores; ``structured.two_sided = false`` keeps everything above ``mu - k*sigma``).
At least one unit per layer survives (the one closest to the mean); the classifier is
never pruned. The proposal is the global model physically shrunk to those units
(:func:`fedprune.core.structured.shrink`).

Band ranking and rounded widths (``structured.round_to``)
    The band rule is a top-``m`` selection under one ranking: two-sided, units closest to
    the layer mean first (``|n_j - mu|`` ascending); one-sided, largest ``n_j`` first
    (ties by index). The kept count ``m`` is rounded to the nearest multiple of
    ``round_to`` (halves up, at least ``round_to``; a layer never grows and a layer the
    rule leaves whole stays whole: :func:`fedprune.core.structured.round_width`), and the
    top ``m'`` units of the same ranking are kept. ``round_to = 1`` is the paper.

Accept / stop rule (the authors' ``prune_model``; ``structured.max_drop = 0``)
    The proposal replaces the global model only if it has strictly fewer parameters; the
    patience counter then resets. Otherwise the model is kept and the counter goes up;
    after ``structured.patience`` consecutive rejections pruning stops for good. No
    proposal is made after round ``structured.max_prune_round`` (the paper's
    ``MAX_PRUNED_ROUND``), before ``structured.start_round``, or after the last round.
    Training continues to ``federation.rounds`` in every case.

Accuracy guard (``structured.max_drop > 0``)
    A proposal that saves parameters replaces the model *on trial*: the server keeps a
    snapshot of the last accepted architecture (its history, weights and server momentum).
    The proposal is trained for ``structured.recovery_rounds`` rounds; in the round after
    those (the *judge round*) every sampled client also receives the snapshot's weights
    and, before training, measures both models on its local validation split (its local
    test split: FEMNIST's per-writer LEAF split, or ``data.local_test_fraction``). The
    server pools the counts (sample-weighted, paired on the same samples). If the
    proposal's accuracy is more than ``max_drop`` below the snapshot's, the model, its
    history and momentum are restored exactly from the snapshot and the rejection counts
    against patience; otherwise the proposal is accepted (patience resets). Clients also
    count the samples only one of the two models gets right, which gives the drop's
    paired standard error ``se`` (``guard_drop_se``); with ``structured.guard_z = z > 0``
    the proposal is rolled back only if ``drop - z * se > max_drop``, so a drop that a
    few hundred validation samples cannot tell from noise does not end pruning. Rolled-back
    rounds stay in the record with the bytes they cost (the judge round's downlink carries
    both models). A guarded proposal is only made when its judge round is a round of the
    run. There is no server hold-out: the server half holds no data.

Adaptive k (``structured.k_schedule = "adaptive"``, needs the guard)
    ``k`` then steps by the factor ``K_STEP`` (0.7): a proposal that would save nothing is
    retried at once with ``k * K_STEP`` (a narrower band); after a guarded acceptance the
    next proposal (made in the same round) starts at ``k * K_STEP`` (bolder); after a
    rollback it starts at ``k / K_STEP`` and must keep strictly more parameters than the
    rejected proposal (a bracketed search on ``k`` between "saves nothing" and "as bold
    as the rejected one"). So the band rule's small steps at k = 2 grow while the guard
    accepts them, and shrink where accuracy starts to suffer. See docs/structured.md.

Weights of an accepted proposal
    ``structured.inherit_weights = true`` (default): the surviving units keep their
    trained weights (and the next layers the matching input channels), so the shrunk
    model computes what the full model computes with the removed units masked.
    ``false``: the authors' code, which builds the narrower model afresh; every layer is
    re-initialised (PyTorch's default init, seeded by run seed and round).

Residual networks (§1.5)
    For the paper's ResNet-7 only the stem and the first convolution of each block are
    scored; the blocks' output widths follow the stem's width (a width tie declared in
    :data:`fedprune.core.structured.WIDTH_TIES`).

Transport
    The shrunk architecture travels as JSON: ``self.history`` (compacted) goes out as
    ``config["arch"]`` and the client replays it on a fresh model before loading the
    weights. In a judge round the snapshot travels as ``guard/<tensor>`` arrays with its
    history in ``config["guard_arch"]``; clients answer with ``guard_correct_new``,
    ``guard_correct_old``, ``guard_total`` and the disagreements ``guard_new_only`` (the
    proposal right, the snapshot wrong) and ``guard_old_only``.

Where the paper is silent, chosen here: ties at the band edges are kept (``<=``); the
one-unit fallback keeps the unit nearest the mean; the proposal is judged on the
model's trainable parameter count (``count_params``, the engine's ``params``).
Metrics per round: ``accepted`` (1 when a proposal was accepted, 0 when one was
rejected or rolled back, absent otherwise), ``proposed`` (1 when a guarded proposal went on
trial), ``rolled_back``, ``proposal_params``, ``k``, ``patience``, ``pruning_active``,
``on_trial``, ``guard_accuracy``/``guard_baseline``/``guard_drop``/``guard_drop_se``/
``guard_disagreements``/``guard_samples`` in a judge round, and ``width/<layer>`` for
every prunable and tied layer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from fedprune.config import RunConfig
from fedprune.core.accounting import count_params
from fedprune.core.codec import Payload
from fedprune.core.sampling import derive_seed
from fedprune.core.structured import (
    compact_history,
    example_input,
    filter_scores,
    reinitialize,
    round_width,
    shrunk_copy,
    structure,
    widths,
)
from fedprune.errors import ConfigError
from fedprune.methods.base import (
    ClientMethod,
    ClientReply,
    ModelSpec,
    ServerMethod,
    state_of,
)

if TYPE_CHECKING:
    from fedprune.data.federation import ClientData

_REINIT_TAG = 0x5EED
GUARD_PREFIX = "guard/"
"""Prefix of the snapshot's tensors in a judge round's payload."""
GUARD_COUNTS = (
    "guard_correct_new",
    "guard_correct_old",
    "guard_new_only",
    "guard_old_only",
    "guard_total",
)
"""The counts a client reports in a judge round (metrics of its fit reply)."""
K_STEP = 0.7
"""Factor of the adaptive k schedule (see the module docstring)."""
K_MIN = 0.01
K_MAX = 100.0
_SEARCH_TRIES = 60


def band_ranking(scores: torch.Tensor, *, two_sided: bool = True) -> list[int]:
    """Unit indices, best first, under the band rule's ranking.

    Two-sided: closest to the layer mean first (``|n_j - mu|`` ascending); one-sided:
    largest score first. Ties by index. The band rule keeps a prefix of this ranking.
    """
    s = scores.detach().double()
    key = (s - s.mean()).abs() if two_sided else -s
    order = sorted(range(s.numel()), key=lambda j: (float(key[j]), j))
    return order


def band_keep(
    scores: torch.Tensor, k: float, *, two_sided: bool = True, round_to: int = 1
) -> list[int]:
    """Indices of the units inside the band ``mean +- k * std`` (the paper's rule).

    Parameters
    ----------
    scores : torch.Tensor
        One score (L1 norm) per unit, 1-D.
    k : float
        Half-width of the band in population standard deviations (> 0).
    two_sided : bool, default True
        Drop both tails (unusually small *and* unusually large units); ``False`` drops
        only the low tail.
    round_to : int, default 1
        Round the kept count to a multiple of this (see
        :func:`fedprune.core.structured.round_width`) and keep that many units of
        :func:`band_ranking`, best first.

    Returns
    -------
    list of int
        Sorted kept indices; never empty (if nothing is inside the band, the unit
        closest to the mean).
    """
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError("scores must be a non-empty 1-D tensor")
    if not k > 0:
        raise ValueError(f"k must be > 0, got {k}")
    s = scores.detach().double()
    mu = s.mean()
    sigma = s.std(unbiased=False)
    dev = s - mu
    # a relative slack so that equal scores (sigma ~ 0, rounding in the mean) all stay
    slack = 1e-12 * max(1.0, float(mu.abs()))
    bound = k * float(sigma) + slack
    ok = dev.abs() <= bound if two_sided else dev >= -bound
    kept = [int(i) for i in torch.nonzero(ok).flatten().tolist()]
    if not kept:
        kept = [int(dev.abs().argmin())]
    if round_to == 1:
        return kept
    m = round_width(len(kept), s.numel(), round_to)
    if m == len(kept):
        return kept
    return sorted(band_ranking(s, two_sided=two_sided)[:m])


class AutoStructuredServer(ServerMethod):
    """FedAvg, then the band rule + physical shrink; accepted if it saves parameters
    (and, with the guard, if federated validation accuracy holds)."""

    name = "autostructured"
    checkpoint_attrs: ClassVar[tuple[str, ...]] = (
        "patience",
        "active",
        "accepted_rounds",
        "k_now",
        "ceiling",
        "trial",
    )

    def __init__(self, cfg: RunConfig, spec: ModelSpec, model: nn.Module) -> None:
        super().__init__(cfg, spec, model)
        s = cfg.structured
        self.example = example_input(spec.input_shape)
        prunable, tied = structure(model, self.example, linear=s.prune_linear)
        if not prunable:
            what = (
                "convolution filters or hidden linear units"
                if s.prune_linear
                else ("convolution filters (structured.prune_linear = false)")
            )
            raise ConfigError(
                f"method autostructured prunes {what}, and model {spec.name!r} has none "
                "besides its classifier"
            )
        if s.k_schedule == "adaptive" and s.max_drop <= 0:
            raise ConfigError(
                "structured.k_schedule = 'adaptive' needs the accuracy guard "
                "(structured.max_drop > 0): without it the band narrows until one unit is left"
            )
        if s.guard_z > 0 and s.max_drop <= 0:
            raise ConfigError(
                "structured.guard_z > 0 weighs the accuracy guard's drop by its standard "
                "error: it needs the guard (structured.max_drop > 0)"
            )
        if s.max_drop > 0 and not (
            cfg.data.partition == "natural" or cfg.data.local_test_fraction > 0
        ):
            raise ConfigError(
                "structured.max_drop > 0 measures accuracy on clients' local validation "
                "splits: set data.local_test_fraction > 0 (or use the natural partition)"
            )
        self.layers = [g.layer for g in prunable]
        self.report_layers = [*self.layers, *(g.layer for g in tied)]
        self.patience = 0
        self.active = True
        self.accepted_rounds: list[int] = []
        self.k_now = float(s.k)
        """The band's half-width for the next proposal (changes only when adaptive)."""
        self.ceiling: int | None = None
        """Adaptive: a proposal must keep more parameters than this (the last rollback's)."""
        self.trial: dict[str, Any] | None = None
        """The proposal on trial under the guard: ``round`` (proposed after), ``judge``
        (judge round), ``k``, ``params`` and the snapshot to restore: ``history``,
        ``weights``, ``momentum``."""

    # -- proposals ----------------------------------------------------------------------
    @property
    def guarded(self) -> bool:
        """Whether the accuracy guard is on."""
        return self.cfg.structured.max_drop > 0

    def propose(self, model: nn.Module, k: float | None = None) -> dict[str, list[int]]:
        """The band rule (at ``k``, default the current one) on every prunable layer of
        ``model``, widths rounded to ``structured.round_to``: kept unit indices."""
        s = self.cfg.structured
        kk = self.k_now if k is None else k
        prunable, _ = structure(model, self.example, linear=s.prune_linear)
        return {
            g.layer: band_keep(
                filter_scores(model, g), kk, two_sided=s.two_sided, round_to=s.round_to
            )
            for g in prunable
        }

    def _candidate(self, k: float) -> tuple[nn.Module, list[dict[str, Any]], int]:
        proposal, entries = shrunk_copy(self.model, self.propose(self.model, k), self.example)
        return proposal, entries, count_params(proposal)

    def search(self) -> tuple[nn.Module, list[dict[str, Any]], int, float] | None:
        """The next proposal ``(model, history entries, params, k)``, or None.

        Fixed schedule: the band at the current ``k`` if it saves parameters. Adaptive:
        ``k`` narrows by :data:`K_STEP` while the proposal saves nothing, widens while it
        is as bold as a rolled-back one (:attr:`ceiling`), bisected (geometrically) once
        both are known; None when no ``k`` in ``[K_MIN, K_MAX]`` gives a proposal.
        """
        adaptive = self.cfg.structured.k_schedule == "adaptive"
        n_old = count_params(self.model)
        k = self.k_now
        k_lo: float | None = None  # too bold (as bold as the rejected proposal)
        k_hi: float | None = None  # saves nothing
        for _ in range(_SEARCH_TRIES):
            proposal, entries, n_new = self._candidate(k)
            if not entries or n_new >= n_old:
                k_hi = k
            elif adaptive and self.ceiling is not None and n_new <= self.ceiling:
                k_lo = k
            else:
                return proposal, entries, n_new, k
            if not adaptive:
                return None
            if k_lo is not None and k_hi is not None:
                if k_hi / k_lo < 1.01:
                    return None
                k = math.sqrt(k_lo * k_hi)
            else:
                k = k * K_STEP if k_lo is None else k / K_STEP
            if not K_MIN <= k <= K_MAX:
                return None
        return None  # pragma: no cover - the bracket closes long before

    def _switch(self, rnd: int, proposal: nn.Module, entries: list[dict[str, Any]]) -> None:
        if not self.cfg.structured.inherit_weights:
            reinitialize(proposal, derive_seed(self.cfg.seed, rnd, _REINIT_TAG))
        self.model = proposal
        self.history = compact_history([*self.history, *entries])
        if self.momentum is not None:  # velocity shapes no longer match
            self.momentum.velocity = {}

    def _reject(self) -> None:
        self.patience += 1
        if self.patience >= self.cfg.structured.patience:
            self.active = False

    def _may_propose(self, rnd: int) -> bool:
        s = self.cfg.structured
        if not (self.active and s.start_round <= rnd < self.cfg.federation.rounds):
            return False
        if self.guarded:  # its judge round must be a round of the run
            return rnd + s.recovery_rounds + 1 <= self.cfg.federation.rounds
        return True

    def _propose_now(self, rnd: int, metrics: dict[str, float]) -> None:
        found = self.search()
        if found is None:  # nothing that saves parameters: a rejected proposal
            metrics["accepted" if not self.guarded else "proposed"] = 0.0
            metrics["proposal_params"] = float(count_params(self.model))
            self._reject()
            return
        proposal, entries, n_new, k = found
        metrics["proposal_params"] = float(n_new)
        if not self.guarded:
            self._switch(rnd, proposal, entries)
            self.patience = 0
            self.accepted_rounds.append(rnd)
            metrics["accepted"] = 1.0
            return
        self.trial = {
            "round": rnd,
            "judge": rnd + self.cfg.structured.recovery_rounds + 1,
            "k": k,
            "params": n_new,
            "history": list(self.history),
            "weights": state_of(self.model),
            "momentum": self.momentum.state_dict() if self.momentum is not None else {},
        }
        self._switch(rnd, proposal, entries)
        metrics["proposed"] = 1.0
        metrics["k"] = k

    # -- the guard ----------------------------------------------------------------------
    def configure_fit(self, rnd: int, cids: list[int]) -> dict[int, Payload]:
        """FedAvg's payload; in a judge round with the snapshot's weights and history."""
        payloads = super().configure_fit(rnd, cids)
        if self.trial is None or rnd < self.trial["judge"]:
            return payloads
        (base,) = {id(p): p for p in payloads.values()}.values()
        arrays = dict(base.arrays)
        arrays.update({GUARD_PREFIX + k: v for k, v in self.trial["weights"].items()})
        config = {**base.config, "guard_arch": self.trial["history"]}
        payload = Payload(arrays=arrays, config=config, metrics=dict(base.metrics))
        return dict.fromkeys(cids, payload)

    def _judge(self, rnd: int, replies: list[ClientReply], metrics: dict[str, float]) -> None:
        assert self.trial is not None
        trial, self.trial = self.trial, None
        s = self.cfg.structured
        pooled = {k: sum(r.payload.metrics.get(k, 0.0) for r in replies) for k in GUARD_COUNTS}
        new, old = pooled["guard_correct_new"], pooled["guard_correct_old"]
        new_only, old_only = pooled["guard_new_only"], pooled["guard_old_only"]
        total = pooled["guard_total"]
        metrics["guard_samples"] = float(total)
        drop = se = 0.0
        if total > 0:
            metrics["guard_accuracy"] = new / total
            metrics["guard_baseline"] = old / total
            drop = (old - new) / total
            metrics["guard_drop"] = drop
            se = paired_drop_se(new_only, old_only, total)
            metrics["guard_drop_se"] = se
            metrics["guard_disagreements"] = float(new_only + old_only)
        adaptive = s.k_schedule == "adaptive"
        if drop - s.guard_z * se > s.max_drop:
            self.history = list(trial["history"])
            self.model = self.spec.rebuild(self.history)
            self.model.load_state_dict(trial["weights"])
            if self.momentum is not None:
                self.momentum.load_state_dict(trial["momentum"])
            metrics["accepted"] = 0.0
            metrics["rolled_back"] = 1.0
            if adaptive:
                self.ceiling = int(trial["params"])
                self.k_now = min(K_MAX, float(trial["k"]) / K_STEP)
            self._reject()
        else:
            metrics["accepted"] = 1.0
            self.accepted_rounds.append(int(trial["round"]))
            self.patience = 0
            if adaptive:
                self.ceiling = None
                self.k_now = max(K_MIN, float(trial["k"]) * K_STEP)

    def after_aggregate(self, rnd: int, replies: list[ClientReply]) -> dict[str, float]:
        """Judge a proposal on trial; propose (and maybe accept) a shrunk model; report."""
        s = self.cfg.structured
        metrics: dict[str, float] = {}
        judged_now = False
        if self.trial is not None and rnd >= self.trial["judge"]:
            self._judge(rnd, replies, metrics)
            judged_now = True
        if self.active and rnd > s.max_prune_round:
            self.active = False
        # after a rollback the fixed schedule waits a round (the same weights would give
        # the same proposal); the adaptive one retries at once with a gentler k
        retry = not (judged_now and metrics.get("rolled_back")) or s.k_schedule == "adaptive"
        if self.trial is None and retry and self._may_propose(rnd):
            self._propose_now(rnd, metrics)
        metrics["k"] = metrics.get("k", self.k_now)
        metrics["patience"] = float(self.patience)
        metrics["pruning_active"] = float(self.active)
        metrics["on_trial"] = float(self.trial is not None)
        for name, w in widths(self.model, self.report_layers).items():
            metrics[f"width/{name}"] = float(w)
        return metrics

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary of the pruning state."""
        return {
            "layers": self.layers,
            "widths": widths(self.model, self.report_layers),
            "accepted_rounds": self.accepted_rounds,
            "patience": self.patience,
            "pruning_active": self.active,
            "params": count_params(self.model),
            "k": self.k_now,
        }


def paired_drop_se(new_only: float, old_only: float, total: float) -> float:
    """Standard error of the accuracy drop of two models measured on the same ``total``
    samples, from the samples only one of them gets right (``new_only``: only the new
    model; ``old_only``: only the old one).

    Each sample's difference (old right − new right) is −1, 0 or +1; the drop is their
    mean, and this is the sample standard deviation of the differences over
    ``sqrt(total)`` (0 for fewer than two samples)."""
    if total < 2:
        return 0.0
    drop = (old_only - new_only) / total
    var = max(0.0, (new_only + old_only - total * drop * drop) / (total - 1))
    return math.sqrt(var / total)


def _right(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Per sample: whether ``model`` (in eval mode) predicts ``y``."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch]).argmax(dim=1) == y[i : i + batch]
                     for i in range(0, int(x.shape[0]), batch)])  # fmt: skip
    model.train(was)
    return out


class AutoStructuredClient(ClientMethod):
    """Dense local training of whatever architecture the server sends (``config["arch"]``);
    in a judge round, first measures the received model and the snapshot on the local
    validation split."""

    def fit(self, payload: Payload, data: ClientData) -> Payload:
        """FedAvg's fit; with ``config["guard_arch"]``, the guard's counts in the metrics."""
        if "guard_arch" not in payload.config:
            return super().fit(payload, data)
        raw = payload.config["guard_arch"] or []
        if not isinstance(raw, list):
            raise ValueError("payload config 'guard_arch' must be a list of history entries")
        n = len(GUARD_PREFIX)
        snap = {k[n:]: v for k, v in payload.arrays.items() if k.startswith(GUARD_PREFIX)}
        rest = {k: v for k, v in payload.arrays.items() if not k.startswith(GUARD_PREFIX)}
        config = {k: v for k, v in payload.config.items() if k != "guard_arch"}
        plain = Payload(arrays=rest, config=config, metrics=dict(payload.metrics))
        counts = dict.fromkeys(GUARD_COUNTS, 0.0)
        x, y = data.x_test, data.y_test
        if x is not None and y is not None and int(y.shape[0]) > 0:
            with torch.no_grad():
                new = _right(self.model_for(plain), x, y)
                old_model = self.spec.rebuild(raw)
                old_model.load_state_dict(snap)
                old = _right(old_model, x, y)
            counts["guard_correct_new"] = float(new.sum())
            counts["guard_correct_old"] = float(old.sum())
            counts["guard_new_only"] = float((new & ~old).sum())
            counts["guard_old_only"] = float((old & ~new).sum())
            counts["guard_total"] = float(y.shape[0])
        reply = super().fit(plain, data)
        reply.metrics.update(counts)
        return reply


__all__ = [
    "GUARD_COUNTS",
    "GUARD_PREFIX",
    "K_STEP",
    "AutoStructuredClient",
    "AutoStructuredServer",
    "band_keep",
    "band_ranking",
    "paired_drop_se",
]
