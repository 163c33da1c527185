"""Client sampling: a seeded draw without replacement each round."""

from __future__ import annotations

import numpy as np


def sample_clients(rng: np.random.Generator, num_clients: int, k: int) -> list[int]:
    """Draw ``k`` distinct client ids out of ``num_clients``, sorted.

    Parameters
    ----------
    rng
        The run's sampling generator (seeded once, advanced every round).
    num_clients
        Size of the federation.
    k
        Clients per round; ``k >= num_clients`` selects everyone.
    """
    if k >= num_clients:
        return list(range(num_clients))
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def derive_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (run seed, round, client, ...)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(
        1, np.uint64
    )
    return int(state[0] >> np.uint64(1))
