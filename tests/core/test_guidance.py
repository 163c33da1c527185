from __future__ import annotations

import copy

import pytest
import torch

from fedprune.core import structured
from fedprune.core.guidance import (
    mean_guidance,
    normalise,
    quantile_threshold,
    squared_deviation,
    unit_layers,
    unit_masks,
    unit_scores,
    units_to_remove,
)
from fedprune.core.masks import apply_masks
from fedprune.core.select import select_lowest
from fedprune.models import build_model


def test_squared_deviation_and_mean() -> None:
    base = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5])}
    t1 = {"w": torch.tensor([1.0, 4.0, 2.0]), "b": torch.tensor([0.5])}
    t2 = {"w": torch.tensor([3.0, 2.0, 3.0]), "b": torch.tensor([1.5])}
    g1 = squared_deviation(t1, base)
    assert torch.equal(g1["w"], torch.tensor([0.0, 4.0, 1.0]))
    g = mean_guidance([g1, squared_deviation(t2, base)])
    assert torch.allclose(g["w"], torch.tensor([2.0, 2.0, 0.5]))
    assert torch.allclose(g["b"], torch.tensor([0.5]))


def test_minmax_still_parameter_is_zero_and_largest_mover_is_one() -> None:
    base = {"w": torch.randn(4, 5, generator=torch.Generator().manual_seed(0))}
    trained = {"w": base["w"].clone()}
    trained["w"][0, 0] += 0.5  # the largest mover
    trained["w"][1:, :] += 0.01 * torch.arange(1, 21, dtype=torch.float32).view(4, 5)[1:]
    # trained["w"][0, 1:] do not move at all
    g = normalise(squared_deviation(trained, base))["w"]
    assert float(g[0, 0]) == 1.0
    assert torch.all(g[0, 1:] == 0.0)
    assert float(g.min()) == 0.0 and float(g.max()) == 1.0
    # per tensor: another tensor's scale does not matter
    g2 = normalise({"a": torch.tensor([0.0, 1e-8, 2e-8]), "b": torch.tensor([5.0, 10.0])})
    assert torch.allclose(g2["a"], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(g2["b"], torch.tensor([0.0, 1.0]))


def test_minmax_of_a_constant_tensor_is_zero() -> None:
    g = normalise({"w": torch.full((3,), 7.0), "z": torch.zeros(2)})
    assert torch.equal(g["w"], torch.zeros(3)) and torch.equal(g["z"], torch.zeros(2))


def test_robust_scaling_centres_on_the_median_without_clipping() -> None:
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])  # median 2, IQR 3 - 1 = 2
    g = normalise({"w": x}, "robust")["w"]
    assert torch.allclose(g, (x - 2.0) / 2.0)
    assert float(g.min()) < 0.0  # not clipped
    # zero IQR: scale 1 (scikit-learn's convention)
    flat = normalise({"w": torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0])}, "robust")["w"]
    assert torch.allclose(flat, torch.tensor([0.0, 0.0, 0.0, 0.0, 4.0]))
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise({"w": x}, "zscore")


@pytest.mark.parametrize("q", [0.0, 0.1, 0.3, 0.5, 0.9])
def test_global_quantile_prunes_the_requested_fraction(q: float) -> None:
    gen = torch.Generator().manual_seed(1)
    values = {"a": torch.rand(10, 7, generator=gen), "b": torch.rand(33, generator=gen)}
    masks = select_lowest(values, q, ties="threshold")
    n = 70 + 33
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == int(q * n + 1e-9)
    # the pruned entries are the smallest ones, over both tensors together
    flat = torch.cat([v.flatten() for v in values.values()])
    kept = torch.cat([m.flatten() for m in masks.values()])
    if pruned:
        assert float(flat[~kept].max()) < float(flat[kept].min())


def test_ties_at_the_threshold_are_all_pruned() -> None:
    values = {"a": torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 1.0])}
    assert quantile_threshold(values, 0.3) == 0.0
    assert select_lowest(values, 0.3, ties="threshold")["a"].tolist() == [False] * 4 + [True, True]
    assert quantile_threshold(values, 0.0) == float("-inf")


def test_unit_scores_and_removal_never_empty_a_layer() -> None:
    model = build_model("fc", (1, 1, 3), 2, hidden=4)
    layers = unit_layers(model)
    assert [u.module for u in layers] == ["fc1", "fc2"]  # the classifier is never a candidate
    norm = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    norm["fc1.weight"][2] = 1.0  # unit 2: mean over 3 weights + bias = 3/4
    norm["fc1.bias"][1] = 1.0  # unit 1: 1/4
    scores = unit_scores(norm, layers)
    assert torch.allclose(scores["fc1"], torch.tensor([0.0, 0.25, 0.75, 0.0]))
    removed = units_to_remove(scores, 0.5)
    assert removed["fc1"] == [0, 3]  # the two lowest (ties by position)
    assert removed["fc2"] == [0, 1]
    # a single-unit layer is never emptied, however high the quantile
    assert units_to_remove({"one": torch.tensor([0.1])}, 0.99) == {"one": []}
    assert len(units_to_remove({"l": torch.rand(4)}, 0.99)["l"]) == 3


def test_shrunk_model_matches_the_masked_full_model_on_kept_units() -> None:
    model = build_model("twocnn", (1, 16, 16), 5, hidden=4, seed=0)
    example = structured.example_input((1, 16, 16))
    layers = unit_layers(model)
    assert [u.module for u in layers] == ["conv1", "conv2", "fc1"]
    removed = {"conv1": [0, 3], "conv2": [1, 2, 5], "fc1": list(range(0, 512, 4))}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    masked = copy.deepcopy(model)
    apply_masks(masked, unit_masks(shapes, layers, removed))

    shrunk = copy.deepcopy(model)
    keep = {
        name: [i for i in range(shapes[f"{name}.weight"][0]) if i not in idx]
        for name, idx in removed.items()
    }
    history = structured.shrink(shrunk, {k: keep[k] for k in ("conv1", "conv2")}, example)
    history += [{"layer": "fc1", "width": 512, "keep": keep["fc1"]}]
    structured.replay(shrunk, history[-1:], example)
    assert shrunk.conv1.weight.shape == (2, 1, 5, 5)
    assert shrunk.conv2.weight.shape == (5, 2, 5, 5)
    assert shrunk.fc1.weight.shape == (384, 5 * 49)
    assert shrunk.classifier.weight.shape == (5, 384)
    x = torch.randn(7, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(shrunk(x), masked(x), atol=1e-5)
    # the kept units carry the same weights
    assert torch.equal(shrunk.conv1.weight, model.conv1.weight[keep["conv1"]])


def test_monotone_thresholding_keeps_the_budget() -> None:
    values = {"a": torch.arange(10, dtype=torch.float32)}
    current = {"a": torch.tensor([True] * 7 + [False] * 3)}  # prunes the 3 largest
    # 30% is already pruned: nothing more, nothing back
    assert torch.equal(
        select_lowest(values, 0.3, current=current, ties="threshold")["a"], current["a"]
    )
    # 50%: two more, the lowest of the kept ones
    m = select_lowest(values, 0.5, current=current, ties="threshold")["a"]
    assert m.tolist() == [False, False] + [True] * 5 + [False] * 3
    # plain intersection would prune another 30% of the entries
    plain = select_lowest(values, 0.3, ties="threshold")["a"] & current["a"]
    assert int((~plain).sum()) == 6
