"""What a round costs on each engine, and on a Flower deployment with each executor.

Two parts, one workload: ``fedsparsify-global`` on ``digits`` (bundled with
scikit-learn), model ``fc`` (Flatten -> 128 -> 128 -> 10), IID clients, every client
every round, the project's default local training (2 epochs, batch 32, SGD lr 0.1), one
torch thread per process, seed 0.

**Engines** (``--clients`` clients): ``inprocess`` (``fedprune run``'s default engine)
and ``flower-sim`` (``engine.name = "flower"``: Flower's simulation runtime, Ray with 2
CPUs), both in this process, with ``engine.values_only = false`` so that both send the
same bytes.

**Deployment** (``--nodes`` SuperNodes, 3 by default): one SuperLink and one SuperNode per
client on 127.0.0.1 (private free ports, insecure, runtime dependency installation off,
in-memory state; ``fedprune.engines.flower_local``), a fresh deployment per run, the
variants interleaved in every repeat:

* ``cold-before``: fedprune as it was before the lean start (``--before``, a git
  revision checked out into a temporary worktree and put first on ``PYTHONPATH`` of
  every process; its app package is that revision's, 1.1 MB), Flower's executor (a
  ``flwr-clientapp`` process per message);
* ``cold-lean``: this fedprune, Flower's executor;
* ``warm``: this fedprune, ``fedprune flower exec`` beside each SuperNode;
* ``flower-minimal``: Flower's own minimal PyTorch app (``benchmarks/flower_minimal``:
  the same MLP, partition sizes and local training, FedAvg, nothing but Flower, torch
  and numpy), Flower's executor.

Every variant pulls replies every 0.5 s (fedprune's ``flower.poll-interval``; the
minimal app gets the same) and leaves Flower's SuperExec at its default task poll (1 s).
``round s`` is the median of rounds 2.. of every run (round 1 also pays the first
imports and, for fedprune, the partition cache's first fill; it is reported apart).
Ratios are of medians measured in the same run of this script.

Usage::

    python benchmarks/engines.py [--rounds 5] [--clients 10] [--repeats 3]
        [--sim-repeats 2] [--nodes 3] [--deploy-rounds 6] [--deploy-repeats 3]
        [--before 434839d] [--skip-engines] [--skip-deploy]
        [--variants cold-before,cold-lean,warm,flower-minimal]

On a shared 2-core machine the timings move with the load of other processes (the load
average is printed before and after each part).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import load_average, machine, median, table
from fedprune import rundir
from fedprune.config import load_config
from fedprune.engines.flower_local import LocalDeployment, local_deployment
from fedprune.experiment import load_federation, run_experiment

REPO = Path(__file__).resolve().parents[1]
MINIMAL = Path(__file__).resolve().parent / "flower_minimal"
BEFORE = "434839d"
"""The last revision before the lean start (issue 15)."""
VARIANTS = ("cold-before", "cold-lean", "warm", "flower-minimal")
_OFFLINE = {"FEDPRUNE_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _settings(clients: int, rounds: int) -> dict[str, Any]:
    return {
        "method": "fedsparsify-global",
        "data.dataset": "digits",
        "model.name": "fc",
        "data.num_clients": clients,
        "federation.rounds": rounds,
        "seed": 0,
    }


# ------------------------------------------------------------------------- engines


def _row(name: str, walls: list[float], runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    rounds = [r["round_s"] for recs in runs for r in recs]
    startups = [w - sum(r["round_s"] for r in recs) for w, recs in zip(walls, runs, strict=True)]
    last = runs[-1][-1]
    return {
        "engine": name,
        "repeats": len(walls),
        "startup": median(startups),
        "round": median(rounds),
        "total": median(walls),
        "accuracy": last["test_accuracy"],
        "mb": (last["cum_bytes_up"] + last["cum_bytes_down"]) / 1e6,
    }


def bench_local(args: argparse.Namespace, out: Path, engine: str, repeats: int) -> dict[str, Any]:
    walls: list[float] = []
    runs: list[list[dict[str, Any]]] = []
    for i in range(repeats):
        cfg = load_config(
            overrides=[f"out='{out}'", f"name='{engine}-{i}'", f"engine.name='{engine}'"],
            values={**_settings(args.clients, args.rounds), "engine.values_only": False},
        )
        t0 = time.perf_counter()
        res = run_experiment(cfg)
        walls.append(time.perf_counter() - t0)
        runs.append(list(res.records))  # type: ignore[arg-type]
        print(f"  {engine} #{i + 1}: {walls[-1]:.1f} s", flush=True)
    return _row("inprocess" if engine == "inprocess" else "flower-sim", walls, runs)


def engines_part(args: argparse.Namespace, out: Path) -> None:
    print(f"\n== engines: {args.clients} clients, {args.rounds} rounds ==")
    print(f"load average before: {load_average()}")
    rows = [
        bench_local(args, out, "inprocess", args.repeats),
        bench_local(args, out, "flower", args.sim_repeats),
    ]
    print(f"load average after: {load_average()}\n")
    print(
        table(
            ["engine", "repeats", "start-up s", "round s", "total s", "acc", "MB"],
            [
                [r[k] for k in ("engine", "repeats", "startup", "round", "total", "accuracy", "mb")]
                for r in rows
            ],
        )
    )
    same = len({round(r["accuracy"], 9) for r in rows}) == 1
    same = same and len({round(r["mb"], 9) for r in rows}) == 1
    print(f"same final accuracy and bytes on both engines: {same}")


# ---------------------------------------------------------------------- deployment


def _wait_file(dep: LocalDeployment, path: Path, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        if time.monotonic() > deadline or not dep.alive():
            raise RuntimeError(f"no {path.name} after {limit:g} s:\n{dep.log_tails()}")
        time.sleep(0.5)


def _before_tree(rev: str, tmp: Path) -> Path:
    """A worktree of ``rev`` (removed with the temporary folder's worktree entry)."""
    tree = tmp / "before"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev],
        check=True,
        capture_output=True,
    )
    return tree


def _minimal_data(nodes: int, folder: Path) -> None:
    """The digits split of fedprune's federation (same seed), as the minimal app's .npy
    files: its clients hold fedprune's clients' samples."""
    fed = load_federation(load_config(values=_settings(nodes, 1)))
    folder.mkdir(parents=True, exist_ok=True)
    for c in fed.clients:
        np.save(folder / f"x{c.cid}.npy", c.x_train.numpy())
        np.save(folder / f"y{c.cid}.npy", c.y_train.numpy())
    np.save(folder / "x_test.npy", fed.x_test.numpy())
    np.save(folder / "y_test.npy", fed.y_test.numpy())


def deploy_run(
    variant: str, args: argparse.Namespace, tmp: Path, i: int, before: Path | None
) -> dict[str, Any]:
    """One run of ``variant`` on a fresh deployment: round times, accuracy, bytes."""
    home = tmp / f"{variant}-{i}"
    env = {**_OFFLINE, "FEDPRUNE_CACHE": str(tmp / f"cache-{variant}")}
    app = REPO
    if variant == "cold-before":
        assert before is not None
        env["PYTHONPATH"] = str(before / "src")
        app = before
    executor = "warm" if variant == "warm" else "subprocess"
    limit = 120.0 * (2 + args.deploy_rounds)
    t_infra = time.perf_counter()
    with local_deployment(home / "flower", args.nodes, env=env, executor=executor) as dep:
        infra = time.perf_counter() - t_infra
        t0 = time.perf_counter()
        if variant == "flower-minimal":
            times = home / "times.json"
            dep.submit(
                MINIMAL,
                {
                    "num-rounds": args.deploy_rounds,
                    "num-nodes": args.nodes,
                    "data-dir": str(tmp / "minimal-data"),
                    "times-file": str(times),
                    "poll-interval": 0.5,
                },
            )
            _wait_file(dep, times, limit)
            data = json.loads(times.read_text(encoding="utf-8"))
            rounds, acc, mb = data["round_s"], data["accuracy"][-1], float("nan")
        else:
            settings = _settings(args.nodes, args.deploy_rounds)
            settings.update({"out": str(home / "runs"), "name": "run"})
            settings["flower.round-timeout"] = 120
            dep.submit(app, settings)
            _wait_file(dep, home / "runs" / "run" / rundir.SUMMARY, limit)
            records = rundir.read_metrics(home / "runs" / "run")
            rounds = [r["round_s"] for r in records]
            acc = records[-1]["test_accuracy"]
            mb = (records[-1]["cum_bytes_up"] + records[-1]["cum_bytes_down"]) / 1e6
        wall = time.perf_counter() - t0
        tasks: list[float] = []
        if variant == "warm":  # the executors' own time per task, after the first train
            for log in sorted(dep.logs.glob("supernode*-exec.log")):
                text = log.read_text(errors="replace")
                found = re.findall(r"task \d+ completed in ([\d.]+) s", text)
                tasks += [float(t) for t in found[2:]]
    print(
        f"  {variant} #{i + 1}: rounds {' '.join(f'{r:.2f}' for r in rounds)} s "
        f"(wall {wall:.1f} s, start {infra:.1f} s)",
        flush=True,
    )
    return {"rounds": rounds, "accuracy": acc, "mb": mb, "wall": wall, "tasks": tasks}


def deploy_part(args: argparse.Namespace, tmp: Path) -> None:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    print(
        f"\n== deployment: {args.nodes} SuperNodes, {args.deploy_rounds} rounds, "
        f"{args.deploy_repeats} repeats, variants interleaved =="
    )
    before = _before_tree(args.before, tmp) if "cold-before" in variants else None
    try:
        if "flower-minimal" in variants:
            _minimal_data(args.nodes, tmp / "minimal-data")
        print(f"load average before: {load_average()}")
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for i in range(args.deploy_repeats):
            for v in variants:
                runs[v].append(deploy_run(v, args, tmp, i, before))
        print(f"load average after: {load_average()}\n")
    finally:
        if before is not None:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)],
                check=False,
                capture_output=True,
            )
    rows, medians = [], {}
    for v in variants:
        steady = [r for run in runs[v] for r in run["rounds"][1:]]
        first = [run["rounds"][0] for run in runs[v]]
        medians[v] = median(steady)
        last = runs[v][-1]
        stats = [median(first), medians[v], min(steady), max(steady)]
        rows.append([v, len(runs[v]), *stats, last["accuracy"], last["mb"]])
    print(
        table(
            ["variant", "runs", "round 1 s", "round s", "min", "max", "acc", "MB"],
            rows,
        )
    )
    print()
    pairs = [
        ("cold-lean", "flower-minimal", "<= 1.2"),
        ("cold-before", "flower-minimal", "-"),
        ("cold-before", "cold-lean", "-"),
        ("cold-lean", "warm", ">= 4"),
        ("cold-before", "warm", "-"),
    ]
    ratios = [
        [f"{a} / {b}", medians[a] / medians[b], target]
        for a, b, target in pairs
        if a in medians and b in medians
    ]
    print(table(["ratio of median round s", "measured", "target"], ratios))
    if "warm" in runs:
        tasks = [t for run in runs["warm"] for t in run["tasks"]]
        if tasks:
            print(
                f"\nwarm executor, seconds per task after each node's first train task: "
                f"median {median(tasks):.3f}, max {max(tasks):.3f} ({len(tasks)} tasks)"
            )
    fed_runs = [run for v in variants if v != "flower-minimal" for run in runs[v]]
    same = len({round(r["accuracy"], 9) for r in fed_runs}) <= 1
    same = same and len({round(r["mb"], 9) for r in fed_runs}) <= 1
    print(f"\nsame final accuracy and bytes in every fedprune run: {same}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="in-process repeats")
    ap.add_argument("--sim-repeats", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--deploy-rounds", type=int, default=6)
    ap.add_argument("--deploy-repeats", type=int, default=3)
    ap.add_argument("--before", default=BEFORE, help="git revision of cold-before")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--skip-deploy", action="store_true")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the deployments' processes are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("FEDPRUNE_OFFLINE", "1")
    print(machine())
    print("workload: fedsparsify-global, digits, fc, all clients every round, seed 0")
    with tempfile.TemporaryDirectory(prefix="fedprune-engines-") as tmp:
        if not args.skip_engines:
            engines_part(args, Path(tmp))
        if not args.skip_deploy:
            deploy_part(args, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
