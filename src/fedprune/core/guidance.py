"""AutoFLIP's guidance matrix: how far each parameter moved during loss exploration.

The pieces of methods.md §2.2 (Phase A and B), as pure functions on named tensors:

1. :func:`squared_deviation`: one explorer's local guidance ``G_k = (theta_k - theta_0)**2``,
   per parameter (weights *and* biases).
2. :func:`mean_guidance`: the server's ``G = mean_k G_k``.
3. :func:`normalise`: per-tensor scaling, each weight and each bias tensor on its own:

   ``"minmax"`` (default, the paper's)
       ``(G - min) / (max - min)``: in [0, 1]; the least-moved entry of a tensor is 0 and
       the most-moved is 1. A constant tensor (``max == min``, e.g. a tensor that did not
       move at all) becomes all 0.
   ``"robust"``
       ``(G - median) / IQR`` (scikit-learn's ``RobustScaler``, the authors' alternative;
       an IQR of 0 is replaced by 1, as scikit-learn does). The result is **not** clipped to
       [0, 1]: clipping would map at least half of every tensor (everything at or below its
       median) to the same value 0, so the global quantile threshold would tie at 0 and
       prune more than half of every tensor whatever ``T_p`` is. Unclipped, the values keep
       their order inside a tensor and the quantile prunes ``T_p`` of the entries.

4. The unstructured mask: one global ranking over *all* normalised entries of all
   tensors, ``tau`` = the ``k``-th smallest value with ``k = floor(T_p * N)``
   (:func:`quantile_threshold`), and the keep-mask ``G > tau``
   (:func:`fedprune.core.select.select_lowest` with ``ties="threshold"``). Without ties
   exactly ``k`` entries are pruned; entries tied with ``tau`` are all pruned (the
   paper's strict ``>``), so a block of identical values (parameters that never moved)
   can push the pruned fraction above ``T_p``. Given the mask in force (``current``),
   the selection is monotone under the same budget (pruned entries stay pruned and
   count towards ``floor(T_p * N)``).
5. The structured part (an implementation choice: the paper's exact unit rule is not
   public, methods.md §2.2): :func:`unit_scores` is the mean normalised guidance of a
   unit's incoming weights and its bias (conv filter ``u``: ``G[u, :, :, :]`` plus
   ``bias[u]``; linear neuron ``u``: ``G[u, :]`` plus ``bias[u]``), and
   :func:`units_to_remove` picks, per layer, the ``floor(T_p * n)`` lowest-scoring units
   (the selector, ties by position; at most ``n - 1``: a layer is never emptied). Output layers are
   never candidates (:func:`unit_layers` leaves out the last conv/linear layer).
   :func:`unit_masks` turns the choice into masks that zero whole units (the stand-in for
   a physical shrink: on a chain of conv/linear layers with ReLU, a unit whose weights and
   bias are zero outputs 0, exactly like a removed one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedprune.core.masks import Masks
from fedprune.core.select import prune_count, select_lowest

Guidance = dict[str, torch.Tensor]
"""Parameter name -> non-negative guidance tensor of the parameter's shape."""

NORMALISATIONS: tuple[str, ...] = ("minmax", "robust")

_UNIT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

__all__ = [
    "NORMALISATIONS",
    "Guidance",
    "UnitLayer",
    "mean_guidance",
    "normalise",
    "quantile_threshold",
    "squared_deviation",
    "unit_layers",
    "unit_masks",
    "unit_scores",
    "units_to_remove",
]


def squared_deviation(
    trained: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    names: Sequence[str] | None = None,
) -> Guidance:
    """One explorer's guidance ``(theta_k - theta_0) ** 2`` (float32), per named tensor.

    Parameters
    ----------
    trained
        The explorer's weights after exploration (``theta_k``).
    base
        The weights it started from (``theta_0``).
    names
        Which tensors (default: every floating tensor of ``base``).
    """
    keys = (
        list(names) if names is not None else [k for k, v in base.items() if v.is_floating_point()]
    )
    out: Guidance = {}
    for k in keys:
        a, b = trained[k], base[k]
        if a.shape != b.shape:
            raise ValueError(f"{k}: shape {tuple(a.shape)} differs from {tuple(b.shape)}")
        out[k] = (a.detach().double() - b.detach().double()).pow(2).float()
    return out


def mean_guidance(guidances: Sequence[Mapping[str, torch.Tensor]]) -> Guidance:
    """The entry-wise mean over explorers (float32, accumulated in float64)."""
    if not guidances:
        raise ValueError("no guidance to average")
    keys = list(guidances[0])
    out: Guidance = {}
    for k in keys:
        acc = torch.zeros(guidances[0][k].shape, dtype=torch.float64)
        for g in guidances:
            t = g[k]
            if t.shape != acc.shape:
                raise ValueError(f"{k}: shape {tuple(t.shape)} differs from {tuple(acc.shape)}")
            acc.add_(t.double())
        out[k] = (acc / len(guidances)).float()
    return out


def _normalise_one(g: torch.Tensor, method: str) -> torch.Tensor:
    x = g.double()
    if method == "minmax":
        lo, hi = x.min(), x.max()
        span = hi - lo
        if float(span) <= 0.0:
            return torch.zeros_like(g, dtype=torch.float32)
        return ((x - lo) / span).clamp_(0.0, 1.0).float()
    if method == "robust":
        # numpy's quantile has no size limit (torch.quantile stops at 2**24 entries)
        q1, med, q3 = np.quantile(x.flatten().numpy(), [0.25, 0.5, 0.75])
        iqr = float(q3 - q1)
        scale = iqr if iqr > 0.0 else 1.0
        return ((x - float(med)) / scale).float()
    raise ValueError(f"unknown normalisation {method!r}; choose from {', '.join(NORMALISATIONS)}")


def normalise(guidance: Mapping[str, torch.Tensor], method: str = "minmax") -> Guidance:
    """Scale each tensor on its own (``"minmax"`` to [0, 1], or ``"robust"``; see module)."""
    return {k: _normalise_one(v, method) for k, v in guidance.items()}


def _kth_smallest(flat: torch.Tensor, k: int) -> float:
    return float("-inf") if k <= 0 or flat.numel() == 0 else float(torch.kthvalue(flat, k).values)


def quantile_threshold(values: Mapping[str, torch.Tensor], q: float) -> float:
    """``tau``: the ``floor(q * N)``-th smallest of all entries (``-inf`` when that is 0).

    ``N`` counts the entries of every tensor together (one global threshold).
    """
    if not 0.0 <= q < 1.0:
        raise ValueError(f"threshold quantile must be in [0, 1), got {q}")
    if not values:
        return float("-inf")
    flat = torch.cat([v.detach().flatten().float() for v in values.values()])
    return _kth_smallest(flat, prune_count(q, flat.numel()))


@dataclass(frozen=True)
class UnitLayer:
    """A layer whose output units (filters / neurons) may be removed."""

    module: str
    """Qualified module name (``"conv1"``)."""
    weight: str
    """Parameter name of its weight (``"conv1.weight"``); dim 0 indexes the units."""
    bias: str | None
    """Parameter name of its bias, if it has one."""


def unit_layers(model: nn.Module, exclude: Sequence[str] = ()) -> list[UnitLayer]:
    """Conv/linear layers whose units may be removed: all but the last one (the output).

    The "last" layer is the last conv/linear module in ``named_modules`` order, which for
    the zoo's chains is the classifier. ``exclude`` names further modules to keep whole.
    """
    found: list[UnitLayer] = []
    for name, mod in model.named_modules():
        if isinstance(mod, _UNIT_LAYERS):
            prefix = f"{name}." if name else ""
            bias = f"{prefix}bias" if getattr(mod, "bias", None) is not None else None
            found.append(UnitLayer(name, f"{prefix}weight", bias))
    return [u for u in found[:-1] if u.module not in exclude]


def unit_scores(
    normalised: Mapping[str, torch.Tensor], layers: Sequence[UnitLayer]
) -> dict[str, torch.Tensor]:
    """Module name -> unit scores: mean normalised guidance of ``weight[u]`` and ``bias[u]``."""
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        w = normalised[layer.weight].double()
        n = w.shape[0]
        flat = w.reshape(n, -1)
        total = flat.sum(dim=1)
        count = flat.shape[1]
        if layer.bias is not None and layer.bias in normalised:
            total = total + normalised[layer.bias].double().reshape(n)
            count += 1
        out[layer.module] = (total / count).float()
    return out


def units_to_remove(scores: Mapping[str, torch.Tensor], q: float) -> dict[str, list[int]]:
    """Module name -> sorted indices of the ``floor(q * n)`` lowest-scoring units (<= n - 1).

    Ties are broken by position (stable sort), so the count per layer is exact.
    """
    if not 0.0 <= q < 1.0:
        raise ValueError(f"threshold quantile must be in [0, 1), got {q}")
    keep = select_lowest(scores, q, per_layer=True, min_keep=1)
    return {name: torch.nonzero(~k.flatten()).flatten().tolist() for name, k in keep.items()}


def unit_masks(
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    layers: Sequence[UnitLayer],
    removed: Mapping[str, Sequence[int]],
) -> Masks:
    """Keep-masks (for the weights and biases of ``layers``) zeroing the removed units."""
    out: Masks = {}
    for layer in layers:
        idx = list(removed.get(layer.module, ()))
        w = torch.ones(tuple(shapes[layer.weight]), dtype=torch.bool)
        if idx:
            w[idx] = False
        out[layer.weight] = w
        if layer.bias is not None and layer.bias in shapes:
            b = torch.ones(tuple(shapes[layer.bias]), dtype=torch.bool)
            if idx:
                b[idx] = False
            out[layer.bias] = b
    return out
