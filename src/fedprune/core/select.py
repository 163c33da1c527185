"""The one mask selector: prune the lowest-scored entries, exactly, never reviving.

Every pruning method turns *scores* (one number per entry, or per unit; higher means
more worth keeping; :mod:`fedprune.core.criteria` computes them) into boolean keep-masks
with :func:`select_lowest`:

- **Budget.** ``k = floor(sparsity * N)`` (:func:`prune_count`), ``N`` = the entries of
  all tensors together (one global ranking, the default) or of each tensor on its own
  (``per_layer``). The budget is a *total*: entries already pruned count towards it.
- **Ranking.** Already-pruned entries (``current`` is ``False``) rank below *every* live
  entry, whatever their score, so the budget is spent on them first. Then live entries
  by score, NaN as ``-inf`` (pruned first), and ties broken by position (flat order over
  the tensors in ``scores`` order). Ranking pruned entries by a masked score instead
  (``|w| * mask`` = 0) ties them with live entries that are exactly 0.0, and a purge to
  ``s`` then spends its budget on those live zeros and over-prunes (issue 17).
- **Monotone.** Entries ``current`` prunes stay pruned: if they alone exceed the budget,
  the result is ``current`` itself. To let pruned entries come back (PruneFL, AutoFLIP's
  ``regrow``), pass no ``current`` and intersect (or not) yourself.
- **Ties.** ``ties="position"`` (default): exactly ``max(k, already pruned)`` entries are
  pruned. ``ties="threshold"``: the keep-mask is ``score > tau`` with ``tau`` the score of
  the ``k``-th lowest entry, so every live entry tied with ``tau`` is pruned too and the
  count may exceed ``k`` (AutoFLIP's strict ``>``).
- **min_keep.** At most ``n - min_keep`` entries of each ranking group are pruned
  (AutoFLIP's units: a layer is never emptied). Only with ``ties="position"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from fedprune.core.masks import Masks

Ties = Literal["position", "threshold"]

__all__ = ["Ties", "prune_count", "select_lowest"]


def prune_count(sparsity: float, n: int) -> int:
    """``floor(sparsity * n)``, robust to float round-off (0.29 * 100 -> 29)."""
    return min(n, math.floor(sparsity * n + 1e-9))


def _ranking_values(flat: torch.Tensor) -> torch.Tensor:
    """Scores as sorted: NaN becomes ``-inf`` (infinities are kept as they are)."""
    if flat.is_floating_point():
        return torch.where(torch.isnan(flat), torch.full_like(flat, -math.inf), flat)
    return flat


def _select_group(
    flat: torch.Tensor, live: torch.Tensor | None, k: int, ties: Ties
) -> torch.Tensor:
    """Flat keep-mask for one ranking group: the budget ``k`` counts pruned entries first."""
    keep = (
        torch.ones(flat.shape, dtype=torch.bool, device=flat.device)
        if live is None
        else live.clone()
    )
    already = 0 if live is None else int(flat.numel() - int(live.sum()))
    budget = k - already
    if budget <= 0:
        return keep
    idx = None if live is None else torch.nonzero(live).flatten()
    vals = _ranking_values(flat if idx is None else flat[idx])
    # stable sort: equal scores are pruned in position order, so the count is exact
    order = torch.argsort(vals, stable=True)[: min(budget, vals.numel())]
    if ties == "threshold" and order.numel():
        order = torch.nonzero(vals <= vals[order[-1]]).flatten()
    keep[order if idx is None else idx[order]] = False
    return keep


def select_lowest(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    per_layer: bool = False,
    current: Mapping[str, torch.Tensor] | None = None,
    ties: Ties = "position",
    min_keep: int = 0,
) -> Masks:
    """Keep-masks pruning the ``floor(sparsity * N)`` lowest-scored entries (see module).

    Parameters
    ----------
    scores
        Name -> score tensor (higher = more worth keeping; signed is fine).
    sparsity
        Target fraction of pruned entries, in [0, 1), *including* already-pruned ones.
    per_layer
        One ranking and budget per tensor instead of one over all tensors.
    current
        Keep-masks in force (any subset of the names, same shapes). Their pruned entries
        rank lowest, count towards the budget and stay pruned.
    ties
        ``"position"`` (exact count) or ``"threshold"`` (strict ``score > tau``).
    min_keep
        Never prune more than ``n - min_keep`` entries of a ranking group.

    Returns
    -------
    Masks
        Name -> boolean keep-mask with the score tensor's shape.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if ties not in ("position", "threshold"):
        raise ValueError(f"ties must be 'position' or 'threshold', got {ties!r}")
    if min_keep < 0 or (min_keep and ties != "position"):
        raise ValueError("min_keep must be >= 0, and only with ties='position'")
    names = list(scores)
    if not names:
        return {}
    flats = {n: scores[n].detach().flatten() for n in names}
    lives: dict[str, torch.Tensor] | None = None
    if current is not None:
        lives = {}
        for n in names:
            if n in current:
                m = current[n]
                if m.shape != scores[n].shape:
                    raise ValueError(
                        f"{n}: mask shape {tuple(m.shape)} differs from {tuple(scores[n].shape)}"
                    )
                lives[n] = m.detach().flatten().bool()
            else:
                lives[n] = torch.ones(flats[n].shape, dtype=torch.bool, device=flats[n].device)

    def budget(n: int) -> int:
        return max(0, min(prune_count(sparsity, n), n - min_keep))

    out: Masks = {}
    if per_layer:
        for n in names:
            live = None if lives is None else lives[n]
            keep = _select_group(flats[n], live, budget(flats[n].numel()), ties)
            out[n] = keep.view(scores[n].shape)
        return out
    flat = torch.cat([flats[n] for n in names])
    live_all = None if lives is None else torch.cat([lives[n] for n in names])
    keep = _select_group(flat, live_all, budget(flat.numel()), ties)
    offset = 0
    for n in names:
        size = flats[n].numel()
        out[n] = keep[offset : offset + size].view(scores[n].shape)
        offset += size
    return out
