"""One run: config -> data -> model -> method -> engine -> run directory."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedprune import rundir
from fedprune.config import RunConfig
from fedprune.core.accounting import ModelStatsCounter
from fedprune.data import build_federation, load_dataset, plot_label_distribution
from fedprune.data.federation import Federation
from fedprune.engines.inprocess import InProcessEngine
from fedprune.methods.base import ModelSpec
from fedprune.methods.registry import get_method
from fedprune.plots import plot_run


@dataclass
class RunResult:
    """What :func:`run_experiment` returns."""

    run_dir: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    model: torch.nn.Module


def load_federation(cfg: RunConfig) -> Federation:
    """Load the configured data set and split it among the clients."""
    bundle = load_dataset(cfg.data.dataset, cfg.data.data_dir or None)
    return build_federation(
        bundle,
        cfg.data.partition,
        cfg.data.num_clients,
        seed=cfg.seed,
        alpha=cfg.data.alpha,
        classes_per_client=cfg.data.classes_per_client,
        local_test_fraction=cfg.data.local_test_fraction,
        min_size=cfg.data.min_size,
    )


def model_spec(cfg: RunConfig, fed: Federation) -> ModelSpec:
    """The initial architecture for this config and data set."""
    return ModelSpec(cfg.model.name, fed.input_shape, fed.num_classes, cfg.model.hidden or None)


def summarize(
    cfg: RunConfig,
    records: list[dict[str, Any]],
    dense: dict[str, Any],
    wall_s: float,
) -> dict[str, Any]:
    """The ``summary.json`` content from the per-round records."""
    last = records[-1]
    accs = [r["test_accuracy"] for r in records if r.get("test_accuracy") is not None]
    up, down = last["cum_bytes_up"], last["cum_bytes_down"]
    dup, ddown = last["cum_dense_bytes_up"], last["cum_dense_bytes_down"]
    return {
        "method": cfg.method,
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "partition": cfg.data.partition,
        "num_clients": cfg.data.num_clients,
        "clients_per_round": cfg.clients_per_round(),
        "seed": cfg.seed,
        "rounds": len(records),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "final_loss": last.get("test_loss"),
        "final_sparsity": last["sparsity"],
        "dense_params": dense["params"],
        "final_params": last["params"],
        "final_nonzero_params": last["nonzero_params"],
        "dense_flops": dense["flops"],
        "final_flops": last["flops"],
        "final_effective_flops": last["effective_flops"],
        "total_bytes_up": up,
        "total_bytes_down": down,
        "dense_bytes_up": dup,
        "dense_bytes_down": ddown,
        "communication_reduction": (dup + ddown) / (up + down) if up + down else None,
        "wall_s": wall_s,
        "time_split_s": {
            k[len("time_") : -len("_s")]: v for k, v in last.items() if k.startswith("time_")
        },
    }


def run_experiment(
    cfg: RunConfig,
    *,
    fed: Federation | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[Path, Federation], None] | None = None,
) -> RunResult:
    """Run one federated experiment and write its run directory.

    Parameters
    ----------
    cfg
        A validated configuration.
    fed
        An already-built federation (``compare`` shares one between methods); loaded
        from ``cfg`` when omitted.
    on_round
        Called with each round's metrics record as soon as it exists.
    on_start
        Called once the run directory exists and the data are loaded.
    """
    t0 = time.perf_counter()
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    if fed is None:
        fed = load_federation(cfg)
    spec = model_spec(cfg, fed)
    model = spec.build(seed=cfg.seed)
    info = get_method(cfg.method)
    dense_stats = ModelStatsCounter(fed.input_shape)(model)
    dense = {"params": dense_stats.params, "flops": dense_stats.flops}
    run_dir = rundir.make_run_dir(cfg)
    plot_label_distribution(fed, run_dir / "label_distribution.png")
    if on_start is not None:
        on_start(run_dir, fed)
    server = info.server(cfg, spec, model)
    factory = functools.partial(info.client, cfg, spec)
    if cfg.engine.name == "flower":
        from fedprune.engines.flower import FlowerSimulationEngine  # optional dependency

        engine: Any = FlowerSimulationEngine(cfg, fed, server, factory)
    else:
        engine = InProcessEngine(cfg, fed, server, factory)

    def _on_round(rec: dict[str, Any]) -> None:
        rundir.append_metrics(run_dir, rec)
        if on_round is not None:
            on_round(rec)

    records = engine.run(_on_round)
    wall = time.perf_counter() - t0
    summary = summarize(cfg, records, dense, wall)
    rundir.write_json(run_dir / rundir.SUMMARY, summary)
    rundir.save_model(
        run_dir,
        server.model,
        {
            "model": spec.name,
            "input_shape": list(spec.input_shape),
            "num_classes": spec.num_classes,
            "hidden": spec.hidden,
            "history": getattr(server, "history", []),
        },
    )
    plot_run(records, run_dir, f"{cfg.method} on {cfg.data.dataset} ({cfg.model.name})")
    return RunResult(run_dir, summary, records, server.model)
