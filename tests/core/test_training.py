from __future__ import annotations

import pytest
import torch
from torch import nn

from fedprune.core.masks import (
    apply_masks,
    layer_densities,
    mask_sparsity,
    ones_masks,
    prunable_names,
    weight_sparsity,
)
from fedprune.core.training import TrainSettings, evaluate, train_local


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_prunable_names_scopes() -> None:
    net = _net()
    assert prunable_names(net) == ["0.weight", "3.weight"]
    assert prunable_names(net, "all") == ["0.weight", "0.bias", "3.weight", "3.bias"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_masked_training_never_revives_a_pruned_weight(optimizer: str) -> None:
    net = _net()
    masks = ones_masks(net)
    g = torch.Generator().manual_seed(2)
    for m in masks.values():
        m &= torch.rand(m.shape, generator=g) > 0.6
    # pruned weights start non-zero: training must zero them first and keep them zero
    x, y = _data()
    s = TrainSettings(
        epochs=3, batch_size=8, lr=0.1, optimizer=optimizer, momentum=0.9, weight_decay=1e-3
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_local(net, x, y, s, masks=masks, generator=torch.Generator().manual_seed(0))
    params = dict(net.named_parameters())
    for name, m in masks.items():
        assert torch.all(params[name][~m] == 0), name
        assert not torch.any(torch.signbit(params[name][~m])), "no -0.0 on the wire"
        assert torch.any(params[name][m] != before[name][m]), "kept weights must train"
    assert weight_sparsity(net) == pytest.approx(mask_sparsity(masks))


def test_unmasked_training_changes_everything_and_reduces_loss() -> None:
    net = _net()
    x, y = _data(128)
    loss0, _ = evaluate(net, x, y)
    train_local(
        net,
        x,
        y,
        TrainSettings(epochs=20, batch_size=16, lr=0.1),
        generator=torch.Generator().manual_seed(0),
    )
    loss1, acc1 = evaluate(net, x, y)
    assert loss1 < loss0
    assert acc1 > 0.6


def test_same_seed_same_result() -> None:
    x, y = _data()
    a, b = _net(), _net()
    s = TrainSettings(epochs=2, batch_size=8)
    train_local(a, x, y, s, generator=torch.Generator().manual_seed(7))
    train_local(b, x, y, s, generator=torch.Generator().manual_seed(7))
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka


def test_layer_densities() -> None:
    net = _net()
    masks = ones_masks(net)
    masks["3.weight"][:, ::2] = False
    apply_masks(net, masks)
    d = layer_densities(net)
    assert d["0"] == 1.0
    assert d["3"] == pytest.approx(0.5)


def test_masking_writes_positive_zeros() -> None:
    # -0.0 is a different bit pattern: the codec would have to send it as a value
    net = _net()
    with torch.no_grad():
        net[3].weight.fill_(-1.0)
    masks = ones_masks(net)
    masks["3.weight"][:, :10] = False
    apply_masks(net, masks)
    pruned = net[3].weight[:, :10]
    assert torch.all(pruned == 0)
    assert not torch.any(torch.signbit(pruned))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fedprox_adds_the_proximal_term_to_the_loss(optimizer: str) -> None:
    """train_local with prox_mu equals a plain loop on CE + mu/2 * ||w - w_start||^2."""
    mu = 0.7
    x, y = _data()
    s = TrainSettings(
        epochs=2, batch_size=16, lr=0.05, optimizer=optimizer, momentum=0.9, prox_mu=mu
    )
    net, ref = _net(), _net()
    masks = ones_masks(net)
    masks["0.weight"][0] = False
    train_local(net, x, y, s, masks=masks, generator=torch.Generator().manual_seed(3))

    apply_masks(ref, masks)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    opt = (
        torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(ref.parameters(), lr=0.05)
    )
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        perm = torch.randperm(64, generator=gen)
        for b in range(4):
            idx = perm[b * 16 : (b + 1) * 16]
            opt.zero_grad()
            prox = sum(((p - start[n]) ** 2).sum() for n, p in ref.named_parameters())
            loss = torch.nn.functional.cross_entropy(ref(x[idx]), y[idx]) + mu / 2 * prox
            loss.backward()
            ref[0].weight.grad[0] = 0  # type: ignore[index]
            opt.step()
    for (k, a), (_, b) in zip(net.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k


def test_fedprox_keeps_local_training_closer_to_the_start() -> None:
    x, y = _data(128)
    drift = []
    for mu in (0.0, 1.0, 10.0):
        net = _net()
        start = [p.detach().clone() for p in net.parameters()]
        s = TrainSettings(epochs=5, batch_size=16, lr=0.1, prox_mu=mu)
        train_local(net, x, y, s, generator=torch.Generator().manual_seed(0))
        drift.append(
            sum(float((p - w).norm() ** 2) for p, w in zip(net.parameters(), start, strict=True))
        )
    assert drift[0] > drift[1] > drift[2] > 0
