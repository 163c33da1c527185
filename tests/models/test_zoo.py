"""Model zoo: exact parameter counts, shape adaptation, registry errors, seeding, tracing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fedprune.errors import ConfigError
from fedprune.models import (
    MODELS,
    ModelInfo,
    SamePad2d,
    build_model,
    describe,
    keras_param_count,
    list_models,
)

NAMES = [
    "fc",
    "cnn6",
    "leaf-cnn",
    "gap-cnn",
    "celeba-cnn",
    "resnet7",
    "inception",
    "twocnn",
    "femnist-cnn",
    "resnet20",
    "vgg11",
    "vgg16",
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def dense(fin: int, fout: int) -> int:
    return fin * fout + fout


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------


def test_registry_lists_every_model_in_order() -> None:
    assert list(MODELS) == NAMES
    assert [info.name for info in list_models()] == NAMES
    for name, info in MODELS.items():
        assert isinstance(info, ModelInfo) and info.name == name
        assert len(info.default_input) == 3 and info.default_classes >= 2
        assert info.description and info.paper
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS["fc"].name = "x"  # type: ignore[misc]


@pytest.mark.parametrize("name", NAMES)
def test_forward_batch_of_two_at_default_input(name: str) -> None:
    info = MODELS[name]
    model = build_model(name, info.default_input, info.default_classes, seed=0)
    assert model.training
    out = model(torch.randn(2, *info.default_input))
    assert out.shape == (2, info.default_classes)
    assert torch.isfinite(out).all()
    # Logits, not probabilities: rows do not sum to one.
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))
    # ReLU modules (not functional calls), so pruning graphs and reports see them.
    assert any(isinstance(m, nn.ReLU) for m in model.modules())


def test_unknown_name_lists_names_and_closest_match() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("resnet-7", (3, 84, 84), 2)
    msg = str(err.value)
    assert "'resnet7'" in msg and "did you mean" in msg
    for name in NAMES:
        assert name in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("name", "shape"),
    [("gap-cnn", (1, 8, 8)), ("inception", (1, 8, 8)), ("vgg16", (1, 28, 28))],
)
def test_input_too_small_is_a_one_line_config_error_suggesting_models(
    name: str, shape: tuple[int, int, int]
) -> None:
    with pytest.raises(ConfigError) as err:
        build_model(name, shape, 10)
    msg = str(err.value)
    assert "\n" not in msg
    assert repr(name) in msg and str(shape) in msg
    assert "models that fit:" in msg and "fc" in msg.split("models that fit:")[1]
    assert name not in msg.split("models that fit:")[1].split(", ")


def test_models_that_fit_digits_build_and_run() -> None:
    # 8x8 scikit-learn digits: everything with "same" padding or adaptive pooling fits.
    for name in ["fc", "cnn6", "leaf-cnn", "resnet7", "twocnn", "femnist-cnn", "resnet20"]:
        model = build_model(name, (1, 8, 8), 10, seed=0)
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    ("shape", "classes"),
    [((1, 28), 10), ((0, 28, 28), 10), ((1, 28.0, 28), 10), ((1, 28, 28), 0)],
)
def test_bad_shape_or_classes_rejected(shape: tuple[int, int, int], classes: int) -> None:
    with pytest.raises(ConfigError):
        build_model("fc", shape, classes)


def test_hidden_only_where_the_architecture_has_one() -> None:
    with pytest.raises(ConfigError, match="hidden"):
        build_model("gap-cnn", (1, 28, 28), 62, hidden=64)
    with pytest.raises(ConfigError, match="hidden"):
        build_model("twocnn", (1, 28, 28), 10, hidden=0)
    fc = build_model("fc", (1, 28, 28), 10, hidden=64)
    assert n_params(fc) == dense(784, 64) + dense(64, 64) + dense(64, 10)
    small = build_model("femnist-cnn", (1, 28, 28), 62, hidden=8)
    assert n_params(small) == conv(1, 8, 5) + conv(8, 16, 5) + dense(16 * 49, 2048) + dense(
        2048, 62
    )


def test_seed_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("twocnn", (1, 28, 28), 10, seed=7)
    b = build_model("twocnn", (1, 28, 28), 10, seed=7)
    c = build_model("twocnn", (1, 28, 28), 10, seed=8)
    assert torch.equal(torch.rand(3), expected)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert not torch.equal(a.state_dict()["conv1.weight"], c.state_dict()["conv1.weight"])


# ---------------------------------------------------------------------------------------
# Exact parameter counts from the papers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "classes", "hidden", "expected"),
    [
        ("fc", (1, 28, 28), 10, None, 118_282),
        ("cnn6", (3, 32, 32), 10, None, 1_609_930),
        ("leaf-cnn", (1, 28, 28), 62, None, 6_603_710),
        ("gap-cnn", (1, 28, 28), 62, None, 56_126),
        ("celeba-cnn", (3, 84, 84), 2, None, 80_930),
        ("inception", (1, 28, 28), 62, None, 246_236),
        ("twocnn", (1, 28, 28), 10, None, 1_663_370),
        ("twocnn", (3, 32, 32), 10, None, 1_664_970),
        ("twocnn", (3, 32, 32), 100, 128, 7_303_524),
        ("femnist-cnn", (1, 28, 28), 62, None, 13_180_734),
    ],
)
def test_reference_parameter_counts(
    name: str, shape: tuple[int, int, int], classes: int, hidden: int | None, expected: int
) -> None:
    model = build_model(name, shape, classes, hidden=hidden)
    assert n_params(model) == expected


def test_cnn6_counts_trainable_and_keras_style() -> None:
    model = build_model("cnn6", (3, 32, 32), 10)
    assert n_params(model) == 1_609_930
    assert keras_param_count(model) == 1_610_314  # + 2 x (64 + 128) BN moving stats
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.2
    assert model.get_submodule("fc1").in_features == 4 * 4 * 128


def test_resnet7_keras_count_matches_paper() -> None:
    model = build_model("resnet7", (3, 84, 84), 2)
    assert keras_param_count(model) == 30_626
    bn_stats = 2 * (16 + (32 + 16 + 16) + (64 + 16 + 16))
    assert n_params(model) == 30_626 - bn_stats
    # 84 -> 42 (stem) -> 21 (pool) -> 11 -> 6 (blocks): flatten 6 x 6 x 16.
    assert model.get_submodule("classifier").in_features == 576


def test_keras_count_equals_trainable_without_batch_norm() -> None:
    model = build_model("gap-cnn", (1, 28, 28), 62)
    assert keras_param_count(model) == n_params(model)
    model.get_submodule("conv1").weight.requires_grad_(False)
    assert keras_param_count(model) == n_params(model) - 32 * 25


def test_resnet20_option_b_count_by_hand() -> None:
    def bn(c: int) -> int:
        return 2 * c

    def block(cin: int, cout: int) -> int:
        total = conv(cin, cout, 3, False) + bn(cout) + conv(cout, cout, 3, False) + bn(cout)
        if cin != cout:  # option B projection shortcut
            total += conv(cin, cout, 1, False) + bn(cout)
        return total

    expected = conv(3, 16, 3, False) + bn(16) + dense(64, 10)
    cin = 16
    for width in (16, 32, 64):
        for _ in range(3):
            expected += block(cin, width)
            cin = width
    model = build_model("resnet20", (3, 32, 32), 10)
    assert expected == 272_474
    assert n_params(model) == expected


@pytest.mark.parametrize(
    ("name", "widths", "classes", "expected"),
    [
        ("vgg11", [64, 128, 256, 256, 512, 512, 512, 512], 10, 9_231_114),
        ("vgg16", [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512], 10, 14_728_266),
        ("vgg16", [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512], 100, 14_774_436),
    ],
)
def test_vgg_counts_by_hand(name: str, widths: list[int], classes: int, expected: int) -> None:
    total, cin = 0, 3
    for w in widths:
        total += conv(cin, w, 3) + 2 * w  # conv with bias + BN gamma/beta
        cin = w
    total += dense(512, classes)  # 32x32 -> 1x1x512 after five pools
    assert total == expected
    assert n_params(build_model(name, (3, 32, 32), classes)) == expected


# ---------------------------------------------------------------------------------------
# Shape adaptation and padding
# ---------------------------------------------------------------------------------------


def test_flatten_sizes_follow_the_input_shape() -> None:
    leaf = build_model("leaf-cnn", (3, 32, 32), 10)
    assert leaf.get_submodule("fc1").in_features == 64 * 8 * 8
    cnn6 = build_model("cnn6", (1, 28, 28), 10)
    assert cnn6.get_submodule("fc1").in_features == 128 * 3 * 3
    celeba = build_model("celeba-cnn", (3, 84, 84), 2)
    assert celeba.get_submodule("classifier").in_features == 5 * 5 * 32
    vgg = build_model("vgg11", (3, 64, 64), 10)
    assert vgg.get_submodule("classifier").in_features == 512 * 2 * 2
    # Construction does not leave the model in eval mode or touch BN statistics.
    assert vgg.training
    bn = vgg.get_submodule("features.bn1_1")
    assert isinstance(bn, nn.BatchNorm2d)
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_var, torch.ones(64))


def test_same_pad_is_tensorflow_asymmetric() -> None:
    pad = SamePad2d(3, 2)
    out = pad(torch.ones(1, 1, 4, 4))  # even size: total 1, all of it bottom/right
    assert out.shape == (1, 1, 5, 5)
    assert out[0, 0, :4, :4].eq(1).all() and out[0, 0, 4].eq(0).all()
    assert out[0, 0, :, 4].eq(0).all()
    odd = pad(torch.ones(1, 1, 5, 5))  # odd size: total 2, one each side
    assert odd.shape == (1, 1, 7, 7) and odd[0, 0, 0].eq(0).all() and odd[0, 0, 6].eq(0).all()
    assert SamePad2d(1, 2)(torch.ones(1, 1, 4, 4)).shape == (1, 1, 4, 4)


def test_resnet7_block_shapes_follow_tf_same_padding() -> None:
    model = build_model("resnet7", (3, 84, 84), 2)
    shapes: dict[str, tuple[int, ...]] = {}
    for name in ["conv1", "pool1", "block1", "block2"]:
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, o, name=name: shapes.__setitem__(name, tuple(o.shape))
        )
    model(torch.zeros(1, 3, 84, 84))
    assert shapes == {
        "conv1": (1, 16, 42, 42),
        "pool1": (1, 16, 21, 21),
        "block1": (1, 16, 11, 11),
        "block2": (1, 16, 6, 6),
    }


def test_inception_uses_valid_strided_convs() -> None:
    model = build_model("inception", (1, 28, 28), 62)
    shapes: list[tuple[int, ...]] = []
    for name in ["conv1", "inception1", "inception2", "conv2", "conv3"]:
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, o: shapes.append(tuple(o.shape))
        )
    model(torch.zeros(1, 1, 28, 28))
    assert shapes == [
        (1, 32, 13, 13),
        (1, 48, 13, 13),
        (1, 96, 13, 13),
        (1, 96, 6, 6),
        (1, 96, 2, 2),
    ]


# ---------------------------------------------------------------------------------------
# describe and structured-pruning traceability
# ---------------------------------------------------------------------------------------


def test_describe_lists_layers_shapes_and_total() -> None:
    model = build_model("gap-cnn", (1, 28, 28), 62)
    model.eval()
    text = describe(model, (1, 28, 28))
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "output", "shape", "params"]
    conv2 = next(line for line in lines if line.startswith("conv2 "))
    assert "Conv2d" in conv2 and "(1, 64, 8, 8)" in conv2 and conv2.endswith("51,264")
    assert lines[-1].startswith("total") and lines[-1].endswith("56,126")
    assert not model.training  # flags restored, eval stays eval
    model.train()
    describe(model, (1, 28, 28))
    assert all(m.training for m in model.modules())


def test_torch_pruning_traces_resnet7_coupling() -> None:
    tp = pytest.importorskip("torch_pruning")
    model = build_model("resnet7", (3, 84, 84), 2, seed=0)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 84, 84))
    # Stem: its consumers are block1's first conv and its shortcut (through the same pad).
    stem = model.get_submodule("conv1")
    graph.get_pruning_group(stem, tp.prune_conv_out_channels, idxs=list(range(8))).prune()
    assert model.get_submodule("block1.conv1").in_channels == 8
    assert model.get_submodule("block1.shortcut_conv").in_channels == 8
    # A block's output width couples its second conv, its shortcut and the next consumers.
    out = model.get_submodule("block2.conv2")
    graph.get_pruning_group(out, tp.prune_conv_out_channels, idxs=list(range(4))).prune()
    assert model.get_submodule("block2.shortcut_conv").out_channels == 12
    assert model.get_submodule("classifier").in_features == 6 * 6 * 12
    assert model(torch.zeros(2, 3, 84, 84)).shape == (2, 2)
