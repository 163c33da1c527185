"""The Flower app: ``flwr run`` loads ``server_app`` and ``client_app`` from here.

``pyproject.toml`` names them in ``[tool.flwr.app.components]`` and mirrors every
fedprune config key in ``[tool.flwr.app.config]`` (dotted names, e.g.
``"pruning.final_sparsity"``), so any of them can be overridden with
``flwr run . <connection> --run-config 'federation.rounds=5 method="fedavg"'``.
See ``docs/flower.md``.

Run ``python -m fedprune.flower_app`` to print that config table for the current
version of :class:`~fedprune.config.RunConfig`.
"""

from __future__ import annotations

import tomli_w

from fedprune.engines.flower import make_client_app, make_server_app, run_config_defaults

__all__ = ["client_app", "run_config_table", "server_app"]

server_app = make_server_app()
client_app = make_client_app()


def run_config_table() -> str:
    """The ``[tool.flwr.app.config]`` table (TOML) with every key and its default."""
    return tomli_w.dumps({"tool": {"flwr": {"app": {"config": run_config_defaults()}}}})


if __name__ == "__main__":  # pragma: no cover
    print(run_config_table(), end="")
