"""Masks: one boolean tensor per prunable parameter.

A mask entry ``True`` keeps the weight, ``False`` prunes it (the weight is exactly 0 and
stays 0 during masked training). Masks are plain ``dict[str, torch.Tensor]`` keyed by the
parameter's name in ``model.named_parameters()``, so they travel in payloads and
checkpoints like any other named tensor.

Scopes
------
``"weights"`` (default)
    The weight tensors of convolution and linear layers (what the FLOPs count).
``"all"``
    Every trainable tensor, biases and batch-norm affine parameters included (the
    FedSparsify authors' code prunes these too).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

Masks = dict[str, torch.Tensor]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_names(model: nn.Module, scope: str = "weights") -> list[str]:
    """Names of the parameters a mask may cover, in ``named_parameters`` order.

    Parameters
    ----------
    model
        Any module.
    scope
        ``"weights"`` for conv/linear weights, ``"all"`` for every trainable tensor.
    """
    if scope == "all":
        return [n for n, p in model.named_parameters() if p.requires_grad]
    if scope != "weights":
        raise ValueError(f"unknown mask scope {scope!r}")
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _WEIGHTED):
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


def ones_masks(model: nn.Module, scope: str = "weights") -> Masks:
    """An all-keep mask for the prunable parameters of ``model``."""
    params = dict(model.named_parameters())
    return {n: torch.ones_like(params[n], dtype=torch.bool) for n in prunable_names(model, scope)}


def masks_from_nonzero(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> Masks:
    """The non-zero pattern of the named tensors (FedSparsify's implicit global mask)."""
    return {n: tensors[n] != 0 for n in names}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned entries of ``model``'s parameters in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        # masked_fill writes +0.0; multiplying by 0 would leave -0.0 for negative
        # weights, which the bit-exact codec must then send as a non-zero value.
        params[name].masked_fill_(~mask.bool(), 0.0)


def mask_state(state: dict[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned entries of a state dict in place."""
    for name, mask in masks.items():
        state[name].masked_fill_(~mask.bool(), 0.0)


def mask_grads(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned entries, so optimiser state never moves them."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        g = params[name].grad
        if g is not None:
            g.mul_(mask.to(g.dtype))


def count_kept(masks: Mapping[str, torch.Tensor]) -> int:
    """Number of kept entries over all masks."""
    return int(sum(int(m.sum()) for m in masks.values()))


def count_total(masks: Mapping[str, torch.Tensor]) -> int:
    """Number of entries covered by the masks."""
    return int(sum(m.numel() for m in masks.values()))


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of pruned entries over all masks (0 for an empty mask set)."""
    total = count_total(masks)
    return 0.0 if total == 0 else 1.0 - count_kept(masks) / total


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the conv/linear weights of ``model``."""
    params = dict(model.named_parameters())
    names = prunable_names(model, "weights")
    total = sum(params[n].numel() for n in names)
    if total == 0:
        return 0.0
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    return zeros / total


def layer_densities(model: nn.Module) -> dict[str, float]:
    """Module name -> fraction of non-zero entries in that conv/linear layer's weight."""
    out: dict[str, float] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _WEIGHTED):
            w = mod.weight
            out[mod_name] = float((w != 0).sum()) / max(1, w.numel())
    return out
