"""AutoFLIP against FedAvg with the same aggregation (FedAvgM), equal rounds, plus a T_p ablation.

Workload (methods.md §2.3, cut to fit about 30 minutes on a loaded 2-core machine; every
cut is a command-line option):

* MNIST and CIFAR-10 (the 40k subset): TwoCNN, 20 clients, pathological shards with 2
  classes per client, 25% of the clients per round (5);
* FEMNIST: natural writer split, FEMNISTCNN, ``--femnist-clients`` writers (default 32;
  the paper about 100), 25% per round (8);
* both methods: Adam with per-round decay 0.99, FedAvgM (beta 0.9, AutoFLIP's aggregator;
  FedAvg runs with exactly the same ``federation.aggregation``), seed 0;
* AutoFLIP: every client explores from the same theta_0, T_p = 0.3, min-max guidance,
  structured step on, monotone per-round mask refresh (the package defaults);
* ablation: AutoFLIP on MNIST with T_p in {0.1, 0.2, 0.3, 0.4, 0.5} (0.3 is the main run).

What was cut, relative to the paper: ``--rounds`` 30 (paper 200), ``--local-epochs`` 1
(5), ``--batch`` 50 and ``--lr`` 1e-3 (350 and 3e-4: with the few samples kept, batch 350
would give one or two steps per epoch), hidden width ``--hidden`` 16 for both models
(TwoCNN 32, FEMNISTCNN 64), each client's training set cut to ``--per-client`` 300
samples by a seeded permutation (MNIST has 3,000 per client, CIFAR-10 2,000; FEMNIST
writers have 2 to 320, median 150), exploration ``--explore-epochs`` 3 with patience
``--explore-patience`` 2 (150 and 40; with 3 epochs early stopping rarely acts), no local
test split (accuracy is the global model's on the data set's whole test split: MNIST
10,000, CIFAR-10 9,966, FEMNIST the 6,190 test images of all 396 writers).

Measurements:

* accuracy: top-1 of the global model after the last round (evaluated every
  ``rounds // 5`` rounds and at the end);
* training FLOPs (an estimate, the formula of the task, written out): for every round,
  ``sum over the round's clients of n_k x local epochs x 3 x F``, where ``3 x F`` is a
  forward + backward pass and ``F`` the forward FLOPs per sample of the model the round's
  clients trained (2 x MACs of conv/linear layers). Two variants: *effective* ``F`` weights
  each layer by the density of its weight (sparse kernels that skip zeros; AutoFLIP's
  ``train_effective_flops``), *dense-kernel* ``F`` counts the shapes only (what a CPU/GPU
  with dense kernels pays: only the structured shrink saves). Exploration adds
  ``sum over explorers of n_k x epochs run x 3 x F_0`` (dense initial model); it is
  included in the totals and also shown on its own;
* communication: ``len()`` of every encoded payload, both directions, exploration (model
  down, guidance up) and explicit masks included; MB = 1e6 bytes; exploration bytes are
  read from the engine's counters right after AutoFLIP's setup phase;
* final model: dense FLOPs of its (shrunk) shapes, effective FLOPs, parameters of the
  shapes, non-zero parameters.

Outputs: ``--out`` (default ``benchmarks/results/autoflip``)/``autoflip.json``.

Usage::

    FEDPRUNE_DATA=/work/shared/data python benchmarks/autoflip.py [--quick] [--workers 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import load_average, machine, table
from fedprune.config import RunConfig, load_config
from fedprune.data.federation import Federation
from fedprune.experiment import load_federation, run_experiment
from fedprune.methods.autoflip import AutoFlipServer

MB = 1e6
SEED = 0
PAPER = "AutoFLIP paper (v2/v3 abstract): -48.8% compute, -35.5% communication vs FedAvg"
DATASETS: dict[str, dict[str, Any]] = {
    "mnist": {
        "data.dataset": "mnist",
        "data.partition": "shards",
        "data.classes_per_client": 2,
        "data.num_clients": 20,
        "model.name": "twocnn",
    },
    "cifar10": {
        "data.dataset": "cifar10",
        "data.partition": "shards",
        "data.classes_per_client": 2,
        "data.num_clients": 20,
        "model.name": "twocnn",
    },
    "femnist": {
        "data.dataset": "femnist",
        "data.partition": "natural",
        "model.name": "femnist-cnn",
    },
}
ABLATION = (0.1, 0.2, 0.3, 0.4, 0.5)

_EXPLORE_BYTES: dict[str, int] = {}
_orig_setup = AutoFlipServer.setup


def _counting_setup(self: AutoFlipServer, io: Any) -> None:
    """AutoFLIP's setup, then the engine's byte counters (= the exploration's traffic)."""
    _orig_setup(self, io)
    traffic = getattr(io, "traffic", None)
    _EXPLORE_BYTES.clear()
    if traffic is not None:
        _EXPLORE_BYTES.update(up=int(traffic.up), down=int(traffic.down))


def make_config(
    dataset: str, method: str, threshold: float, args: argparse.Namespace, out: str
) -> RunConfig:
    """One run's configuration."""
    values: dict[str, Any] = {
        "method": method,
        "seed": SEED,
        "out": out,
        "name": f"{dataset}-{method}-{threshold:g}",
        **DATASETS[dataset],
        "model.hidden": args.hidden,
        "train.optimizer": "adam",
        "train.lr": args.lr,
        "train.lr_decay": 0.99,
        "train.local_epochs": args.local_epochs,
        "train.batch_size": args.batch,
        "federation.rounds": args.rounds,
        "federation.clients_per_round": 0.25,
        "federation.aggregation": "fedavgm",
        "federation.server_momentum": 0.9,
        "federation.eval_every": max(1, args.rounds // 5),
        "engine.workers": args.workers,
        "engine.threads": 1,
        "autoflip.explore_fraction": 1.0,
        "autoflip.explore_epochs": args.explore_epochs,
        "autoflip.explore_patience": args.explore_patience,
        "autoflip.explore_lr": args.lr,
        "autoflip.threshold": threshold,
    }
    if dataset == "femnist":
        values["data.num_clients"] = args.femnist_clients
    overrides = [kv for kv in args.set if method == "autoflip"]
    return load_config(None, overrides, values)


def shrink_clients(fed: Federation, per_client: int, seed: int) -> Federation:
    """Keep at most ``per_client`` training samples per client (seeded permutation)."""
    clients = []
    for c in fed.clients:
        n = int(c.x_train.shape[0])
        if n > per_client:
            g = torch.Generator().manual_seed(seed * 1_000_003 + c.cid)
            idx = torch.randperm(n, generator=g)[:per_client].sort().values
            c = dataclasses.replace(
                c, x_train=c.x_train[idx].contiguous(), y_train=c.y_train[idx].contiguous()
            )
        clients.append(c)
    return dataclasses.replace(fed, clients=clients)


def run_one(
    dataset: str,
    method: str,
    threshold: float,
    fed: Federation,
    args: argparse.Namespace,
    out: str,
) -> dict[str, Any]:
    """Run one configuration; collect accuracy, FLOPs, bytes and model size."""
    cfg = make_config(dataset, method, threshold, args, out)
    _EXPLORE_BYTES.clear()
    t0 = time.perf_counter()
    res = run_experiment(cfg, fed=fed)
    wall = time.perf_counter() - t0
    s, recs = res.summary, res.records
    sizes = [int(c.x_train.shape[0]) for c in fed.clients]
    dense_f = float(s["dense_flops"])
    eff = dense_kernel = 0.0
    for r in recs:
        samples = sum(sizes[c] for c in r["sampled"]) * cfg.train.local_epochs
        mm = r["method_metrics"]
        eff += samples * 3 * float(mm.get("train_effective_flops", r["effective_flops"]))
        dense_kernel += samples * 3 * float(mm.get("train_flops", r["flops"]))
    explore = 3 * dense_f * float(recs[0]["method_metrics"].get("explore_sample_epochs", 0.0))
    up, down = s["total_bytes_up"], s["total_bytes_down"]
    last = recs[-1]["method_metrics"]
    return {
        "dataset": dataset,
        "method": method,
        "threshold": threshold if method == "autoflip" else None,
        "label": method if method == "fedavg" else f"autoflip T_p={threshold:g}",
        "final_accuracy": s["final_accuracy"],
        "best_accuracy": s["best_accuracy"],
        "train_flops_effective": eff + explore,
        "train_flops_dense_kernels": dense_kernel + explore,
        "explore_flops": explore,
        "explore_epochs_mean": recs[0]["method_metrics"].get("explore_epochs_mean"),
        "mb_total": (up + down) / MB,
        "mb_up": up / MB,
        "mb_down": down / MB,
        "explore_mb": (sum(_EXPLORE_BYTES.values()) / MB) if method == "autoflip" else 0.0,
        "dense_params": s["dense_params"],
        "dense_flops": s["dense_flops"],
        "final_params": s["final_params"],
        "final_nonzero_params": s["final_nonzero_params"],
        "final_flops": s["final_flops"],
        "final_effective_flops": s["final_effective_flops"],
        "structured_sparsity": last.get("structured_sparsity"),
        "unstructured_sparsity": last.get("unstructured_sparsity"),
        "total_sparsity": last.get("total_sparsity"),
        "wall_s": wall,
        "curve": [
            {
                "round": r["round"],
                "accuracy": r["test_accuracy"],
                "unstructured_sparsity": r["method_metrics"].get("unstructured_sparsity"),
                "cum_mb": (r["cum_bytes_up"] + r["cum_bytes_down"]) / MB,
            }
            for r in recs
            if r.get("test_accuracy") is not None
        ],
    }


def relative(runs: list[dict[str, Any]]) -> None:
    """Ratios against the FedAvg run of the same data set."""
    base = {r["dataset"]: r for r in runs if r["method"] == "fedavg"}
    for r in runs:
        ref = base.get(r["dataset"])
        if ref is None:
            continue
        r["acc_vs_fedavg_pt"] = 100 * (r["final_accuracy"] - ref["final_accuracy"])
        r["compute_change"] = r["train_flops_effective"] / ref["train_flops_effective"] - 1
        r["compute_change_no_explore"] = (r["train_flops_effective"] - r["explore_flops"]) / ref[
            "train_flops_effective"
        ] - 1
        r["compute_change_dense_kernels"] = (
            r["train_flops_dense_kernels"] / ref["train_flops_dense_kernels"] - 1
        )
        r["comm_change"] = r["mb_total"] / ref["mb_total"] - 1
        r["comm_change_no_explore"] = (r["mb_total"] - r["explore_mb"]) / ref["mb_total"] - 1


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}%"


def rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    """Table rows (one per run)."""
    out = []
    for r in runs:
        out.append(
            [
                f"{r['dataset']} {r['label']}",
                f"{100 * r['final_accuracy']:.2f}",
                f"{r.get('acc_vs_fedavg_pt', 0.0):+.2f}",
                f"{r['train_flops_effective'] / 1e12:.3f}",
                _pct(r.get("compute_change")),
                _pct(r.get("compute_change_no_explore")),
                _pct(r.get("compute_change_dense_kernels")),
                f"{r['mb_total']:.1f}",
                f"{r['explore_mb']:.1f}",
                _pct(r.get("comm_change")),
                _pct(r.get("comm_change_no_explore")),
                f"{r['final_flops'] / 1e6:.2f}",
                f"{r['final_effective_flops'] / 1e6:.2f}",
                f"{r['final_params']:,}",
                f"{r['final_nonzero_params']:,}",
                f"{r['wall_s']:.0f}",
            ]
        )
    return out


HEADERS = (
    "run",
    "acc %",
    "Δacc pt",
    "train TFLOP",
    "ΔFLOP",
    "ΔFLOP w/o expl.",
    "ΔFLOP dense kern.",
    "MB",
    "expl. MB",
    "ΔMB",
    "ΔMB w/o expl.",
    "final MFLOP",
    "final eff. MFLOP",
    "final params",
    "non-zero",
    "wall s",
)


def main(argv: list[str] | None = None) -> int:
    """Run every job, print the tables, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=300)
    ap.add_argument("--femnist-clients", type=int, default=32)
    ap.add_argument("--explore-epochs", type=int, default=3)
    ap.add_argument("--explore-patience", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--datasets", default="mnist,cifar10,femnist")
    ap.add_argument("--ablation", default="mnist", help="data set of the T_p ablation ('' = none)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for the AutoFLIP runs (e.g. autoflip.regrow=true)",
    )
    ap.add_argument("--no-fedavg", action="store_true", help="AutoFLIP runs only")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, tiny clients")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/autoflip"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.per_client, args.explore_epochs = 3, 60, 1
    argv_list = sys.argv[1:] if argv is None else argv
    env = os.environ.get("FEDPRUNE_DATA")
    prefix = [f"FEDPRUNE_DATA={shlex.quote(env)}"] if env else []
    command = " ".join([*prefix, "python", "benchmarks/autoflip.py", *map(shlex.quote, argv_list)])
    print("# AutoFLIP vs FedAvg (FedAvgM for both), equal rounds\n")
    print(f"- command: {command}")
    print(f"- machine: {machine()}; engine.workers={args.workers}; load {load_average()}")
    print(
        f"- settings: {args.rounds} rounds x {args.local_epochs} local epoch(s), batch "
        f"{args.batch}, Adam lr {args.lr} (decay 0.99/round), FedAvgM 0.9, hidden "
        f"{args.hidden}, <= {args.per_client} train samples/client, 25% of clients per round, "
        f"exploration by all clients: <= {args.explore_epochs} epochs, patience "
        f"{args.explore_patience}; seed {SEED}\n",
        flush=True,
    )
    AutoFlipServer.setup = _counting_setup  # type: ignore[method-assign]
    datasets = [d for d in args.datasets.split(",") if d]
    jobs: list[tuple[str, str, float]] = []
    for d in datasets:
        jobs += (
            [(d, "autoflip", 0.3)] if args.no_fedavg else [(d, "fedavg", 0.3), (d, "autoflip", 0.3)]
        )
        if d == args.ablation:
            jobs += [(d, "autoflip", t) for t in ABLATION if t != 0.3]
    runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="autoflip-bench-") as tmp:
        fed: Federation | None = None
        loaded = ""
        for i, (d, method, thr) in enumerate(jobs, 1):
            if loaded != d:
                fed = shrink_clients(
                    load_federation(make_config(d, method, thr, args, tmp)), args.per_client, SEED
                )
                loaded = d
            assert fed is not None
            r = run_one(d, method, thr, fed, args, tmp)
            runs.append(r)
            print(
                f"[{i:2d}/{len(jobs)}] {d:8s} {r['label']:18s} "
                f"acc {100 * r['final_accuracy']:6.2f}%"
                f"  train {r['train_flops_effective'] / 1e12:7.3f} TFLOP  {r['mb_total']:8.1f} MB"
                f"  final {r['final_flops'] / 1e6:7.2f} MFLOP  {r['wall_s']:5.0f} s"
                f"  (elapsed {time.perf_counter() - t_start:5.0f} s)",
                flush=True,
            )
    AutoFlipServer.setup = _orig_setup  # type: ignore[method-assign]
    total = time.perf_counter() - t_start
    relative(runs)
    main_runs = [r for r in runs if r["method"] == "fedavg" or r["threshold"] == 0.3]
    print("\n## AutoFLIP (T_p = 0.3) vs FedAvg, same aggregation and rounds\n")
    print(table(HEADERS, rows(main_runs)))
    abl = [r for r in runs if r["dataset"] == args.ablation]
    if len(abl) > 2:
        abl.sort(key=lambda r: (r["method"] != "fedavg", r["threshold"] or 0))
        print(f"\n## T_p ablation on {args.ablation}\n")
        print(table(HEADERS, rows(abl)))
    af = [r for r in main_runs if r["method"] == "autoflip" and "compute_change" in r]
    if af:
        mean = lambda k: sum(r[k] for r in af) / len(af)  # noqa: E731
        print(
            f"\nmean over data sets (T_p = 0.3): compute {_pct(mean('compute_change'))} "
            f"(without exploration {_pct(mean('compute_change_no_explore'))}, dense kernels "
            f"{_pct(mean('compute_change_dense_kernels'))}), communication "
            f"{_pct(mean('comm_change'))} (without exploration "
            f"{_pct(mean('comm_change_no_explore'))}), accuracy "
            f"{sum(r['acc_vs_fedavg_pt'] for r in af) / len(af):+.2f} pt"
        )
    print(f"{PAPER}")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "autoflip",
        "command": command,
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "datasets": DATASETS,
        "total_wall_s": total,
        "load_average_end": load_average(),
        "paper": PAPER,
        "runs": runs,
    }
    js = args.out / "autoflip.json"
    js.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"\ntotal wall {total:.0f} s; wrote {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
