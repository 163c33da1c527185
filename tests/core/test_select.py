"""The mask selector (core.select) and the importance criteria (core.criteria).

The property tests pin down what ``select_lowest`` must do with a mask in force, on
tensors full of exact zeros and ties (issue 17: FedSparsify's purge over-pruned when live
weights were exactly 0.0, because already-pruned entries tied with them). For every
ranking group (all tensors together, or each tensor with ``per_layer``), with ``N``
entries, ``A`` of them already pruned by ``current`` and the budget
``k = min(floor(s * N), N - min_keep)``:

1. *never revives*: every entry kept by the result is kept by ``current``, i.e. every
   entry pruned before is still pruned;
2. *exact count*: exactly ``max(k, A)`` entries are pruned, i.e. ``max(0, k - A)`` live
   entries are newly pruned: already-pruned entries use up the budget first, and when
   they alone reach it no live entry is pruned (the result is ``current``);
3. *lowest first, ties by position*: every newly pruned live entry precedes every kept
   entry in the order (score, position), NaN scoring as ``-inf``. In particular a live
   exact 0.0 is pruned only when the budget left after the already-pruned entries
   reaches it, and never instead of an already-pruned entry, whatever the criterion
   (the scores may be negative, ``-inf`` or NaN).

Properties 1 to 3 determine the result uniquely. With ``ties="threshold"`` 2 and 3
become: when ``k > A``, the live entries pruned are exactly those scoring at most
``tau``, the ``(k - A)``-th lowest live score (so at least ``k`` in all).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fedprune.core.criteria import SNIP, FilterL1, GraSP, Guidance, Magnitude, RandomOrder
from fedprune.core.guidance import mean_guidance, normalise
from fedprune.core.select import prune_count, select_lowest

HSET = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# few distinct values, many exact zeros (both signs): ties everywhere
WEIGHTS = st.sampled_from([0.0, 0.0, 0.0, -0.0, 0.5, -0.5, 1.0, 2.0, -2.0])
SIGNED = st.one_of(
    WEIGHTS,
    st.sampled_from([-math.inf, math.inf, math.nan, -1e-30]),
    st.floats(-3, 3, width=32),
)


@st.composite
def problems(draw: st.DrawFn, values: st.SearchStrategy[float] = WEIGHTS) -> dict:
    """Named 1-D or 2-D tensors, a mask in force (maybe none), a sparsity."""
    n_tensors = draw(st.integers(1, 3))
    scores: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] | None = {} if draw(st.booleans()) else None
    for i in range(n_tensors):
        rows = draw(st.integers(1, 4))
        cols = draw(st.integers(0, 8))
        vals = draw(st.lists(values, min_size=rows * cols, max_size=rows * cols))
        scores[f"t{i}"] = torch.tensor(vals, dtype=torch.float32).view(rows, cols)
        if current is not None and draw(st.booleans()):  # some tensors have no mask
            pruned = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
            current[f"t{i}"] = ~torch.tensor(pruned, dtype=torch.bool).view(rows, cols)
    return {
        "scores": scores,
        "current": current,
        "sparsity": draw(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.77, 0.9, 0.999]))
        if draw(st.booleans())
        else draw(st.floats(0.0, 0.999)),
        "per_layer": draw(st.booleans()),
    }


def _groups(p: dict, keep: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Per ranking group: flat scores (NaN as -inf), live-before mask, result keep-mask."""
    names = list(p["scores"])
    cur = p["current"] or {}

    def flat(n: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = p["scores"][n].flatten().double()
        s = torch.where(torch.isnan(s), torch.full_like(s, -math.inf), s)
        live = cur[n].flatten() if n in cur else torch.ones(s.shape, dtype=torch.bool)
        return s, live, keep[n].flatten()

    parts = [flat(n) for n in names]
    if p["per_layer"]:
        return parts
    return [tuple(torch.cat([q[i] for q in parts]) for i in range(3))]


def _check_position(s: torch.Tensor, live: torch.Tensor, keep: torch.Tensor, k: int) -> None:
    n, already = s.numel(), int((~live).sum())
    # 1. never revives
    assert not bool((keep & ~live).any())
    # 2. exact count: the budget counts the already-pruned entries first
    assert n - int(keep.sum()) == max(k, already)
    # 3. newly pruned live entries all precede every kept entry in (score, position)
    new = torch.nonzero(live & ~keep).flatten().tolist()
    kept = torch.nonzero(keep).flatten().tolist()
    if new and kept:
        last = max((float(s[i]), i) for i in new)
        first = min((float(s[j]), j) for j in kept)
        assert last < first


@HSET
@given(p=problems(), min_keep=st.integers(0, 3))
def test_exact_count_no_revival_lowest_first_with_zeros_and_ties(p: dict, min_keep: int) -> None:
    keep = select_lowest(
        Magnitude()(p["scores"]),
        p["sparsity"],
        per_layer=p["per_layer"],
        current=p["current"],
        min_keep=min_keep,
    )
    assert {n: m.shape for n, m in keep.items()} == {n: t.shape for n, t in p["scores"].items()}
    mags = {n: t.abs() for n, t in p["scores"].items()}
    for s, live, kp in _groups({**p, "scores": mags}, keep):
        n = s.numel()
        _check_position(s, live, kp, max(0, min(prune_count(p["sparsity"], n), n - min_keep)))
    # deterministic
    again = select_lowest(
        Magnitude()(p["scores"]),
        p["sparsity"],
        per_layer=p["per_layer"],
        current=p["current"],
        min_keep=min_keep,
    )
    assert all(torch.equal(again[n], keep[n]) for n in keep)


@HSET
@given(p=problems(SIGNED))
def test_pruned_entries_rank_below_every_live_score_for_any_criterion(p: dict) -> None:
    """Signed scores with -inf, +inf and NaN (GraSP, random ranks, guidance...)."""
    keep = select_lowest(p["scores"], p["sparsity"], per_layer=p["per_layer"], current=p["current"])
    for s, live, kp in _groups(p, keep):
        _check_position(s, live, kp, prune_count(p["sparsity"], s.numel()))


@HSET
@given(p=problems(SIGNED))
def test_threshold_ties_prune_everything_at_tau_and_never_revive(p: dict) -> None:
    keep = select_lowest(
        p["scores"],
        p["sparsity"],
        per_layer=p["per_layer"],
        current=p["current"],
        ties="threshold",
    )
    for s, live, kp in _groups(p, keep):
        k, already = prune_count(p["sparsity"], s.numel()), int((~live).sum())
        assert not bool((kp & ~live).any())
        if k <= already:
            assert torch.equal(kp, live)
            continue
        tau = s[live].sort().values[k - already - 1]
        assert torch.equal(kp, live & (s > tau))
        assert s.numel() - int(kp.sum()) >= k


def test_issue_17_live_zeros_do_not_take_the_budget() -> None:
    # one live exact 0.0 before one already-pruned entry; prune floor(0.25 * 4) = 1
    w = {"w": torch.tensor([0.0, 0.0, 1.0, 2.0])}
    current = {"w": torch.tensor([True, False, True, True])}
    keep = select_lowest(Magnitude()(w), 0.25, current=current)["w"]
    assert keep.tolist() == [True, False, True, True]  # was [False, False, True, True]
    # 50%: the live zero goes next (lowest live magnitude), nothing else
    keep = select_lowest(Magnitude()(w), 0.5, current=current)["w"]
    assert keep.tolist() == [False, False, True, True]


def test_selector_arguments_are_checked() -> None:
    s = {"w": torch.ones(3)}
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="sparsity"):
            select_lowest(s, bad)
    with pytest.raises(ValueError, match="min_keep"):
        select_lowest(s, 0.5, ties="threshold", min_keep=1)
    with pytest.raises(ValueError, match="shape"):
        select_lowest(s, 0.5, current={"w": torch.ones(2, dtype=torch.bool)})
    assert select_lowest({}, 0.5) == {}


# ------------------------------------------------------------------- criteria


def test_magnitude_filter_l1_random_order_and_guidance() -> None:
    w = {"a": torch.tensor([[1.0, -2.0], [0.0, -0.5]]), "b": torch.tensor([3.0, -4.0, 0.0])}
    assert torch.equal(Magnitude()(w)["a"], torch.tensor([[1.0, 2.0], [0.0, 0.5]]))
    conv = {"c": torch.tensor([[[1.0, -1.0]], [[0.0, 2.5]]])}  # 2 filters
    l1 = FilterL1()(conv)["c"]
    assert l1.dtype == torch.float64 and l1.tolist() == [2.0, 2.5]
    ranks = RandomOrder(7)(w)
    assert ranks["a"].shape == (2, 2) and ranks["b"].shape == (3,)
    flat = torch.cat([ranks["a"].flatten(), ranks["b"]])
    assert sorted(flat.tolist()) == list(range(7))  # one permutation over all entries
    assert torch.equal(RandomOrder(7)(w)["b"], ranks["b"])  # seeded
    assert not torch.equal(torch.cat([r.flatten() for r in RandomOrder(8)(w).values()]), flat)
    # nested prefixes: masks of increasing sparsity only ever prune more
    m1, m2 = select_lowest(ranks, 0.3), select_lowest(ranks, 0.6)
    assert all(not torch.any(m2[n] & ~m1[n]) for n in m1)
    g = [{"x": torch.tensor([0.0, 1.0, 4.0])}, {"x": torch.tensor([2.0, 1.0, 0.0])}]
    for norm in ("minmax", "robust"):
        assert torch.equal(Guidance(norm)(g)["x"], normalise(mean_guidance(g), norm)["x"])


def test_snip_and_grasp_score_the_named_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    names = ["0.weight", "2.weight"]
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    snip = SNIP()(model, x, y, names)
    assert list(snip) == names
    for n, g in zip(names, grads, strict=True):
        assert torch.allclose(snip[n], (g * params[n]).abs())
    grasp = GraSP()(model, x, y, names)
    assert [t.shape for t in grasp.values()] == [params[n].shape for n in names]
    assert bool((torch.cat([t.flatten() for t in grasp.values()]) < 0).any())  # signed
