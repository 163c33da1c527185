"""Validation of client updates before they reach aggregation.

A reply is checked against the global model it answers, and rejected with a short
reason when anything is off:

- a tensor of the global state is missing, or has another shape or dtype;
- a value is NaN or infinite (extra arrays too);
- a weight is non-zero where the global mask says it is pruned;
- the reported sample count is not a whole number in ``[1, max_examples]``;
- the L2 norm of the update (reply minus global, over floating tensors) exceeds
  ``max_update_norm`` (when set).

Rejected replies never reach the global model; the engine counts them and records the
reasons in the round's metrics.

Before any of that, a reply is decoded against :func:`reply_schema` (the names, shapes
and dtypes of the global state): an array the server does not expect, a missing one or a
forged shape is a :class:`~fedprune.errors.DecodeError` before anything is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedprune.core.codec import Payload, Schema


@dataclass(frozen=True)
class ValidationPolicy:
    """What a reply must satisfy."""

    max_update_norm: float = 0.0
    """Reject updates whose L2 norm exceeds this (0 = no bound)."""
    max_examples: int = 2**31 - 1
    """Largest credible sample count of one client."""
    check_mask: bool = True
    """Reject non-zero values at positions the global mask prunes."""


def reply_schema(global_state: Mapping[str, torch.Tensor], task: str) -> Schema:
    """What a client's reply to ``task`` may hold, from the global state it was sent.

    Every tensor of ``global_state`` with its shape and dtype (all required for ``fit``,
    optional for setup tasks), and per-parameter side data named ``"<prefix>/<name>"``
    for a tensor ``<name>`` of the state (importance, guidance, scores) with that
    tensor's shape. Nothing else: decoding a reply against it allocates at most what
    these shapes need.
    """
    return Schema.of(global_state, required=task == "fit", prefixed=True)


class Rejected(Exception):
    """A reply failed validation; ``str(exc)`` is the one-line reason."""


def _finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise Rejected(f"{name} has NaN or infinite values")


def validate_reply(
    payload: Payload,
    global_state: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
    policy: ValidationPolicy = ValidationPolicy(),
) -> None:
    """Raise :class:`Rejected` with a reason if ``payload`` is not a sound reply.

    Parameters
    ----------
    payload
        The decoded reply (``arrays`` must hold every tensor of ``global_state``).
    global_state
        The global model's state dict the client was sent.
    masks
        The global keep-masks (pruned positions must stay exactly zero).
    policy
        Bounds to enforce.
    """
    n = payload.metrics.get("num_examples")
    if n is None or not math.isfinite(n) or n != int(n) or not 1 <= n <= policy.max_examples:
        raise Rejected(f"num_examples {n!r} is out of range [1, {policy.max_examples}]")
    arrays = payload.arrays
    sq_norm = 0.0
    for name, ref in global_state.items():
        got = arrays.get(name)
        if got is None:
            raise Rejected(f"{name} is missing")
        if got.shape != ref.shape:
            raise Rejected(f"{name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise Rejected(f"{name} has dtype {got.dtype}, expected {ref.dtype}")
        _finite(name, got)
        if ref.is_floating_point():
            sq_norm += float((got.double() - ref.double()).pow(2).sum())
    for name, t in arrays.items():
        if name not in global_state:
            _finite(name, t)
    if policy.check_mask and masks:
        for name, keep in masks.items():
            got = arrays.get(name)
            if got is not None and got.shape == keep.shape and bool((got[~keep] != 0).any()):
                count = int((got[~keep] != 0).sum())
                raise Rejected(f"{name} has {count} non-zero values at pruned positions")
    norm = math.sqrt(sq_norm)
    if policy.max_update_norm > 0 and norm > policy.max_update_norm:
        raise Rejected(f"update norm {norm:.4g} exceeds the bound {policy.max_update_norm:.4g}")


def check_reply(
    payload: Payload,
    global_state: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
    policy: ValidationPolicy = ValidationPolicy(),
) -> str | None:
    """Like :func:`validate_reply`, returning the reason (or None when the reply is sound)."""
    try:
        validate_reply(payload, global_state, masks, policy)
    except Rejected as exc:
        return str(exc)
    return None
