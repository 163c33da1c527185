"""Model names, metadata and the single entry point that builds a model by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedprune.errors import ConfigError
from fedprune.models import zoo

__all__ = [
    "MODELS",
    "ModelInfo",
    "build_model",
    "describe",
    "keras_param_count",
    "list_models",
]


@dataclass(frozen=True)
class ModelInfo:
    """What the zoo knows about one model.

    Attributes
    ----------
    name : str
        Registry name, as given to :func:`build_model` and ``--model``.
    description : str
        One line: the architecture in words.
    paper : str
        Where the architecture comes from.
    default_input : tuple of int
        ``(C, H, W)`` of the data set the model was published with.
    default_classes : int
        Class count of that data set.
    """

    name: str
    description: str
    paper: str
    default_input: tuple[int, int, int]
    default_classes: int


_FEDSPARSIFY = "FedSparsify (Stripelis et al.)"
_AUTOSTRUCT = "Automatic structured pruning (Nguyen, Le, Avila 2024)"
_AUTOFLIP = "AutoFLIP (Internò et al.)"

MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in [
        ModelInfo(
            "fc",
            "2-layer MLP: Flatten -> 128 ReLU -> 128 ReLU -> classes",
            _FEDSPARSIFY,
            (1, 28, 28),
            10,
        ),
        ModelInfo(
            "cnn6",
            "6-conv CIFAR CNN with 2 BN, Dense 512, dropout 0.2",
            _FEDSPARSIFY,
            (3, 32, 32),
            10,
        ),
        ModelInfo(
            "leaf-cnn",
            "LEAF FEMNIST CNN: 2 conv5x5 (32, 64) + Dense 2048",
            "LEAF benchmark (Caldas et al. 2018)",
            (1, 28, 28),
            62,
        ),
        ModelInfo(
            "gap-cnn",
            "2 valid conv5x5 (32, 64) + global average pooling",
            _AUTOSTRUCT,
            (1, 28, 28),
            62,
        ),
        ModelInfo(
            "celeba-cnn",
            "4 x [conv5x5 32 same -> pool] + Dense",
            _AUTOSTRUCT,
            (3, 84, 84),
            2,
        ),
        ModelInfo(
            "resnet7",
            "small ResNet: stem 16 + residual blocks 32, 64 (7 convs)",
            _AUTOSTRUCT,
            (3, 84, 84),
            2,
        ),
        ModelInfo(
            "inception",
            "stem conv + 2 naive inception modules + 2 strided convs + GAP",
            _AUTOSTRUCT,
            (1, 28, 28),
            62,
        ),
        ModelInfo(
            "twocnn",
            "2 conv5x5 (h, 2h; h=32) + Dense 512",
            _AUTOFLIP,
            (1, 28, 28),
            10,
        ),
        ModelInfo(
            "femnist-cnn",
            "2 conv5x5 (h, 2h; h=64) + Dense 2048",
            _AUTOFLIP,
            (1, 28, 28),
            62,
        ),
        ModelInfo(
            "resnet20",
            "CIFAR ResNet-20, 1x1-conv (option B) shortcuts",
            "He et al. 2016",
            (3, 32, 32),
            10,
        ),
        ModelInfo(
            "vgg11",
            "VGG-11 with BN, conv stack + one Dense",
            "Simonyan & Zisserman 2015 (CIFAR variant)",
            (3, 32, 32),
            10,
        ),
        ModelInfo(
            "vgg16",
            "VGG-16 with BN, conv stack + one Dense",
            "Simonyan & Zisserman 2015; FedSparsify's CIFAR-100 model",
            (3, 32, 32),
            100,
        ),
    ]
}
"""All models of the zoo, by registry name."""

_Builder = Callable[[tuple[int, int, int], int, int | None], nn.Module]


def _plain(cls: Callable[[tuple[int, int, int], int], nn.Module]) -> _Builder:
    return lambda shape, classes, _hidden: cls(shape, classes)


def _with_hidden(
    cls: Callable[[tuple[int, int, int], int, int], nn.Module], default: int
) -> _Builder:
    return lambda shape, classes, hidden: cls(shape, classes, default if hidden is None else hidden)


_BUILDERS: dict[str, _Builder] = {
    "fc": _with_hidden(zoo.FC2, 128),
    "cnn6": _plain(zoo.CNN6),
    "leaf-cnn": _plain(zoo.LeafCNN),
    "gap-cnn": _plain(zoo.GapCNN),
    "celeba-cnn": _plain(zoo.CelebACNN),
    "resnet7": _plain(zoo.ResNet7),
    "inception": _plain(zoo.InceptionNet),
    "twocnn": _with_hidden(zoo.TwoCNN, 32),
    "femnist-cnn": _with_hidden(zoo.FEMNISTCNN, 64),
    "resnet20": _plain(zoo.ResNet20),
    "vgg11": lambda shape, classes, _hidden: zoo.VGG("vgg11", shape, classes),
    "vgg16": lambda shape, classes, _hidden: zoo.VGG("vgg16", shape, classes),
}

_HIDDEN_MODELS = ("fc", "twocnn", "femnist-cnn")
"""Models whose hidden width ``hidden`` sets (fc: both dense layers; the CNNs: h)."""


def list_models() -> list[ModelInfo]:
    """Return the metadata of every model, in registry order.

    Returns
    -------
    list of ModelInfo
        One entry per registry name.
    """
    return list(MODELS.values())


def _check_name(name: str) -> None:
    if name in _BUILDERS:
        return
    close = difflib.get_close_matches(name, list(_BUILDERS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown model {name!r}{hint} (valid: {', '.join(_BUILDERS)})")


def _check_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise ConfigError(
            f"model input shape must be 3 positive ints (C, H, W), got {input_shape!r}"
        )
    return (shape[0], shape[1], shape[2])


def _fitting_models(input_shape: tuple[int, int, int], num_classes: int) -> list[str]:
    """Names of the models that accept ``input_shape`` (built on the meta device: cheap)."""
    fits = []
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        for name, builder in _BUILDERS.items():
            try:
                builder(input_shape, num_classes, None)
            except ConfigError:
                continue
            fits.append(name)
    return fits


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    hidden: int | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Build a zoo model for a data set's input shape and class count.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    input_shape : tuple of int
        ``(C, H, W)`` of one sample.
    num_classes : int
        Number of output logits (>= 1).
    hidden : int, optional
        Hidden width where the architecture has one: ``twocnn`` (h, default 32),
        ``femnist-cnn`` (h, default 64) and ``fc`` (both dense layers, default 128).
    seed : int, optional
        If given, the initialisation is deterministic for this seed; the global random
        state is left untouched (the seed is applied inside ``torch.random.fork_rng``).
        Without it, the global generator is used.

    Returns
    -------
    torch.nn.Module
        The model, in training mode, on the CPU (or on the default device), with float32
        parameters. It outputs logits.

    Raises
    ------
    ConfigError
        Unknown name (the message lists valid names and the closest match), malformed input
        shape or class count, ``hidden`` given for a model without a hidden width or not
        positive, or an input too small for the model (the message suggests models that
        fit).
    """
    _check_name(name)
    shape = _check_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"number of classes must be a positive int, got {num_classes!r}")
    if hidden is not None:
        if name not in _HIDDEN_MODELS:
            raise ConfigError(
                f"model {name!r} has no hidden width to set; 'hidden' applies to "
                f"{', '.join(_HIDDEN_MODELS)}"
            )
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ConfigError(f"model hidden width must be a positive int, got {hidden!r}")
    builder = _BUILDERS[name]
    try:
        if seed is None:
            return builder(shape, num_classes, hidden)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return builder(shape, num_classes, hidden)
    except zoo.ModelDoesNotFitError as exc:
        fits = [n for n in _fitting_models(shape, num_classes) if n != name]
        hint = f"; models that fit: {', '.join(fits)}" if fits else ""
        raise ConfigError(
            f"model {name!r} does not fit input shape {shape} (C, H, W): {exc}{hint}"
        ) from exc


def keras_param_count(model: nn.Module) -> int:
    """Count parameters the way Keras' ``model.count_params()`` does.

    Keras counts batch-norm moving mean and variance as (non-trainable) weights, so this is
    the number of trainable parameter elements plus the elements of every batch-norm
    ``running_mean`` and ``running_var`` (``num_batches_tracked`` is PyTorch-only and not
    counted).

    Parameters
    ----------
    model : torch.nn.Module
        Any model.

    Returns
    -------
    int
        The Keras-style parameter count.
    """
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for buf in (module.running_mean, module.running_var):
                if buf is not None:
                    total += buf.numel()
    return total


def describe(model: nn.Module, input_shape: tuple[int, int, int]) -> str:
    """Return a per-layer table: name, type, output shape and parameters of each leaf layer.

    One forward pass on zeros (batch 1, eval mode, no gradients; the training flags are
    restored) records the output shape of every leaf module. Layers are listed in call
    order; a leaf called twice is listed twice. Parameters are the layer's own (not
    recursive); the last line gives the totals.

    Parameters
    ----------
    model : torch.nn.Module
        The model to describe (left unchanged).
    input_shape : tuple of int
        ``(C, H, W)`` of one sample.

    Returns
    -------
    str
        A plain-text table, one line per layer.
    """
    rows: list[tuple[str, str, str, int]] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def hook(module: nn.Module, _inputs: object, output: object) -> None:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else "?"
        own = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append((names[module], type(module).__name__, str(shape), own))

    for module in model.modules():
        if next(module.children(), None) is None:
            handles.append(module.register_forward_hook(hook))
    flags = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    # Parameters not owned by any leaf (rare) still count in the total.
    total = sum(p.numel() for p in model.parameters())
    header = ("layer", "type", "output shape", "params")
    body = [(n, t, s, f"{p:,}") for n, t, s, p in rows]
    footer = ("total", type(model).__name__, f"input {(1, *input_shape)}", f"{total:,}")
    widths = [max(len(r[i]) for r in [header, *body, footer]) for i in range(4)]

    def fmt(r: tuple[str, str, str, str]) -> str:
        return (
            f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}"
        ).rstrip()

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(footer)])
