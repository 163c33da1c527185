"""Reproduce a paper's headline experiment: one command per claim, resumable.

    FEDPRUNE_DATA=/work/shared/data python benchmarks/reproduce.py CLAIM \
        [--seeds 0,1,2] [--scale 0.1] [--resume | --report-only] [--set key=value ...]
    python benchmarks/reproduce.py --list

A claim is a set of variants (method and settings) run on the paper's own setting (the
example config in ``configs/`` it names: data set, split, model, optimiser, rounds),
once per seed. ``--scale`` multiplies the paper's number of rounds (and AutoFLIP's
exploration epochs), never the model, the data set or the split; the scale is written
next to every figure. Each run is an ordinary run directory under
``benchmarks/results/reproduction/CLAIM/runs/`` (not committed); with ``--resume`` a
finished run is read back, an interrupted one continues from its checkpoint, and a new
one starts; ``--report-only`` only reads finished runs and never starts one (to build a
combined table from runs made by several commands). A run directory made with other
settings than the ones asked for (rounds, seed, method keys...; where and how it ran,
``out``, ``name``, ``engine.*`` and ``flower.*``, may differ) is refused rather than
mixed into a table. The command writes ``CLAIM.json`` (every figure, how it was measured) and
``CLAIM.png`` (accuracy against rounds and against MB communicated) to
``benchmarks/results/reproduction/CLAIM/`` and prints the Markdown table rows that
``REPRODUCTION.md`` quotes.

Figures per variant (mean ± std over seeds; "vs FedAvg" compares with the FedAvg run of
the same seed, split and scale): final and best accuracy of the global model on the
central test set, the gap to FedAvg in points, the mean accuracy over the evaluations in
the last tenth of the rounds and its gap to FedAvg's (one evaluation is noisy on
pathological splits), the final sparsity and non-zero
parameters, the bytes up + down of the real encoded payloads, and how many times fewer
bytes than FedAvg's run ("comm ×"). Claims that shrink the model (AutoFLIP, structured)
add the parameters and FLOPs removed; structured claims also time the dense initial and
the final model in onnxruntime (``fedprune latency``) and report the speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from _common import load_average, machine, seed_list
from fedprune.config import RunConfig, config_to_flat, load_config
from fedprune.engines.common import RoundRecord
from fedprune.errors import UserInputError
from fedprune.experiment import load_federation, resume_experiment, run_experiment
from fedprune.rundir import CONFIG, SUMMARY, read_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reproduction"
MB = 1e6


@dataclass(frozen=True)
class Variant:
    """One line of a claim's table: a method and its settings on the claim's config."""

    label: str
    overrides: tuple[str, ...]
    config: str | None = None
    """Another config file than the claim's (e.g. the IID split of the same setting)."""
    group: str = ""
    """Variants are compared with the FedAvg variant of the same group (e.g. a split)."""


@dataclass(frozen=True)
class Claim:
    """A headline claim of a paper and the runs that test it."""

    name: str
    paper: str
    claim: str
    config: str
    variants: tuple[Variant, ...]
    explore: bool = False
    """AutoFLIP: ``--scale`` also scales the exploration epochs."""
    latency: bool = False
    """Structured claims: time the dense initial and the final model in onnxruntime."""
    notes: tuple[str, ...] = field(default_factory=tuple)


def _fedsparsify(group: str, config: str | None = None) -> list[Variant]:
    out = [Variant(f"{group} fedavg", ("method='fedavg'",), config, group)]
    for s in (0.8, 0.9, 0.95, 0.99):  # the paper explores 0.8-0.99 (methods.md §3.4)
        for m in ("global", "local"):
            out.append(
                Variant(
                    f"{group} {m} {s:g}",
                    (f"method='fedsparsify-{m}'", f"pruning.final_sparsity={s}"),
                    config,
                    group,
                )
            )
    return out


def _autostructured(model: str, k: float, last: int, per_round: int) -> tuple[Variant, ...]:
    """FedAvg, the authors' code (re-initialised proposals), the paper's rule with weight
    inheritance, and ours (widths rounded to 8 plus the accuracy guard, which rolls back
    on the measured drop, or only on a drop 2 standard errors beyond it; with proposals
    from round 1 or only after a 24-round warm-up), all at the
    authors' settings for ``model`` (methods.md §1.3: k, last pruning round, patience 3,
    5 epochs, batch 32, Adam; convolutions only, two-sided band)."""
    base = (
        f"model.name='{model}'",
        f"federation.clients_per_round={per_round}",
        "train.local_epochs=5",
        "train.batch_size=32",
    )
    paper = (
        *base,
        "method='autostructured'",
        f"structured.k={k}",
        "structured.patience=3",
        f"structured.max_prune_round={last}",
        "structured.start_round=1",  # proposals from round 1, whatever the config file says
        "structured.two_sided=true",
        "structured.prune_linear=false",
        "structured.round_to=1",
        "structured.max_drop=0",
        "structured.k_schedule='fixed'",
    )
    ours = (
        *paper[:-3],
        "structured.round_to=8",
        "structured.max_drop=0.015",
        "structured.k_schedule='adaptive'",
        "structured.inherit_weights=true",
    )
    return (
        Variant("fedavg", (*base, "method='fedavg'")),
        Variant("authors' code (re-init)", (*paper, "structured.inherit_weights=false")),
        Variant("paper rule (inherited weights)", (*paper, "structured.inherit_weights=true")),
        Variant("round to 8 + guard", ours),
        # the guard rolls back only drops it can tell from noise (2 paired standard errors)
        Variant("round to 8 + guard (z 2)", (*ours, "structured.guard_z=2")),
        # proposals (and so the guard's judgements) only from round 25, once the model is
        # past chance accuracy: judged at chance, the guard's decisions are noise
        Variant("round to 8 + guard + warm-up", (*ours, "structured.start_round=25")),
        Variant(
            "round to 8 + guard (z 2) + warm-up",
            (*ours, "structured.guard_z=2", "structured.start_round=25"),
        ),
    )


CLAIMS: dict[str, Claim] = {
    c.name: c
    for c in (
        Claim(
            "fedsparsify-fmnist",
            "Stripelis et al. 2022 (FedSparsify)",
            "about FedAvg's accuracy at 80-99% sparsity with ~3x less communication",
            "configs/fedsparsify-fmnist-10c-noniid.toml",
            (
                *_fedsparsify("non-IID"),
                *_fedsparsify("IID", "configs/fedsparsify-fmnist-10c-iid.toml"),
            ),
        ),
        Claim(
            "fedsparsify-fmnist-100c",
            "Stripelis et al. 2022 (FedSparsify)",
            "the 100-client, 10%-participation environment at 90%",
            "configs/fedsparsify-fmnist-100c-noniid.toml",
            (
                Variant("fedavg", ("method='fedavg'",)),
                Variant("global 0.9", ("method='fedsparsify-global'",)),
                Variant("local 0.9", ("method='fedsparsify-local'",)),
            ),
        ),
        Claim(
            "fedsparsify-cifar10",
            "Stripelis et al. 2022 (FedSparsify)",
            "cnn6 on CIFAR-10 at 90% with the paper's optimiser",
            "configs/fedsparsify-cifar10.toml",
            (
                Variant("fedavg", ("method='fedavg'",)),
                Variant("global 0.9", ("method='fedsparsify-global'",)),
                Variant("local 0.9", ("method='fedsparsify-local'",)),
            ),
        ),
        *(
            Claim(
                f"autostructured-{net}",
                "Nguyen, Le, Avila 2024 (automatic structured pruning)",
                "-89% parameters, -90% FLOPs, minimal accuracy loss, faster inference",
                "configs/autostructured-femnist.toml",
                _autostructured(model, k, last, per_round),
                latency=True,
            )
            for net, model, k, last, per_round in (
                ("femnist", "gap-cnn", 2.2, 50, 20),
                ("inception", "inception", 2.5, 100, 10),
            )
        ),
        *(
            Claim(
                f"autoflip-{ds}",
                "Internò et al. 2024 (AutoFLIP)",
                "better global accuracy than FedAvg with -48.8% compute and -35.5% communication",
                f"configs/autoflip-{ds}.toml",
                (
                    Variant("fedavg (FedAvgM)", ("method='fedavg'",)),
                    Variant("autoflip (paper; T_p share)", ("method='autoflip'",)),
                    Variant(
                        "autoflip (paper; strict G > tau)",
                        ("method='autoflip'", "autoflip.threshold_rule='strict'"),
                    ),
                    Variant(
                        "autoflip (authors' code)",
                        ("method='autoflip'", "autoflip.compat='authors-code'"),
                    ),
                ),
                explore=True,
            )
            for ds in ("mnist", "cifar10", "femnist")
        ),
    )
}


# ------------------------------------------------------------------------------ runs


def _scaled(cfg: RunConfig, scale: float, explore: bool) -> list[str]:
    rounds = max(1, round(cfg.federation.rounds * scale))
    out = [f"federation.rounds={rounds}"]
    if cfg.method == "prunefl":  # pragma: no cover - not in any claim yet
        out.append(f"pruning.readjust_every={max(1, round(cfg.pruning.readjust_every * scale))}")
    if explore and cfg.method == "autoflip":
        af = cfg.autoflip
        out.append(f"autoflip.explore_epochs={max(1, round(af.explore_epochs * scale))}")
        out.append(f"autoflip.explore_patience={max(1, round(af.explore_patience * scale))}")
    return out


def run_config(
    claim: Claim, v: Variant, seed: int, scale: float, extra: Sequence[str]
) -> RunConfig:
    """The configuration of one run of a claim."""
    path = ROOT / (v.config or claim.config)
    base = load_config(path, [*v.overrides, f"seed={seed}", *extra])
    return load_config(
        path, [*v.overrides, f"seed={seed}", *extra, *_scaled(base, scale, claim.explore)]
    )


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text).strip("-")


def run_one(
    cfg: RunConfig, run_dir: Path, resume: bool, latency: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run (or read back, or continue) one run directory; returns summary and records.

    With ``latency`` the finished run's dense initial and final models are timed in
    onnxruntime once (``fedprune latency``: 1 thread, batch 1, 200 alternating runs after
    20 warm-up), and the result is kept in its ``summary.json``.
    """
    summary, records = _run_or_read(cfg, run_dir, resume)
    if latency and cfg.method != "fedavg" and "latency" not in summary:
        from fedprune.export import measure_latency

        summary["latency"] = measure_latency(run_dir)
    return summary, records


_HOW_NOT_WHAT = ("out", "name", "engine.", "flower.")
"""Keys that say where and how a run executes, not what it computes."""


def config_mismatch(run_dir: Path, cfg: RunConfig) -> list[str]:
    """The keys whose value in ``run_dir``'s ``config.toml`` differs from ``cfg``'s, as
    ``key: stored != wanted`` (empty when the directory holds no config yet)."""
    path = run_dir / CONFIG
    if not path.is_file():
        return []
    stored = config_to_flat(load_config(path))
    wanted = config_to_flat(cfg)
    return [
        f"{k}: {stored.get(k)!r} != {wanted.get(k)!r}"
        for k in sorted(stored.keys() | wanted.keys())
        if not k.startswith(_HOW_NOT_WHAT) and stored.get(k) != wanted.get(k)
    ]


def _check_same(cfg: RunConfig, run_dir: Path) -> None:
    diff = config_mismatch(run_dir, cfg)
    if diff:
        shown = "; ".join(diff[:3]) + (f" (+{len(diff) - 3} more)" if len(diff) > 3 else "")
        raise SystemExit(
            f"{run_dir} was run with other settings ({shown}); use another --out or remove it"
        )


def _run_or_read(
    cfg: RunConfig, run_dir: Path, resume: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary = run_dir / SUMMARY
    if summary.is_file():
        if not resume:
            raise SystemExit(f"{run_dir} exists; pass --resume to reuse it")
        _check_same(cfg, run_dir)
        return json.loads(summary.read_text()), read_metrics(run_dir)
    if run_dir.exists():
        if resume and (run_dir / "checkpoint.safetensors").is_file():
            _check_same(cfg, run_dir)
            res = resume_experiment(run_dir, on_round=_on_round, on_progress=_on_progress)
            return res.summary, [dict(r) for r in res.records]
        if not resume:
            raise SystemExit(f"{run_dir} exists; pass --resume to continue it")
        shutil.rmtree(run_dir)  # started but no checkpoint yet: start again
    cfg.out, cfg.name = str(run_dir.parent), run_dir.name
    res = run_experiment(cfg.validate(), on_round=_on_round, on_progress=_on_progress)
    return res.summary, [dict(r) for r in res.records]


def _on_progress(text: str) -> None:
    """Long setup phases (AutoFLIP's exploration) print their progress lines."""
    print(f"    {text}", flush=True)


def _on_round(rec: RoundRecord) -> None:
    """Every 10th round prints a short line (accuracy "-" where the round did not evaluate)."""
    if rec["round"] % 10 == 0:
        acc = rec.get("test_accuracy")
        shown = "-" if acc is None else f"{100 * acc:.2f}%"
        print(
            f"    round {rec['round']}: accuracy {shown}, sparsity {100 * rec['sparsity']:.1f}%, "
            f"{rec['round_s']:.1f} s",
            flush=True,
        )


def training_flops(
    cfg: RunConfig, summary: dict[str, Any], records: Sequence[dict[str, Any]]
) -> tuple[float, float]:
    """FLOPs the clients spent: ``(rounds, setup)``.

    Rounds: over every round and sampled client, training samples × local epochs × 3 ×
    the forward FLOPs of the model the round trained, weighted by its weight density (the
    share of non-zero weights: masked ones, and in AutoFLIP's authors'-code mode the ones
    that stay exactly zero because no gradient reaches them).
    Setup: AutoFLIP's exploration and (authors' code) pre-training sample-epochs × 3 ×
    the dense initial model's forward FLOPs. "× 3" is the usual forward + backward
    estimate; the same factor on both sides of a comparison.
    """
    fed = load_federation(cfg)
    sizes = [int(c.x_train.shape[0]) for c in fed.clients]
    rounds = 0.0
    for r in records:
        mm = r.get("method_metrics") or {}
        per_sample = float(mm.get("train_effective_flops", r["effective_flops"]))
        samples = sum(sizes[c] for c in r["sampled"]) * cfg.train.local_epochs
        rounds += 3.0 * samples * per_sample
    first = (records[0].get("method_metrics") or {}) if records else {}
    sample_epochs = float(first.get("explore_sample_epochs", 0.0)) + float(
        first.get("pretrain_sample_epochs", 0.0)
    )
    return rounds, 3.0 * float(summary["dense_flops"]) * sample_epochs


def _ms(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _pm(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 2) -> str:
    if mean is None:
        return "—"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std else "")


def tail_accuracy(records: Sequence[dict[str, Any]], share: float = 0.1) -> float | None:
    """Mean test accuracy over the evaluations in the last ``share`` of the rounds.

    One evaluation is noisy on pathological non-IID splits (FedAvg swings by several
    points from round to round); this averages the evaluations of the run's last tenth,
    and always includes the final one.
    """
    evals = [
        (r["round"], r["test_accuracy"]) for r in records if r.get("test_accuracy") is not None
    ]
    if not evals:
        return None
    last = max(rnd for rnd, _ in evals)
    start = last - max(1, math.ceil(share * last))
    return statistics.fmean(acc for rnd, acc in evals if rnd > start)


def fedavg_reference(claim: Claim) -> dict[str, str]:
    """Each variant's label -> the label of the FedAvg variant of its group it compares with."""
    fedavg = {v.group: v.label for v in claim.variants if "fedavg" in v.label}
    return {v.label: fedavg[v.group] for v in claim.variants if v.group in fedavg}


def summarise(
    claim: Claim, runs: dict[tuple[str, int], tuple[dict[str, Any], list[dict[str, Any]]]]
) -> list[dict[str, Any]]:
    """One row per variant: means and standard deviations over seeds."""
    rows = []
    seeds = sorted({s for _, s in runs})
    reference = fedavg_reference(claim)
    for v in claim.variants:
        per = [runs[(v.label, s)] for s in seeds if (v.label, s) in runs]
        if not per:
            continue
        refs = [runs.get((reference.get(v.label, ""), s)) for s in seeds if (v.label, s) in runs]
        gap, tail_gap, comm, work, work_rounds = [], [], [], [], []
        for (s, recs), ref in zip(per, refs, strict=True):
            if ref is None:
                continue
            gap.append(100 * (s["final_accuracy"] - ref[0]["final_accuracy"]))
            mine_tail, ref_tail = tail_accuracy(recs), tail_accuracy(ref[1])
            if mine_tail is not None and ref_tail is not None:
                tail_gap.append(100 * (mine_tail - ref_tail))
            if "train_flops_rounds" in s and "train_flops_rounds" in ref[0]:
                base = ref[0]["train_flops_rounds"] + ref[0]["train_flops_setup"]
                work.append(1 - (s["train_flops_rounds"] + s["train_flops_setup"]) / base)
                work_rounds.append(1 - s["train_flops_rounds"] / base)
            mine = s["total_bytes_up"] + s["total_bytes_down"]
            theirs = ref[0]["total_bytes_up"] + ref[0]["total_bytes_down"]
            comm.append(theirs / mine)
        row: dict[str, Any] = {"variant": v.label, "seeds": len(per)}
        for key in ("final_accuracy", "best_accuracy", "final_sparsity", "final_nonzero_params"):
            row[key], row[key + "_std"] = _ms([s.get(key) for s, _ in per])
        row["tail_accuracy"], row["tail_accuracy_std"] = _ms([tail_accuracy(r) for _, r in per])
        row["mb"], row["mb_std"] = _ms(
            [(s["total_bytes_up"] + s["total_bytes_down"]) / MB for s, _ in per]
        )
        row["params_cut"], row["params_cut_std"] = _ms(
            [1 - s["final_params"] / s["dense_params"] for s, _ in per]
        )
        row["flops_cut"], row["flops_cut_std"] = _ms(
            [1 - s["final_effective_flops"] / s["dense_flops"] for s, _ in per]
        )
        row["ort_speedup"], row["ort_speedup_std"] = _ms(
            [s["latency"]["speedup"] if "latency" in s else None for s, _ in per]
        )
        row["train_compute_cut"], row["train_compute_cut_std"] = _ms(work)
        row["train_compute_cut_rounds"], row["train_compute_cut_rounds_std"] = _ms(work_rounds)
        row["gap_pt"], row["gap_pt_std"] = _ms(gap)
        row["tail_gap_pt"], row["tail_gap_pt_std"] = _ms(tail_gap)
        row["comm_x"], row["comm_x_std"] = _ms(comm)
        row["wall_s"], _ = _ms([s.get("wall_s") for s, _ in per])
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]], claim: Claim | None = None) -> str:
    """The rows as REPRODUCTION.md shows them.

    Claims that shrink the model (structured, AutoFLIP) add the parameters and FLOPs
    removed (final model against the dense initial one; FLOPs weighted by weight
    density), and structured claims the onnxruntime speed-up of the final model.
    """
    shrink = claim is not None and (claim.latency or claim.explore)
    cols = [
        "variant",
        "seeds",
        "final acc %",
        "best acc %",
        "vs FedAvg (pt)",
        "last-10% acc %",
        "last-10% vs FedAvg (pt)",
        "sparsity %",
        "non-zero params",
    ]
    if shrink:
        cols += ["params cut %", "FLOPs cut %"]
    if claim is not None and claim.latency:
        cols.append("ORT speed-up")
    if claim is not None and claim.explore:
        cols += ["training compute cut % (rounds only)", "training compute cut % (with setup)"]
    cols += ["MB up+down", "comm × vs FedAvg"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        cells = [
            r["variant"],
            str(r["seeds"]),
            _pm(r["final_accuracy"], r["final_accuracy_std"], 100),
            _pm(r["best_accuracy"], r["best_accuracy_std"], 100),
            _pm(r["gap_pt"], r["gap_pt_std"]),
            _pm(r.get("tail_accuracy"), r.get("tail_accuracy_std"), 100),
            _pm(r.get("tail_gap_pt"), r.get("tail_gap_pt_std")),
            _pm(r["final_sparsity"], r["final_sparsity_std"], 100, 1),
            _pm(r["final_nonzero_params"], r["final_nonzero_params_std"], 1, 0),
        ]
        if shrink:
            cells.append(_pm(r["params_cut"], r["params_cut_std"], 100, 1))
            cells.append(_pm(r["flops_cut"], r["flops_cut_std"], 100, 1))
        if claim is not None and claim.latency:
            cells.append(_pm(r["ort_speedup"], r["ort_speedup_std"]))
        if claim is not None and claim.explore:
            cells.append(
                _pm(r["train_compute_cut_rounds"], r["train_compute_cut_rounds_std"], 100, 1)
            )
            cells.append(_pm(r["train_compute_cut"], r["train_compute_cut_std"], 100, 1))
        cells += [_pm(r["mb"], r["mb_std"], 1, 1), _pm(r["comm_x"], r["comm_x_std"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    claim: Claim,
    runs: dict[tuple[str, int], tuple[dict[str, Any], list[dict[str, Any]]]],
    out: Path,
    stem: str,
) -> Path:
    """Accuracy against round and against cumulative MB, one line per variant (seed 1st)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    seen: set[str] = set()
    for (label, _seed), (_s, recs) in sorted(runs.items()):
        if label in seen:
            continue
        seen.add(label)
        pts = [r for r in recs if r.get("test_accuracy") is not None]
        a1.plot([r["round"] for r in pts], [100 * r["test_accuracy"] for r in pts], label=label)
        a2.plot(
            [(r["cum_bytes_up"] + r["cum_bytes_down"]) / MB for r in pts],
            [100 * r["test_accuracy"] for r in pts],
            label=label,
        )
    a1.set_xlabel("round")
    a2.set_xlabel("MB communicated (up + down)")
    a2.set_xscale("log")
    for a in (a1, a2):
        a.set_ylabel("test accuracy %")
        a.grid(alpha=0.3)
    a2.legend(fontsize=7)
    fig.suptitle(f"{claim.name}: {claim.claim}", fontsize=9)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("claim", nargs="?", choices=sorted(CLAIMS))
    p.add_argument("--list", action="store_true", help="list the claims and their runs")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--scale", type=float, default=1.0, help="share of the paper's rounds")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="reuse and continue run directories")
    mode.add_argument(
        "--report-only",
        action="store_true",
        help="only read finished runs (never start or continue one); list those left out",
    )
    p.add_argument("--variants", default="", help="comma-separated variant labels: only these")
    p.add_argument(
        "--set", dest="extra", action="append", default=[], help="key=value for every run"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--tag",
        default="",
        help="write CLAIM-TAG.json/.png (a subset of the runs) instead of CLAIM.json/.png",
    )
    args = p.parse_args(argv)
    if args.list or args.claim is None:
        for c in CLAIMS.values():
            print(f"{c.name}: {c.paper}: {c.claim} ({c.config}, {len(c.variants)} variants)")
        return 0
    claim = CLAIMS[args.claim]
    if not 0 < args.scale <= 1:
        p.error("--scale must be in (0, 1]")
    seeds = seed_list(p, args.seeds)
    wanted = [w.strip() for w in args.variants.split(",") if w.strip()]
    unknown = sorted(set(wanted) - {v.label for v in claim.variants})
    if unknown:
        p.error(f"unknown variants {unknown}; the claim has {[v.label for v in claim.variants]}")
    variants = [v for v in claim.variants if not wanted or v.label in wanted]
    try:  # every run's configuration is built, and so checked, before the first run starts
        run_cfgs = {
            (v.label, seed): run_config(claim, v, seed, args.scale, args.extra)
            for seed in seeds
            for v in variants
        }
    except UserInputError as exc:
        p.error(str(exc))
    out = args.out / claim.name
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, int], tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    configs: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    t0 = time.perf_counter()
    for seed in seeds:
        for v in variants:
            cfg = run_cfgs[(v.label, seed)]
            rd = out / "runs" / f"{_slug(v.label)}-seed{seed}"
            if args.report_only and not (rd / SUMMARY).is_file():
                print(f"not finished, left out: {v.label}, seed {seed} ({rd})", flush=True)
                missing.append(f"{v.label} seed {seed}")
                continue
            print(
                f"[{time.perf_counter() - t0:7.0f} s] {v.label}, seed {seed}: "
                f"{cfg.federation.rounds} rounds -> {rd}",
                flush=True,
            )
            runs[(v.label, seed)] = run_one(cfg, rd, args.resume or args.report_only, claim.latency)
            if claim.explore:
                summary, recs = runs[(v.label, seed)]
                summary["train_flops_rounds"], summary["train_flops_setup"] = training_flops(
                    cfg, summary, recs
                )
            configs[v.label] = {"config": v.config or claim.config, "overrides": list(v.overrides)}
    if not runs:
        raise SystemExit(f"no finished runs of {claim.name} under {out / 'runs'}")
    rows = summarise(claim, runs)
    command = "python benchmarks/reproduce.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    stem = claim.name + (f"-{_slug(args.tag)}" if args.tag else "")
    png = plot(claim, runs, out, stem)
    payload = {
        "claim": claim.name,
        "paper": claim.paper,
        "claimed": claim.claim,
        "scale": args.scale,
        "seeds": seeds,
        "command": command,
        "machine": machine(),
        "load_average_at_end": load_average(),
        "left_out": missing,
        "variants": configs,
        "rows": rows,
        "curves": {
            f"{label} seed {seed}": [
                {
                    "round": r["round"],
                    "acc": r.get("test_accuracy"),
                    "mb": (r["cum_bytes_up"] + r["cum_bytes_down"]) / MB,
                    "sparsity": r.get("sparsity"),
                }
                for r in recs
            ]
            for (label, seed), (_s, recs) in runs.items()
        },
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"\n{claim.name} at scale {args.scale:g} of the paper's rounds, seeds {seeds}:")
    print(markdown(rows, claim))
    print(f"\nwritten: {out / (stem + '.json')}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
