"""Aggregation of client models: sample-weighted FedAvg, server momentum (FedAvgM), and
the server-side moving average of the global models."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

State = dict[str, torch.Tensor]


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> State:
    """Sample-weighted mean of state dicts (FedAvg).

    Floating tensors are averaged with weights ``w_k / sum(w)``; integer tensors (e.g.
    batch-norm ``num_batches_tracked``) take the maximum, which is what an ever-growing
    counter needs.

    Raises
    ------
    ValueError
        No states, mismatched keys/shapes, or non-positive total weight.
    """
    if not states:
        raise ValueError("nothing to aggregate")
    if len(states) != len(weights):
        raise ValueError("one weight per state is needed")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("total aggregation weight must be positive")
    keys = list(states[0].keys())
    out: State = {}
    for key in keys:
        first = states[0][key]
        if not (first.is_floating_point() or first.is_complex()):
            out[key] = torch.stack([s[key] for s in states]).amax(dim=0)
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for s, w in zip(states, weights, strict=True):
            t = s[key]
            if t.shape != first.shape:
                raise ValueError(
                    f"shape mismatch for {key}: {tuple(t.shape)} vs {tuple(first.shape)}"
                )
            acc.add_(t.to(torch.float64), alpha=w / total)
        out[key] = acc.to(first.dtype)
    return out


class ServerMomentum:
    """FedAvgM as in AutoFLIP's code: ``v <- b*v + (1-b)*Delta``, ``theta <- theta - v``.

    ``Delta = theta_global - FedAvg(clients)`` is the pseudo-gradient. There is no server
    learning rate. With ``beta = 0`` this is plain FedAvg.
    """

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)
        self.velocity: State = {}

    def step(
        self, current: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor]
    ) -> State:
        """New global state from the current one and the clients' FedAvg."""
        out: State = {}
        for key, cur in current.items():
            avg = averaged[key]
            if not cur.is_floating_point():
                out[key] = avg.clone()
                continue
            delta = cur - avg
            v = self.velocity.get(key)
            if v is None or v.shape != delta.shape:
                v = torch.zeros_like(delta)
            v = self.beta * v + (1.0 - self.beta) * delta
            self.velocity[key] = v
            out[key] = cur - v
        return out

    def mask_velocity(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Forget momentum at pruned positions so it cannot revive them."""
        for key, m in masks.items():
            if key in self.velocity and self.velocity[key].shape == m.shape:
                self.velocity[key].mul_(m.to(self.velocity[key].dtype))

    def state_dict(self) -> State:
        """Velocity tensors (for checkpoints)."""
        return {k: v.clone() for k, v in self.velocity.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore velocity tensors."""
        self.velocity = {k: v.clone() for k, v in state.items()}


class ModelAverage:
    """Exponential moving average of the global models over the rounds.

    After round t the average is ``decay * previous + (1 - decay) * w_t`` (the first
    round's model starts it). It is only read (evaluated, saved), never sent, so training
    is unchanged. Positions a mask prunes are zero in the average too, so it is as
    sparse as the global model. When the model's architecture changes (structured
    pruning shrinks it), the average starts again from the new model: ``rounds`` counts
    the rounds in the current average. Integer tensors (batch-norm counters) follow the
    latest model.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the moving average's decay must be in (0, 1), not {decay}")
        self.decay = float(decay)
        self.state: State = {}
        self.rounds = 0

    def update(
        self,
        current: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Fold in one round's global model (``masks``: the positions it keeps)."""
        same = self.state.keys() == current.keys() and all(
            self.state[k].shape == v.shape for k, v in current.items()
        )
        if not same:
            self.state = {k: v.detach().clone() for k, v in current.items()}
            self.rounds = 1
        else:
            for key, cur in current.items():
                avg = self.state[key]
                if cur.is_floating_point():
                    avg.mul_(self.decay).add_(cur.detach(), alpha=1.0 - self.decay)
                else:
                    avg.copy_(cur)
            self.rounds += 1
        for key, m in (masks or {}).items():
            kept = self.state.get(key)
            if kept is not None and kept.shape == m.shape:
                kept.mul_(m.to(kept.dtype))

    def state_dict(self) -> dict[str, State | int]:
        """The average and its round count (for checkpoints)."""
        return {"state": {k: v.clone() for k, v in self.state.items()}, "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Inverse of :meth:`state_dict`.

        Raises
        ------
        ValueError
            ``state`` does not hold tensors under ``state`` and a count under ``rounds``.
        """
        saved, rounds = state.get("state", {}), state.get("rounds", 0)
        if not isinstance(saved, Mapping) or not isinstance(rounds, int):
            raise ValueError("the saved moving average is not a state dict and a round count")
        if not all(isinstance(v, torch.Tensor) for v in saved.values()):
            raise ValueError("the saved moving average holds values that are not tensors")
        self.state = {str(k): v.clone() for k, v in saved.items()}
        self.rounds = rounds


def _robust(
    states: Sequence[Mapping[str, torch.Tensor]],
    reduce: Callable[[torch.Tensor], torch.Tensor],
) -> State:
    if not states:
        raise ValueError("nothing to aggregate")
    out: State = {}
    for key, first in states[0].items():
        stacked = torch.stack([s[key] for s in states])
        if not first.is_floating_point():
            out[key] = stacked.amax(dim=0)
            continue
        out[key] = reduce(stacked.double()).to(first.dtype)
    return out


def coordinate_median(states: Sequence[Mapping[str, torch.Tensor]]) -> State:
    """Coordinate-wise median of client states (unweighted; even counts average the two
    middle values). A pruned coordinate that is zero in every state stays exactly zero."""
    return _robust(states, lambda t: t.quantile(0.5, dim=0))


def trimmed_mean(states: Sequence[Mapping[str, torch.Tensor]], fraction: float) -> State:
    """Coordinate-wise mean after dropping the ``floor(fraction * n)`` largest and smallest
    values of each coordinate (unweighted)."""
    if not 0 <= fraction < 0.5:
        raise ValueError("trim fraction must be in [0, 0.5)")
    n = len(states)
    k = int(fraction * n)

    def reduce(t: torch.Tensor) -> torch.Tensor:
        s = t.sort(dim=0).values
        return s[k : n - k].mean(dim=0)

    return _robust(states, reduce)
