"""FLOPs of a model's forward pass, dense and weighted by weight density.

The convention of all three papers: FLOPs = 2 x multiply-accumulates (MACs) of the
convolution and linear layers, for one sample, forward pass. Bias additions, batch norm,
activations and pooling are not counted (the papers' TensorFlow profiler adds them, which
changes totals by about 1%). Counting is done by :class:`torch.utils.flop_counter.FlopCounterMode`
on a real forward pass, so any shape (including physically shrunk models) is handled.

Effective FLOPs of an unstructured-sparse model weight each layer by the density of its
weight: ``sum(flops[layer] * density[layer])``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["COUNTED_LAYERS", "FlopReport", "count_flops", "effective_flops"]

COUNTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""Layer types whose FLOPs are counted (subclasses included)."""

_PreHook = Callable[[nn.Module, tuple[Any, ...]], None]
_PostHook = Callable[[nn.Module, tuple[Any, ...], Any], None]


@dataclass(frozen=True)
class FlopReport:
    """FLOPs of one forward pass of one sample.

    Attributes
    ----------
    total : int
        2 x MACs of all convolution and linear layers; equals ``sum(per_layer.values())``.
    per_layer : dict of str to int
        Qualified module name (as in ``model.named_modules()``) -> FLOPs of that layer, in
        call order. A layer called several times is counted each time.
    """

    total: int
    per_layer: dict[str, int]


def count_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> FlopReport:
    """Count the forward FLOPs of ``model`` for one sample of shape ``input_shape``.

    Runs one forward pass (batch 1) in eval mode and without gradients, under
    :class:`~torch.utils.flop_counter.FlopCounterMode` (which counts 2 x MACs for matrix
    products and convolutions). The FLOPs of each convolution/linear layer are the
    counter's increase across that layer's forward call, taken with forward hooks. The
    pass runs on the meta device (the model's parameters and buffers are swapped for
    shape-only meta tensors with :func:`torch.func.functional_call`), so nothing is
    computed and the cost does not grow with the model's arithmetic; if some operation
    cannot run on the meta device, a real pass on zeros is counted instead. The model is
    left as it was: hooks are removed, every module's training flag is restored, and
    batch-norm statistics are not updated.

    Parameters
    ----------
    model : torch.nn.Module
        The model; its parameters' device and dtype are used for the input.
    input_shape : tuple of int
        Shape of one sample without the batch dimension, e.g. ``(C, H, W)``.

    Returns
    -------
    FlopReport
        Total and per-layer FLOPs.
    """
    counter = FlopCounterMode(display=False)
    per_layer: dict[str, int] = {}
    started: dict[str, int] = {}
    handles = []

    def make_hooks(name: str) -> tuple[_PreHook, _PostHook]:
        def pre(_module: nn.Module, _inputs: tuple[Any, ...]) -> None:
            started[name] = counter.get_total_flops()

        def post(_module: nn.Module, _inputs: tuple[Any, ...], _output: Any) -> None:
            spent = counter.get_total_flops() - started.pop(name)
            per_layer[name] = per_layer.get(name, 0) + int(spent)

        return pre, post

    for name, module in model.named_modules():
        if isinstance(module, COUNTED_LAYERS):
            pre, post = make_hooks(name)
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))

    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        try:
            _meta_forward(model, counter, input_shape)
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            # Some op cannot run on shapes alone (data-dependent code): count a real pass.
            per_layer.clear()
            started.clear()
            _real_forward(model, counter, input_shape)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    return FlopReport(total=sum(per_layer.values()), per_layer=per_layer)


def _meta_forward(
    model: nn.Module, counter: FlopCounterMode, input_shape: tuple[int, int, int]
) -> None:
    """Forward on the meta device: shapes only, no arithmetic, no copy of the weights."""
    state = {n: t.to("meta") for n, t in model.named_parameters(remove_duplicate=False)}
    state.update({n: t.to("meta") for n, t in model.named_buffers(remove_duplicate=False)})
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    x = torch.zeros(1, *input_shape, device="meta", dtype=dtype)
    with torch.no_grad(), counter:
        torch.func.functional_call(model, state, (x,))


def _real_forward(
    model: nn.Module, counter: FlopCounterMode, input_shape: tuple[int, int, int]
) -> None:
    """Forward on zeros on the model's own device and dtype."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = torch.zeros(1, *input_shape, device=device, dtype=dtype)
    with torch.no_grad(), counter:
        model(x)


def effective_flops(report: FlopReport, densities: Mapping[str, float]) -> float:
    """FLOPs when each layer only multiplies by its non-zero weights.

    Parameters
    ----------
    report : FlopReport
        Dense FLOPs from :func:`count_flops`.
    densities : mapping of str to float
        Layer name -> fraction of non-zero elements of that layer's weight, in [0, 1].
        Layers not listed are dense (1.0). A key may also be the weight's parameter name
        (``"conv1.weight"`` for layer ``"conv1"``).

    Returns
    -------
    float
        ``sum(report.per_layer[name] * density[name])``.

    Raises
    ------
    ValueError
        A key names no counted layer of ``report`` (a typo would otherwise be silently
        ignored), or a density is outside [0, 1].
    """
    resolved: dict[str, float] = {}
    for key, density in densities.items():
        name = key
        if name not in report.per_layer and name.endswith(".weight"):
            name = name.removesuffix(".weight")
        if name not in report.per_layer:
            raise ValueError(
                f"density given for {key!r}, which is not a counted layer "
                f"(known: {', '.join(report.per_layer) or 'none'})"
            )
        d = float(density)
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"density of {key!r} must be in [0, 1], got {density!r}")
        resolved[name] = d
    return float(sum(f * resolved.get(name, 1.0) for name, f in report.per_layer.items()))
