"""benchmarks/reproduce.py: every claim's configuration loads, scaling touches only rounds
(and AutoFLIP's exploration), and the table's figures are computed from the runs."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench_module(name: str) -> Iterator[ModuleType]:
    """Import ``benchmarks/<name>.py`` (and its ``_common`` sibling) for one module's tests."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def rp() -> Iterator[ModuleType]:
    yield from _bench_module("reproduce")


def _records(accs: Mapping[int, float | None], rounds: int) -> list[dict[str, Any]]:
    return [{"round": r, "test_accuracy": accs.get(r)} for r in range(1, rounds + 1)]


def _summary(acc: float, up: int, down: int = 0) -> dict[str, Any]:
    return {
        "final_accuracy": acc,
        "best_accuracy": acc,
        "final_sparsity": 0.0,
        "final_nonzero_params": 10,
        "final_params": 10,
        "dense_params": 10,
        "final_effective_flops": 5.0,
        "dense_flops": 10.0,
        "total_bytes_up": up,
        "total_bytes_down": down,
    }


def test_tail_accuracy_averages_the_last_tenth(rp: ModuleType) -> None:
    every = {r: r / 1000 for r in range(1, 201)}
    # 200 rounds evaluated every round: rounds 181..200.
    assert rp.tail_accuracy(_records(every, 200)) == pytest.approx(sum(range(181, 201)) / 20 / 1000)
    # Evaluated at rounds 10 and 20 of 20: only the final evaluation is in the last tenth.
    assert rp.tail_accuracy(_records({10: 0.2, 20: 0.6}, 20)) == pytest.approx(0.6)
    # Every 5 rounds out of 100: rounds 95 and 100.
    sparse = {r: r / 100 for r in range(5, 101, 5)}
    assert rp.tail_accuracy(_records(sparse, 100)) == pytest.approx((0.95 + 1.0) / 2)
    assert rp.tail_accuracy(_records({}, 5)) is None


def test_summarise_compares_each_seed_with_its_own_fedavg(rp: ModuleType) -> None:
    claim = rp.Claim(
        "toy",
        "paper",
        "claim",
        "configs/fedsparsify-fmnist-10c-noniid.toml",
        (rp.Variant("fedavg", ()), rp.Variant("pruned", ())),
    )
    runs = {
        ("fedavg", 0): (_summary(0.80, 300, 100), _records({10: 0.70, 20: 0.80}, 20)),
        ("fedavg", 1): (_summary(0.90, 300, 100), _records({10: 0.70, 20: 0.90}, 20)),
        ("pruned", 0): (_summary(0.78, 100, 100), _records({10: 0.60, 20: 0.78}, 20)),
        ("pruned", 1): (_summary(0.86, 100, 100), _records({10: 0.60, 20: 0.86}, 20)),
    }
    rows = {r["variant"]: r for r in rp.summarise(claim, runs)}
    pruned = rows["pruned"]
    assert pruned["seeds"] == 2
    assert pruned["gap_pt"] == pytest.approx(-3.0)  # (-2 + -4) / 2
    assert pruned["tail_gap_pt"] == pytest.approx(-3.0)
    assert pruned["comm_x"] == pytest.approx(2.0)
    assert pruned["flops_cut"] == pytest.approx(0.5)
    assert rows["fedavg"]["gap_pt"] == pytest.approx(0.0)
    table = rp.markdown(list(rows.values()))
    assert "last-10% vs FedAvg (pt)" in table.splitlines()[0]
    assert "| pruned | 2 | 82.00 ± 5.66 |" in table


def test_every_claim_loads_and_scales_only_rounds(rp: ModuleType) -> None:
    for claim in rp.CLAIMS.values():
        for v in claim.variants:
            full = rp.run_config(claim, v, 3, 1.0, [])
            tenth = rp.run_config(claim, v, 3, 0.1, [])
            assert tenth.seed == full.seed == 3
            assert tenth.federation.rounds == max(1, round(full.federation.rounds * 0.1))
            assert tenth.model == full.model and tenth.data == full.data
            assert tenth.train == full.train
            if claim.explore and full.method == "autoflip":
                assert tenth.autoflip.explore_epochs == round(full.autoflip.explore_epochs / 10)
            else:
                assert tenth.autoflip == full.autoflip


@pytest.fixture(scope="module")
def cg() -> Iterator[ModuleType]:
    yield from _bench_module("curve_gap")


def test_window_gaps_compare_with_fedavg_of_the_same_group_and_seed(cg: ModuleType) -> None:
    def curve(accs: list[float | None], sparsity: float = 0.0) -> list[dict[str, Any]]:
        return [
            {"round": i + 1, "acc": a, "sparsity": sparsity * (i + 1) / len(accs)}
            for i, a in enumerate(accs)
        ]

    curves = {
        "IID fedavg seed 0": curve([0.5, 0.6, 0.7, 0.8]),
        "IID fedavg seed 1": curve([0.5, 0.6, 0.7, 0.9]),
        "IID global 0.9 seed 0": curve([0.5, 0.6, 0.6, 0.7], 0.9),
        "IID global 0.9 seed 1": curve([0.5, None, 0.6, 0.7], 0.9),
        "non-IID fedavg seed 0": curve([0.1, 0.1, 0.1, 0.1]),
    }
    reference = {
        "IID fedavg": "IID fedavg",
        "IID global 0.9": "IID fedavg",
        "non-IID fedavg": "non-IID fedavg",
    }
    rows = {(r["variant"], r["rounds"]): r for r in cg.window_gaps(curves, 2, reference)}
    first, second = rows[("IID global 0.9", "1-2")], rows[("IID global 0.9", "3-4")]
    assert first["gap"] == pytest.approx(0.0)
    # Seed 0: (-0.1 - 0.1) / 2 = -10 pt; seed 1: (-0.1 - 0.2) / 2 = -15 pt.
    assert second["gap"] == pytest.approx(-12.5)
    assert second["sparsity"] == pytest.approx(90.0)
    assert rows[("non-IID fedavg", "3-4")]["gap"] == pytest.approx(0.0)
    # swing: |0.7 - 0.6| in both seeds; FedAvg's 10 and 20 points; seed 1 of the first
    # window has one evaluation only and no swing
    assert second["swing"] == pytest.approx(10.0)
    assert rows[("IID fedavg", "3-4")]["swing"] == pytest.approx(15.0)
    assert first["swing"] == pytest.approx(10.0)
    assert rows[("non-IID fedavg", "1-2")]["swing"] == pytest.approx(0.0)
    assert "| IID global 0.9 | 3-4 | 2 |" in cg.markdown(list(rows.values()))


def test_curves_of_several_files_of_one_claim_merge(cg: ModuleType) -> None:
    a = {"claim": "c", "curves": {"fedavg seed 0": [{"round": 1, "acc": 0.5}]}}
    b = {"claim": "c", "curves": {"x seed 0": [{"round": 1, "acc": 0.4}], **a["curves"]}}
    claim, curves = cg.merged_curves([("a", a), ("b", b)])
    assert claim == "c" and set(curves) == {"fedavg seed 0", "x seed 0"}
    other = {"claim": "c", "curves": {"fedavg seed 0": [{"round": 1, "acc": 0.6}]}}
    with pytest.raises(ValueError, match="different curves in a and other"):
        cg.merged_curves([("a", a), ("other", other)])
    with pytest.raises(ValueError, match="of claim 'd'"):
        cg.merged_curves([("a", a), ("d", {"claim": "d", "curves": {}})])


def test_curve_gap_merges_a_later_variant_with_committed_fedavg_runs(
    cg: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    def curve(accs: list[float]) -> list[dict[str, Any]]:
        return [{"round": i + 1, "acc": a, "sparsity": 0.0} for i, a in enumerate(accs)]

    claim = "autostructured-femnist"
    fedavg = {"claim": claim, "curves": {"fedavg seed 1": curve([0.5, 0.8])}}
    later = {"claim": claim, "curves": {"round to 8 + guard seed 1": curve([0.5, 0.7])}}
    paths = []
    for name, data in (("fedavg", fedavg), ("later", later)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data), encoding="utf-8")
    assert cg.main([*map(str, paths), "--windows", "2"]) == 0
    assert "| round to 8 + guard | 2-2 | 1 | 70.00 | -10.00 |" in capsys.readouterr().out
    assert cg.main([str(paths[0]), str(tmp_path / "missing.json")]) == 2
    assert "cannot read a claim's curves" in capsys.readouterr().err


def _fake_run(run_dir: Path, cfg: Any, acc: float, up: int) -> None:
    """A finished run directory as ``run_experiment`` leaves it (config, summary, metrics)."""
    import json

    from fedprune.config import config_to_toml

    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(config_to_toml(cfg), encoding="utf-8")
    summary = {**_summary(acc, up), "wall_s": 1.0}
    (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    rec = {"round": 1, "test_accuracy": acc, "sparsity": 0.0, "cum_bytes_up": up}
    (run_dir / "metrics.jsonl").write_text(
        json.dumps({**rec, "cum_bytes_down": 0}) + "\n", encoding="utf-8"
    )


def test_report_only_reads_finished_runs_and_refuses_other_settings(
    rp: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    claim = rp.CLAIMS["fedsparsify-fmnist-100c"]
    fedavg, glob, _local = claim.variants
    runs = tmp_path / claim.name / "runs"
    argv = [claim.name, "--scale", "0.5", "--seeds", "0", "--out", str(tmp_path)]
    _fake_run(runs / "fedavg-seed0", rp.run_config(claim, fedavg, 0, 0.5, []), 0.8, 300)
    # engine keys say how a run executed, not what it computed: they may differ
    cohort = rp.run_config(claim, glob, 0, 0.5, ["engine.cohort=on"])
    _fake_run(runs / "global-0.9-seed0", cohort, 0.7, 100)
    assert rp.main([*argv, "--report-only"]) == 0  # local 0.9 has no run: left out
    out = capsys.readouterr().out
    assert "not finished, left out: local 0.9, seed 0" in out
    payload = json.loads((tmp_path / claim.name / f"{claim.name}.json").read_text())
    assert payload["left_out"] == ["local 0.9 seed 0"]
    assert [r["variant"] for r in payload["rows"]] == ["fedavg", "global 0.9"]
    assert payload["rows"][1]["comm_x"] == pytest.approx(3.0)
    assert not (runs / "local-0.9-seed0").exists(), "--report-only never starts a run"

    # the same directories asked for at another scale: refused, naming the key
    with pytest.raises(SystemExit, match=r"federation\.rounds: 100 != 200"):
        rp.main([*argv[:2], "1", *argv[3:], "--report-only", "--variants", "fedavg"])
    assert rp.config_mismatch(runs / "global-0.9-seed0", cohort) == []
    with pytest.raises(SystemExit, match="no finished runs"):
        rp.main([*argv, "--report-only", "--variants", "local 0.9"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0,x"], "--seeds expects comma-separated integers"),
        (["--seeds", "1,1"], "each once"),
        (["--seeds", ","], "at least one seed"),
        (["--set", "nope.key=1"], "unknown config key 'nope'"),
        (["--set", "train.lr=-1"], "train.lr must be in"),
        (["--seeds", "0,-1"], "seed must be in"),
    ],
)
def test_bad_arguments_stop_before_any_run_with_one_line(
    rp: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    with pytest.raises(SystemExit) as exc:
        rp.main(["fedsparsify-fmnist-100c", "--resume", "--out", str(tmp_path), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and ": error: " in err[-1]
    assert not list(tmp_path.rglob("config.toml")), "no run was started"


@pytest.fixture(scope="module")
def pc() -> Iterator[ModuleType]:
    yield from _bench_module("per_class")


def test_per_class_accuracy_of_a_finished_run(
    pc: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from fedprune.config import load_config
    from fedprune.data.datasets import load_dataset
    from fedprune.experiment import run_experiment

    cfg = load_config(
        overrides=[f"out='{tmp_path}'", "name='r'", "method='fedsparsify-global'"],
        values={"data.num_clients": 4, "federation.rounds": 2, "pruning.final_sparsity": 0.5},
    )
    res = run_experiment(cfg)
    acc, classes = pc.per_class_accuracy(tmp_path / "r")
    assert acc == pytest.approx(res.summary["final_accuracy"], abs=1e-6)
    y = torch.as_tensor(load_dataset("digits").test.y)
    counts = torch.bincount(y, minlength=10).tolist()
    assert len(classes) == 10
    # the per-class figures are the overall one split by label
    assert sum(c * n for c, n in zip(classes, counts, strict=True)) / sum(counts) == (
        pytest.approx(acc)
    )
    assert pc.main([str(tmp_path / "r")]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| {tmp_path / 'r'} | {100 * acc:.2f} | ")
    assert row.count("|") == 13


@pytest.fixture(scope="module")
def mt() -> Iterator[ModuleType]:
    yield from _bench_module("mask_transfer")


def test_fixed_mask_method_trains_under_the_source_models_zeros(
    mt: ModuleType, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    from fedprune.config import load_config
    from fedprune.errors import ConfigError
    from fedprune.experiment import run_experiment

    base = {"data.num_clients": 4, "federation.rounds": 2, "pruning.final_sparsity": 0.7}
    src = run_experiment(
        load_config(
            overrides=[f"out='{tmp_path}'", "name='src'", "method='fedsparsify-global'"],
            values=base,
        )
    )
    source = tmp_path / "src" / "model.safetensors"
    zeros = {n: t == 0 for n, t in load_file(source).items() if n.endswith("weight")}
    assert sum(int(z.sum()) for z in zeros.values()) > 0

    def fixed(name: str, path: Path) -> Any:
        return load_config(
            overrides=[f"out='{tmp_path}'", f"name='{name}'", "method='fixed-mask'",
                       f"fixedmask.source='{path}'"],
            values=base,
        )  # fmt: skip

    res = run_experiment(fixed("fixed", source))
    final = res.model.state_dict()
    for n, z in zeros.items():
        assert torch.all(final[n][z] == 0), n  # every source zero stays zero
        assert torch.all(final[n][~z] != 0), n  # and nothing else is pruned
    assert res.summary["final_nonzero_params"] == src.summary["final_nonzero_params"]
    # the mask is in force from round 1, not only at the end
    assert res.records[0]["sparsity"] == pytest.approx(src.summary["final_sparsity"])

    with pytest.raises(ConfigError, match="is not a file"):
        run_experiment(fixed("missing", tmp_path / "nope.safetensors"))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"unrelated": torch.zeros(3)}, str(other))
    with pytest.raises(ConfigError, match="has no tensor"):
        run_experiment(fixed("bad", other))


def test_one_shot_mask_rules_keep_the_same_counts_and_differ_where_they_should(
    mt: ModuleType,
) -> None:
    import torch

    gen = torch.Generator().manual_seed(3)
    model = {
        "fc1.weight": torch.randn(16, 12, generator=gen),
        "fc1.bias": torch.randn(16, generator=gen),
        "fc2.weight": torch.randn(4, 16, generator=gen) * 3,
    }
    init = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in model.items()}
    init["fc1.weight"][:, 0] = model["fc1.weight"][:, 0]  # input 0's weights never moved
    spread = {"fc1.weight": torch.ones(12), "fc2.weight": torch.ones(16)}
    spread["fc1.weight"][1] = 0.0  # input 1 is constant: its weights act as a bias
    model["fc1.weight"][:, 1] *= 100  # and are the largest
    glob = mt.one_shot_mask(model, "global")
    assert set(glob) == {"fc1.weight", "fc2.weight"}  # weights only
    total = sum(int(m.sum()) for m in glob.values())
    assert total == round(0.1 * (16 * 12 + 4 * 16))
    assert glob["fc1.weight"][:, 1].sum() > 0  # magnitude keeps the bias-like weights
    rules = {
        "per unit": {},
        "moved": {"init": init},
        "activation": {"spread": spread},
        "random": {"seed": 1},
    }
    masks = {r: mt.one_shot_mask(model, r, **kw) for r, kw in rules.items()}
    for rule, m in masks.items():
        assert set(m) == set(glob)
        assert sum(int(t.sum()) for t in m.values()) == total, rule
        for n in glob:
            assert set(m[n].unique().tolist()) <= {0.0, 1.0}
            if rule != "moved":  # its own global threshold; the others keep glob's split
                assert int(m[n].sum()) == int(glob[n].sum()), (rule, n)
    assert masks["moved"]["fc1.weight"][:, 0].sum() == 0  # unmoved weights go first
    assert masks["activation"]["fc1.weight"][:, 1].sum() == 0  # a constant input scores 0
    rows = masks["per unit"]["fc1.weight"].sum(1)
    assert rows.max() - rows.min() <= 1  # spread evenly over the output units
    again = mt.one_shot_mask(model, "random", seed=1)
    other = mt.one_shot_mask(model, "random", seed=2)
    assert all(torch.equal(again[n], masks["random"][n]) for n in glob)
    assert any(not torch.equal(other[n], masks["random"][n]) for n in glob)
