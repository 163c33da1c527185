"""The fedprune ServerApp for ``flwr run``: one whole run, from the run config to its
run directory.

The engine does not prepare or finish runs itself (that is ``fedprune.experiment``,
above the engines in the layering): :func:`make_server_app` receives the three steps
as callables (``fedprune.flower_app`` passes the experiment's ``prepare_run``,
``prepare_resume`` and ``finish_run``).

The strategy (and with it torch) is imported when the ServerApp runs, not when this
module is imported: ``fedprune.flower_app`` builds both apps at import, and a ClientApp
process that imports it must stay lean.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedprune.config import RunConfig
from fedprune.engines.flower.runconfig import config_from_run_config

if TYPE_CHECKING:
    from fedprune.data.federation import Federation
    from fedprune.engines.common import CheckpointFn, Resume, RoundCallback, RoundRecord
    from fedprune.methods.base import ServerMethod

__all__ = ["FinishedRun", "PreparedServerRun", "make_server_app"]

_LOG = logging.getLogger("flwr.fedprune")


class PreparedServerRun(Protocol):
    """What the ServerApp needs of a prepared run (``fedprune.experiment.PreparedRun``)."""

    @property
    def cfg(self) -> RunConfig:
        """The run's (validated) configuration."""

    @property
    def fed(self) -> Federation:
        """The federation (the server evaluates on its global test set)."""

    @property
    def server(self) -> ServerMethod:
        """The method's server half, holding the initial (or restored) global model."""

    def on_round(self) -> RoundCallback:
        """The per-round callback (writes ``metrics.jsonl``)."""

    def checkpointer(self) -> CheckpointFn | None:
        """The per-round checkpoint callback, if checkpoints are on."""


class FinishedRun(Protocol):
    """What the ServerApp logs of a finished run (``fedprune.experiment.RunResult``)."""

    @property
    def run_dir(self) -> Path:
        """The run directory."""

    @property
    def summary(self) -> Mapping[str, Any]:
        """The content of ``summary.json``."""


R = TypeVar("R", bound=PreparedServerRun)


def make_server_app(
    *,
    prepare_run: Callable[[RunConfig], R],
    prepare_resume: Callable[[Path], tuple[R, Resume | None]],
    finish_run: Callable[[R, list[RoundRecord]], FinishedRun],
) -> ServerApp:
    """The fedprune ServerApp: config from the run config.

    It writes a run directory exactly like ``fedprune run`` (under ``out``, relative to
    the ServerApp process's working directory: pass an absolute ``out`` in deployment).

    Parameters
    ----------
    prepare_run
        Loads the data, builds the model and the method's halves and creates the run
        directory for a config.
    prepare_resume
        Rebuilds the unfinished run in a run directory (``flower.resume``) and restores
        its checkpoint; returns it and where the engine continues.
    finish_run
        Writes the summary, the final model and the plots from the records.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedprune.engines.flower.strategy import FedpruneStrategy

        cfg, options = config_from_run_config(context.run_config)
        resume: Resume | None = None
        if options.resume:
            _LOG.info("fedprune: resuming %s with its own config.toml", options.resume)
            run, resume = prepare_resume(Path(options.resume))
            _LOG.info("fedprune: continuing after round %d", resume.round if resume else 0)
        else:
            run = prepare_run(cfg)
        strategy = FedpruneStrategy(
            run.cfg,
            run.fed,
            run.server,
            on_round=run.on_round(),
            options=options,
            resume=resume,
            checkpoint=run.checkpointer(),
            on_progress=lambda text: _LOG.info("fedprune %s", text),
        )
        records = strategy.run(grid)
        result = finish_run(run, records)
        _LOG.info(
            "fedprune run finished: %s (final accuracy %s, sparsity %.3f)",
            result.run_dir,
            result.summary.get("final_accuracy"),
            result.summary.get("final_sparsity"),
        )

    return app
