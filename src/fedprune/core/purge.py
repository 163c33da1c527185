"""Magnitude pruning ("purge") to an exact sparsity, never reviving a pruned weight.

Given named tensors and a target sparsity ``s``, prune exactly ``floor(s * N)`` entries
of smallest magnitude (``N`` = entries considered), either with one threshold over all
tensors (default, as in FedSparsify) or per tensor. Ties at the threshold are broken by
position, so the count is exact. Entries already pruned in ``current`` stay pruned: if
they alone exceed the target, the result is simply the current mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedprune.core.masks import Masks


def _prune_smallest(flat_abs: torch.Tensor, k: int) -> torch.Tensor:
    """A keep-mask pruning exactly the ``k`` smallest entries (ties by position)."""
    keep = torch.ones_like(flat_abs, dtype=torch.bool)
    if k <= 0:
        return keep
    k = min(k, flat_abs.numel())
    # stable sort: equal magnitudes are pruned in index order, so the count is exact
    order = torch.argsort(flat_abs, stable=True)
    keep[order[:k]] = False
    return keep


def prune_count(sparsity: float, n: int) -> int:
    """``floor(sparsity * n)``, robust to float round-off (0.29 * 100 -> 29)."""
    return min(n, math.floor(sparsity * n + 1e-9))


def magnitude_masks(
    tensors: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    per_layer: bool = False,
    current: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Keep-masks that prune ``floor(sparsity * N)`` smallest-magnitude entries.

    Parameters
    ----------
    tensors
        Name -> weight tensor (the prunable scope).
    sparsity
        Target fraction of pruned entries, in [0, 1).
    per_layer
        One threshold per tensor instead of one over all tensors.
    current
        Existing keep-masks; pruned entries are treated as zero and stay pruned.

    Returns
    -------
    Masks
        Name -> boolean keep-mask with the tensor's shape.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    names = list(tensors)
    mags = {}
    for n in names:
        m = tensors[n].detach().abs().float()
        if current is not None and n in current:
            m = m * current[n].to(m.dtype)
        mags[n] = m
    out: Masks = {}
    if per_layer:
        for n in names:
            flat = mags[n].flatten()
            keep = _prune_smallest(flat, prune_count(sparsity, flat.numel()))
            out[n] = keep.view_as(mags[n])
    else:
        flat = torch.cat([mags[n].flatten() for n in names]) if names else torch.zeros(0)
        keep = _prune_smallest(flat, prune_count(sparsity, flat.numel()))
        offset = 0
        for n in names:
            size = mags[n].numel()
            out[n] = keep[offset : offset + size].view_as(mags[n])
            offset += size
    if current is not None:
        for n in names:
            if n in current:
                out[n] = out[n] & current[n].bool()
    return out
