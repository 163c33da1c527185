"""The model zoo: the architectures of the three papers plus standard CIFAR baselines.

Every model is a plain :class:`torch.nn.Module` built from standard layers (convolutions,
batch norm, ``nn.ReLU`` modules, pooling, residual adds and ``torch.cat``), so that
Torch-Pruning's dependency graph can trace it and ONNX can export it. Models output
logits: the papers' Keras ``softmax`` + categorical cross-entropy is cross-entropy on
logits here.

Input shape ``(C, H, W)`` and class count come from the data set. Flatten sizes are found
with a dummy forward pass at construction; an input too small for a model raises
:class:`~fedprune.errors.ConfigError` (see :func:`fedprune.models.build_model`).

Framework conventions that differ from the Keras originals, on purpose:

- PyTorch's default initialisation (Kaiming-uniform) instead of Keras' Glorot-uniform.
- Batch norm uses PyTorch's defaults (``eps=1e-5``, ``momentum=0.1``) rather than Keras'
  (``eps=1e-3``, moving-average momentum 0.99): with the few local steps of a federated
  client, Keras' slow moving average would leave the running statistics near their
  initial values. Parameter counts are unaffected.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedprune.errors import ConfigError

__all__ = [
    "CNN6",
    "FC2",
    "FEMNISTCNN",
    "VGG",
    "VGG_CONFIGS",
    "CelebACNN",
    "GapCNN",
    "InceptionNet",
    "LeafCNN",
    "ModelDoesNotFitError",
    "NaiveInception",
    "ResNet7",
    "ResNet7Block",
    "ResNet20",
    "ResNetBasicBlock",
    "SamePad2d",
    "TwoCNN",
]


class ModelDoesNotFitError(ConfigError):
    """The input is too small for a model; the message names the failing layer."""


def _probe(layers: Iterable[nn.Module], input_shape: tuple[int, int, int]) -> torch.Size:
    """Return the output shape (batch 1) of ``layers`` applied in order to zeros.

    Runs in eval mode (batch norm neither needs two samples nor updates its running
    statistics; the training flags are restored) under ``torch.no_grad``, on the default
    device (``meta`` when the caller builds the model on the meta device: nothing computed).

    Raises
    ------
    ModelDoesNotFitError
        If a layer rejects the shape (for example a kernel larger than its input) or a
        spatial size reaches zero.
    """
    layers = list(layers)
    modules = [m for layer in layers for m in layer.modules()]
    flags = [m.training for m in modules]
    x = torch.zeros(1, *input_shape)
    try:
        for m in modules:
            m.training = False
        with torch.no_grad():
            for layer in layers:
                x = layer(x)
                if any(s == 0 for s in x.shape):
                    raise ModelDoesNotFitError(
                        f"{type(layer).__name__} gave shape {tuple(x.shape)}"
                    )
    except RuntimeError as exc:
        text = str(exc).strip()
        raise ModelDoesNotFitError(text.splitlines()[0] if text else type(exc).__name__) from exc
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.training = flag
    return x.shape


class _Stack(nn.Module):
    """A chain of named layers applied in order (like ``nn.Sequential``, but flat names).

    Subclasses fill ``self`` through :meth:`_add`; the qualified names of the layers are then
    their keys (``conv1``, ``fc1``, ``classifier``...), which masks and reports use.
    """

    def _add(self, layers: OrderedDict[str, nn.Module]) -> None:
        for name, layer in layers.items():
            self.add_module(name, layer)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.children():
            x = layer(x)
        return x


def _flat_features(layers: OrderedDict[str, nn.Module], input_shape: tuple[int, int, int]) -> int:
    return math.prod(_probe(layers.values(), input_shape)[1:])


# ---------------------------------------------------------------------------------------
# FedSparsify (§3.4)
# ---------------------------------------------------------------------------------------


class FC2(_Stack):
    """FedSparsify's 2-FC network: Flatten -> 128 ReLU -> 128 ReLU -> classes.

    118,282 parameters on 28x28x1 inputs with 10 classes.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``.
    num_classes : int
        Number of output logits.
    hidden : int, default 128
        Width of both hidden layers.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, hidden: int = 128):
        super().__init__()
        in_features = math.prod(input_shape)
        self._add(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(in_features, hidden),
                relu1=nn.ReLU(),
                fc2=nn.Linear(hidden, hidden),
                relu2=nn.ReLU(),
                classifier=nn.Linear(hidden, num_classes),
            )
        )


class CNN6(_Stack):
    """FedSparsify's CIFAR-10 "6-CNN".

    2 x Conv3x3-64 (same, ReLU) -> MaxPool2 -> BN -> 2 x Conv3x3-128 -> MaxPool2 -> BN ->
    2 x Conv3x3-128 -> MaxPool2 -> Flatten -> Dense 512 ReLU -> Dropout 0.2 -> Dense.

    On 32x32x3 with 10 classes: 1,609,930 trainable parameters, 1,610,314 counted the Keras
    way (with the 384 batch-norm moving statistics).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c = input_shape[0]
        features: OrderedDict[str, nn.Module] = OrderedDict()
        widths = [(c, 64), (64, 64), (64, 128), (128, 128), (128, 128), (128, 128)]
        for i, (cin, cout) in enumerate(widths, start=1):
            features[f"conv{i}"] = nn.Conv2d(cin, cout, 3, padding=1)
            features[f"relu{i}"] = nn.ReLU()
            if i % 2 == 0:
                stage = i // 2
                features[f"pool{stage}"] = nn.MaxPool2d(2)
                if stage < 3:
                    features[f"bn{stage}"] = nn.BatchNorm2d(cout)
        features["flatten"] = nn.Flatten()
        n = _flat_features(features, input_shape)
        features["fc1"] = nn.Linear(n, 512)
        features["relu7"] = nn.ReLU()
        features["dropout"] = nn.Dropout(0.2)
        features["classifier"] = nn.Linear(512, num_classes)
        self._add(features)


# ---------------------------------------------------------------------------------------
# LEAF reference CNN (environment.md §3(a))
# ---------------------------------------------------------------------------------------


class LeafCNN(_Stack):
    """The LEAF FEMNIST CNN.

    Conv5x5-32 (pad 2) -> ReLU -> MaxPool2 -> Conv5x5-64 (pad 2) -> ReLU -> MaxPool2 ->
    Dense 2048 ReLU -> Dense. 6,603,710 parameters on 28x28x1 with 62 classes.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=nn.Conv2d(input_shape[0], 32, 5, padding=2),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(32, 64, 5, padding=2),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
        )
        n = _flat_features(layers, input_shape)
        layers["fc1"] = nn.Linear(n, 2048)
        layers["relu3"] = nn.ReLU()
        layers["classifier"] = nn.Linear(2048, num_classes)
        self._add(layers)


# ---------------------------------------------------------------------------------------
# Automatic structured pruning paper (§1.5)
# ---------------------------------------------------------------------------------------


class GapCNN(_Stack):
    """The structured-pruning paper's FEMNIST CNN ("vanilla_conv").

    Conv5x5-32 (valid) -> ReLU -> MaxPool2 -> Conv5x5-64 (valid) -> ReLU -> MaxPool2 ->
    global average pooling -> Dense. No batch norm, no dropout. 56,126 parameters on
    28x28x1 with 62 classes. Needs inputs of at least 16x16.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=nn.Conv2d(input_shape[0], 32, 5),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(32, 64, 5),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            gap=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
        )
        n = _flat_features(layers, input_shape)
        layers["classifier"] = nn.Linear(n, num_classes)
        self._add(layers)


class CelebACNN(_Stack):
    """The structured-pruning paper's CelebA CNN.

    4 x [Conv5x5-32 (same) -> ReLU -> MaxPool2 (valid)] -> Flatten -> Dense. On 84x84x3 the
    features are 5x5x32 = 800 and the model has 80,930 parameters (2 classes). The
    original's declared dropout rate is unused there and is not reproduced.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin = input_shape[0]
        for i in range(1, 5):
            layers[f"conv{i}"] = nn.Conv2d(cin, 32, 5, padding=2)
            layers[f"relu{i}"] = nn.ReLU()
            layers[f"pool{i}"] = nn.MaxPool2d(2)
            cin = 32
        layers["flatten"] = nn.Flatten()
        n = _flat_features(layers, input_shape)
        layers["classifier"] = nn.Linear(n, num_classes)
        self._add(layers)


class SamePad2d(nn.Module):
    """Zero padding that reproduces TensorFlow's ``padding="same"`` for a strided window.

    TensorFlow pads a total of ``max((ceil(n / s) - 1) * s + k - n, 0)`` along each spatial
    dimension, putting the extra pixel (if the total is odd) at the bottom/right. Follow
    this module by a convolution with ``padding=0``. The padding is computed from the
    input's size at every call, so any input size works.

    Parameters
    ----------
    kernel_size : int
        Window size of the following layer.
    stride : int
        Stride of the following layer.
    """

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def _amount(self, n: int) -> tuple[int, int]:
        total = max((math.ceil(n / self.stride) - 1) * self.stride + self.kernel_size - n, 0)
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:
        top, bottom = self._amount(int(x.shape[-2]))
        left, right = self._amount(int(x.shape[-1]))
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class ResNet7Block(nn.Module):
    """One residual block of the structured-pruning paper's small ResNet.

    Main path: Conv3x3 stride 2 (``width``, TF "same") -> BN -> ReLU -> Conv3x3
    (``in_channels``, same) -> BN. Shortcut: Conv1x1 stride 2 -> BN. Add -> ReLU. The
    block's output width equals its input width; only ``conv1`` is prunable on its own.

    Parameters
    ----------
    in_channels : int
        Input (and output) channels.
    width : int
        Output channels of ``conv1``.
    """

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.pad1 = SamePad2d(3, 2)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=2)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, in_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(in_channels)
        # A 1x1 stride-2 "same" convolution needs no padding: output ceil(n / 2) either way.
        self.shortcut_conv = nn.Conv2d(in_channels, in_channels, 1, stride=2)
        self.shortcut_bn = nn.BatchNorm2d(in_channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(self.pad1(x))))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut_bn(self.shortcut_conv(x))
        return self.relu2(out)


class ResNet7(nn.Module):
    """The structured-pruning paper's "ResNet" (ResNet-7: 7 convolutions, widths 16/32/64).

    Stem: Conv3x3 stride 2 (16, TF "same") -> BN -> ReLU -> MaxPool2 ("same", i.e.
    ``ceil_mode``). Then one :class:`ResNet7Block` per width 32 and 64, Flatten -> Dense.

    On 84x84x3 with 2 classes: 84 -> 42 -> 21 -> 11 -> 6, flatten 6x6x16 = 576, 30,274
    trainable parameters and 30,626 counted the Keras way (with the 352 batch-norm moving
    statistics), as the paper reports. TensorFlow's asymmetric "same" padding of stride-2
    convolutions on even sizes (extra row/column at the bottom/right) is reproduced by
    :class:`SamePad2d`.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        stem = 16
        self.pad1 = SamePad2d(3, 2)
        self.conv1 = nn.Conv2d(input_shape[0], stem, 3, stride=2)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2, ceil_mode=True)
        self.block1 = ResNet7Block(stem, 32)
        self.block2 = ResNet7Block(stem, 64)
        self.flatten = nn.Flatten()
        n = math.prod(_probe(list(self.children()), input_shape)[1:])
        self.classifier = nn.Linear(n, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(self.pad1(x)))))
        x = self.block2(self.block1(x))
        return self.classifier(self.flatten(x))


class NaiveInception(nn.Module):
    """A naive inception module: parallel 1x1, 3x3 and 5x5 convolutions ("same", ReLU),
    concatenated along channels.

    Parameters
    ----------
    in_channels : int
        Input channels.
    widths : tuple of int
        Output channels of the 1x1, 3x3 and 5x5 branches.
    """

    def __init__(self, in_channels: int, widths: tuple[int, int, int]):
        super().__init__()
        self.branch1x1 = nn.Conv2d(in_channels, widths[0], 1)
        self.relu1x1 = nn.ReLU()
        self.branch3x3 = nn.Conv2d(in_channels, widths[1], 3, padding=1)
        self.relu3x3 = nn.ReLU()
        self.branch5x5 = nn.Conv2d(in_channels, widths[2], 5, padding=2)
        self.relu5x5 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.relu1x1(self.branch1x1(x)),
                self.relu3x3(self.branch3x3(x)),
                self.relu5x5(self.branch5x5(x)),
            ],
            dim=1,
        )


class InceptionNet(_Stack):
    """The structured-pruning paper's naive Inception network.

    Conv3x3 stride 2 (32, valid, ReLU) -> :class:`NaiveInception` (16, 16, 16) ->
    :class:`NaiveInception` (32, 32, 32) -> Conv3x3 stride 2 (96, valid, ReLU) -> Conv3x3
    stride 2 (96, valid, ReLU) -> global average pooling -> Dense 50 ReLU -> Dense.

    246,236 parameters on 28x28x1 with 62 classes (28 -> 13 -> 6 -> 2). The two stride-2
    96-wide convolutions use Keras' default "valid" padding: that reproduces the paper's
    31,010,894 FLOPs within 0.2%, whereas "same" would give about 35 M. Needs inputs of at
    least 15x15.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=nn.Conv2d(input_shape[0], 32, 3, stride=2),
            relu1=nn.ReLU(),
            inception1=NaiveInception(32, (16, 16, 16)),
            inception2=NaiveInception(48, (32, 32, 32)),
            conv2=nn.Conv2d(96, 96, 3, stride=2),
            relu2=nn.ReLU(),
            conv3=nn.Conv2d(96, 96, 3, stride=2),
            relu3=nn.ReLU(),
            gap=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
        )
        n = _flat_features(layers, input_shape)
        layers["fc1"] = nn.Linear(n, 50)
        layers["relu4"] = nn.ReLU()
        layers["classifier"] = nn.Linear(50, num_classes)
        self._add(layers)


# ---------------------------------------------------------------------------------------
# AutoFLIP (§2.4)
# ---------------------------------------------------------------------------------------


class TwoCNN(_Stack):
    """AutoFLIP's TwoCNN (McMahan et al. 2017 style) with hidden width ``h``.

    Conv5x5-h (pad 1) -> ReLU -> MaxPool2 (pad 1) -> Conv5x5-2h (pad 1) -> ReLU -> MaxPool2
    (pad 1) -> AdaptiveAvgPool 7x7 -> Linear(2h*49 -> 512) -> ReLU -> Linear(512 -> classes).

    Parameter counts: 1,663,370 (28x28x1, 10 classes, h=32), 1,664,970 (32x32x3, 10
    classes), 7,303,524 (32x32x3, 100 classes, h=128).

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``.
    num_classes : int
        Number of output logits.
    hidden : int, default 32
        Width ``h`` of the first convolution.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, hidden: int = 32):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=nn.Conv2d(input_shape[0], hidden, 5, padding=1),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2, padding=1),
            conv2=nn.Conv2d(hidden, 2 * hidden, 5, padding=1),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2, padding=1),
            avgpool=nn.AdaptiveAvgPool2d(7),
            flatten=nn.Flatten(),
        )
        n = _flat_features(layers, input_shape)
        layers["fc1"] = nn.Linear(n, 512)
        layers["relu3"] = nn.ReLU()
        layers["classifier"] = nn.Linear(512, num_classes)
        self._add(layers)


class FEMNISTCNN(_Stack):
    """AutoFLIP's FEMNIST CNN with hidden width ``h``.

    Conv5x5-h (pad 1) -> ReLU -> MaxPool2 (stride 2, pad 1) -> Conv5x5-2h (pad 1) -> ReLU ->
    MaxPool2 (pad 1) -> AdaptiveAvgPool 7x7 -> Linear(2h*49 -> 2048) -> ReLU ->
    Linear(2048 -> classes). 13,180,734 parameters on 28x28x1 with 62 classes (h=64).
    Both convolutions and both pools use padding 1, as in the public PyTorch code this
    model comes from (28 -> 26 -> 14 -> 12 -> 7).

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)``.
    num_classes : int
        Number of output logits.
    hidden : int, default 64
        Width ``h`` of the first convolution.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, hidden: int = 64):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv1=nn.Conv2d(input_shape[0], hidden, 5, padding=1),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2, stride=2, padding=1),
            conv2=nn.Conv2d(hidden, 2 * hidden, 5, padding=1),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2, stride=2, padding=1),
            avgpool=nn.AdaptiveAvgPool2d(7),
            flatten=nn.Flatten(),
        )
        n = _flat_features(layers, input_shape)
        layers["fc1"] = nn.Linear(n, 2048)
        layers["relu3"] = nn.ReLU()
        layers["classifier"] = nn.Linear(2048, num_classes)
        self._add(layers)


# ---------------------------------------------------------------------------------------
# Standard CIFAR baselines
# ---------------------------------------------------------------------------------------


class ResNetBasicBlock(nn.Module):
    """He et al.'s basic block: Conv3x3 -> BN -> ReLU -> Conv3x3 -> BN, + shortcut, ReLU.

    The shortcut is the identity, or (option B) Conv1x1 with the block's stride -> BN when
    the shape changes.

    Parameters
    ----------
    in_channels : int
        Input channels.
    out_channels : int
        Output channels.
    stride : int, default 1
        Stride of the first convolution and of the projection shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(out_channels),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 with option-B (1x1 convolution + BN) projection shortcuts.

    Conv3x3-16 -> BN -> ReLU -> 3 stages of 3 :class:`ResNetBasicBlock` (16, 32, 64 channels;
    stride 2 at the start of stages 2 and 3) -> global average pooling -> Dense.
    Convolutions have no bias. 272,474 parameters for 10 classes (option A, the parameter-
    free zero-padding shortcut of the paper, would have 269,722; option B is used because
    its shortcut is an ordinary layer that structured pruning can trace and shrink).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        cin = 16
        stages = []
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(3):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(ResNetBasicBlock(cin, width, stride))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        n = math.prod(_probe(list(self.children()), input_shape)[1:])
        self.classifier = nn.Linear(n, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(self.flatten(self.gap(x)))


_VGG512: list[int | str] = [512, 512, 512, "M"]

VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", *_VGG512, *_VGG512],
}
"""Convolution widths (ints) and 2x2 max pools (``"M"``) of the CIFAR VGG variants."""


class VGG(nn.Module):
    """VGG with batch norm for CIFAR: convolution stack + one linear classifier.

    Each convolution is Conv3x3 (pad 1, with bias, as Keras' and the common CIFAR
    implementations) -> BN -> ReLU; ``"M"`` is a 2x2 max pool. After the five pools a
    32x32 input is 1x1x512, flattened into a single ``Linear`` (FedSparsify's "VGG-16 conv
    layers + one Dense"). VGG-11: 9,231,114 parameters, VGG-16: 14,728,266 (10 classes).
    Needs inputs of at least 32x32.

    Parameters
    ----------
    config : str
        ``"vgg11"`` or ``"vgg16"`` (a key of :data:`VGG_CONFIGS`).
    input_shape : tuple of int
        ``(C, H, W)``.
    num_classes : int
        Number of output logits.
    """

    def __init__(self, config: str, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin, block, conv = input_shape[0], 1, 1
        for item in VGG_CONFIGS[config]:
            if item == "M":
                layers[f"pool{block}"] = nn.MaxPool2d(2)
                block, conv = block + 1, 1
                continue
            assert isinstance(item, int)
            name = f"{block}_{conv}"
            layers[f"conv{name}"] = nn.Conv2d(cin, item, 3, padding=1)
            layers[f"bn{name}"] = nn.BatchNorm2d(item)
            layers[f"relu{name}"] = nn.ReLU()
            cin, conv = item, conv + 1
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        n = math.prod(_probe([self.features, self.flatten], input_shape)[1:])
        self.classifier = nn.Linear(n, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.features(x)))
