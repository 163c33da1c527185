"""Side-by-side comparison of methods on one federation.

``fedprune compare CONFIG --methods fedavg,fedsparsify-global,...`` loads the data once
per seed and runs every method on the same client partitions, the same client sampling
stream and the same initial weights (all fixed by the seed; each run's ``summary.json``
records fingerprints of both, ``partition_sha`` and ``init_sha``, so this can be
checked). It writes a comparison directory::

    COMPARE_DIR/
      runs/<method>-seed<s>/      one ordinary run directory per method and seed
      comparison.md               the table (mean ± std over seeds when several)
      comparison.csv, comparison.json
      accuracy_vs_round.png, accuracy_vs_mb.png, sparsity_flops_vs_round.png,
      pareto_flops.png, pareto_mb.png
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedprune import registry, rundir
from fedprune.config import RunConfig
from fedprune.errors import ConfigError, UserInputError, elide

MB = 1e6
COMPARISON_JSON = "comparison.json"


@dataclass
class MethodRuns:
    """All seeds of one method."""

    method: str
    run_dirs: list[Path]
    summaries: list[dict[str, Any]]
    records: list[Sequence[Mapping[str, Any]]]


def parse_methods(text: str) -> list[str]:
    """``"a,b,c"`` -> ``["a", "b", "c"]``, checked against the known methods."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods needs at least one method")
    known = registry.method_names()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(
            f"--methods: unknown method {elide(', '.join(unknown), 60)}; "
            f"choose from {', '.join(known)}"
        )
    if len(set(methods)) != len(methods):
        raise ConfigError("--methods lists a method twice")
    return methods


def check_combinations(
    cfg: RunConfig, methods: Sequence[str], seeds: Sequence[int]
) -> dict[int, Any]:
    """Load each seed's federation and check every method on it before any training.

    Returns the federations by seed. Raises one ConfigError that lists every problem
    (a method's config, the data, a model that does not fit the data, a method that
    cannot serve the model) so that a comparison never stops after hours of training.
    """
    from fedprune.experiment import check_method, load_federation

    problems: list[str] = []
    feds: dict[int, Any] = {}
    for seed in seeds:
        base = dataclasses.replace(cfg, seed=seed).validate()
        try:
            feds[seed] = load_federation(base)
        except UserInputError as exc:
            problems.append(f"data (seed {seed}): {exc}")
            continue
        for m in methods:
            try:
                check_method(dataclasses.replace(base, method=m).validate(), feds[seed])
            except UserInputError as exc:
                text = f"{m}: {exc}"
                if text not in problems:
                    problems.append(text)
    if problems:
        n = len(problems)
        head = "1 problem" if n == 1 else f"{n} problems"
        raise ConfigError(f"compare cannot start, {head}: " + " | ".join(problems))
    return feds


def reach(records: Sequence[Mapping[str, Any]], target: float) -> tuple[int | None, float | None]:
    """First round at which test accuracy >= target, and the cumulative MB (up + down) then."""
    for r in records:
        acc = r.get("test_accuracy")
        if acc is not None and acc >= target:
            return int(r["round"]), (r["cum_bytes_up"] + r["cum_bytes_down"]) / MB
    return None, None


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def build_rows(runs: Sequence[MethodRuns], target: float | None) -> list[dict[str, Any]]:
    """One row per method: means (and standard deviations) over its seeds."""
    rows = []
    for mr in runs:
        s = mr.summaries

        def col(key: str, summaries: list[dict[str, Any]] = s) -> tuple[float | None, float | None]:
            return _mean_std([x.get(key) for x in summaries])

        row: dict[str, Any] = {"method": mr.method, "seeds": len(s)}
        for key in (
            "final_accuracy",
            "best_accuracy",
            "final_average_accuracy",
            "final_sparsity",
            "final_params",
            "final_nonzero_params",
            "final_flops",
            "final_effective_flops",
            "wall_s",
        ):
            row[key], row[key + "_std"] = col(key)
        row["mb_up"], row["mb_up_std"] = _mean_std([x["total_bytes_up"] / MB for x in s])
        row["mb_down"], row["mb_down_std"] = _mean_std([x["total_bytes_down"] / MB for x in s])
        # `fedprune latency` stores summary["latency"]["speedup"] (dense median / final)
        lat = [x["latency"].get("speedup") for x in s if isinstance(x.get("latency"), dict)]
        row["latency_speedup"], _ = _mean_std(lat)
        if target is not None:
            reached = [reach(recs, target) for recs in mr.records]
            row["rounds_to_target"], _ = _mean_std([r for r, _ in reached])
            row["mb_to_target"], _ = _mean_std([m for _, m in reached])
            row["reached_target"] = sum(r is not None for r, _ in reached)
        rows.append(row)
    return rows


def _fmt(
    value: Any, std: Any = None, scale: float = 1.0, digits: int = 2, pct: bool = False
) -> str:
    if value is None:
        return "—"
    v = value * (100 if pct else scale)
    text = f"{v:,.{digits}f}"
    if std:
        text += f" ± {std * (100 if pct else scale):,.{digits}f}"
    return text


def markdown_table(rows: Sequence[dict[str, Any]], target: float | None) -> str:
    """The comparison as a Markdown table."""
    # runs with federation.average_decay > 0 also report their moving average's accuracy
    average = any(r.get("final_average_accuracy") is not None for r in rows)
    head = [
        "method",
        "final acc %",
        "best acc %",
        *(["average acc %"] if average else []),
        "sparsity %",
        "params",
        "non-zero",
        "MFLOPs",
        "eff. MFLOPs",
        "MB up",
        "MB down",
    ]
    if target is not None:
        head += [f"rounds to {100 * target:.1f}%", f"MB to {100 * target:.1f}%"]
    head += ["wall s", "ORT speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [
            r["method"],
            _fmt(r["final_accuracy"], r["final_accuracy_std"], pct=True),
            _fmt(r["best_accuracy"], r["best_accuracy_std"], pct=True),
            *(
                [
                    _fmt(
                        r.get("final_average_accuracy"),
                        r.get("final_average_accuracy_std"),
                        pct=True,
                    )
                ]
                if average
                else []
            ),
            _fmt(r["final_sparsity"], None, pct=True, digits=1),
            _fmt(r["final_params"], digits=0),
            _fmt(r["final_nonzero_params"], digits=0),
            _fmt(r["final_flops"], scale=1e-6),
            _fmt(r["final_effective_flops"], scale=1e-6),
            _fmt(r["mb_up"], r["mb_up_std"]),
            _fmt(r["mb_down"], r["mb_down_std"]),
        ]
        if target is not None:
            cells += [_fmt(r["rounds_to_target"], digits=1), _fmt(r["mb_to_target"])]
        cells += [_fmt(r["wall_s"], digits=1), _fmt(r["latency_speedup"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _curves(
    mr: MethodRuns, x_key: Callable[[Mapping[str, Any]], float]
) -> tuple[list[float], list[float]]:
    """Mean accuracy curve over seeds (seeds share the evaluation rounds)."""
    per_seed = [
        [(x_key(r), r["test_accuracy"]) for r in recs if r.get("test_accuracy") is not None]
        for recs in mr.records
    ]
    n = min(len(p) for p in per_seed)
    xs = [statistics.fmean(p[i][0] for p in per_seed) for i in range(n)]
    ys = [100 * statistics.fmean(p[i][1] for p in per_seed) for i in range(n)]
    return xs, ys


def plot_comparison(runs: Sequence[MethodRuns], rows: Sequence[dict[str, Any]], out: Path) -> None:
    """The five comparison plots (PNG)."""
    for name, xlabel, key in [
        ("accuracy_vs_round.png", "round", lambda r: float(r["round"])),
        (
            "accuracy_vs_mb.png",
            "cumulative MB (up + down)",
            lambda r: (r["cum_bytes_up"] + r["cum_bytes_down"]) / MB,
        ),
    ]:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for mr in runs:
            xs, ys = _curves(mr, key)
            ax.plot(xs, ys, marker=".", markersize=3, label=mr.method)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for mr in runs:
        recs = mr.records[0]
        a1.plot([r["round"] for r in recs], [100 * r["sparsity"] for r in recs], label=mr.method)
        a2.plot(
            [r["round"] for r in recs], [r["effective_flops"] / 1e6 for r in recs], label=mr.method
        )
    a1.set_xlabel("round")
    a1.set_ylabel("weight sparsity (%)")
    a2.set_xlabel("round")
    a2.set_ylabel("effective MFLOPs per sample")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sparsity_flops_vs_round.png")
    plt.close(fig)

    for name, xlabel, xfun in [
        (
            "pareto_flops.png",
            "final effective MFLOPs per sample",
            lambda r: (r["final_effective_flops"] or 0) / 1e6,
        ),
        (
            "pareto_mb.png",
            "total MB communicated",
            lambda r: (r["mb_up"] or 0) + (r["mb_down"] or 0),
        ),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
        for r in rows:
            if r["final_accuracy"] is None:
                continue
            x, y = xfun(r), 100 * r["final_accuracy"]
            ax.scatter([x], [y])
            ax.annotate(r["method"], (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final test accuracy (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)


def run_compare(
    cfg: RunConfig,
    methods: Sequence[str],
    *,
    seeds: Sequence[int] = (),
    out: Path | None = None,
    target: float | None = None,
    on_run_start: Callable[[str, int, int, int], None] | None = None,
    on_round: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run ``methods`` (each over ``seeds``) on identical federations; write the comparison.

    Parameters
    ----------
    cfg
        The shared configuration (its ``method`` is replaced per run).
    methods
        Method names.
    seeds
        Seeds to repeat over (default: ``cfg.seed`` only).
    out
        The comparison directory (default ``<cfg.out>/compare_<timestamp>``).
    target
        Accuracy (0-1) for "rounds / MB to reach". Default: FedAvg's mean final
        accuracy minus 1 point when ``fedavg`` is among the methods, else none.
    on_run_start, on_round
        Progress callbacks: ``(method, seed, index, total)`` and ``(method, seed, record)``.

    Returns
    -------
    (Path, list of dict)
        The comparison directory and the table rows.
    """
    from fedprune.experiment import run_experiment

    seeds = list(seeds) or [cfg.seed]
    out = out or Path(cfg.out) / f"compare_{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and any(out.iterdir()):
        raise UserInputError(
            f"comparison directory {elide(repr(str(out)), 80)} exists and is not empty"
        )
    feds = check_combinations(cfg, methods, seeds)  # before anything is written
    (out / "runs").mkdir(parents=True, exist_ok=True)
    by_method = {m: MethodRuns(m, [], [], []) for m in methods}
    total = len(methods) * len(seeds)
    index = 0
    for seed in seeds:
        base = dataclasses.replace(cfg, seed=seed, out=str(out / "runs"))
        fed = feds.pop(seed)  # one data load and one partition per seed
        for m in methods:
            run_cfg = dataclasses.replace(base, method=m, name=f"{m}-seed{seed}").validate()
            if on_run_start is not None:
                on_run_start(m, seed, index, total)
            index += 1
            cb = (lambda rec, m=m, seed=seed: on_round(m, seed, rec)) if on_round else None
            res = run_experiment(run_cfg, fed=fed, on_round=cb)
            mr = by_method[m]
            mr.run_dirs.append(res.run_dir)
            mr.summaries.append(res.summary)
            mr.records.append(res.records)
    runs = list(by_method.values())
    if target is None and "fedavg" in by_method:
        accs = [s["final_accuracy"] for s in by_method["fedavg"].summaries]
        mean, _ = _mean_std(accs)
        target = None if mean is None else mean - 0.01
    rows = build_rows(runs, target)
    write_comparison(out, runs, rows, target, cfg)
    return out, rows


def write_comparison(
    out: Path,
    runs: Sequence[MethodRuns],
    rows: list[dict[str, Any]],
    target: float | None,
    cfg: RunConfig,
) -> None:
    """Write the table (Markdown, CSV, JSON) and the plots."""
    md = (
        f"# Comparison on {cfg.data.dataset} ({cfg.data.partition}, {cfg.data.num_clients} "
        f"clients), model {cfg.model.name}, {cfg.federation.rounds} rounds\n\n"
        + markdown_table(rows, target)
        + ("" if target is None else f"\nTarget accuracy: {100 * target:.2f}%.\n")
    )
    (out / "comparison.md").write_text(md, encoding="utf-8")
    keys = list(rows[0]) if rows else []
    with open(out / "comparison.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    rundir.write_json(
        out / COMPARISON_JSON,
        {
            "target": target,
            "rows": rows,
            "runs": {mr.method: [str(p.relative_to(out)) for p in mr.run_dirs] for mr in runs},
        },
    )
    plot_comparison(runs, rows, out)


def comparison_run_dirs(path: str | Path) -> list[Path]:
    """Every run directory of a comparison directory, in table order."""
    out = Path(path)
    runs = read_comparison(out).get("runs", {})
    return [out / rel for rels in runs.values() for rel in rels]


def refresh_comparison(path: str | Path) -> list[dict[str, Any]]:
    """Rebuild a comparison's table (Markdown, CSV, JSON, plots) from its run directories,
    e.g. after ``fedprune latency`` stored each run's speed-up; returns the rows."""
    from fedprune.config import load_config

    out = Path(path)
    data = read_comparison(out)
    runs: list[MethodRuns] = []
    for method, rels in data.get("runs", {}).items():
        dirs = [out / rel for rel in rels]
        runs.append(
            MethodRuns(
                method,
                dirs,
                [rundir.read_summary(d) for d in dirs],
                [rundir.read_metrics(d) for d in dirs],
            )
        )
    if not runs or not runs[0].run_dirs:
        raise UserInputError(f"{elide(repr(str(out)), 80)} lists no runs")
    target = data.get("target")
    rows = build_rows(runs, target)
    cfg = load_config(runs[0].run_dirs[0] / "config.toml")
    write_comparison(out, runs, rows, target, cfg)
    return rows


def read_comparison(path: str | Path) -> dict[str, Any]:
    """The ``comparison.json`` of a comparison directory."""
    return rundir.read_json_object(Path(path) / COMPARISON_JSON, "a comparison directory")
