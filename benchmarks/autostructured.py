"""Automatic structured pruning (issue 5): unpruned FedAvg vs ``autostructured``.

Three workloads, each loaded once and shared by its runs (all numbers from the run
directories the package writes; nothing recomputed by hand):

* ``femnist-gap``: FEMNIST, LEAF's natural writer split (396 writers), the paper's GAP CNN
  (``gap-cnn``, 56,126 parameters with 62 classes), ``--femnist-rounds`` rounds of
  ``--femnist-clients`` writers; autostructured at every k of ``--ks`` (weight
  inheritance) and of ``--reinit-ks`` (the authors' re-initialisation).
* ``femnist-inception``: same data, the paper's naive Inception net (``inception``);
  ``--inception-rounds`` rounds of ``--inception-clients`` writers; autostructured at
  ``--inception-k`` (the paper's 2.5 by default).
* ``cifar10-twocnn``: CIFAR-10 (the 40k-image subset), ``twocnn`` (the zoo's 2-conv CNN
  with a 512-unit dense layer: its parameters sit mostly in the dense layer, whose
  inputs shrink with the last convolution), ``--cifar-clients-total`` clients from a
  Dirichlet(0.5) label split, ``--cifar-clients`` per round; autostructured at
  ``--cifar-k``.

Training (shortened from the paper's 500 rounds x 5 epochs, methods.md §1.3, to fit a
2-core machine): Adam lr 1e-3 (the paper's Keras default; a fresh optimiser per client
and round), batch 32, ``--local-epochs`` local epoch(s), seed 0. Pruning: the band rule
two-sided, patience 3, ``structured.max_prune_round`` = ``--prune-fraction`` of the
rounds (the paper prunes in the first 10-20% of its 500 rounds; a short run needs a
larger share to shrink at all, and the rest of the rounds to recover), weight
inheritance (the default) unless stated.

Reported per run: final and best test accuracy (global test set, evaluated every 10
rounds and at the end), accuracy change vs FedAvg in points, parameters and FLOPs
(2 x MACs of conv/linear layers, one sample) of the final model vs the dense model,
total MB communicated (encoded payloads, both directions; MB = 1e6 bytes) and its
ratio to FedAvg's, the last round's MB against the first round's, and the onnxruntime
latency speedup (``fedprune.export.measure_latency``: dense initial vs final model, one
thread, batch 1, 20 warm-up + ``--latency-runs`` alternating timed runs, median).

The label-distribution PNG of each run directory is not drawn (see below): it costs more
than a short FEMNIST run. Outputs: ``--out`` (default ``benchmarks/results/autostructured``) gets
``autostructured.json``; run directories go to a temporary folder unless
``--keep-runs DIR``.

Usage::

    FEDPRUNE_DATA=/work/shared/data python benchmarks/autostructured.py \
        [--quick] [--ks 2.0 2.5] [--reinit-ks 2.0] [--workloads femnist-gap ...] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
WORKLOADS = ("femnist-gap", "femnist-inception", "cifar10-twocnn")
PAPER = (
    "paper: -89% params, -90% FLOPs within 1.5 pt, >= 5x less communication, >= 2x lower "
    "latency; authors' stored FEMNIST CNN run: -62% params at about -3 pt"
)


def workload(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Config values shared by a workload's runs, and the ks to try."""
    common = {
        "seed": SEED,
        "train.optimizer": "adam",
        "train.lr": 1e-3,
        "train.batch_size": 32,
        "train.local_epochs": args.local_epochs,
        "federation.eval_every": 10,
        "engine.workers": args.workers,
        "engine.threads": 1,
        "structured.two_sided": True,
        "structured.patience": 3,
        "structured.inherit_weights": True,
    }
    femnist = {"data.dataset": "femnist", "data.partition": "natural", "data.num_clients": 396}
    if name == "femnist-gap":
        return {
            "values": {
                **common,
                **femnist,
                "model.name": "gap-cnn",
                "federation.rounds": args.femnist_rounds,
                "federation.clients_per_round": args.femnist_clients,
            },
            "ks": args.ks,
            "reinit_ks": args.reinit_ks,
        }
    if name == "femnist-inception":
        return {
            "values": {
                **common,
                **femnist,
                "model.name": "inception",
                "federation.rounds": args.inception_rounds,
                "federation.clients_per_round": args.inception_clients,
            },
            "ks": [args.inception_k],
            "reinit_ks": [],
        }
    if name == "cifar10-twocnn":
        return {
            "values": {
                **common,
                "data.dataset": "cifar10",
                "data.partition": "dirichlet",
                "data.alpha": 0.5,
                "data.num_clients": args.cifar_clients_total,
                "model.name": "twocnn",
                "federation.rounds": args.cifar_rounds,
                "federation.clients_per_round": args.cifar_clients,
            },
            "ks": [args.cifar_k],
            "reinit_ks": [],
        }
    raise ValueError(name)


def make_config(
    values: dict[str, Any], method: str, k: float | None, out: str, inherit: bool = True
) -> RunConfig:
    """One run's configuration."""
    v = dict(values)
    v["method"] = method
    v["out"] = out
    v["name"] = (
        f"{v['model.name']}-{v['data.dataset']}-{method}"
        + (f"-k{k:g}" if k else "")
        + ("" if inherit else "-reinit")
    )
    rounds = int(v["federation.rounds"])
    v["structured.max_prune_round"] = max(1, round(ARGS.prune_fraction * rounds))
    v["structured.inherit_weights"] = inherit
    if k is not None:
        v["structured.k"] = k
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
    accepted = [r["round"] for r in recs if r["method_metrics"].get("accepted") == 1.0]
    out: dict[str, Any] = {
        "method": cfg.method,
        "k": cfg.structured.k if cfg.method == "autostructured" else None,
        "inherit_weights": cfg.structured.inherit_weights,
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
        "max_prune_round": cfg.structured.max_prune_round,
        "wall_s": wall,
        "curve": [
            {"round": r["round"], "accuracy": r["test_accuracy"], "params": r["params"]}
            for r in recs
            if r.get("test_accuracy") is not None
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
    "last round x less",
    "ORT speedup",
    "wall s",
)


def row(w: str, r: dict[str, Any]) -> list[str]:
    """One table row."""
    label = f"{w} {r['method']}" + (f" k={r['k']:g}" if r["k"] else "")
    label += "" if r["inherit_weights"] else " reinit"
    lat = r.get("latency")
    return [
        label,
        f"{100 * r['final_accuracy']:.2f}",
        f"{r['accuracy_vs_fedavg_points']:+.2f}",
        f"{r['final_params']:,}",
        f"{100 * r['params_change']:+.1f}%",
        f"{r['final_flops'] / 1e6:.2f}",
        f"{100 * r['flops_change']:+.1f}%",
        f"{r['mb_total']:.1f}",
        f"{r['communication_vs_fedavg']:.2f}",
        f"{r['last_round_vs_first']:.2f}",
        f"{lat['speedup']:.2f}" if lat else "-",
        f"{r['wall_s']:.0f}",
    ]


def markdown(rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] * len(HEADERS)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--ks", type=float, nargs="+", default=[2.0, 2.5], help="femnist-gap")
    ap.add_argument(
        "--reinit-ks", type=float, nargs="*", default=[2.0], help="femnist-gap, re-initialising"
    )
    ap.add_argument("--inception-k", type=float, default=2.5)
    ap.add_argument("--cifar-k", type=float, default=2.0)
    ap.add_argument("--femnist-rounds", type=int, default=40)
    ap.add_argument("--femnist-clients", type=int, default=20)
    ap.add_argument("--inception-rounds", type=int, default=30)
    ap.add_argument("--inception-clients", type=int, default=10)
    ap.add_argument("--cifar-rounds", type=int, default=30)
    ap.add_argument("--cifar-clients", type=int, default=10)
    ap.add_argument("--cifar-clients-total", type=int, default=200)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--prune-fraction", type=float, default=0.3)
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 4 clients")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/autostructured"))
    ap.add_argument("--keep-runs", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        for key in ("femnist_rounds", "inception_rounds", "cifar_rounds"):
            setattr(args, key, 3)
        for key in ("femnist_clients", "inception_clients", "cifar_clients"):
            setattr(args, key, 4)
        args.latency_runs = 20
    return args


ARGS = argparse.Namespace(prune_fraction=0.3)


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
    print("# Automatic structured pruning benchmark (issue 5)\n")
    print(f"command: {command}")
    print(f"machine: {machine()}; load average at start: {load_average()}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="autostructured-bench-")
    runs_dir = str(args.keep_runs) if args.keep_runs else tmp.name
    t_start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    settings: dict[str, dict[str, Any]] = {}
    for w in args.workloads:
        spec = workload(w, args)
        settings[w] = {k: v for k, v in spec["values"].items() if k != "engine.workers"}
        cfg0 = make_config(spec["values"], "fedavg", None, runs_dir)
        fed = load_federation(cfg0)
        runs = []
        todo: list[tuple[str, float | None, bool]] = [
            ("fedavg", None, True),
            *(("autostructured", k, True) for k in spec["ks"]),
            *(("autostructured", k, False) for k in spec["reinit_ks"]),
        ]
        for method, k, inherit in todo:
            cfg = make_config(spec["values"], method, k, runs_dir, inherit)
            r = run_one(cfg, fed, args.latency_runs)
            runs.append(r)
            print(
                f"{w:18s} {method:14s} k={k if k else '-':<4} "
                f"{'inherit' if inherit else 'reinit ':7s} "
                f"acc {100 * r['final_accuracy']:6.2f}% "
                f"params {r['final_params']:>9,}/{r['dense_params']:,} "
                f"{r['mb_total']:8.1f} MB  {r['wall_s']:5.0f} s "
                f"(elapsed {time.perf_counter() - t_start:5.0f} s)",
                flush=True,
            )
        relative(runs)
        results[w] = runs
        del fed
    total = time.perf_counter() - t_start
    tmp.cleanup()

    rows = [row(w, r) for w, runs in results.items() for r in runs]
    print("\n" + table(HEADERS, rows))
    print("\n" + markdown(rows))
    print(f"\n{PAPER}")
    print(f"total wall time {total:.0f} s ({total / 60:.1f} min)")
    payload = {
        "command": command,
        "machine": machine(),
        "load_average_end": load_average(),
        "total_wall_s": total,
        "paper_targets": PAPER,
        "settings": settings,
        "prune_fraction": args.prune_fraction,
        "latency": "onnxruntime CPU EP, 1 intra-op + 1 inter-op thread, batch 1, 20 warm-up, "
        f"{args.latency_runs} alternating timed runs per model, median; dense initial vs final",
        "results": results,
    }
    path = args.out / "autostructured.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
