"""The Flower app: ``flwr run`` loads ``server_app`` and ``client_app`` from here.

``pyproject.toml`` names them in ``[tool.flwr.app.components]`` and mirrors every
fedprune config key in ``[tool.flwr.app.config]`` (dotted names, e.g.
``"pruning.final_sparsity"``), so any of them can be overridden with
``flwr run . <connection> --run-config 'federation.rounds=5 method="fedavg"'``.
See ``docs/flower.md``.

This module sits above :mod:`fedprune.experiment` in the layering: it builds the
engine's ClientApp and ServerApp with the experiment's functions (how a client process
loads its federation and client half; how a run is prepared, resumed and finished),
which the engine (:mod:`fedprune.engines.flower`) receives instead of importing them.

A SuperNode imports this module in every ClientApp process, so its imports are lean:
the experiment, torch and the data-set stack are imported inside the functions that
need them (:func:`build_node` on a ``train`` message; the ServerApp when it runs). A
node reads its partition from its cache (:mod:`fedprune.engines.flower.partitions`)
and only loads the data set the first time.

Run ``python -m fedprune.flower_app`` to print that config table for the current
version of :class:`~fedprune.config.RunConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedprune.config import RunConfig
from fedprune.engines.flower import client as flower_client
from fedprune.engines.flower import server as flower_server

if TYPE_CHECKING:
    from fedprune.engines.common import Resume, RoundRecord
    from fedprune.experiment import PreparedRun, RunResult

__all__ = [
    "build_node",
    "client_app",
    "make_client_app",
    "make_server_app",
    "run_config_table",
    "server_app",
]


def build_node(cfg: RunConfig, pid: int) -> flower_client.NodeRuntime:
    """A SuperNode's runtime for ``cfg``: partition ``pid`` (from the node's cache, or
    loaded with the experiment's :func:`~fedprune.experiment.load_federation` and then
    cached) and the registered method's client half with the model spec of its data set
    (as :func:`~fedprune.experiment.model_spec` makes it)."""
    from fedprune.engines.flower.partitions import load_partition
    from fedprune.methods.base import ModelSpec
    from fedprune.registry import get_method

    part = load_partition(cfg, pid, _load_federation)
    spec = ModelSpec(cfg.model.name, part.input_shape, part.num_classes, cfg.model.hidden or None)
    return flower_client.NodeRuntime(
        part.data, part.num_clients, get_method(cfg.method).client(cfg, spec)
    )


def _load_federation(cfg: RunConfig) -> Any:
    from fedprune import experiment

    return experiment.load_federation(cfg)


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """The fedprune ClientApp (``cfg``: the run's config; ``None`` for ``flwr run``, which
    passes it as the run config)."""
    return flower_client.make_client_app(build_node, cfg)


def _prepare_run(cfg: RunConfig) -> PreparedRun:
    from fedprune import experiment

    return experiment.prepare_run(cfg)


def _prepare_resume(run_dir: Path) -> tuple[PreparedRun, Resume | None]:
    from fedprune import experiment

    return experiment.prepare_resume(run_dir)


def _finish_run(run: PreparedRun, records: list[RoundRecord]) -> RunResult:
    from fedprune import experiment

    return experiment.finish_run(run, records)


def make_server_app() -> ServerApp:
    """The fedprune ServerApp for ``flwr run``: config from the run config."""
    return flower_server.make_server_app(
        prepare_run=_prepare_run, prepare_resume=_prepare_resume, finish_run=_finish_run
    )


server_app = make_server_app()
client_app = make_client_app()


def run_config_table() -> str:
    """The ``[tool.flwr.app.config]`` table (TOML) with every key and its default."""
    import tomli_w

    from fedprune.engines.flower.runconfig import run_config_defaults

    return tomli_w.dumps({"tool": {"flwr": {"app": {"config": run_config_defaults()}}}})


if __name__ == "__main__":  # pragma: no cover
    print(run_config_table(), end="")
