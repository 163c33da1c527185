from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fedprune.core.structured import (
    compact_history,
    example_input,
    filter_scores,
    history_key,
    prunable_layers,
    reinitialize,
    replay,
    round_width,
    shrink,
    shrunk_copy,
    structure,
    widths,
)
from fedprune.models import build_model

MODELS = {
    "gap-cnn": ((1, 28, 28), 62),
    "inception": ((1, 28, 28), 62),
    "resnet7": ((1, 28, 28), 62),
    "resnet20": ((3, 32, 32), 10),
    "cnn6": ((3, 32, 32), 10),
    "twocnn": ((1, 8, 8), 10),
}


def _model(name: str, seed: int = 0) -> nn.Module:
    shape, classes = MODELS[name]
    model = build_model(name, shape, classes, seed=seed)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode tests them too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _random_keep(model: nn.Module, ex: torch.Tensor, seed: int = 1) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for grp in structure(model, ex)[0]:
        n = max(1, grp.width // 2)
        keep[grp.layer] = sorted(torch.randperm(grp.width, generator=g)[:n].tolist())
    return keep


def _x(name: str, n: int = 3) -> torch.Tensor:
    return torch.randn(n, *MODELS[name][0], generator=torch.Generator().manual_seed(7))


def test_prunable_layers_are_convs_and_never_the_classifier() -> None:
    ex = example_input((1, 28, 28))
    assert prunable_layers(_model("gap-cnn"), ex) == ["conv1", "conv2"]
    inc = prunable_layers(_model("inception"), ex)
    assert len(inc) == 10 and "classifier" not in inc and inc[-1] == "fc1"  # Dense 50
    conv_only = prunable_layers(_model("inception"), ex, linear=False)
    assert conv_only == inc[:-1]  # the paper's 9 convolutions
    # resnet7: stem + first conv of each block (§1.5); block outputs are tied to the stem
    prunable, tied = structure(_model("resnet7"), ex)
    assert [g.layer for g in prunable] == ["conv1", "block1.conv1", "block2.conv1"]
    assert prunable[0].tied == ("block1.conv2", "block2.conv2")
    assert [g.layer for g in tied] == ["block1.conv2", "block2.conv2"]
    assert tied[0].members == ("block1.conv2", "block1.shortcut_conv")


def test_shrunk_model_equals_masked_full_model_on_kept_channels() -> None:
    for name in ("gap-cnn", "inception"):
        model = _model(name)
        ex = example_input(MODELS[name][0])
        keep = _random_keep(model, ex)
        small, hist = shrunk_copy(model, keep, ex)
        assert hist and {e["layer"] for e in hist} == set(keep)
        # the full model with the removed filters zeroed (weight and bias) computes the same
        masked = build_model(name, *MODELS[name], seed=0).eval()
        masked.load_state_dict(model.state_dict())
        with torch.no_grad():
            for layer, idx in keep.items():
                conv = masked.get_submodule(layer)
                drop = [j for j in range(widths(masked, [layer])[layer]) if j not in idx]
                conv.weight[drop] = 0.0
                conv.bias[drop] = 0.0
        x = _x(name)
        with torch.no_grad():
            assert torch.allclose(small(x), masked(x), atol=1e-5)
            # and the kept channels of the first conv are the full model's channels
            first = next(iter(keep))
            full_act = model.get_submodule(first)(x)
            small_act = small.get_submodule(first)(x)
            assert torch.allclose(small_act, full_act[:, keep[first]], atol=1e-6)
        assert sum(p.numel() for p in small.parameters()) < sum(
            p.numel() for p in model.parameters()
        )


@pytest.mark.parametrize("name", list(MODELS))
def test_history_replays_on_a_fresh_model(name: str) -> None:
    model = _model(name)
    ex = example_input(MODELS[name][0])
    small, hist = shrunk_copy(model, _random_keep(model, ex), ex)
    hist = json.loads(json.dumps(hist))  # the history is plain JSON
    fresh = build_model(name, *MODELS[name], seed=123)  # other weights: only shapes matter
    replay(fresh, hist, ex)
    want = {k: v.shape for k, v in small.state_dict().items()}
    assert {k: v.shape for k, v in fresh.state_dict().items()} == want
    fresh.load_state_dict(small.state_dict())
    fresh.eval()
    x = _x(name)
    with torch.no_grad():
        assert torch.equal(fresh(x), small(x))


def test_resnet7_shrinks_with_stem_tied_to_block_outputs() -> None:
    model = _model("resnet7")
    ex = example_input((1, 28, 28))
    small, hist = shrunk_copy(model, {"conv1": [1, 4, 9], "block2.conv1": list(range(10))}, ex)
    w = widths(small)
    assert w["conv1"] == 3 and w["block1.conv1"] == 32 and w["block2.conv1"] == 10
    # block outputs (conv2 and the 1x1 shortcut) follow the stem width
    for b in ("block1", "block2"):
        assert w[f"{b}.conv2"] == 3 and w[f"{b}.shortcut_conv"] == 3
    tied = [e for e in hist if e.get("tied_to") == "conv1"]
    assert [e["layer"] for e in tied] == ["block1.conv2", "block2.conv2"]
    # the tied groups keep their largest-L1 channels
    grp = {g.layer: g for g in structure(model, ex)[1]}["block1.conv2"]
    top = torch.topk(filter_scores(model, grp), 3).indices.sort().values.tolist()
    assert tied[0]["keep"] == top
    with torch.no_grad():
        assert small(_x("resnet7")).shape == (3, 62)
    assert small.classifier.in_features < model.classifier.in_features
    with pytest.raises(ValueError, match="tied"):
        shrink(_model("resnet7"), {"block1.conv2": [0]}, ex)


def test_resnet20_residual_groups_shrink_and_run() -> None:
    model = _model("resnet20")
    ex = example_input((3, 32, 32))
    prunable = structure(model, ex)[0]
    stem = prunable[0]
    assert stem.layer == "conv1" and "layer1.0.conv2" in stem.members  # identity adds couple
    small, _ = shrunk_copy(model, _random_keep(model, ex), ex)
    assert small.conv1.out_channels == 8 and small.layer1[2].conv2.out_channels == 8
    assert small.layer2[0].shortcut.conv.out_channels == small.layer2[2].conv2.out_channels == 16
    small.train()
    out = small(_x("resnet20", 4))
    out.sum().backward()  # trains too
    assert out.shape == (4, 10)


def test_inception_concat_shrinks() -> None:
    model = _model("inception")
    ex = example_input((1, 28, 28))
    keep = {"inception1.branch1x1": [0, 5], "inception1.branch5x5": [3, 4, 15]}
    small, _ = shrunk_copy(model, keep, ex)
    assert small.inception1.branch3x3.out_channels == 16
    assert small.inception2.branch1x1.in_channels == 2 + 16 + 3
    with torch.no_grad():
        assert small(_x("inception")).shape == (3, 62)


def test_compacted_history_replays_to_the_same_model() -> None:
    model = _model("inception")
    ex = example_input((1, 28, 28))
    step1, h1 = shrunk_copy(model, _random_keep(model, ex, seed=1), ex)
    step2, h2 = shrunk_copy(step1, _random_keep(step1, ex, seed=2), ex)
    compact = compact_history([*h1, *h2])
    full = widths(model, [e["layer"] for e in compact])
    assert len(compact) == 10 and all(e["width"] == full[e["layer"]] for e in compact)
    fresh = replay(build_model("inception", (1, 28, 28), 62), compact, ex)
    fresh.load_state_dict(step2.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(_x("inception")), step2(_x("inception")))
    assert history_key(compact) == history_key(json.loads(json.dumps(compact)))


def test_bad_keep_and_bad_history_are_rejected() -> None:
    model = _model("gap-cnn")
    ex = example_input((1, 28, 28))
    with pytest.raises(ValueError, match="at least one"):
        shrink(model, {"conv1": []}, ex)
    with pytest.raises(ValueError, match="must be in"):
        shrink(model, {"conv1": [32]}, ex)
    with pytest.raises(ValueError, match="not a prunable layer"):
        shrink(model, {"classifier": [0]}, ex)
    with pytest.raises(ValueError, match="expects 16"):
        replay(_model("gap-cnn"), [{"layer": "conv1", "width": 16, "keep": [0]}], ex)
    with pytest.raises(ValueError, match="no layer"):
        replay(_model("gap-cnn"), [{"layer": "nope", "width": 16, "keep": [0]}], ex)
    assert shrink(model, {"conv1": list(range(32))}, ex) == []  # keeping all is a no-op


def test_shrink_leaves_batch_norm_statistics_and_training_flag_alone() -> None:
    model = _model("resnet7").train()
    ex = example_input((1, 28, 28))
    before = model.bn1.running_mean.clone()
    small, _ = shrunk_copy(model, {"conv1": [0, 2]}, ex)
    assert torch.equal(model.bn1.running_mean, before)
    assert torch.equal(small.bn1.running_mean, before[[0, 2]])
    assert small.training and model.training


def test_reinitialize_is_seeded() -> None:
    a = reinitialize(_model("gap-cnn"), 5)
    b = reinitialize(_model("gap-cnn", seed=9), 5)
    c = reinitialize(_model("gap-cnn"), 6)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_hidden_linear_units_are_prunable_never_the_classifier() -> None:
    mlp = build_model("fc", (1, 28, 28), 10, seed=0)
    ex = example_input((1, 28, 28))
    assert prunable_layers(mlp, ex) == ["fc1", "fc2"]
    assert prunable_layers(mlp, ex, linear=False) == []
    heads = {"twocnn": ((1, 28, 28), 10), "leaf-cnn": ((1, 28, 28), 62)}
    for name, (shape, classes) in heads.items():
        layers = prunable_layers(build_model(name, shape, classes, seed=0), example_input(shape))
        assert layers == ["conv1", "conv2", "fc1"], name
    # a unit's score is the L1 norm of its incoming weights
    grp = structure(mlp, ex)[0][0]
    want = mlp.fc1.weight.detach().abs().double().sum(1)
    assert torch.equal(filter_scores(mlp, grp), want)


@pytest.mark.parametrize("name", ["fc", "twocnn"])
def test_shrunk_model_equals_masked_dense_model_on_kept_linear_units(name: str) -> None:
    shape, classes = (1, 28, 28), 10
    model = build_model(name, shape, classes, seed=0).eval()
    ex = example_input(shape)
    g = torch.Generator().manual_seed(3)
    keep = {}
    for grp in structure(model, ex)[0]:
        if isinstance(model.get_submodule(grp.layer), nn.Linear):
            keep[grp.layer] = sorted(
                torch.randperm(grp.width, generator=g)[: grp.width // 3].tolist()
            )
    small, hist = shrunk_copy(model, keep, ex)
    assert {e["layer"] for e in hist} == set(keep)
    masked = build_model(name, shape, classes, seed=0).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer, idx in keep.items():
            lin = masked.get_submodule(layer)
            drop = [j for j in range(lin.out_features) if j not in idx]
            lin.weight[drop] = 0.0
            lin.bias[drop] = 0.0
        x = torch.randn(4, *shape, generator=g)
        assert torch.allclose(small(x), masked(x), atol=1e-5)
        first = next(iter(keep))
        assert small.get_submodule(first).out_features == len(keep[first])
    fresh = replay(build_model(name, shape, classes, seed=9), json.loads(json.dumps(hist)), ex)
    fresh.load_state_dict(small.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), small(x))


def test_round_width_gives_multiples_never_grows() -> None:
    assert round_width(29, 32, 1) == 29  # round_to 1: the rule's count
    assert round_width(29, 32, 8) == 32 and round_width(28, 32, 8) == 32  # halves up
    assert round_width(27, 32, 8) == 24 and round_width(20, 32, 8) == 24
    assert round_width(19, 32, 8) == 16 and round_width(3, 32, 8) == 8  # at least round_to
    assert round_width(50, 50, 8) == 50  # a whole layer stays whole
    assert round_width(49, 50, 8) == 48 and round_width(3, 4, 8) == 4  # never grows
    for width in range(1, 70):
        for n in range(1, width + 1):
            m = round_width(n, width, 8)
            assert m == width or (m % 8 == 0 and 8 <= m < width)
    with pytest.raises(ValueError):
        round_width(0, 8, 8)
    with pytest.raises(ValueError):
        round_width(3, 8, 0)
