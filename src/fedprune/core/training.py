"""Local training and evaluation on in-memory tensors.

Batches are drawn by slicing pre-loaded tensors with a seeded permutation (no
``DataLoader``: the data sets here fit in memory and slicing is several times faster for
small models). Masked training keeps pruned weights exactly zero: their gradients are
zeroed before every optimiser step (so momentum and Adam moments never see them) and the
mask is re-applied after every step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from fedprune.config import TrainConfig


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one client's local training."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0
    """FedProx's proximal weight: the gradient of ``mu/2 * ||w - w_start||^2`` is added to
    every step's gradient (``w_start``: the weights training started from)."""

    @classmethod
    def from_config(cls, train: TrainConfig, lr: float | None = None) -> TrainSettings:
        """The settings a ``[train]`` section describes (``lr``: this round's, after
        decay). The one place the two are mapped; a test checks every field is covered."""
        return cls(
            epochs=train.local_epochs,
            batch_size=train.batch_size,
            lr=train.lr if lr is None else lr,
            optimizer=train.optimizer,
            momentum=train.momentum,
            weight_decay=train.weight_decay,
            prox_mu=train.prox_mu,
        )


@dataclass(frozen=True)
class TrainStats:
    """What local training reports back."""

    loss: float
    """Mean training loss over the last epoch's batches."""
    num_examples: int
    steps: int


def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """A fresh optimiser for one round of local training."""
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}")


@torch.no_grad()
def _fill_pruned(pruned: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for p, off in pruned:
        p.masked_fill_(off, 0.0)


@torch.no_grad()
def add_proximal(anchor: Sequence[tuple[torch.Tensor, torch.Tensor]], mu: float) -> None:
    """Add FedProx's ``mu * (w - w_start)`` to the gradient of every ``(w, w_start)``."""
    for p, start in anchor:
        if p.grad is not None:
            p.grad.add_(p - start, alpha=mu)


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``(x, y)`` for ``settings.epochs`` epochs.

    Parameters
    ----------
    model
        The client's copy of the global model.
    x, y
        The client's training tensors.
    settings
        Local hyper-parameters.
    masks
        If given, pruned entries are zeroed first and stay exactly zero.
    generator
        Seeded generator for the batch order (reproducibility).
    """
    n = int(x.shape[0])
    if n == 0:
        return TrainStats(loss=float("nan"), num_examples=0, steps=0)
    model.train()
    opt = make_optimizer(model, settings)
    # Computed once; the hot loop multiplies by float keep-masks (several times faster
    # than masked_fill). Pruned entries start at +0.0 and their gradients are zeroed,
    # so the optimiser (fresh each round) leaves them at +0.0; the multiply after each
    # step is a safety net, and a final masked_fill guarantees +0.0 (never -0.0).
    params = dict(model.named_parameters())
    pruned = [(params[n], ~m.bool()) for n, m in (masks or {}).items()]
    keep = [(p, (~off).to(p.dtype)) for p, off in pruned]
    _fill_pruned(pruned)
    # FedProx: the start (the received model, masked) anchors the proximal term
    anchor = [(p, p.detach().clone()) for p in params.values()] if settings.prox_mu > 0 else []
    bs = settings.batch_size
    steps = 0
    last_epoch_loss = 0.0
    for _ in range(settings.epochs):
        perm = torch.randperm(n, generator=generator)
        total = torch.zeros((), dtype=torch.float64)
        batches = math.ceil(n / bs)
        for b in range(batches):
            idx = perm[b * bs : (b + 1) * bs]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            add_proximal(anchor, settings.prox_mu)
            for p, k in keep:
                if p.grad is not None:
                    p.grad.mul_(k)
            opt.step()
            if keep:
                with torch.no_grad():
                    for p, k in keep:
                        p.mul_(k)
            total += loss.detach()
            steps += 1
        last_epoch_loss = float(total) / batches
    _fill_pruned(pruned)
    return TrainStats(loss=last_epoch_loss, num_examples=n, steps=steps)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean cross-entropy loss and top-1 accuracy of ``model`` on ``(x, y)``."""
    n = int(x.shape[0])
    if n == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    correct = 0
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
    model.train(was_training)
    return loss_sum / n, correct / n
