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

Run ``python -m fedprune.flower_app`` to print that config table for the current
version of :class:`~fedprune.config.RunConfig`.
"""

from __future__ import annotations

import tomli_w
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedprune import experiment
from fedprune.config import RunConfig
from fedprune.data.federation import Federation
from fedprune.engines import flower
from fedprune.methods.base import ClientMethod
from fedprune.methods.registry import get_method

__all__ = [
    "build_client",
    "client_app",
    "make_client_app",
    "make_server_app",
    "run_config_table",
    "server_app",
]


def build_client(cfg: RunConfig) -> tuple[Federation, ClientMethod]:
    """A client process's federation and the registered method's client half for
    ``cfg`` (with the model spec of its data set)."""
    fed = experiment.load_federation(cfg)
    return fed, get_method(cfg.method).client(cfg, experiment.model_spec(cfg, fed))


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """The fedprune ClientApp (``cfg``: the run's config; ``None`` for ``flwr run``, which
    passes it as the run config)."""
    return flower.make_client_app(build_client, cfg)


def make_server_app() -> ServerApp:
    """The fedprune ServerApp for ``flwr run``: config from the run config."""
    return flower.make_server_app(
        prepare_run=experiment.prepare_run,
        prepare_resume=experiment.prepare_resume,
        finish_run=experiment.finish_run,
    )


server_app = make_server_app()
client_app = make_client_app()


def run_config_table() -> str:
    """The ``[tool.flwr.app.config]`` table (TOML) with every key and its default."""
    return tomli_w.dumps({"tool": {"flwr": {"app": {"config": flower.run_config_defaults()}}}})


if __name__ == "__main__":  # pragma: no cover
    print(run_config_table(), end="")
