"""``fedprune run --engine flower``: the method's halves on Flower's simulation runtime
(Ray), in this process, on this machine's CPUs or on an existing Ray cluster.

With ``RAY_ADDRESS`` set (Ray's own variable: ``host:port`` of a running cluster's
head, as ``ray start --head`` prints it) or ``ray_address`` given, the engine attaches
to that cluster instead of starting Ray here: Flower's backend passes the address to
``ray.init`` and creates one ClientApp actor per CPU of the whole cluster (one CPU per
client), on every node. Every node needs the same Python environment (fedprune, torch,
Flower) and the data set (``$FEDPRUNE_DATA`` in the environment ``ray start`` ran in).
The cluster is left running when the run ends.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedprune.config import RunConfig
from fedprune.data.federation import Federation
from fedprune.engines.common import (
    CheckpointFn,
    ProgressCallback,
    Resume,
    RoundCallback,
    RoundRecord,
)
from fedprune.engines.flower.client import ClientBuilder, make_client_app
from fedprune.engines.flower.runconfig import FlowerOptions
from fedprune.engines.flower.strategy import FedpruneStrategy
from fedprune.engines.flower.wire import FlowerEngineError
from fedprune.errors import RoundFailedError
from fedprune.methods.base import ServerMethod

__all__ = ["FlowerSimulationEngine"]


def _set_flower_env() -> None:
    """Environment defaults for an in-process Flower run (only where unset)."""
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning


@dataclass
class FlowerSimulationEngine:
    """Runs a method's halves on Flower's simulation runtime (Ray), in this process.

    The ServerApp runs in a thread of this process around the very ``server`` object
    given (so records are collected here and ``server.model`` is the final model); the
    ClientApp runs in Ray actors (one CPU each, Ray limited to 2 CPUs), one virtual
    SuperNode per client.

    Parameters
    ----------
    cfg, fed, server
        As for :class:`~fedprune.engines.inprocess.InProcessEngine`.
    build_client
        Builds each actor's federation and client half (e.g. a
        :class:`~fedprune.engines.flower.client.FactoryClientBuilder` around the run's
        client factory); shipped to the actors, so it must pickle.
    options
        Timeouts.
    num_cpus
        CPUs of the Ray instance started here (ignored when attaching to a cluster).
    ray_address
        Attach to this running Ray cluster (``host:port``) instead of starting Ray;
        ``None``: ``$RAY_ADDRESS`` when set, otherwise start Ray here.
    """

    cfg: RunConfig
    fed: Federation
    server: ServerMethod
    build_client: ClientBuilder
    options: FlowerOptions = field(default_factory=FlowerOptions)
    num_cpus: int = 2
    ray_address: str | None = None

    def backend_config(self) -> dict[str, Any]:
        """Flower's backend config: one CPU per client; Ray started here with
        ``num_cpus`` CPUs, or attached to the cluster at :meth:`cluster_address`."""
        address = self.cluster_address()
        init_args: dict[str, Any] = {"include_dashboard": False}
        if address:
            init_args["address"] = address  # a cluster has its own CPU count
        else:
            init_args["num_cpus"] = self.num_cpus
        return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}

    def cluster_address(self) -> str | None:
        """The Ray cluster to attach to (``ray_address`` or ``$RAY_ADDRESS``), if any."""
        address = self.ray_address or os.environ.get("RAY_ADDRESS", "").strip()
        return address or None

    def run(
        self,
        on_round: RoundCallback | None = None,
        *,
        resume: Resume | None = None,
        checkpoint: CheckpointFn | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> list[RoundRecord]:
        """Run setup and every round on Flower; return one metrics record per round
        (``resume``, ``checkpoint`` and ``on_progress`` as for the in-process engine; a
        setup phase sends ``num_cpus`` clients per exchange, all of them on a cluster)."""
        _set_flower_env()
        from flwr.simulation import run_simulation

        strategy = FedpruneStrategy(
            self.cfg,
            self.fed,
            self.server,
            on_round=on_round,
            options=self.options,
            resume=resume,
            checkpoint=checkpoint,
            on_progress=on_progress,
            parallel=0 if self.cluster_address() else self.num_cpus,
        )
        server_app = ServerApp()

        errors: list[RoundFailedError] = []

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                strategy.run(grid)
            except RoundFailedError as exc:  # stopped cleanly; raised again below
                errors.append(exc)

        client_app = make_client_app(self.build_client, self.cfg)
        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        flwr_logger.setLevel(logging.WARNING)
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=len(self.fed.clients),
                backend_config=self.backend_config(),
            )
        finally:
            flwr_logger.setLevel(level)
            _shutdown_ray()
        if errors:
            raise errors[0]
        if len(strategy.records) != self.cfg.federation.rounds:
            raise FlowerEngineError(
                f"Flower simulation ended after {len(strategy.records)} of "
                f"{self.cfg.federation.rounds} rounds (see the log above)"
            )
        return strategy.records


def _shutdown_ray() -> None:
    """Disconnect from Ray (and stop it when it was started here; a cluster keeps
    running)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - flwr[simulation] brings ray
        return
    if ray.is_initialized():
        ray.shutdown()
