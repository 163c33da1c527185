"""How much the in-process engine costs over a plain PyTorch FedAvg loop, and vs Flower.

Workload: FedAvg on Fashion-MNIST, model ``fc``, 10 clients (IID split, seed 0), every
client every round, 1 local epoch, batch 32, SGD lr 0.02, ``--rounds`` rounds, the global
model evaluated on the 10k test set after every round in every variant.

Variants (data loaded and split once, before any timing; torch threads = 1 in this process):

* ``plain``: a hand-written loop. Per round and client: load the global state into a model,
  train on the same batches as ``ClientMethod.fit`` (``torch.randperm`` with
  ``Generator().manual_seed(derive_seed(derive_seed(seed, rnd), cid))``) with a fresh SGD,
  then sample-weighted average (float64 accumulation, as the engine) and evaluate.
* ``engine w=1``: ``InProcessEngine`` driven directly (model build + engine + ``run()``; no run
  directory, no plots): codec encode/decode of every message, method halves, byte and FLOP
  accounting.
* ``engine w=2``: the same with ``engine.workers=2`` (2 forked processes, 1 torch thread each;
  the pool start-up is inside the timing).
* ``cohort w=1`` / ``cohort w=2``: the same engine with ``engine.cohort=on`` (the round's
  clients trained as one batched computation; with 2 workers, two sub-cohorts).
* ``run_experiment``: ``fedprune.experiment.run_experiment(cfg, fed=fed)`` end to end, i.e.
  the engine plus run directory, metrics files, model file and plots (for information).
* ``flower``: ``flwr.simulation.run_simulation`` with a plain Message-API app (ServerApp with
  ``flwr.serverapp.strategy.FedAvg``, ClientApp training partition ``partition-id`` with the
  same loop and seeds; global evaluation through ``evaluate_fn``, no federated evaluation).
  Ray ``num_cpus=2``, ``client_resources num_cpus=1`` (2 actors, 1 torch thread each). Timed
  from the ``run_simulation`` call until the ServerApp holds the final model (Ray start-up
  included; ``flwr``/``ray`` already imported, partitions already written to a temp dir).

In-process variants are repeated ``--repeats`` times, interleaved (order rotated each
repeat) after a 1-round warm-up; medians of wall and CPU seconds are reported, plus the
per-round phase split (the engine's ``time_*_s`` records against the same split of the plain
loop) and, from one extra instrumented engine run, the time spent in the codec and in the
model statistics. On a shared 2-core machine the wall times of whole runs move by 10-30 %
with the load of other processes (the load average is printed); the instrumented split is
the load-independent measure of what the engine adds.

Sanity checks (exit 1 if they fail): the engine and the plain loop give the same final
accuracy (within 0.5 points; in practice bit-identical weights), ``workers=2`` gives the
same weights as ``workers=1``, the cohort engine's weights are within 1e-4 of the plain
loop's on FC (1e-3 on the CNN workloads), and Flower's accuracy is within 1 point.

Cohort workloads (after the FC block; ``--skip-workloads`` leaves them out): GAP CNN on
FEMNIST (20 writers of the natural partition, all every round, 5 local epochs, lr 0.05)
and TwoCNN on CIFAR-10 (``--cifar-clients`` of 100 IID clients, 400 samples each, 1
epoch), ``--workload-rounds`` rounds, variants plain / engine w=1 / cohort w=1 / cohort
w=2, the same interleaved medians. For every workload the script prints the training
GFLOP/s per core (3 x forward FLOPs of ``core.flops`` x samples, over the ``train``
phase) next to a single-core fp32 matmul peak (1024^3) measured in the same run, and the
ratio plain loop / cohort w=1 (targets: >= 2.0 on FC, >= 1.8 on the GAP CNN). Flower runs
on the FC workload only (Ray start-up dominates the small workloads).

Default sizes run in a few minutes on 2 cores; the full size of issue 13 is
``--rounds 5 --workload-rounds 5 --cifar-clients 100 --repeats 5``.

Usage::

    python benchmarks/engine_overhead.py [--repeats 5] [--rounds 5] [--skip-flower]
        [--flower-repeats 3] [--data-dir PATH] [--partition iid|dirichlet]
        [--workload-rounds 1] [--cifar-clients 10] [--skip-workloads]

Data: ``--data-dir`` or ``$FEDPRUNE_DATA`` (a folder holding ``fashion_mnist/``); if the
data set is not there the script prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from _common import cpu_seconds, load_average, machine, median, table
from fedprune.config import RunConfig, load_config
from fedprune.core.sampling import derive_seed
from fedprune.data import build_federation, load_dataset
from fedprune.data.federation import Federation
from fedprune.engines.inprocess import InProcessEngine
from fedprune.errors import DataError
from fedprune.experiment import model_spec, run_experiment
from fedprune.methods.registry import get_method
from fedprune.models import build_model

DATASET = "fashion-mnist"
MODEL = "fc"
NUM_CLIENTS = 10
BATCH = 32
LR = 0.02
EPOCHS = 1
SEED = 0
PHASES = ("train", "aggregate", "evaluate")


# --------------------------------------------------------------------------- plain loop


def plain_train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, bs: int, epochs: int, seed: int
) -> float:
    """Plain SGD epochs over seeded random batches (the same batches as ``train_local``)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    n = int(x.shape[0])
    loss_sum = torch.zeros((), dtype=torch.float64)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for b in range(math.ceil(n / bs)):
            idx = perm[b * bs : (b + 1) * bs]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
    return float(loss_sum) / math.ceil(n / bs)


@torch.no_grad()
def plain_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy, in batches of 1024."""
    model.eval()
    correct = 0
    for s in range(0, len(y), 1024):
        correct += int((model(x[s : s + 1024]).argmax(1) == y[s : s + 1024]).sum())
    model.train()
    return correct / len(y)


def run_plain(
    fed: Federation, rounds: int, model: str = MODEL, lr: float = LR, epochs: int = EPOCHS
) -> dict[str, Any]:
    """FedAvg by hand; returns the final state, accuracy and the phase split."""
    build = functools.partial(
        build_model, model, fed.input_shape, fed.num_classes
    )  # the same init as the engine's server (seed=SEED)
    t0, c0 = time.perf_counter(), cpu_seconds()
    glob, local = build(seed=SEED), build()
    times = dict.fromkeys(PHASES, 0.0)
    acc = float("nan")
    for rnd in range(1, rounds + 1):
        ta = time.perf_counter()
        gstate = glob.state_dict()
        states, weights = [], []
        for c in fed.clients:
            local.load_state_dict(gstate)
            seed = derive_seed(derive_seed(SEED, rnd), c.cid)
            plain_train(local, c.x_train, c.y_train, lr, BATCH, epochs, seed)
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            weights.append(len(c.y_train))
        tb = time.perf_counter()
        total = float(sum(weights))
        new = {}
        for k, v in gstate.items():
            acc64 = torch.zeros_like(v, dtype=torch.float64)
            for s, w in zip(states, weights, strict=True):
                acc64.add_(s[k].double(), alpha=w / total)
            new[k] = acc64.to(v.dtype)
        glob.load_state_dict(new)
        tc = time.perf_counter()
        acc = plain_accuracy(glob, fed.x_test, fed.y_test)
        td = time.perf_counter()
        times["train"] += tb - ta
        times["aggregate"] += tc - tb
        times["evaluate"] += td - tc
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"wall": wall, "cpu": cpu, "acc": acc, "state": glob.state_dict(), "phases": times}


# --------------------------------------------------------------------------- engine


def make_cfg(
    rounds: int,
    workers: int,
    partition: str,
    out: str = "runs",
    *extra: str,
    dataset: str = DATASET,
    model: str = MODEL,
    clients: int = NUM_CLIENTS,
    lr: float = LR,
    epochs: int = EPOCHS,
) -> RunConfig:
    """The benchmark workload as a fedprune configuration (``extra``: more overrides)."""
    return load_config(
        overrides=[
            "method=fedavg",
            f"seed={SEED}",
            f"out={out!r}",
            f"data.dataset={dataset!r}",
            f"data.partition={partition!r}",
            f"data.num_clients={clients}",
            f"model.name={model!r}",
            f"train.lr={lr}",
            f"train.batch_size={BATCH}",
            f"train.local_epochs={epochs}",
            "train.optimizer='sgd'",
            f"federation.rounds={rounds}",
            "federation.clients_per_round=0",
            "federation.eval_every=1",
            f"engine.workers={workers}",
            "engine.threads=1",
            *extra,
        ]
    )


def run_engine(fed: Federation, cfg: RunConfig) -> dict[str, Any]:
    """Drive ``InProcessEngine`` directly (no run directory); time model build + run."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    spec = model_spec(cfg, fed)
    info = get_method(cfg.method)
    server = info.server(cfg, spec, spec.build(seed=cfg.seed))
    engine = InProcessEngine(cfg, fed, server, functools.partial(info.client, cfg, spec))
    records = engine.run()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    last = records[-1]
    phases = {p: float(last.get(f"time_{p}_s", 0.0)) for p in PHASES}
    return {
        "wall": wall,
        "cpu": cpu,
        "acc": last["test_accuracy"],
        "state": server.model.state_dict(),
        "phases": phases,
        "engine_run": last["wall_s"],
    }


def run_full(fed: Federation, cfg: RunConfig) -> dict[str, Any]:
    """``run_experiment`` end to end (run directory, metrics, model file, plots)."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    res = run_experiment(cfg, fed=fed)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    acc = res.summary["final_accuracy"]
    return {"wall": wall, "cpu": cpu, "acc": acc, "state": res.model.state_dict()}


def engine_machinery(fed: Federation, cfg: RunConfig) -> dict[str, float]:
    """Seconds spent in the codec, reply validation and model statistics (one w=1 run).

    Wraps ``encode_payload``/``decode_payload`` as the engine module sees them,
    ``ServerMethod.validate`` (reply checks before aggregation, where it exists) and
    ``ModelStatsCounter.__call__`` (parameter/sparsity/FLOP statistics) with timers; the
    engine code itself is unchanged. Returns seconds for the whole run.
    """
    from fedprune.core import accounting
    from fedprune.engines import inprocess
    from fedprune.methods.base import ServerMethod

    spent = {"encode": 0.0, "decode": 0.0, "validate": 0.0, "stats": 0.0}

    def wrap(fn: Any, key: str) -> Any:
        @functools.wraps(fn)
        def inner(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t0

        return inner

    saved = (inprocess.encode_payload, inprocess.decode_payload)
    saved_stats = accounting.ModelStatsCounter.__call__
    saved_validate = getattr(ServerMethod, "validate", None)
    inprocess.encode_payload = wrap(saved[0], "encode")
    inprocess.decode_payload = wrap(saved[1], "decode")
    accounting.ModelStatsCounter.__call__ = wrap(saved_stats, "stats")  # type: ignore[method-assign]
    if saved_validate is not None:
        ServerMethod.validate = wrap(saved_validate, "validate")  # type: ignore[method-assign]
    try:
        res = run_engine(fed, cfg)
    finally:
        inprocess.encode_payload, inprocess.decode_payload = saved
        accounting.ModelStatsCounter.__call__ = saved_stats  # type: ignore[method-assign]
        if saved_validate is not None:
            ServerMethod.validate = saved_validate  # type: ignore[method-assign]
    return {**spent, "train": res["phases"]["train"], "wall": res["wall"]}


# --------------------------------------------------------------------------- Flower

_CACHE_MODULE = "_engine_overhead_actor_cache"


def _actor_partition(data_dir: str, pid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A partition's tensors, loaded once per Ray actor process.

    This function is pickled by value into the actors, so its module globals do not persist
    between calls; the cache lives on a module object in ``sys.modules`` instead.
    """
    import types

    mod = sys.modules.get(_CACHE_MODULE)
    if mod is None:
        mod = types.ModuleType(_CACHE_MODULE)
        mod.cache = {}  # type: ignore[attr-defined]
        sys.modules[_CACHE_MODULE] = mod
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = mod.cache  # type: ignore[attr-defined]
    if pid not in cache:
        cache[pid] = torch.load(Path(data_dir) / f"client_{pid}.pt")
    return cache[pid]


def make_flower_apps(fed: Federation, rounds: int, data_dir: Path, result: dict[str, Any]) -> Any:
    """A minimal Flower 1.41 Message-API app for the workload: (server_app, client_app)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        cfg = msg.content["config"]
        pid = int(context.node_config["partition-id"])
        x, y = _actor_partition(str(cfg["data-dir"]), pid)
        shape = tuple(int(s) for s in cfg["input-shape"])
        model = build_model(str(cfg["model"]), shape, int(cfg["classes"]))  # type: ignore[arg-type]
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        rnd = int(cfg["server-round"])
        seed = derive_seed(derive_seed(int(cfg["seed"]), rnd), pid)
        loss = plain_train(
            model, x, y, float(cfg["lr"]), int(cfg["batch-size"]), int(cfg["epochs"]), seed
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"train_loss": loss, "num-examples": len(y)}),
            }
        )
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()
    eval_model = build_model(MODEL, fed.input_shape, fed.num_classes)

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        if rnd == 0:  # the other variants do not evaluate the initial model
            return None
        eval_model.load_state_dict(arrays.to_torch_state_dict())
        acc = plain_accuracy(eval_model, fed.x_test, fed.y_test)
        result["acc"] = acc
        return MetricRecord({"accuracy": acc})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=NUM_CLIENTS,
            min_available_nodes=NUM_CLIENTS,
        )
        init = build_model(MODEL, fed.input_shape, fed.num_classes, seed=SEED)
        train_config = ConfigRecord(
            {
                "lr": LR,
                "batch-size": BATCH,
                "epochs": EPOCHS,
                "seed": SEED,
                "model": MODEL,
                "classes": fed.num_classes,
                "input-shape": [int(s) for s in fed.input_shape],
                "data-dir": str(data_dir),
            }
        )
        res = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(init.state_dict()),
            train_config=train_config,
            num_rounds=rounds,
            evaluate_fn=evaluate_fn,
        )
        result["state"] = res.arrays.to_torch_state_dict()
        result["t_final"] = time.perf_counter()

    return server_app, client_app


def run_flower(fed: Federation, rounds: int, data_dir: Path) -> dict[str, Any]:
    """One ``run_simulation``; wall = start to final model in the ServerApp."""
    from flwr.simulation import run_simulation

    result: dict[str, Any] = {}
    server_app, client_app = make_flower_apps(fed, rounds, data_dir, result)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False},
    }
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config=backend_config,  # type: ignore[arg-type]
    )
    t_end = time.perf_counter()
    if "state" not in result:
        raise RuntimeError("the Flower ServerApp did not finish (see the log above)")
    result["wall"] = result["t_final"] - t0
    result["wall_return"] = t_end - t0
    return result


_RAY_MARKERS = ("ray::", "raylet", "gcs_server", "ray/_private", "ray/dashboard")


def _ray_processes() -> dict[int, str]:
    """``pid -> "ppid stat args"`` of the Ray processes visible to ``ps``."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True, check=False
    ).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and any(m in parts[1] for m in _RAY_MARKERS):
            found[int(parts[0])] = parts[1][:100]
    return found


def _new_ray_processes(before: dict[int, str], wait_s: float = 20.0) -> list[str]:
    """Ray processes that were not there before the Flower runs (waits for them to exit)."""
    deadline = time.monotonic() + wait_s
    while True:
        new = {p: a for p, a in _ray_processes().items() if p not in before}
        if not new or time.monotonic() > deadline:
            return [f"{p} {a}" for p, a in sorted(new.items())]
        time.sleep(0.5)


# --------------------------------------------------------------------------- main


def verdict(ok: bool) -> str:
    """'met' or 'NOT met'."""
    return "met" if ok else "NOT met"


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts."""
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of in-process variants")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--flower-repeats", type=int, default=3)
    ap.add_argument("--data-dir", default=None, help="default: $FEDPRUNE_DATA")
    ap.add_argument("--partition", default="iid", choices=("iid", "dirichlet"))
    ap.add_argument(
        "--workload-rounds", type=int, default=1, help="rounds of the GAP CNN and TwoCNN runs"
    )
    ap.add_argument(
        "--cifar-clients", type=int, default=10, help="TwoCNN: this many of 100 IID clients"
    )
    ap.add_argument("--skip-workloads", action="store_true", help="FC/Fashion-MNIST only")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    try:
        bundle = load_dataset(DATASET, args.data_dir, allow_hub=False)
    except DataError as exc:
        print(f"engine_overhead: {exc}", file=sys.stderr)
        return 2
    fed = build_federation(bundle, args.partition, NUM_CLIENTS, seed=SEED)
    sizes = [len(c.y_train) for c in fed.clients]

    print("engine overhead benchmark")
    print(f"machine: {machine()}; load average at start: {load_average()}")
    print(
        f"workload: FedAvg, {DATASET} ({sum(sizes)} train / {len(fed.y_test)} test), model {MODEL},"
        f" {NUM_CLIENTS} clients ({args.partition}, sizes {min(sizes)}-{max(sizes)}), all per"
        f" round, {args.rounds} rounds, {EPOCHS} local epoch, batch {BATCH}, SGD lr {LR},"
        " test-set evaluation every round"
    )
    print(
        "threads: 1 torch thread in this process (plain, engine w=1, run_experiment, Flower"
        " server); engine w=2: 2 forked workers x 1 thread; Flower: Ray num_cpus=2, 2 actors x 1"
        " thread"
    )
    print(f"repeats: {args.repeats} interleaved after a 1-round warm-up; medians reported\n")
    sys.stdout.flush()

    with tempfile.TemporaryDirectory(prefix="fedprune-bench-") as tmp:
        runs_dir = str(Path(tmp) / "runs")
        variants = {
            "plain": lambda r: run_plain(fed, r),
            "engine w=1": lambda r: run_engine(fed, make_cfg(r, 1, args.partition)),
            "engine w=2": lambda r: run_engine(fed, make_cfg(r, 2, args.partition)),
            "cohort w=1": lambda r: run_engine(fed, make_cfg(r, 1, args.partition, "", *COHORT)),
            "cohort w=2": lambda r: run_engine(fed, make_cfg(r, 2, args.partition, "", *COHORT)),
            "run_experiment": lambda r: run_full(fed, make_cfg(r, 1, args.partition, runs_dir)),
        }
        for fn in variants.values():  # warm-up (imports, allocator, matplotlib, FLOP counter)
            fn(1)
        walls: dict[str, list[float]] = {k: [] for k in variants}
        cpus: dict[str, list[float]] = {k: [] for k in variants}
        last: dict[str, dict[str, Any]] = {}
        phases: dict[str, list[dict[str, float]]] = {
            "plain": [],
            "engine w=1": [],
            "cohort w=1": [],
            "cohort w=2": [],
        }
        names = list(variants)
        for i in range(args.repeats):
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                res = variants[name](args.rounds)
                walls[name].append(res["wall"])
                cpus[name].append(res["cpu"])
                last[name] = res
                if name in phases:
                    phases[name].append(res["phases"])
            print(
                f"repeat {i + 1}: " + ", ".join(f"{n} {walls[n][-1]:.2f}s" for n in names),
                flush=True,
            )
        print(f"load average after the in-process variants: {load_average()}", flush=True)
        machinery = engine_machinery(fed, make_cfg(args.rounds, 1, args.partition))

        flower_walls: list[float] = []
        flower_returns: list[float] = []
        flower_res: dict[str, Any] | None = None
        leftovers: list[str] = []
        if not args.skip_flower:
            flower_res, flower_walls, flower_returns, leftovers = _flower_block(
                fed, args, Path(tmp)
            )

    med = {k: median(v) for k, v in walls.items()}
    cmed = {k: median(v) for k, v in cpus.items()}
    print()
    rows = [
        [k, med[k], min(walls[k]), max(walls[k]), med[k] / args.rounds, cmed[k], last[k]["acc"]]
        for k in names
    ]
    if flower_res is not None:
        fm = median(flower_walls)
        rows.append(
            ["flower (to final model)", fm, min(flower_walls), max(flower_walls), math.nan,
             math.nan, flower_res.get("acc", math.nan)]
        )  # fmt: skip
        rows.append(
            ["flower (run_simulation returns)", median(flower_returns), min(flower_returns),
             max(flower_returns), math.nan, math.nan, flower_res.get("acc", math.nan)]
        )  # fmt: skip
    headers = ["variant", "wall med s", "min s", "max s", "wall s/round", "CPU med s", "final acc"]
    print(table(headers, rows))
    print(
        "(wall = model build to final evaluated global model; CPU = this process + joined"
        " fork workers, n/a for Flower)"
    )

    print("\nper-round time split (medians over repeats, seconds per round):")
    split_rows = []
    for p in PHASES:
        a = median([d[p] for d in phases["plain"]]) / args.rounds
        b = median([d[p] for d in phases["engine w=1"]]) / args.rounds
        split_rows.append([p, a, b, b - a])
    a_other, b_other = (
        median([w - sum(d.values()) for w, d in zip(walls[k], phases[k], strict=True)])
        / args.rounds
        for k in ("plain", "engine w=1")
    )
    split_rows.append(["other (build, sampling, records)", a_other, b_other, b_other - a_other])
    print(table(["phase", "plain", "engine w=1", "engine - plain"], split_rows))
    print(
        "(engine 'train' = encode + decode + client method + training; 'evaluate' includes"
        " the per-round parameter/FLOP/sparsity statistics)"
    )
    mach_rows = [
        [k, 1000 * machinery[k] / args.rounds, 100 * machinery[k] / machinery["wall"]]
        for k in ("encode", "decode", "validate", "stats")
    ]
    tot = sum(machinery[k] for k in ("encode", "decode", "validate", "stats"))
    mach_rows.append(["total", 1000 * tot / args.rounds, 100 * tot / machinery["wall"]])
    print("\nengine-only machinery, timed inside one extra engine w=1 run:")
    print(table(["part", "ms/round", "% of run wall"], mach_rows))

    acc_diff = abs(last["engine w=1"]["acc"] - last["plain"]["acc"])
    par_diff = max_diff(last["engine w=1"]["state"], last["plain"]["state"])
    w_diff = max_diff(last["engine w=2"]["state"], last["engine w=1"]["state"])
    print("\nsanity checks (final global model):")
    print(f"  engine w=1 vs plain:  |acc diff| = {acc_diff:.6f}, max |param diff| = {par_diff:.3g}")
    print(f"  engine w=2 vs w=1:    max |param diff| = {w_diff:.3g}")
    if par_diff > 1e-6:
        print(
            "  WARNING: the engine's weights differ from the plain loop's: it did not train on"
            " the batches of derive_seed(derive_seed(seed, rnd), cid), or aggregated differently"
        )
    checks_ok = acc_diff <= 0.005 and w_diff <= 1e-6
    if flower_res is not None:
        f_acc = abs(flower_res["acc"] - last["plain"]["acc"])
        f_par = max_diff(flower_res["state"], last["plain"]["state"])
        print(f"  flower vs plain:      |acc diff| = {f_acc:.6f}, max |param diff| = {f_par:.3g}")
        checks_ok = checks_ok and f_acc <= 0.01
        print(f"  Ray processes left after the Flower runs (20 s grace): {len(leftovers)}")
        for p in leftovers:
            print(f"    {p}")

    ratio = med["engine w=1"] / med["plain"]
    print("\nratios (of medians):")
    print(f"  engine w=1 / plain loop     = {ratio:.3f}  (target <= 1.10: {verdict(ratio <= 1.1)})")
    mratio = min(walls["engine w=1"]) / min(walls["plain"])
    print(f"  engine w=1 / plain loop min = {mratio:.3f}  (fastest repeats; least disturbed)")
    cratio = cmed["engine w=1"] / cmed["plain"]
    print(f"  engine w=1 / plain loop CPU = {cratio:.3f}  (CPU seconds; less sensitive to load)")
    print(f"  run_experiment / plain loop = {med['run_experiment'] / med['plain']:.3f}")
    print(
        f"  engine w=1 / engine w=2     = {med['engine w=1'] / med['engine w=2']:.3f}  (speed-up)"
    )
    if flower_res is not None:
        fm = median(flower_walls)
        for k in ("engine w=1", "engine w=2", "cohort w=1", "cohort w=2"):
            r = fm / med[k]
            print(f"  flower / {k}          = {r:.2f}x  (target >= 4: {verdict(r >= 4)})")
    c_diff = max_diff(last["cohort w=1"]["state"], last["plain"]["state"])
    c2_diff = max_diff(last["cohort w=2"]["state"], last["cohort w=1"]["state"])
    print(f"  cohort w=1 vs plain: max |param diff| = {c_diff:.3g}; w=2 vs w=1: {c2_diff:.3g}")
    checks_ok = checks_ok and c_diff <= 1e-4 and c2_diff <= 1e-4
    peak = matmul_peak()
    fc_flops = train_flops(fed, MODEL, EPOCHS) * args.rounds
    fc_rows = [
        gflops_row(k, median([d["train"] for d in phases[k]]), fc_flops, peak, cores)
        for k, cores in (("plain", 1), ("engine w=1", 1), ("cohort w=1", 1), ("cohort w=2", 2))
    ]
    cr = med["plain"] / med["cohort w=1"]
    ctr = median([d["train"] for d in phases["plain"]]) / median(
        [d["train"] for d in phases["cohort w=1"]]
    )
    print(
        f"  plain loop / cohort w=1     = {cr:.2f}x  (train phase {ctr:.2f}x; target >= 2.0:"
        f" {verdict(cr >= 2.0)})"
    )
    print(f"\nsingle-core fp32 matmul peak (1024^3, best of 5): {peak:.1f} GFLOP/s")
    print("achieved, FC (train phase; GFLOP = 3 x forward FLOPs x samples):")
    print(table(GFLOP_HEADERS, fc_rows))
    if not args.skip_workloads:
        checks_ok = workloads(args, peak) and checks_ok
    if not checks_ok:
        print("\nSANITY CHECK FAILED: the variants did not compute the same model", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- cohort workloads

COHORT = ("engine.cohort=on",)
GFLOP_HEADERS = ["variant", "train s", "GFLOP", "GFLOP/s per core", "% of matmul peak"]

WORKLOADS: dict[str, dict[str, Any]] = {
    # GAP CNN on FEMNIST: 20 writers (natural partition), all of them every round
    "gap-cnn/femnist": {
        "dataset": "femnist",
        "model": "gap-cnn",
        "partition": "natural",
        "clients": 20,
        "use": 20,
        "epochs": 5,
        "lr": 0.05,
    },
    # TwoCNN on CIFAR-10: 10 of 100 IID clients (400 samples each; --cifar-clients)
    "twocnn/cifar10": {
        "dataset": "cifar10",
        "model": "twocnn",
        "partition": "iid",
        "clients": 100,
        "use": 10,
        "epochs": 1,
        "lr": 0.02,
    },
}


def matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """Single-thread fp32 matmul throughput in GFLOP/s (best of ``repeats``: the least
    disturbed by other jobs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def train_flops(fed: Federation, model: str, epochs: int) -> float:
    """FLOPs of one round of local training over every client: 3 x forward x samples."""
    from fedprune.core.flops import count_flops

    m = build_model(model, fed.input_shape, fed.num_classes)
    per_sample = count_flops(m, fed.input_shape).total
    return 3.0 * per_sample * epochs * sum(len(c.y_train) for c in fed.clients)


def gflops_row(name: str, seconds: float, flops: float, peak: float, cores: int) -> list[Any]:
    """One row of the GFLOP/s table."""
    rate = flops / seconds / 1e9 / cores
    return [name, seconds, flops / 1e9, rate, 100 * rate / peak]


def _subset(fed: Federation, n: int) -> Federation:
    """The first ``n`` clients of ``fed`` (and at most 2,000 test samples: evaluation is
    not what is measured here)."""
    import dataclasses

    local = fed.local_test_indices[:n] if fed.local_test_indices is not None else None
    return dataclasses.replace(
        fed,
        clients=fed.clients[:n],
        train_indices=fed.train_indices[:n],
        local_test_indices=local,
        x_test=fed.x_test[:2000],
        y_test=fed.y_test[:2000],
    )


def workloads(args: argparse.Namespace, peak: float) -> bool:
    """GAP CNN/FEMNIST and TwoCNN/CIFAR-10: plain loop, engine, cohort w=1 and w=2."""
    ok = True
    for title, wl in WORKLOADS.items():
        use = args.cifar_clients if wl["dataset"] == "cifar10" else wl["use"]
        try:
            bundle = load_dataset(wl["dataset"], args.data_dir, allow_hub=False)
        except DataError as exc:
            print(f"\n{title}: skipped ({exc})")
            continue
        fed = _subset(build_federation(bundle, wl["partition"], wl["clients"], seed=SEED), use)
        sizes = [len(c.y_train) for c in fed.clients]
        rounds = args.workload_rounds

        def cfg(
            workers: int, *extra: str, wl: dict[str, Any] = wl, n: int = use, rounds: int = rounds
        ) -> RunConfig:
            return make_cfg(
                rounds, workers, wl["partition"], "", *extra, dataset=wl["dataset"],
                model=wl["model"], clients=n, lr=wl["lr"], epochs=wl["epochs"],
            )  # fmt: skip

        variants = {
            "plain": lambda r, wl=wl, fed=fed: run_plain(
                fed, r, model=wl["model"], lr=wl["lr"], epochs=wl["epochs"]
            ),
            "engine w=1": lambda r, fed=fed: run_engine(fed, cfg(1)),
            "cohort w=1": lambda r, fed=fed: run_engine(fed, cfg(1, *COHORT)),
            "cohort w=2": lambda r, fed=fed: run_engine(fed, cfg(2, *COHORT)),
        }
        print(
            f"\n{title}: {len(sizes)} clients (sizes {min(sizes)}-{max(sizes)}), all per round,"
            f" {rounds} round(s), {wl['epochs']} local epoch(s), batch {BATCH}, SGD lr {wl['lr']}",
            flush=True,
        )
        for fn in variants.values():
            fn(1)
        walls: dict[str, list[float]] = {k: [] for k in variants}
        trains: dict[str, list[float]] = {k: [] for k in variants}
        last: dict[str, dict[str, Any]] = {}
        names = list(variants)
        for i in range(args.repeats):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                res = variants[name](rounds)
                walls[name].append(res["wall"])
                trains[name].append(res["phases"]["train"])
                last[name] = res
            print(
                f"  repeat {i + 1}: " + ", ".join(f"{n} {walls[n][-1]:.2f}s" for n in names),
                flush=True,
            )
        flops = train_flops(fed, wl["model"], wl["epochs"]) * rounds
        cores = {"plain": 1, "engine w=1": 1, "cohort w=1": 1, "cohort w=2": 2}
        rows = [
            [*gflops_row(k, median(trains[k]), flops, peak, cores[k]), median(walls[k])]
            for k in names
        ]
        print(table([*GFLOP_HEADERS, "wall med s"], rows))
        diff = max_diff(last["cohort w=1"]["state"], last["plain"]["state"])
        med = {k: median(v) for k, v in walls.items()}
        ratio = med["plain"] / med["cohort w=1"]
        tratio = median(trains["plain"]) / median(trains["cohort w=1"])
        target = 1.8 if wl["model"] == "gap-cnn" else None
        aim = f"; target >= {target}: {verdict(ratio >= target)}" if target else ""
        print(
            f"  plain loop / cohort w=1 = {ratio:.2f}x (train phase {tratio:.2f}x{aim});"
            f" engine w=1 / cohort w=1 = {med['engine w=1'] / med['cohort w=1']:.2f}x;"
            f" cohort w=1 / w=2 = {med['cohort w=1'] / med['cohort w=2']:.2f}x;"
            f" max |param diff| cohort vs plain = {diff:.3g}"
        )  # fmt: skip
        ok = ok and diff <= 1e-3
    return ok


def _flower_block(
    fed: Federation, args: argparse.Namespace, tmp: Path
) -> tuple[dict[str, Any], list[float], list[float], list[str]]:
    """Run the Flower variant ``--flower-repeats`` times (after preparing its inputs)."""
    import logging

    os.environ["FLWR_HOME"] = str(tmp / "flwr-home")
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import flwr.simulation  # noqa: F401  (import cost outside the timing)
    import ray  # noqa: F401

    logging.getLogger("flwr").setLevel(logging.WARNING)
    data_dir = tmp / "partitions"
    data_dir.mkdir()
    for c in fed.clients:
        torch.save((c.x_train, c.y_train), data_dir / f"client_{c.cid}.pt")
    before = _ray_processes()
    walls, returns = [], []
    res: dict[str, Any] = {}
    for i in range(args.flower_repeats):
        res = run_flower(fed, args.rounds, data_dir)
        walls.append(res["wall"])
        returns.append(res["wall_return"])
        print(
            f"flower run {i + 1}: {res['wall']:.2f}s to final model,"
            f" {res['wall_return']:.2f}s until run_simulation returned",
            flush=True,
        )
    print(f"load average after the Flower runs: {load_average()}", flush=True)
    return res, walls, returns, _new_ray_processes(before)


if __name__ == "__main__":
    sys.exit(main())
