"""In-process engine vs Flower simulation vs Flower deployment, on one workload.

Workload: ``fedsparsify-global`` on ``digits`` (bundled with scikit-learn), model ``fc``,
``--clients`` clients (IID, seed 0), every client every round, ``--rounds`` rounds, the
project's default local training (2 epochs, batch 32, SGD lr 0.1), one torch thread per
process. The same config runs on three engines:

* ``inprocess``: ``fedprune run`` 's default engine (``run_experiment``), in this process.
* ``flower-sim``: ``run_experiment`` with ``engine.name = "flower"``: Flower's simulation
  runtime (``run_simulation``, Ray with 2 CPUs, one CPU per ClientApp actor) in this
  process.
* ``flower-deploy``: a real SuperLink and one SuperNode per client on 127.0.0.1 (private
  free ports, ``--insecure``, runtime dependency installation disabled, in-memory state:
  with ``--database`` ten SuperNodes pushing at once hit SQLite's "database is locked"
  and replies were lost), the run submitted
  with ``flwr run <repo> <connection> --run-config ...``. Timed from the submission to
  the run directory's ``summary.json``; the SuperLink/SuperNode start-up is reported
  apart (``infra s``). Every process started is stopped by PID and process group.

Reported per engine (medians over the repeats): ``start-up s`` = run wall time minus the
sum of the rounds' ``round_s`` (data, model, Ray or ServerApp start, SuperNode discovery,
run directory and plots), ``round s`` = median round time, ``total s`` = whole run, and
the final accuracy and bytes, which must agree between the engines (same seed, same
sampler, same codec).

Usage::

    python benchmarks/engines.py [--rounds 5] [--clients 10] [--repeats 3]
        [--sim-repeats 2] [--deploy-repeats 1] [--skip-deploy]

On a shared 2-core machine the timings move with the load of other processes (the load
average is printed before and after).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import load_average, machine, median, table
from fedprune import rundir
from fedprune.config import load_config
from fedprune.engines.flower import run_config_from_config
from fedprune.engines.flower_local import local_deployment
from fedprune.experiment import run_experiment

REPO = Path(__file__).resolve().parents[1]
_OFFLINE = {"FEDPRUNE_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "method": "fedsparsify-global",
        "data.dataset": "digits",
        "model.name": "fc",
        "data.num_clients": args.clients,
        "federation.rounds": args.rounds,
        "seed": 0,
    }


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
            values=_settings(args),
        )
        t0 = time.perf_counter()
        res = run_experiment(cfg)
        walls.append(time.perf_counter() - t0)
        runs.append(res.records)
        print(f"  {engine} #{i + 1}: {walls[-1]:.1f} s", flush=True)
    return _row("inprocess" if engine == "inprocess" else "flower-sim", walls, runs)


# ------------------------------------------------------------------ deployment


def bench_deploy(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    walls: list[float] = []
    runs: list[list[dict[str, Any]]] = []
    t_infra = time.perf_counter()
    with local_deployment(out / "flower", args.clients, env=_OFFLINE) as dep:
        infra = time.perf_counter() - t_infra
        print(f"  SuperLink + {args.clients} SuperNodes started in {infra:.1f} s", flush=True)
        for i in range(args.deploy_repeats):
            name = f"deploy-{i}"
            cfg = load_config(values=_settings(args))
            rc = {
                k: v
                for k, v in run_config_from_config(cfg).items()
                if k in _settings(args) or k in ("out", "name")
            }
            rc.update({"out": str(out), "name": name, "flower.round-timeout": 120})
            t0 = time.perf_counter()
            dep.submit(REPO, rc)
            summary = out / name / rundir.SUMMARY
            deadline = time.monotonic() + 60 * (2 + args.rounds)
            while not summary.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"deployment run {name} did not finish:\n{dep.log_tails()}")
                time.sleep(0.5)
            walls.append(time.perf_counter() - t0)
            runs.append(rundir.read_metrics(out / name))
            print(f"  deployment #{i + 1}: {walls[-1]:.1f} s", flush=True)
    row = _row("flower-deploy", walls, runs)
    row["infra"] = infra
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="in-process repeats")
    ap.add_argument("--sim-repeats", type=int, default=2)
    ap.add_argument("--deploy-repeats", type=int, default=1)
    ap.add_argument("--skip-deploy", action="store_true")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the deployment's processes are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("FEDPRUNE_OFFLINE", "1")
    print(machine())
    print(f"load average before: {load_average()}")
    print(
        f"workload: fedsparsify-global, digits, fc, {args.clients} clients (all per round), "
        f"{args.rounds} rounds, seed 0"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedprune-engines-") as tmp:
        out = Path(tmp)
        rows.append(bench_local(args, out, "inprocess", args.repeats))
        rows.append(bench_local(args, out, "flower", args.sim_repeats))
        if not args.skip_deploy:
            rows.append(bench_deploy(args, out))
    print(f"load average after: {load_average()}\n")
    print(
        table(
            ["engine", "repeats", "infra s", "start-up s", "round s", "total s", "acc", "MB"],
            [
                [
                    r["engine"],
                    r["repeats"],
                    r.get("infra", "-"),
                    r["startup"],
                    r["round"],
                    r["total"],
                    r["accuracy"],
                    r["mb"],
                ]
                for r in rows
            ],
        )
    )
    accs = {round(r["accuracy"], 9) for r in rows}
    mbs = {round(r["mb"], 9) for r in rows}
    same = len(accs) == 1 and len(mbs) == 1
    print(f"\nsame final accuracy and bytes on every engine: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
