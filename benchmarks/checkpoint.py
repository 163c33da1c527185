"""What the per-round checkpoint costs, and how long a resume takes to get going.

Workloads (in-process engine, 1 torch thread, 10 IID clients, all of them every round,
1 local epoch, ``--rounds`` rounds):

* ``digits/fc``: FedSparsify-Global on scikit-learn's digits, the 26k-parameter MLP.
* ``digits/cnn6``: FedAvg with FedAvgM on digits, the 626k-parameter CIFAR CNN (momentum
  doubles the tensor state).
* ``fashion-mnist/twocnn``: FedSparsify-Global on Fashion-MNIST (shared data; skipped
  without it), AutoFLIP's 1.66M-parameter CNN, 2 of 10 clients per round.

For each workload the run is repeated ``--repeats`` times with ``engine.checkpoint`` on.
Measured per round (medians over all rounds of all repeats): the checkpoint write (the
``checkpoint`` phase of the engine's timer: state collection, encoding, fsync, rename),
the round itself (``round_s``: training, aggregation, evaluation), and the checkpoint's
size. Resume: median wall time of ``prepare_resume`` (read and verify the checkpoint,
load the data, rebuild and restore the server half) against ``prepare_run`` (what a
fresh start does), on the finished run's last checkpoint.

Usage::

    FEDPRUNE_DATA=../shared/data python benchmarks/checkpoint.py [--rounds 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import load_average, machine, median, table
from fedprune import rundir
from fedprune.checkpoint import CHECKPOINT
from fedprune.config import load_config
from fedprune.errors import UserInputError
from fedprune.experiment import prepare_resume, prepare_run, run_experiment

WORKLOADS: dict[str, list[str]] = {
    "digits/fc": ["method=fedsparsify-global", "model.name=fc"],
    "digits/cnn6": ["method=fedavg", "model.name=cnn6", "federation.aggregation=fedavgm"],
    "fashion-mnist/twocnn": [
        "method=fedsparsify-global",
        "data.dataset=fashion-mnist",
        "model.name=twocnn",
        "federation.clients_per_round=2",
    ],
}


def _per_round_checkpoint_s(records: list[dict[str, Any]]) -> list[float]:
    """Each checkpoint write's time from the cumulative ``time_checkpoint_s`` (the write
    after round r shows in round r+1's record, so the last write is not seen)."""
    cum = [float(r.get("time_checkpoint_s") or 0.0) for r in records]
    return [b - a for a, b in itertools.pairwise(cum)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("FEDPRUNE_OFFLINE", "1")
    torch.set_num_threads(1)
    print(machine())
    print(f"load average at start: {load_average()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in WORKLOADS.items():
            overrides = [
                f"out='{tmp}'",
                "data.num_clients=10",
                f"federation.rounds={args.rounds}",
                "train.local_epochs=1",
                *extra,
            ]
            try:
                cfg = load_config(overrides=overrides)
                prepare_run(cfg, run_dir=Path(tmp) / "probe")  # data present?
            except UserInputError as exc:  # a missing data set skips the workload
                print(f"{name}: skipped ({str(exc).splitlines()[0]})")
                continue
            finally:
                shutil.rmtree(Path(tmp) / "probe", ignore_errors=True)
            ckpt_s: list[float] = []
            round_s: list[float] = []
            sizes: list[int] = []
            last = None
            for rep in range(args.repeats):
                cfg = load_config(overrides=[*overrides, f"name='{name.replace('/', '-')}-{rep}'"])
                res = run_experiment(cfg)
                ckpt_s += _per_round_checkpoint_s(res.records)
                round_s += [float(r["round_s"]) for r in res.records]
                sizes.append((res.run_dir / CHECKPOINT).stat().st_size)
                last = res.run_dir
            assert last is not None
            resume_s, fresh_s = [], []
            for _ in range(args.repeats):
                (last / rundir.SUMMARY).rename(last / "summary.saved")
                t0 = time.perf_counter()
                prepare_resume(last)
                resume_s.append(time.perf_counter() - t0)
                (last / "summary.saved").rename(last / rundir.SUMMARY)
                t0 = time.perf_counter()
                prepare_run(cfg, run_dir=Path(tmp) / "fresh")
                fresh_s.append(time.perf_counter() - t0)
                shutil.rmtree(Path(tmp) / "fresh")
            c, r = median(ckpt_s), median(round_s)
            rows.append(
                [
                    name,
                    f"{max(sizes) / 1e6:.2f}",
                    f"{1e3 * c:.1f}",
                    f"{1e3 * r:.0f}",
                    f"{100 * c / r:.1f}%",
                    f"{median(resume_s):.2f}",
                    f"{median(fresh_s):.2f}",
                ]
            )
            print(rows[-1])
    print()
    print(
        table(
            [
                "workload",
                "checkpoint MB",
                "write ms",
                "round ms",
                "overhead",
                "resume prep s",
                "fresh prep s",
            ],
            rows,
        )
    )
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
