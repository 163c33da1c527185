"""Structured shrink: remove output channels for real, through Torch-Pruning's dependency graph.

A *shrink* removes whole output channels: filters of convolutions and hidden units of
linear layers (issue 16). Everything coupled to
them follows, as Torch-Pruning's :class:`~torch_pruning.DependencyGraph` finds it by
tracing the model: the next layer's input channels, batch-norm statistics and affine
parameters, the other operands of a residual add, the slice of a concatenation, the
``C x H x W`` block of a flatten feeding a linear layer. The result is an ordinary,
smaller, dense :class:`torch.nn.Module` of the same class (its tensors are smaller; no
mask, no hook), which trains, aggregates, saves as safetensors and exports to ONNX like
any other model.

Groups and prunable layers
--------------------------
Output channels that must disappear together form a *group* (Torch-Pruning's pruning
group rooted at a convolution's or a linear layer's outputs). Each group is named by its
*representative*: the first layer, in module order, whose output channels the group
removes. For a plain CNN or MLP every convolution and hidden linear layer is its own
group. In a ResNet with identity shortcuts the stem convolution and the second
convolution of every block of the first stage form one group (their outputs are added),
named after the stem. A group is *prunable* unless it
removes output units of the model's output layer (the module named ``classifier``, or
else the last convolution/linear layer): the classifier is never shrunk.

Hidden linear layers (``fc1``/``fc2`` of the MLP ``fc``, the dense heads of ``twocnn``
and ``leaf-cnn``, the Inception net's Dense 50) start groups too: a unit's score is the L1
norm of its incoming weights, the same criterion as a filter's. The paper prunes only
convolutions; ``structured.prune_linear = false`` restricts a method to them
(``structure(..., linear=False)``). The classifier is never pruned, so any model whose
last layer is the classifier has its hidden units available.

Width ties (the small ResNet of the automatic structured pruning paper)
------------------------------------------------------------------------
In :class:`~fedprune.models.zoo.ResNet7` a block's output width equals its input width,
but the shortcut is a 1x1 convolution, so nothing in the graph couples the stem's width
to the blocks' output widths. The paper (methods.md §1.5) prunes only the stem and the
first convolution of each block, and narrows the later blocks when the stem narrows. This
module reproduces that with an explicit *tie*: the block-output groups (named after each
block's ``conv2``; the shortcut convolution is in the same group) are not prunable on
their own and always keep as many channels as the stem. Which of their channels survive
is decided by their own filter L1 norms (summed over ``conv2`` and the shortcut
convolution), largest first; their original order is kept. Ties are looked up by model
class in :data:`WIDTH_TIES`, so other architectures can declare theirs.

History (JSON, never pickle)
----------------------------
A shrink is described by a list of entries, each a JSON object::

    {"layer": "conv1", "width": 32, "keep": [0, 2, 3, ...]}

``layer`` names a group representative, ``width`` is its output width *before* the entry
is applied (a consistency check) and ``keep`` the sorted indices of the output channels
that survive, relative to that width. Entries may carry extra keys (``"tied_to"``,
``"round"``), which :func:`replay` ignores. Applying the entries in order to a freshly
built model reproduces the shrunk architecture exactly (same parameter names, shapes and
channel order); with the same weights loaded it computes the same function.
:func:`compact_history` folds any history into one entry per layer whose indices are
relative to the original model, which is what travels between server and clients.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from fedprune.core.criteria import FilterL1
from fedprune.models import zoo

__all__ = [
    "WIDTH_TIES",
    "HistoryEntry",
    "LayerGroup",
    "compact_history",
    "example_input",
    "filter_scores",
    "history_key",
    "prunable_layers",
    "reinitialize",
    "replay",
    "round_width",
    "shrink",
    "shrunk_copy",
    "structure",
    "widths",
]

HistoryEntry = dict[str, Any]
"""One pruning operation: ``{"layer": str, "width": int, "keep": list[int], ...}``."""


@dataclass(frozen=True)
class LayerGroup:
    """Output channels of one or more convolutions (or linear layers) removed together.

    Attributes
    ----------
    layer : str
        The representative: the first member in module order (the name used in histories).
    members : tuple of str
        Every convolution or linear layer whose output channels this group removes (the
        representative first). Filter scores sum over them.
    width : int
        The current number of channels.
    tied : tuple of str
        Representatives of other groups whose width follows this one (empty but for
        architectures listed in :data:`WIDTH_TIES`).
    """

    layer: str
    members: tuple[str, ...]
    width: int
    tied: tuple[str, ...] = ()


def _resnet7_ties(model: nn.Module) -> dict[str, list[str]]:
    """ResNet-7 (methods.md §1.5): every block's output width follows the stem's."""
    blocks = [name for name, m in model.named_children() if isinstance(m, zoo.ResNet7Block)]
    return {"conv1": [f"{b}.conv2" for b in blocks]}


WIDTH_TIES: dict[type[nn.Module], Callable[[nn.Module], dict[str, list[str]]]] = {
    zoo.ResNet7: _resnet7_ties,
}
"""Model class -> function giving ``{prunable layer: [layers whose width follows it]}``."""


def example_input(input_shape: Sequence[int]) -> torch.Tensor:
    """A batch-1 tensor of zeros of shape ``(1, C, H, W)`` for tracing."""
    return torch.zeros(1, *(int(s) for s in input_shape))


def _output_layers(model: nn.Module) -> list[nn.Module]:
    """The layer(s) whose output units must never be removed."""
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Module):
        return [head]
    last: list[nn.Module] = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return last[-1:]


def _graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model`` (in eval mode: batch-norm statistics are left untouched)."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example, verbose=False
            )
    finally:
        for m, flag in flags.items():
            m.training = flag


_LAYER_TYPES = (nn.Conv2d, nn.Linear)


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    raise ValueError(f"a {type(module).__name__} is not a conv or linear layer")


def _groups(model: nn.Module, dg: tp.DependencyGraph, linear: bool = True) -> list[LayerGroup]:
    """Every conv-rooted (and, with ``linear``, linear-rooted) group that does not touch
    the output layer, in module order."""
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    names = {m: n for n, m in model.named_modules()}
    outputs = _output_layers(model)
    found: list[LayerGroup] = []
    roots = _LAYER_TYPES if linear else (nn.Conv2d,)
    for group in dg.get_all_groups(ignored_layers=outputs, root_module_types=roots):
        members = sorted(
            {
                dep.target.module
                for dep, _ in group
                if dg.is_out_channel_pruning_fn(dep.handler)
                and isinstance(dep.target.module, _LAYER_TYPES)
            },
            key=lambda m: order[m],
        )
        if not members:  # pragma: no cover - a rooted group always has its root
            continue
        found.append(
            LayerGroup(
                layer=names[members[0]],
                members=tuple(names[m] for m in members),
                width=_width(members[0]),
            )
        )
    found.sort(key=lambda g: order[model.get_submodule(g.layer)])
    return found


def structure(
    model: nn.Module, example: torch.Tensor, *, linear: bool = True
) -> tuple[list[LayerGroup], list[LayerGroup]]:
    """The prunable groups and the tied groups of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        Any model Torch-Pruning can trace (every zoo model).
    example : torch.Tensor
        An input of batch size 1 (see :func:`example_input`).
    linear : bool, default True
        Hidden linear layers are prunable groups too; ``False``: convolutions only (the
        paper).

    Returns
    -------
    prunable : list of LayerGroup
        Groups whose width a method may choose (module order); ``tied`` lists the groups
        that follow each.
    tied : list of LayerGroup
        Groups whose width follows a prunable group (empty for most models).
    """
    groups = _groups(model, _graph(model, example), linear)
    ties: dict[str, list[str]] = {}
    for cls, fn in WIDTH_TIES.items():
        if isinstance(model, cls):
            ties = fn(model)
            break
    by_name = {g.layer: g for g in groups}
    tied_names = {t for ts in ties.values() for t in ts}
    unknown = [t for t in [*ties, *tied_names] if t not in by_name]
    if unknown:
        raise ValueError(f"width ties name layers that are not group representatives: {unknown}")
    prunable = [
        LayerGroup(g.layer, g.members, g.width, tuple(ties.get(g.layer, ())))
        for g in groups
        if g.layer not in tied_names
    ]
    tied = [g for g in groups if g.layer in tied_names]
    return prunable, tied


def prunable_layers(model: nn.Module, example: torch.Tensor, *, linear: bool = True) -> list[str]:
    """Names of the layers whose output channels a method may remove (module order).

    One name per group (see the module docstring); never the classifier, never a layer
    whose width is tied to another one; hidden linear layers unless ``linear=False``.
    """
    return [g.layer for g in structure(model, example, linear=linear)[0]]


def widths(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, int]:
    """Output width of each named layer (default: every convolution), in the given order."""
    if layers is None:
        layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    out: dict[str, int] = {}
    for name in layers:
        m = model.get_submodule(name)
        if isinstance(m, nn.Conv2d):
            out[name] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = int(m.out_features)
        else:
            raise ValueError(f"layer {name!r} is a {type(m).__name__}, not a conv or linear layer")
    return out


@torch.no_grad()
def filter_scores(model: nn.Module, group: LayerGroup) -> torch.Tensor:
    """L1 norm of every output filter (unit) of a group (summed over its members).

    ``n_j = sum |W[j, ...]|`` over the kernel only (no bias), as in the paper; for a
    group of one convolution this is exactly its filters' L1 norms, for a linear layer
    the L1 norms of its units' incoming weights. Returned as float64.
    """
    total: torch.Tensor | None = None
    for name in group.members:
        layer = model.get_submodule(name)
        assert isinstance(layer, _LAYER_TYPES)
        s = FilterL1()({name: layer.weight})[name]
        total = s if total is None else total + s
    assert total is not None
    return total


def round_width(n: int, width: int, round_to: int) -> int:
    """The width a layer keeps when ``n`` of its ``width`` channels survive a rule and
    widths are rounded to multiples of ``round_to`` (hardware-friendly widths).

    ``n`` is rounded to the nearest multiple of ``round_to`` (halves up), at least
    ``round_to``. A result at or above ``width`` means the layer keeps all its channels
    (``width``): rounding never adds channels, and a layer the rule leaves whole stays
    whole even when ``width`` itself is not a multiple. ``round_to = 1`` returns ``n``.

    Raises
    ------
    ValueError
        ``n`` not in ``[1, width]`` or ``round_to < 1``.
    """
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    if not 1 <= n <= width:
        raise ValueError(f"kept count {n} must be in [1, {width}]")
    if round_to == 1 or n == width:
        return n
    m = max(round_to, round_to * ((2 * n + round_to) // (2 * round_to)))
    return width if m >= width else m


def _check_keep(layer: str, keep: Iterable[int], width: int) -> list[int]:
    idx = sorted({int(i) for i in keep})
    if not idx:
        raise ValueError(f"layer {layer!r}: at least one channel must be kept")
    if idx[0] < 0 or idx[-1] >= width:
        raise ValueError(f"layer {layer!r}: channel indices must be in [0, {width}), got {idx}")
    return idx


def _prune_fn(module: nn.Module) -> Callable[..., Any]:
    if isinstance(module, nn.Conv2d):
        return tp.prune_conv_out_channels
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    raise ValueError(f"cannot remove output channels of a {type(module).__name__}")


def _apply(model: nn.Module, dg: tp.DependencyGraph, entries: Sequence[HistoryEntry]) -> None:
    """Apply history entries in order with one dependency graph (it stays valid)."""
    for i, entry in enumerate(entries):
        try:
            layer, width, keep = entry["layer"], entry["width"], entry["keep"]
        except (KeyError, TypeError):
            raise ValueError(
                f"history entry {i} must be an object with 'layer', 'width' and 'keep'"
            ) from None
        try:
            module = model.get_submodule(str(layer))
        except AttributeError:
            raise ValueError(f"history entry {i}: the model has no layer {layer!r}") from None
        current = widths(model, [str(layer)])[str(layer)]
        if current != width:
            raise ValueError(
                f"history entry {i}: layer {layer!r} has {current} output channels, "
                f"the history expects {width}"
            )
        kept = set(_check_keep(str(layer), keep, current))
        removed = [j for j in range(current) if j not in kept]
        if removed:
            group = dg.get_pruning_group(module, _prune_fn(module), removed)
            group.prune(record_history=False)


def shrink(
    model: nn.Module,
    keep: Mapping[str, Iterable[int]],
    example: torch.Tensor,
) -> list[HistoryEntry]:
    """Remove output channels of ``model`` in place; return the history entries applied.

    Parameters
    ----------
    model : torch.nn.Module
        The model to shrink (modified in place; deep-copy it first to keep the original).
    keep : mapping of str to iterable of int
        Layer name (a prunable group's representative, see :func:`prunable_layers`) to the
        indices of the output channels to keep. At least one per layer. Layers not named
        keep all their channels. Groups tied to a named layer (see :data:`WIDTH_TIES`)
        keep the same number of channels, their largest-L1 ones.
    example : torch.Tensor
        An input of batch size 1 (see :func:`example_input`).

    Returns
    -------
    list of dict
        The history entries (JSON-able; see the module docstring), in module order, tied
        groups right after the layer they follow (with ``"tied_to"``). Layers that keep all
        their channels produce no entry.

    Raises
    ------
    ValueError
        A name that is not a prunable layer, no channel kept, or an index out of range.
    """
    prunable, tied = structure(model, example)
    by_name = {g.layer: g for g in prunable}
    tied_by_name = {g.layer: g for g in tied}
    for name in keep:
        if name not in by_name:
            hint = " (its width is tied to another layer)" if name in tied_by_name else ""
            raise ValueError(
                f"{name!r} is not a prunable layer{hint}; prunable: {', '.join(by_name)}"
            )
    entries: list[HistoryEntry] = []
    for g in prunable:
        if g.layer not in keep:
            continue
        idx = _check_keep(g.layer, keep[g.layer], g.width)
        if len(idx) < g.width:
            entries.append({"layer": g.layer, "width": g.width, "keep": idx})
        for t in g.tied:
            tg = tied_by_name[t]
            n = min(len(idx), tg.width)
            if n == tg.width:
                continue
            scores = filter_scores(model, tg)
            top = torch.topk(scores, n).indices  # computed before anything is pruned
            entries.append(
                {
                    "layer": t,
                    "width": tg.width,
                    "keep": sorted(int(i) for i in top),
                    "tied_to": g.layer,
                }
            )
    if entries:
        _apply(model, _graph(model, example), entries)
    return entries


def replay(model: nn.Module, history: Sequence[HistoryEntry], example: torch.Tensor) -> nn.Module:
    """Apply a history to ``model`` (in place, usually a fresh zoo model) and return it.

    Raises
    ------
    ValueError
        An entry names a missing layer, expects another width than the model has, or
        keeps no channel / an index out of range.
    """
    if history:
        _apply(model, _graph(model, example), history)
    return model


def compact_history(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """Fold a history into one entry per layer, relative to the original model.

    Successive entries of one layer compose (``keep`` of a later entry indexes the
    survivors of the earlier one); layers are listed in the order they first appear.
    The result replays to the same architecture with the same channel order. Extra keys
    other than ``"tied_to"`` are dropped.
    """
    out: dict[str, HistoryEntry] = {}
    for entry in history:
        layer = str(entry["layer"])
        keep = [int(i) for i in entry["keep"]]
        prev = out.get(layer)
        if prev is None:
            new: HistoryEntry = {"layer": layer, "width": int(entry["width"]), "keep": keep}
        else:
            base = prev["keep"]
            if len(base) != int(entry["width"]):
                raise ValueError(
                    f"history is inconsistent: layer {layer!r} had {len(base)} channels, "
                    f"a later entry expects {entry['width']}"
                )
            new = {"layer": layer, "width": prev["width"], "keep": [base[i] for i in keep]}
        if "tied_to" in entry:
            new["tied_to"] = entry["tied_to"]
        out[layer] = new
    return list(out.values())


def history_key(history: Sequence[HistoryEntry] | None) -> str:
    """A canonical JSON string of a history (for caching models by architecture)."""
    return json.dumps(list(history or []), sort_keys=True, separators=(",", ":"))


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Fresh default initialisation of every layer (in place), deterministic for ``seed``.

    Calls ``reset_parameters()`` of every module that has one (PyTorch's default
    initialisation, batch-norm statistics reset) inside a forked random state, so the
    global generator is untouched. This is the authors' "new narrower model" (their code
    re-initialises with Glorot; the zoo uses PyTorch's defaults throughout).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return model


def shrunk_copy(
    model: nn.Module, keep: Mapping[str, Iterable[int]], example: torch.Tensor
) -> tuple[nn.Module, list[HistoryEntry]]:
    """A shrunk deep copy of ``model`` and its history entries (``model`` is untouched)."""
    clone = copy.deepcopy(model)
    return clone, shrink(clone, keep, example)
