"""FedSparsify on Fashion-MNIST (issue 3): accuracy against communication, against FedAvg.

Workload (methods.md §3.4, shortened to fit a 2-core machine): Fashion-MNIST, model
``fc`` (118,282 parameters), 10 clients, every client every round, SGD lr 0.02 (no
momentum), batch 32, seed 1990, ``--rounds`` rounds of ``--local-epochs`` local epochs
(the paper: 200 x 4). Two splits, each loaded once and shared by all its runs:

* non-IID: ``data.partition = "sort-and-deal"``, ``data.classes_per_client = 2``;
* IID: ``data.partition = "iid"``.

Runs: on both splits ``fedavg`` and ``fedsparsify-global`` at final sparsity 0.8, 0.9,
0.95, 0.99; on the non-IID split also, at 0.9, ``fedsparsify-local`` and the baselines
``omp``, ``snip``, ``grasp``, ``random`` and ``prunefl`` (PruneFL ignores
``final_sparsity`` by design; its own sparsity is reported). Every pruning method uses
the package defaults of the ``pruning`` section (polynomial schedule, exponent 3, from
round 1, every round, one global threshold over conv/linear weights), except PruneFL's
mask readjustment period, scaled with the rounds (``50 * rounds / 200``: 50 of the
paper's 200) so that a short run still readjusts; OMP prunes after 90% of the rounds.

Bytes are the lengths of the real encoded payloads (codec buffers, both directions,
every message including setup exchanges such as SNIP's score upload); MB = 1e6 bytes.
Evaluation (global model on the 10k test set after every round) is not counted.
"Reach" is the first round whose accuracy is at least FedAvg's final accuracy on the same
split minus 1 point, with the cumulative MB (up + down) spent by then.

Outputs (``--out``, default ``benchmarks/results/fedsparsify``): ``fedsparsify.json``
(every number, the per-round curves, how it was measured) and
``accuracy_vs_mb_noniid.png``. The run directories go to a temporary folder that is
deleted at the end (``--keep-runs DIR`` keeps them).

Usage::

    FEDPRUNE_DATA=/work/shared/data python benchmarks/fedsparsify.py \
        [--rounds 40] [--local-epochs 1] [--workers 2] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import ScalarFormatter

from _common import load_average, machine
from fedprune.config import RunConfig, load_config
from fedprune.experiment import load_federation, run_experiment

MB = 1e6
DATASET = "fashion-mnist"
MODEL = "fc"
NUM_CLIENTS = 10
SEED = 1990
LR = 0.02
BATCH = 32
DEFAULT_ROUNDS = 40
DEFAULT_EPOCHS = 1
QUICK_ROUNDS = 2
SPARSITIES = (0.8, 0.9, 0.95, 0.99)
BASELINES = ("omp", "snip", "grasp", "random", "prunefl")
SPLITS = {
    "non-iid": {"data.partition": "sort-and-deal", "data.classes_per_client": 2},
    "iid": {"data.partition": "iid"},
}
REACH_MARGIN = 0.01
"""Reach = FedAvg's final accuracy minus this (1 point)."""


@dataclass(frozen=True)
class Job:
    """One run of the benchmark."""

    split: str
    method: str
    sparsity: float | None  # None: the method has no final sparsity (FedAvg, PruneFL)

    @property
    def label(self) -> str:
        """Short name for tables and the plot legend."""
        return self.method if self.sparsity is None else f"{self.method} @{self.sparsity:g}"


def jobs() -> list[Job]:
    """Every run, non-IID split first; FedAvg first on each split."""
    out: list[Job] = []
    for split in SPLITS:
        out.append(Job(split, "fedavg", None))
        out += [Job(split, "fedsparsify-global", s) for s in SPARSITIES]
        if split == "non-iid":
            out.append(Job(split, "fedsparsify-local", 0.9))
            out += [Job(split, m, None if m == "prunefl" else 0.9) for m in BASELINES]
    return out


def make_config(job: Job, args: argparse.Namespace, out_dir: str) -> RunConfig:
    """The full configuration of one run."""
    values: dict[str, Any] = {
        "method": job.method,
        "seed": SEED,
        "out": out_dir,
        "name": f"{job.split}-{job.label.replace(' @', '-')}",
        "data.dataset": DATASET,
        "data.data_dir": args.data_dir,
        "data.num_clients": NUM_CLIENTS,
        "model.name": MODEL,
        "train.local_epochs": args.local_epochs,
        "train.batch_size": BATCH,
        "train.lr": LR,
        "train.optimizer": "sgd",
        "train.momentum": 0.0,
        "federation.rounds": args.rounds,
        "federation.clients_per_round": 0,
        "federation.eval_every": 1,
        "pruning.final_sparsity": job.sparsity if job.sparsity is not None else 0.9,
        "pruning.readjust_every": max(1, round(50 * args.rounds / 200)),
        "engine.name": "inprocess",
        "engine.workers": args.workers,
        "engine.threads": 1,
        **SPLITS[job.split],
    }
    return load_config(None, [], values)


def curve(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-round accuracy, sparsity and cumulative MB (the evaluated rounds)."""
    return [
        {
            "round": r["round"],
            "accuracy": r["test_accuracy"],
            "sparsity": r["sparsity"],
            "cum_mb": (r["cum_bytes_up"] + r["cum_bytes_down"]) / MB,
        }
        for r in records
        if r.get("test_accuracy") is not None
    ]


def run_one(job: Job, args: argparse.Namespace, fed: Any, runs_dir: str) -> dict[str, Any]:
    """Run ``job`` and collect its numbers (reach is filled in once FedAvg is known)."""
    cfg = make_config(job, args, runs_dir)
    t0 = time.perf_counter()
    res = run_experiment(cfg, fed=fed)
    wall = time.perf_counter() - t0
    s = res.summary
    up, down = s["total_bytes_up"] / MB, s["total_bytes_down"] / MB
    return {
        "split": job.split,
        "method": job.method,
        "label": job.label,
        "final_sparsity_target": job.sparsity,
        "rounds": s["rounds"],
        "final_accuracy": s["final_accuracy"],
        "best_accuracy": s["best_accuracy"],
        "final_sparsity": s["final_sparsity"],
        "dense_params": s["dense_params"],
        "final_nonzero_params": s["final_nonzero_params"],
        "mb_up": up,
        "mb_down": down,
        "mb_total": up + down,
        "dense_mb_total": (s["dense_bytes_up"] + s["dense_bytes_down"]) / MB,
        "wall_s": wall,
        "engine_wall_s": s["wall_s"],
        "curve": curve(res.records),
    }


def fill_relative(runs: list[dict[str, Any]]) -> None:
    """Add MB vs FedAvg and the reach metrics, against the FedAvg run of the same split."""
    base = {r["split"]: r for r in runs if r["method"] == "fedavg"}
    for r in runs:
        ref = base[r["split"]]
        r["mb_vs_fedavg"] = r["mb_total"] / ref["mb_total"]
        r["accuracy_vs_fedavg_points"] = 100 * (r["final_accuracy"] - ref["final_accuracy"])
        target = ref["final_accuracy"] - REACH_MARGIN
        r["reach_target_accuracy"] = target
        hit = next((c for c in r["curve"] if c["accuracy"] >= target), None)
        r["reach_round"] = hit["round"] if hit else None
        r["reach_mb"] = hit["cum_mb"] if hit else None


# --------------------------------------------------------------------------- printing

HEADERS = (
    "run",
    "final acc %",
    "best acc %",
    "Δ vs FedAvg (pt)",
    "sparsity %",
    "non-zero params",
    "MB up",
    "MB down",
    "MB total",
    "MB vs FedAvg",
    "reach round",
    "reach MB",
    "wall s",
)


def _row(r: dict[str, Any]) -> list[str]:
    ratio = r["mb_vs_fedavg"]
    return [
        r["label"],
        f"{100 * r['final_accuracy']:.2f}",
        f"{100 * r['best_accuracy']:.2f}",
        f"{r['accuracy_vs_fedavg_points']:+.2f}",
        f"{100 * r['final_sparsity']:.1f}",
        f"{r['final_nonzero_params']:,}",
        f"{r['mb_up']:.1f}",
        f"{r['mb_down']:.1f}",
        f"{r['mb_total']:.1f}",
        f"{ratio:.3f} ({1 / ratio:.2f}x less)",
        "never" if r["reach_round"] is None else str(r["reach_round"]),
        "—" if r["reach_mb"] is None else f"{r['reach_mb']:.1f}",
        f"{r['wall_s']:.0f}",
    ]


def markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the given runs."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] * len(HEADERS)) + "|"]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in rows]
    return "\n".join(lines)


def _gap(gap: float) -> str:
    return f"{gap:.2f} pt below FedAvg" if gap >= 0 else f"{-gap:.2f} pt above FedAvg"


def checks(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's targets, per split, for FedSparsify-Global (and Local where it ran)."""
    out: list[dict[str, Any]] = []
    for r in runs:
        if r["method"] not in ("fedsparsify-global", "fedsparsify-local"):
            continue
        gap = -r["accuracy_vs_fedavg_points"]
        less = 1 / r["mb_vs_fedavg"]
        if r["final_sparsity_target"] == 0.9:
            ok_acc, ok_mb = gap <= 1.0, less >= 3.0
            out.append(
                {
                    "split": r["split"],
                    "run": r["label"],
                    "target": "90%: accuracy within 1 pt of FedAvg and >= 3x less communication",
                    "pass": ok_acc and ok_mb,
                    "detail": f"{_gap(gap)} ({'ok' if ok_acc else 'no'}), "
                    f"{less:.2f}x less MB ({'ok' if ok_mb else 'no'})",
                }
            )
        if r["final_sparsity_target"] == 0.95:
            out.append(
                {
                    "split": r["split"],
                    "run": r["label"],
                    "target": "95%: accuracy within 2 pt of FedAvg",
                    "pass": gap <= 2.0,
                    "detail": f"{_gap(gap)} ({less:.2f}x less MB)",
                }
            )
    return out


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy against cumulative MB, one line per run."""
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=100)
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(r for r in runs if r["method"] != "fedavg"):
        xs = [c["cum_mb"] for c in r["curve"]]
        ys = [100 * c["accuracy"] for c in r["curve"]]
        style = "-" if r["method"].startswith("fed") else "--"
        width = 1.6 if r["method"].startswith("fedsparsify-global") else 1.2
        ax.plot(xs, ys, style, color=cmap(i % 10), lw=width, label=r["label"])
    fedavg = next(r for r in runs if r["method"] == "fedavg")
    ax.plot(
        [c["cum_mb"] for c in fedavg["curve"]],
        [100 * c["accuracy"] for c in fedavg["curve"]],
        color="black",
        lw=2.2,
        label="fedavg",
    )
    ax.axhline(
        100 * fedavg["reach_target_accuracy"],
        color="grey",
        lw=0.8,
        ls=":",
        label="FedAvg final − 1 pt",
    )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("cumulative MB communicated (up + down, encoded payloads; log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def git_commit() -> str:
    """The checked-out commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def how_measured(args: argparse.Namespace, command: str) -> list[str]:
    """The header lines: what was run and what the numbers mean."""
    return [
        f"command: {command}",
        f"machine: {machine()}; engine.workers={args.workers} (forked client processes, "
        "1 torch thread each; identical results to workers=1); commit "
        f"{git_commit()}",
        f"workload: {DATASET}, model {MODEL}, {NUM_CLIENTS} clients, all clients every round, "
        f"{args.rounds} rounds x {args.local_epochs} local epoch(s) (paper: 200 x 4), "
        f"SGD lr {LR} no momentum, batch {BATCH}, seed {SEED}",
        "splits: non-IID = sort-and-deal, 2 classes per client (FedSparsify's split); "
        "IID = shuffle and split equally; each split loaded once and shared by its runs",
        "pruning: polynomial schedule s_t (exponent 3, from round 1, every round), one global "
        "magnitude threshold over conv/linear weights; OMP prunes after 90% of the rounds; "
        f"PruneFL readjusts every {max(1, round(50 * args.rounds / 200))} rounds "
        "(50 x rounds/200) and sets its own sparsity",
        "bytes: len() of the real encoded payloads (codec picks dense/bitmask/COO per "
        "tensor), both directions, every message incl. setup exchanges; evaluation not "
        "counted; MB = 1e6 bytes; 'MB vs FedAvg' = run total / FedAvg total on the same split",
        "accuracy: global model on the 10,000-image test set after every round; "
        "'reach' = first round with accuracy >= FedAvg's final accuracy - 1 pt (same split), "
        "'reach MB' = cumulative MB by then; wall s = run_experiment wall time "
        "(incl. run-dir writing and plots)",
        "sparsity: fraction of exact zeros over conv/linear weights; non-zero params "
        "counted over all parameters",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables and targets; write the JSON and the plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help=f"default {DEFAULT_ROUNDS}")
    ap.add_argument("--local-epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK_ROUNDS} rounds (2-3 min)"
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fedsparsify"))
    ap.add_argument("--data-dir", default="", help="Fashion-MNIST IDX folder")
    ap.add_argument("--keep-runs", type=Path, default=None, help="keep the run directories")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS
    argv_list = sys.argv[1:] if argv is None else argv
    env = os.environ.get("FEDPRUNE_DATA")
    prefix = [f"FEDPRUNE_DATA={shlex.quote(env)}"] if env else []
    command = " ".join(
        [*prefix, "python", "benchmarks/fedsparsify.py", *map(shlex.quote, argv_list)]
    )
    header = how_measured(args, command)
    print("# FedSparsify benchmark (issue 3)\n")
    print("How measured:")
    for line in header:
        print(f"- {line}")
    print(f"- load average at start: {load_average()}\n", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if args.keep_runs is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedsparsify-bench-")
        runs_dir = tmp.name
    else:
        runs_dir = str(args.keep_runs)
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    feds: dict[str, Any] = {}
    all_jobs = jobs()
    for i, job in enumerate(all_jobs, 1):
        if job.split not in feds:
            feds = {job.split: load_federation(make_config(job, args, runs_dir))}
        r = run_one(job, args, feds[job.split], runs_dir)
        runs.append(r)
        print(
            f"[{i:2d}/{len(all_jobs)}] {job.split:7s} {job.label:26s} "
            f"acc {100 * r['final_accuracy']:6.2f}% (best {100 * r['best_accuracy']:6.2f}%)  "
            f"sparsity {100 * r['final_sparsity']:5.1f}%  {r['mb_total']:8.1f} MB  "
            f"{r['wall_s']:5.0f} s  (elapsed {time.perf_counter() - t_start:5.0f} s)",
            flush=True,
        )
    total_wall = time.perf_counter() - t_start
    if tmp is not None:
        tmp.cleanup()
    fill_relative(runs)

    for split in SPLITS:
        rows = [
            r
            for r in runs
            if r["split"] == split and r["method"] in ("fedavg", "fedsparsify-global")
        ]
        print(f"\n## {split}: FedAvg vs FedSparsify-Global\n")
        print(markdown(rows))
    nid = [r for r in runs if r["split"] == "non-iid"]
    at90 = [r for r in nid if r["method"] == "fedavg" or r["final_sparsity_target"] == 0.9]
    at90 += [r for r in nid if r["method"] == "prunefl"]
    print("\n## non-iid: Global vs Local and the baselines at 90% (PruneFL: own sparsity)\n")
    print(markdown(at90))

    results = checks(runs)
    print("\n## Paper targets (final accuracy vs FedAvg's final accuracy, same split)\n")
    for c in results:
        verdict = "PASS" if c["pass"] else "FALL SHORT"
        print(f"- {verdict}: {c['split']} {c['run']}: {c['target']}: {c['detail']}")

    png = args.out / "accuracy_vs_mb_noniid.png"
    plot(
        nid,
        png,
        f"Fashion-MNIST fc, non-IID (sort-and-deal, 2 classes/client), 10 clients, "
        f"{args.rounds} rounds x {args.local_epochs} epoch, seed {SEED}",
    )
    doc = {
        "benchmark": "fedsparsify (issue 3)",
        "how_measured": header,
        "settings": {
            "dataset": DATASET,
            "model": MODEL,
            "num_clients": NUM_CLIENTS,
            "clients_per_round": NUM_CLIENTS,
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "lr": LR,
            "batch_size": BATCH,
            "seed": SEED,
            "workers": args.workers,
            "splits": SPLITS,
            "prunefl_readjust_every": max(1, round(50 * args.rounds / 200)),
            "reach_margin": REACH_MARGIN,
        },
        "total_wall_s": total_wall,
        "load_average_end": load_average(),
        "runs": runs,
        "targets": results,
    }
    js = args.out / "fedsparsify.json"
    js.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"\ntotal wall {total_wall:.0f} s; wrote {js} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
