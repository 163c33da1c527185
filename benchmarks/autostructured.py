"""Automatic structured pruning (issues 5 and 16): FedAvg vs the paper's band rule vs
``structured.round_to = 8`` vs the accuracy guard with the adaptive k schedule.

Workloads, each loaded once and shared by its runs (all numbers from the run directories
the package writes; nothing recomputed by hand):

* ``femnist-gap``: FEMNIST, LEAF's natural writer split (396 writers, each with its LEAF
  test part as local validation split), the paper's GAP CNN (``gap-cnn``, 56,126
  parameters), ``--femnist-rounds`` rounds of ``--femnist-clients`` writers.
* ``femnist-inception``: same data, the paper's naive Inception net (``inception``,
  246,236 parameters); ``--inception-rounds`` rounds of ``--inception-clients`` writers.
* ``fmnist-fc``: Fashion-MNIST, FedSparsify's 2-layer MLP (``fc``, 118,282 parameters),
  ``--fmnist-clients`` IID clients, all in every round, 10% of each client's data held
  out as its local validation split (``data.local_test_fraction = 0.1``, every row).
* ``cifar10-twocnn`` (issue 5's third workload; not in the default list).

Rows per workload (same data, rounds, clients and seed; only ``[structured]`` differs):

* ``fedavg``: no pruning.
* ``paper k=K``: the band rule at k = K (``--k``), accept if fewer parameters, patience 3.
* ``round8 k=K``: the same with ``structured.round_to = 8``.
* ``guard``: ``round_to = 8``, ``max_drop = --max-drop`` (FEMNIST) / ``--fmnist-max-drop``,
  ``recovery_rounds = --recovery``, ``k_schedule = adaptive`` starting at k = K.

Every pruned row prunes hidden linear units too (``structured.prune_linear``, default
true; the paper prunes convolutions only: on the Inception net this adds its Dense 50).
No proposal after ``--prune-fraction`` of the rounds (the paper prunes in its first 10-20%
of 500 rounds; a short run needs a larger share).

Training (shortened from the paper's 500 rounds x 5 epochs, methods.md §1.3, to fit a
shared 2-core machine; the scale is the number of rounds, never the model, data or split):
Adam lr 1e-3, batch 32, ``--local-epochs`` local epoch(s), seed 0.

Reported per run: final and best test accuracy (global test set, every 5 rounds and at
the end), change vs FedAvg in points, parameters and FLOPs of the final model vs the
dense model, total MB communicated (encoded payloads, both directions, rolled-back
rounds included) and its ratio to FedAvg's, accepted / rolled-back proposals, and the
onnxruntime speed-up (``fedprune.export.measure_latency``: dense initial vs final model,
one thread, batch 1, 20 warm-up + ``--latency-runs`` alternating timed runs, median).
``autostructured.png`` plots, per workload, accuracy change vs parameters kept with the
speed-up written at each point, and the guard run's parameter curve over the rounds.

Outputs: ``--out`` (default ``benchmarks/results/autostructured``) gets
``autostructured.json`` and ``autostructured.png``; run directories go to a temporary
folder unless ``--keep-runs DIR``.

Usage::

    FEDPRUNE_DATA=/work/shared/data python benchmarks/autostructured.py \
        [--quick] [--workloads femnist-gap fmnist-fc ...] [--rows fedavg guard ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fedprune.experiment as experiment
from _common import load_average, machine, table
from fedprune.config import RunConfig, load_config
from fedprune.experiment import load_federation, run_experiment
from fedprune.export import measure_latency

# The label-distribution plot of a run directory draws one bar per (client, class): for
# 396 writers x 62 classes it takes 30-90 s per run on this machine, more than a short
# FEMNIST run itself. The benchmark skips it (nothing measured depends on it).
experiment.plot_label_distribution = lambda *args, **kwargs: None  # type: ignore[assignment]

MB = 1e6
SEED = 0
WORKLOADS = ("femnist-gap", "femnist-inception", "fmnist-fc", "cifar10-twocnn")
DEFAULT_WORKLOADS = ("femnist-gap", "femnist-inception", "fmnist-fc")
ROWS = ("fedavg", "paper", "round8", "guard")
PAPER = (
    "paper: -89% params, -90% FLOPs within 1.5 pt, >= 5x less communication, >= 2x lower "
    "latency; authors' stored FEMNIST CNN run: -62% params at about -3 pt"
)
TARGETS = {
    "femnist-gap": ">= 85% fewer params and FLOPs, <= 1.5 pt below FedAvg, ORT speed-up >= 2.5x",
    "femnist-inception": "ORT speed-up >= 3x",
    "fmnist-fc": ">= 80% fewer params, <= 1 pt below FedAvg",
}


def workload(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Config values shared by a workload's runs."""
    common = {
        "seed": SEED,
        "train.optimizer": "adam",
        "train.lr": 1e-3,
        "train.batch_size": 32,
        "train.local_epochs": args.local_epochs,
        "federation.eval_every": 5,
        "engine.workers": args.workers,
        "engine.threads": 1,
        "structured.two_sided": True,
        "structured.patience": 3,
        "structured.inherit_weights": True,
    }
    femnist = {"data.dataset": "femnist", "data.partition": "natural", "data.num_clients": 396}
    if name == "femnist-gap":
        return {
            **common,
            **femnist,
            "model.name": "gap-cnn",
            "federation.rounds": args.femnist_rounds,
            "federation.clients_per_round": args.femnist_clients,
        }
    if name == "femnist-inception":
        return {
            **common,
            **femnist,
            "model.name": "inception",
            "federation.rounds": args.inception_rounds,
            "federation.clients_per_round": args.inception_clients,
        }
    if name == "fmnist-fc":
        return {
            **common,
            "data.dataset": "fashion-mnist",
            "data.partition": "iid",
            "data.num_clients": args.fmnist_clients,
            "data.local_test_fraction": 0.1,
            "model.name": "fc",
            "federation.rounds": args.fmnist_rounds,
            "federation.clients_per_round": args.fmnist_clients,
        }
    if name == "cifar10-twocnn":
        return {
            **common,
            "data.dataset": "cifar10",
            "data.partition": "dirichlet",
            "data.alpha": 0.5,
            "data.num_clients": args.cifar_clients_total,
            "data.local_test_fraction": 0.1,
            "model.name": "twocnn",
            "federation.rounds": args.cifar_rounds,
            "federation.clients_per_round": args.cifar_clients,
        }
    raise ValueError(name)


def row_values(row: str, w: str, args: argparse.Namespace) -> dict[str, Any]:
    """The ``[structured]`` values of one row."""
    k = args.k
    if row == "fedavg":
        return {"method": "fedavg"}
    out: dict[str, Any] = {"method": "autostructured", "structured.k": k}
    if row in ("round8", "guard"):
        out["structured.round_to"] = 8
    if row == "guard":
        drop = args.fmnist_max_drop if w == "fmnist-fc" else args.max_drop
        out.update(
            {
                "structured.max_drop": drop,
                "structured.recovery_rounds": args.recovery,
                "structured.k_schedule": "adaptive",
            }
        )
    return out


def label(row: str, args: argparse.Namespace) -> str:
    """A row's name in tables."""
    if row == "fedavg":
        return "fedavg"
    if row == "guard":
        return f"guard (round_to 8, adaptive k from {args.k:g})"
    return f"{row} k={args.k:g}"


def make_config(values: dict[str, Any], row: dict[str, Any], name: str, out: str) -> RunConfig:
    """One run's configuration."""
    v = {**values, **row, "out": out, "name": name}
    rounds = int(v["federation.rounds"])
    v["structured.max_prune_round"] = max(1, round(ARGS.prune_fraction * rounds))
    v["structured.start_round"] = max(1, round(ARGS.start_fraction * rounds))
    return load_config(None, [], v)


def run_one(cfg: RunConfig, fed: Any, latency_runs: int) -> dict[str, Any]:
    """Run one configuration; collect its numbers (and latency for a pruned run)."""
    t0 = time.perf_counter()
    res = run_experiment(cfg, fed=fed)
    wall = time.perf_counter() - t0
    s, recs = res.summary, res.records
    mb = (s["total_bytes_up"] + s["total_bytes_down"]) / MB
    first = (recs[0]["bytes_up"] + recs[0]["bytes_down"]) / MB
    last = (recs[-1]["bytes_up"] + recs[-1]["bytes_down"]) / MB
    last_mm = recs[-1]["method_metrics"]
    widths = {k[len("width/") :]: int(v) for k, v in last_mm.items() if k.startswith("width/")}
    mm = [r["method_metrics"] for r in recs]
    accepted = [r["round"] for r, m in zip(recs, mm, strict=True) if m.get("accepted") == 1.0]
    rolled = [r["round"] for r, m in zip(recs, mm, strict=True) if m.get("rolled_back") == 1.0]
    st = cfg.structured
    out: dict[str, Any] = {
        "method": cfg.method,
        "structured": {
            "k": st.k,
            "round_to": st.round_to,
            "max_drop": st.max_drop,
            "recovery_rounds": st.recovery_rounds,
            "k_schedule": st.k_schedule,
            "prune_linear": st.prune_linear,
        }
        if cfg.method == "autostructured"
        else None,
        "rounds": s["rounds"],
        "final_accuracy": s["final_accuracy"],
        "best_accuracy": s["best_accuracy"],
        "dense_params": s["dense_params"],
        "final_params": s["final_params"],
        "dense_flops": s["dense_flops"],
        "final_flops": s["final_flops"],
        "mb_total": mb,
        "mb_first_round": first,
        "mb_last_round": last,
        "widths": widths,
        "accepted_rounds": accepted,
        "rolled_back_rounds": rolled,
        "guard": [
            {
                "round": r["round"],
                **{k: m[k] for k in ("guard_accuracy", "guard_baseline", "guard_drop") if k in m},
            }
            for r, m in zip(recs, mm, strict=True)
            if "guard_samples" in m
        ],
        "max_prune_round": cfg.structured.max_prune_round,
        "wall_s": wall,
        "curve": [
            {"round": r["round"], "accuracy": r["test_accuracy"], "params": r["params"]}
            for r in recs
        ],
    }
    if cfg.method == "autostructured":
        t1 = time.perf_counter()
        lat = measure_latency(res.run_dir, runs=latency_runs, warmup=20)
        out["latency"] = {
            "dense_median_ms": lat["dense"]["median_ms"],
            "final_median_ms": lat["final"]["median_ms"],
            "dense_p90_ms": lat["dense"]["p90_ms"],
            "final_p90_ms": lat["final"]["p90_ms"],
            "speedup": lat["speedup"],
            "seconds": time.perf_counter() - t1,
        }
    return out


def relative(runs: list[dict[str, Any]]) -> None:
    """Fill changes against the workload's FedAvg run."""
    base = next(r for r in runs if r["method"] == "fedavg")
    for r in runs:
        r["accuracy_vs_fedavg_points"] = 100 * (r["final_accuracy"] - base["final_accuracy"])
        r["params_change"] = r["final_params"] / r["dense_params"] - 1
        r["flops_change"] = r["final_flops"] / r["dense_flops"] - 1
        r["communication_vs_fedavg"] = base["mb_total"] / r["mb_total"]
        r["last_round_vs_first"] = r["mb_first_round"] / r["mb_last_round"]


HEADERS = (
    "workload / run",
    "final acc %",
    "Δ acc pt",
    "params",
    "Δ params",
    "MFLOPs",
    "Δ FLOPs",
    "MB total",
    "comm x less",
    "accepted / rolled back",
    "ORT speedup",
    "wall s",
)


def row(w: str, r: dict[str, Any]) -> list[str]:
    """One table row."""
    lat = r.get("latency")
    return [
        f"{w} {r['label']}",
        f"{100 * r['final_accuracy']:.2f}",
        f"{r['accuracy_vs_fedavg_points']:+.2f}",
        f"{r['final_params']:,}",
        f"{100 * r['params_change']:+.1f}%",
        f"{r['final_flops'] / 1e6:.2f}",
        f"{100 * r['flops_change']:+.1f}%",
        f"{r['mb_total']:.1f}",
        f"{r['communication_vs_fedavg']:.2f}",
        f"{len(r['accepted_rounds'])} / {len(r['rolled_back_rounds'])}" if r["structured"] else "-",
        f"{lat['speedup']:.2f}" if lat else "-",
        f"{r['wall_s']:.0f}",
    ]


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Accuracy change vs parameters kept (speed-up at each point); the guard's params."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(5 * n, 7.5), squeeze=False)
    for i, (w, runs) in enumerate(results.items()):
        ax = axes[0][i]
        for r in runs:
            x = 100 * r["final_params"] / r["dense_params"]
            y = r["accuracy_vs_fedavg_points"]
            ax.scatter([x], [y])
            sp = r.get("latency", {}).get("speedup")
            text = r["label"].split(" (")[0] + (f" {sp:.2f}x" if sp else "")
            ax.annotate(text, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("parameters kept, % of dense")
        ax.set_ylabel("final accuracy vs FedAvg, points")
        ax.set_title(f"{w}: accuracy vs size (ORT speed-up)", fontsize=9)
        ax2 = axes[1][i]
        for r in runs:
            if r["structured"]:
                xs = [c["round"] for c in r["curve"]]
                ys = [100 * c["params"] / r["dense_params"] for c in r["curve"]]
                ax2.plot(xs, ys, label=r["label"].split(" (")[0])
        ax2.set_xlabel("round")
        ax2.set_ylabel("parameters, % of dense")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] * len(HEADERS)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(DEFAULT_WORKLOADS))
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--k", type=float, default=2.0, help="band half-width (start, adaptive)")
    ap.add_argument("--max-drop", type=float, default=0.015, help="guard, FEMNIST")
    ap.add_argument("--fmnist-max-drop", type=float, default=0.01, help="guard, Fashion-MNIST")
    ap.add_argument("--recovery", type=int, default=2, help="structured.recovery_rounds")
    ap.add_argument("--femnist-rounds", type=int, default=40)
    ap.add_argument("--femnist-clients", type=int, default=20)
    ap.add_argument("--inception-rounds", type=int, default=30)
    ap.add_argument("--inception-clients", type=int, default=10)
    ap.add_argument("--fmnist-rounds", type=int, default=30)
    ap.add_argument("--fmnist-clients", type=int, default=10)
    ap.add_argument("--cifar-rounds", type=int, default=30)
    ap.add_argument("--cifar-clients", type=int, default=10)
    ap.add_argument("--cifar-clients-total", type=int, default=200)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--prune-fraction", type=float, default=0.6, help="last proposal")
    ap.add_argument("--start-fraction", type=float, default=0.0, help="first proposal")
    ap.add_argument(
        "--width-sweep", action="store_true", help="only time uniformly scaled widths (no FL)"
    )
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 rounds, 4 clients")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/autostructured"))
    ap.add_argument("--tag", default="autostructured", help="output file stem")
    ap.add_argument("--keep-runs", type=Path, default=None)
    ap.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="no runs: merge these result JSONs (rows run by separate commands) into --tag",
    )
    args = ap.parse_args(argv)
    if args.quick:
        for key in ("femnist_rounds", "inception_rounds", "cifar_rounds", "fmnist_rounds"):
            setattr(args, key, 4)
        for key in ("femnist_clients", "inception_clients", "cifar_clients", "fmnist_clients"):
            setattr(args, key, 4)
        args.latency_runs = 20
        args.recovery = 0
    return args


ARGS = argparse.Namespace(prune_fraction=0.6, start_fraction=0.0)


SWEEP = {
    "femnist-gap": ("gap-cnn", (1, 28, 28), 62),
    "femnist-inception": ("inception", (1, 28, 28), 62),
}
SWEEP_SCALES = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125)


def width_sweep(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """onnxruntime latency of each model with every prunable width scaled by the same
    factor, rounded to multiples of 8 and, for contrast, one unit below that ("odd"):
    what a width costs, independent of training (the speed-up each architecture can
    reach at most)."""
    import tempfile as tf

    import torch

    from fedprune.core.accounting import count_params
    from fedprune.core.structured import example_input, shrunk_copy, structure
    from fedprune.export import _session, onnx_export_model, time_sessions
    from fedprune.models import build_model

    out: dict[str, list[dict[str, Any]]] = {}
    for w in args.workloads:
        if w not in SWEEP:
            continue
        name, shape, classes = SWEEP[w]
        dense = build_model(name, shape, classes, seed=0).eval()
        ex = example_input(shape)
        groups = structure(dense, ex)[0]
        variants: dict[str, tuple[torch.nn.Module, dict[str, int]]] = {}
        for scale in SWEEP_SCALES:
            for kind in ("round8", "odd"):
                if scale == 1.0 and kind == "odd":
                    continue
                keep = {}
                for g in groups:
                    n = max(8, 8 * round(scale * g.width / 8)) if scale < 1 else g.width
                    n = min(n, g.width) - (1 if kind == "odd" else 0)
                    keep[g.layer] = list(range(max(1, n)))
                small, _ = shrunk_copy(dense, keep, ex)
                variants[f"{scale:g}-{kind}"] = (small, {k: len(v) for k, v in keep.items()})
        with tf.TemporaryDirectory() as tmp:
            paths = {
                k: onnx_export_model(m, shape, Path(tmp) / f"{k}.onnx")
                for k, (m, _) in variants.items()
            }
            sessions = {k: _session(p) for k, p in paths.items()}
            times = time_sessions(sessions, shape, args.latency_runs, 20)
        base = statistics.median(times["1-round8"])
        rows = []
        for k, (m, wd) in variants.items():
            med = statistics.median(times[k])
            rows.append(
                {
                    "variant": k,
                    "widths": wd,
                    "params": count_params(m),
                    "median_ms": med,
                    "speedup": base / med,
                }
            )
            print(
                f"{w:18s} {k:12s} params {count_params(m):>8,} median {med:.4f} ms "
                f"speed-up {base / med:.2f} widths {list(wd.values())}",
                flush=True,
            )
        out[w] = rows
    return out


def merge(args: argparse.Namespace, command: str) -> int:
    """Merge result files whose rows ran as separate commands (same workload settings)."""
    merged: dict[str, list[dict[str, Any]]] = {}
    sources = []
    for path in args.merge:
        doc = json.loads(path.read_text(encoding="utf-8"))
        sources.append({"file": str(path), "command": doc["command"]})
        for w, runs in doc["results"].items():
            for r in runs:
                r["command"] = doc["command"]
                merged.setdefault(w, []).append(r)
    order = {name: i for i, name in enumerate(ROWS)}
    for runs in merged.values():
        runs.sort(key=lambda r: order.get(r["row"], len(ROWS)))
        relative(runs)
    rows = [row(w, r) for w, runs in merged.items() for r in runs]
    print(table(HEADERS, rows))
    print("\n" + markdown(rows))
    path = args.out / f"{args.tag}.json"
    payload = {"command": command, "merged_from": sources, "results": merged}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    plot(merged, args.out / f"{args.tag}.png")
    print(f"results: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write the JSON."""
    global ARGS
    args = ARGS = parse(argv)
    argv_list = sys.argv[1:] if argv is None else argv
    env = os.environ.get("FEDPRUNE_DATA")
    prefix = [f"FEDPRUNE_DATA={shlex.quote(env)}"] if env else []
    command = " ".join(
        [*prefix, "python", "benchmarks/autostructured.py", *map(shlex.quote, argv_list)]
    )
    print("# Automatic structured pruning benchmark (issues 5 and 16)\n")
    print(f"command: {command}")
    print(f"machine: {machine()}; load average at start: {load_average()}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(args, command)
    if args.width_sweep:
        sweep = width_sweep(args)
        path = args.out / f"{args.tag}.json"
        doc = {"command": command, "machine": machine(), "latency_runs": args.latency_runs}
        path.write_text(json.dumps({**doc, "sweep": sweep}, indent=2) + "\n", encoding="utf-8")
        print(f"results: {path}")
        return 0
    tmp = tempfile.TemporaryDirectory(prefix="autostructured-bench-")
    runs_dir = str(args.keep_runs) if args.keep_runs else tmp.name
    t_start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    settings: dict[str, dict[str, Any]] = {}
    for w in args.workloads:
        values = workload(w, args)
        settings[w] = {k: v for k, v in values.items() if k != "engine.workers"}
        fed = load_federation(make_config(values, {"method": "fedavg"}, f"{w}-load", runs_dir))
        runs = []
        for rname in args.rows:
            cfg = make_config(values, row_values(rname, w, args), f"{w}-{rname}", runs_dir)
            r = run_one(cfg, fed, args.latency_runs)
            r["row"], r["label"] = rname, label(rname, args)
            runs.append(r)
            sp = r.get("latency", {}).get("speedup")
            print(
                f"{w:18s} {rname:7s} acc {100 * r['final_accuracy']:6.2f}% "
                f"params {r['final_params']:>9,}/{r['dense_params']:,} widths {r['widths']} "
                f"{r['mb_total']:8.1f} MB speedup {sp if sp else 0:.2f} {r['wall_s']:5.0f} s "
                f"(elapsed {time.perf_counter() - t_start:5.0f} s)",
                flush=True,
            )
        if "fedavg" in args.rows:
            relative(runs)
        results[w] = runs
        del fed
    total = time.perf_counter() - t_start
    tmp.cleanup()

    payload = {
        "command": command,
        "machine": machine(),
        "load_average_end": load_average(),
        "total_wall_s": total,
        "paper_targets": PAPER,
        "issue_16_targets": TARGETS,
        "settings": settings,
        "prune_fraction": args.prune_fraction,
        "start_fraction": args.start_fraction,
        "latency": "onnxruntime CPU EP, 1 intra-op + 1 inter-op thread, batch 1, 20 warm-up, "
        f"{args.latency_runs} alternating timed runs per model, median; dense initial vs final",
        "results": results,
    }
    path = args.out / f"{args.tag}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if "fedavg" in args.rows:
        rows = [row(w, r) for w, runs in results.items() for r in runs]
        print("\n" + table(HEADERS, rows))
        print("\n" + markdown(rows))
        plot(results, args.out / f"{args.tag}.png")
    print(f"\n{PAPER}")
    print(f"total wall time {total:.0f} s ({total / 60:.1f} min)")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
