from __future__ import annotations

import pytest
import torch

from fedprune.core.aggregation import ServerMomentum, weighted_average
from fedprune.core.sampling import derive_seed, sample_clients


def test_fedavg_equals_hand_computed_weighted_mean() -> None:
    a = {"w": torch.tensor([1.0, 2.0, 3.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 6.0, -3.0]), "n": torch.tensor(7)}
    c = {"w": torch.tensor([0.0, 0.0, 9.0]), "n": torch.tensor(5)}
    out = weighted_average([a, b, c], [10, 30, 60])
    # by hand: (10*a + 30*b + 60*c) / 100
    expected = torch.tensor(
        [(10 * 1 + 30 * 3 + 0) / 100, (10 * 2 + 30 * 6) / 100, (10 * 3 - 30 * 3 + 60 * 9) / 100]
    )
    assert torch.allclose(out["w"], expected)
    assert out["w"].dtype == torch.float32
    assert int(out["n"]) == 7  # integer counters take the max


def test_fedavg_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError, match="shape mismatch"):
        weighted_average([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        weighted_average([{"w": torch.zeros(2)}], [0])


def test_server_momentum_matches_formula() -> None:
    m = ServerMomentum(0.9)
    cur = {"w": torch.tensor([1.0, 1.0])}
    avg = {"w": torch.tensor([0.0, 2.0])}
    out = m.step(cur, avg)
    # v = 0.1 * (cur - avg) = [0.1, -0.1]; theta = cur - v
    assert torch.allclose(out["w"], torch.tensor([0.9, 1.1]))
    out2 = m.step(out, avg)
    v2 = 0.9 * torch.tensor([0.1, -0.1]) + 0.1 * (out["w"] - avg["w"])
    assert torch.allclose(out2["w"], out["w"] - v2)
    m.mask_velocity({"w": torch.tensor([False, True])})
    assert m.velocity["w"][0] == 0


def test_beta_zero_is_fedavg() -> None:
    m = ServerMomentum(0.0)
    out = m.step({"w": torch.tensor([5.0])}, {"w": torch.tensor([2.0])})
    assert torch.equal(out["w"], torch.tensor([2.0]))


def test_sampling_is_seeded_and_distinct() -> None:
    import numpy as np

    a = sample_clients(np.random.default_rng(3), 100, 10)
    b = sample_clients(np.random.default_rng(3), 100, 10)
    assert a == b and len(set(a)) == 10 and a == sorted(a)
    assert sample_clients(np.random.default_rng(3), 5, 10) == [0, 1, 2, 3, 4]
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(1, 3)
