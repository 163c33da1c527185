"""FLOPs counting: hand-computed references, the papers' numbers, effective FLOPs."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from fedprune.core.flops import FlopReport, count_flops, effective_flops
from fedprune.models import MODELS, build_model


def test_gap_cnn_exact_and_close_to_paper() -> None:
    report = count_flops(build_model("gap-cnn", (1, 28, 28), 62), (1, 28, 28))
    expected = 2 * (24 * 24 * 32 * 25 + 8 * 8 * 64 * 800) + 2 * 64 * 62
    assert report.total == expected
    assert report.per_layer == {
        "conv1": 2 * 24 * 24 * 32 * 25,
        "conv2": 2 * 8 * 8 * 64 * 32 * 25,
        "classifier": 2 * 64 * 62,
    }
    # The paper's TF profiler also counts bias adds, pooling and softmax.
    assert abs(report.total - 7_529_588) / 7_529_588 < 0.01


def test_fc_by_hand() -> None:
    report = count_flops(build_model("fc", (1, 28, 28), 10), (1, 28, 28))
    assert report.total == 2 * (784 * 128 + 128 * 128 + 128 * 10)
    assert list(report.per_layer) == ["fc1", "fc2", "classifier"]


def test_conv_layers_by_hand() -> None:
    report = count_flops(build_model("leaf-cnn", (1, 28, 28), 62), (1, 28, 28))
    # "same" 5x5 convs: output positions x output channels x (input channels x 25) MACs.
    assert report.per_layer["conv1"] == 2 * (28 * 28) * 32 * (1 * 25)
    assert report.per_layer["conv2"] == 2 * (14 * 14) * 64 * (32 * 25)
    assert report.per_layer["fc1"] == 2 * 3136 * 2048
    assert report.total == sum(report.per_layer.values())


@pytest.mark.parametrize(
    ("name", "paper"),
    [
        ("fc", 236_348),  # FedSparsify, FashionMNIST
        ("cnn6", 232_458_812),  # FedSparsify, CIFAR-10
        ("celeba-cnn", 152_485_804),
        ("inception", 31_010_894),
        ("resnet7", 5_234_332),
    ],
)
def test_close_to_published_profiler_numbers(name: str, paper: int) -> None:
    info = MODELS[name]
    report = count_flops(
        build_model(name, info.default_input, info.default_classes), info.default_input
    )
    # Conv/linear only is slightly below the profiler (which adds bias, BN, pooling).
    assert report.total <= paper
    assert (paper - report.total) / paper < (0.015 if name == "resnet7" else 0.01)


@pytest.mark.parametrize("name", list(MODELS))
def test_total_is_sum_of_named_conv_and_linear_layers(name: str) -> None:
    info = MODELS[name]
    model = build_model(name, info.default_input, info.default_classes)
    report = count_flops(model, info.default_input)
    assert report.total == sum(report.per_layer.values()) > 0
    modules = dict(model.named_modules())
    counted = {n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(report.per_layer) == counted


def test_model_is_left_unchanged() -> None:
    model = build_model("cnn6", (3, 32, 32), 10, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    count_flops(model, (3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert [id(p) for p in model.parameters()] == params
    for key, value in model.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, before[key]), key
    model.eval()
    count_flops(model, (3, 32, 32))
    assert not any(m.training for m in model.modules())
    assert not model._forward_hooks and not model.get_submodule("conv1")._forward_pre_hooks


def test_physically_shrunk_model() -> None:
    full = count_flops(build_model("gap-cnn", (1, 28, 28), 62), (1, 28, 28))
    shrunk = nn.Sequential()
    shrunk.add_module("conv1", nn.Conv2d(1, 16, 5))
    shrunk.add_module("relu1", nn.ReLU())
    shrunk.add_module("pool1", nn.MaxPool2d(2))
    shrunk.add_module("conv2", nn.Conv2d(16, 40, 5))
    shrunk.add_module("gap", nn.AdaptiveAvgPool2d(1))
    shrunk.add_module("flatten", nn.Flatten())
    shrunk.add_module("classifier", nn.Linear(40, 62))
    report = count_flops(shrunk, (1, 28, 28))
    assert report.per_layer["conv1"] == full.per_layer["conv1"] // 2
    assert report.per_layer["conv2"] == 2 * 8 * 8 * 40 * 16 * 25
    assert report.per_layer["classifier"] == 2 * 40 * 62


def test_shared_layer_counted_per_call_and_data_dependent_fallback() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            x = x.flatten(1)
            if x.sum().item() > 1e9:  # data-dependent: cannot run on the meta device
                return x
            return self.fc(self.fc(x))

    report = count_flops(Twice(), (1, 2, 2))
    assert report.per_layer == {"fc": 2 * 2 * 4 * 4}
    assert report.total == 64


def test_effective_flops() -> None:
    report = count_flops(build_model("gap-cnn", (1, 28, 28), 62), (1, 28, 28))
    assert effective_flops(report, {}) == report.total
    half = effective_flops(report, {"conv2": 0.5})
    assert half == report.total - 0.5 * report.per_layer["conv2"]
    assert effective_flops(report, {"conv2.weight": 0.5}) == half
    assert effective_flops(report, dict.fromkeys(report.per_layer, 0.0)) == 0.0
    with pytest.raises(ValueError, match="conv9"):
        effective_flops(report, {"conv9": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        effective_flops(report, {"conv1": 1.5})


def test_report_is_frozen() -> None:
    report = FlopReport(total=1, per_layer={"a": 1})
    with pytest.raises(AttributeError):
        report.total = 2  # type: ignore[misc]


def test_fast_on_leaf_cnn() -> None:
    model = build_model("leaf-cnn", (1, 28, 28), 62)
    count_flops(model, (1, 28, 28))
    best = min(_timed(lambda: count_flops(model, (1, 28, 28))) for _ in range(3))
    assert best < 0.2


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
