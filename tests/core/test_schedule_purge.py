from __future__ import annotations

import itertools

import pytest
import torch

from fedprune.core.criteria import Magnitude
from fedprune.core.schedule import Schedule
from fedprune.core.select import prune_count, select_lowest


def test_polynomial_schedule_at_start_middle_and_end() -> None:
    s = Schedule(final_sparsity=0.9, total=101, start_round=1, exponent=3)
    assert s.sparsity(1) == pytest.approx(0.0)  # t~ = t0: s_0
    # midway: t = 51 -> frac = 0.5 -> 0.9 + (0 - 0.9) * 0.5**3
    assert s.sparsity(51) == pytest.approx(0.9 - 0.9 * 0.125)
    assert s.sparsity(101) == pytest.approx(0.9)
    assert s.sparsity(500) == pytest.approx(0.9)
    vals = s.values()
    assert all(b >= a for a, b in itertools.pairwise(vals)), "never decreases"


def test_polynomial_schedule_frequency_holds_between_pruning_rounds() -> None:
    s = Schedule(final_sparsity=0.8, total=20, start_round=1, frequency=4, exponent=1)
    assert s.sparsity(5) == s.sparsity(7) == pytest.approx(0.8 * 3 / 19)
    assert s.prunes_at(8) and not s.prunes_at(9)
    assert s.sparsity(20) == pytest.approx(0.8)


def test_schedule_before_start_and_initial_sparsity() -> None:
    s = Schedule(final_sparsity=0.9, total=10, initial_sparsity=0.5, start_round=3, exponent=1)
    assert s.sparsity(2) == 0.0 and not s.prunes_at(2)
    assert s.sparsity(3) == pytest.approx(0.5)


def test_polynomial_schedule_end_round_reaches_final_early_and_holds() -> None:
    full = Schedule(final_sparsity=0.9, total=200, exponent=3)
    early = Schedule(final_sparsity=0.9, total=200, exponent=3, end_round=151)
    # the same curve compressed into rounds 1..151: midway is round 76, not round 100.5
    assert early.sparsity(76) == pytest.approx(0.9 - 0.9 * 0.125)
    assert early.sparsity(76) > full.sparsity(76)
    assert early.sparsity(150) < 0.9
    assert early.sparsity(151) == early.sparsity(200) == pytest.approx(0.9)
    assert full.sparsity(151) < 0.9
    assert early.prunes_at(151) and early.prunes_at(152)
    vals = early.values()
    assert all(b >= a for a, b in itertools.pairwise(vals))
    with pytest.raises(ValueError, match="end_round"):
        Schedule(final_sparsity=0.9, total=10, end_round=11)


def test_end_round_is_checked_against_the_rounds() -> None:
    from fedprune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"pruning.end_round is 30 .*federation.rounds \(20\)"):
        load_config(overrides=["federation.rounds=20", "pruning.end_round=30"])
    with pytest.raises(ConfigError, match=r"pruning\.end_round"):
        load_config(overrides=["pruning.start_round=5", "pruning.end_round=4"])
    cfg = load_config(overrides=["federation.rounds=20", "pruning.end_round=15"])
    assert cfg.pruning.end_round == 15


def test_nnz_rate_schedule() -> None:
    s = Schedule(final_sparsity=0.99, total=50, schedule="nnz_rate", nnz_rate=0.1, frequency=2)
    assert s.sparsity(1) == pytest.approx(0.1)
    assert s.sparsity(2) == pytest.approx(0.1)
    assert s.sparsity(3) == pytest.approx(1 - 0.9**2)


def test_purge_hits_exact_sparsity_with_ties() -> None:
    # 10 entries, 6 equal to 1.0: prune 5 must cut through the tie exactly
    t = {"a": torch.tensor([1.0, 1.0, 1.0, 0.5, 1.0]), "b": torch.tensor([1.0, 1.0, 3.0, 0.2, 2.0])}
    m = select_lowest(Magnitude()(t), 0.5)
    kept = int(m["a"].sum() + m["b"].sum())
    assert kept == 5
    assert not m["a"][3] and not m["b"][3]  # the two smallest are gone
    assert m["b"][2] and m["b"][4]  # the two largest stay


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("s", [0.0, 0.3, 0.77, 0.9, 0.99])
def test_purge_count_random(per_layer: bool, s: float) -> None:
    g = torch.Generator().manual_seed(0)
    t = {"w1": torch.randn(30, 20, generator=g), "w2": torch.randn(7, 3, 3, generator=g)}
    m = select_lowest(Magnitude()(t), s, per_layer=per_layer)
    if per_layer:
        for n in t:
            assert int((~m[n]).sum()) == prune_count(s, t[n].numel())
    else:
        assert int(sum((~v).sum() for v in m.values())) == prune_count(s, 600 + 63)
        # global threshold: every kept magnitude >= every pruned magnitude
        kept = torch.cat([t[n][m[n]].abs() for n in t])
        pruned = torch.cat([t[n][~m[n]].abs() for n in t])
        if len(pruned) and len(kept):
            assert kept.min() >= pruned.max()


def test_purge_never_revives() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(100, generator=g)
    current = torch.rand(100, generator=g) > 0.5  # about half already pruned
    w_big = w.clone()
    w_big[~current] = 100.0  # even if a pruned position now has a huge value
    m = select_lowest(Magnitude()({"w": w_big}), 0.2, current={"w": current})
    assert not torch.any(m["w"] & ~current)
    m2 = select_lowest(Magnitude()({"w": w}), 0.8, current={"w": current})
    assert int((~m2["w"]).sum()) == 80
    assert not torch.any(m2["w"] & ~current)


def test_purge_rejects_bad_sparsity() -> None:
    with pytest.raises(ValueError):
        select_lowest(Magnitude()({"w": torch.ones(3)}), 1.0)


def test_schedule_fields_are_the_pruning_keys() -> None:
    """Schedule and [pruning] describe the schedule once: same names, copied by name."""
    from dataclasses import fields

    from fedprune.config import PruningConfig, load_config
    from fedprune.core.schedule import schedule_from_config

    names = {f.name for f in fields(Schedule)} - {"total"}
    assert names <= {f.name for f in fields(PruningConfig)}
    cfg = load_config(
        overrides=[
            "pruning.final_sparsity=0.7",
            "pruning.start_round=3",
            "federation.rounds=9",
            "pruning.end_round=8",
        ]
    )
    s = schedule_from_config(cfg)
    assert (s.final_sparsity, s.start_round, s.total, s.end_round) == (0.7, 3, 9, 8)
