"""Importance criteria: small objects that score entries (or units) for the selector.

A score is a tensor per parameter name; higher means more worth keeping. Feed the
scores to :func:`fedprune.core.select.select_lowest`, which prunes the lowest ones.

=====================  ====================================  ==============================
criterion              score                                 called with
=====================  ====================================  ==============================
:class:`Magnitude`     ``|w|`` (float32)                     the named weights
:class:`RandomOrder`   position in one seeded permutation    the named weights (shapes)
:class:`FilterL1`      per output unit ``sum |W[u, ...]|``   the named weights
:class:`SNIP`          ``|g ⊙ w|`` on one batch              model, batch, names
:class:`GraSP`         ``(H g) ⊙ w`` on one batch            model, batch, names
:class:`Guidance`      normalised mean of explorers' ``G_k`` the explorers' guidance
=====================  ====================================  ==============================

:class:`TensorCriterion` and :class:`BatchCriterion` are the two call signatures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedprune.core.guidance import mean_guidance, normalise

Scores = dict[str, torch.Tensor]
"""Parameter name -> scores (per entry, or per unit for :class:`FilterL1`)."""

__all__ = [
    "SNIP",
    "BatchCriterion",
    "FilterL1",
    "GraSP",
    "Guidance",
    "Magnitude",
    "RandomOrder",
    "Scores",
    "TensorCriterion",
]


class TensorCriterion(Protocol):
    """Scores computed from the named tensors alone."""

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> Scores: ...


class BatchCriterion(Protocol):
    """Scores of a model's named parameters on one batch."""

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: Sequence[str]
    ) -> Scores: ...


@dataclass(frozen=True)
class Magnitude:
    """``|w|`` as float32 (FedSparsify's purge, OMP)."""

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> Scores:
        """Absolute values of each tensor."""
        return {n: t.detach().abs().float() for n, t in tensors.items()}


@dataclass(frozen=True)
class RandomOrder:
    """Rank of each entry in one permutation of all entries, drawn from ``seed``.

    The permutation runs over the tensors' entries concatenated in mapping order; an
    entry's score is its position in it, so the lowest ``k`` are a prefix and the masks
    of increasing sparsity are nested. Only the shapes of the tensors are used.
    """

    seed: int

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> Scores:
        """int64 ranks, one per entry."""
        sizes = [t.numel() for t in tensors.values()]
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(sum(sizes), generator=gen)
        rank = torch.empty_like(perm)
        rank[perm] = torch.arange(perm.numel())
        return {
            n: chunk.view(t.shape)
            for (n, t), chunk in zip(tensors.items(), torch.split(rank, sizes), strict=True)
        }


@dataclass(frozen=True)
class FilterL1:
    """Per output unit (dim 0): ``sum |W[u, ...]|`` in float64 (filter L1 norms)."""

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> Scores:
        """One 1-D score tensor per weight, of length ``shape[0]``."""
        return {n: t.detach().abs().double().flatten(1).sum(1) for n, t in tensors.items()}


def _named(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    params = dict(model.named_parameters())
    return [params[n] for n in names]


@dataclass(frozen=True)
class SNIP:
    """SNIP saliency ``|∂L/∂w ⊙ w|`` (Lee et al. 2019) on one batch.

    ``L`` is the mean cross-entropy of ``model(x)`` against ``y``; the model's training
    flag is used as it is.
    """

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: Sequence[str]
    ) -> Scores:
        """float32 saliency of each named parameter."""
        ws = _named(model, names)
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, ws, allow_unused=True)
        out: Scores = {}
        for n, w, g in zip(names, ws, grads, strict=True):
            g = torch.zeros_like(w) if g is None else g
            out[n] = (g * w).abs().detach().float()
        return out


@dataclass(frozen=True)
class GraSP:
    """GraSP scores ``(H g) ⊙ w`` (Wang et al. 2020) on one batch; low ones are removed.

    ``g`` and ``H`` are the gradient and Hessian of the mean cross-entropy with respect
    to the named parameters only (other parameters are constants). ``Hg`` comes from a
    double backward: ``z = Σ g · stop_grad(g)``, ``Hg = ∂z/∂w``.
    """

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: Sequence[str]
    ) -> Scores:
        """float32 scores of each named parameter (signed)."""
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
        out: Scores = {}
        for n, w, hg in zip(names, ws, hgs, strict=True):
            hg = torch.zeros_like(w) if hg is None else hg
            out[n] = (hg * w).detach().float()
        return out


@dataclass(frozen=True)
class Guidance:
    """AutoFLIP: the explorers' mean guidance, normalised per tensor.

    See :mod:`fedprune.core.guidance` (``normalisation`` is ``"minmax"`` or ``"robust"``).
    """

    normalisation: str = "minmax"

    def __call__(self, guidances: Sequence[Mapping[str, torch.Tensor]]) -> Scores:
        """``normalise(mean_guidance(guidances))``."""
        return normalise(mean_guidance(guidances), self.normalisation)
