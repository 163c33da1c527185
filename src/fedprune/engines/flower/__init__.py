"""Flower engine: the same method halves on Flower's simulation and deployment runtimes.

Nothing here re-implements a method. A :class:`FedpruneStrategy` (a Flower
``Strategy``) drives any fedprune :class:`~fedprune.methods.base.ServerMethod`, and the
``ClientApp`` built by :func:`make_client_app` runs the matching
:class:`~fedprune.methods.base.ClientMethod` on a SuperNode. The engine only moves codec
buffers inside Flower ``Message`` objects, and it samples, counts, times and records
rounds with the code the in-process engine uses (:mod:`fedprune.engines.common`).

One module per concern:

- :mod:`~fedprune.engines.flower.wire`: a codec buffer <-> a message's ``RecordDict``
  (and the discovery keys, the engine's error);
- :mod:`~fedprune.engines.flower.runconfig`: Flower's run config <-> ``RunConfig``,
  the ``flower.*`` options;
- :mod:`~fedprune.engines.flower.client`: the ClientApp and its per-process cache;
- :mod:`~fedprune.engines.flower.grid`: a grid that polls for replies more often;
- :mod:`~fedprune.engines.flower.strategy`: the Strategy (discovery, rounds, retries);
- :mod:`~fedprune.engines.flower.server`: the ServerApp of ``flwr run`` (one whole run);
- :mod:`~fedprune.engines.flower.simulation`: ``fedprune run --engine flower`` (Ray, this
  machine or an existing Ray cluster);
- :mod:`~fedprune.engines.flower.partitions`: a SuperNode's partition cached as ``.npy``;
- :mod:`~fedprune.engines.flower.warm`: the opt-in warm executor of a SuperNode
  (``fedprune flower exec``);
- :mod:`~fedprune.engines.flower.submit`: submit a run and wait for its final status
  (``fedprune flower run``).

The engine never imports ``fedprune.experiment``: how a client process builds its
federation and client half, and how the ServerApp prepares, resumes and finishes a run,
are passed in (``fedprune.flower_app`` binds them to the experiment's functions; the
experiment passes its own to the simulation engine it creates).

Names are re-exported lazily: importing :mod:`fedprune.engines.flower.client` (what a
ClientApp process loads) does not import the strategy, the simulation runtime or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "ClientBuilder": "client",
    "FactoryClientBuilder": "client",
    "NodeRuntime": "client",
    "make_client_app": "client",
    "PollingGrid": "grid",
    "FlowerOptions": "runconfig",
    "config_from_run_config": "runconfig",
    "run_config_defaults": "runconfig",
    "run_config_from_config": "runconfig",
    "make_server_app": "server",
    "FlowerSimulationEngine": "simulation",
    "FedpruneStrategy": "strategy",
    "ARRAYS_KEY": "wire",
    "CONFIG_KEY": "wire",
    "STYPE": "wire",
    "EncodedPayload": "wire",
    "FlowerEngineError": "wire",
    "decode_content": "wire",
    "encode_for_flower": "wire",
    "make_content": "wire",
}

__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "STYPE",
    "ClientBuilder",
    "EncodedPayload",
    "FactoryClientBuilder",
    "FedpruneStrategy",
    "FlowerEngineError",
    "FlowerOptions",
    "FlowerSimulationEngine",
    "NodeRuntime",
    "PollingGrid",
    "config_from_run_config",
    "decode_content",
    "encode_for_flower",
    "make_client_app",
    "make_content",
    "make_server_app",
    "run_config_defaults",
    "run_config_from_config",
]

if TYPE_CHECKING:  # pragma: no cover
    from fedprune.engines.flower.client import (
        ClientBuilder,
        FactoryClientBuilder,
        NodeRuntime,
        make_client_app,
    )
    from fedprune.engines.flower.grid import PollingGrid
    from fedprune.engines.flower.runconfig import (
        FlowerOptions,
        config_from_run_config,
        run_config_defaults,
        run_config_from_config,
    )
    from fedprune.engines.flower.server import make_server_app
    from fedprune.engines.flower.simulation import FlowerSimulationEngine
    from fedprune.engines.flower.strategy import FedpruneStrategy
    from fedprune.engines.flower.wire import (
        ARRAYS_KEY,
        CONFIG_KEY,
        STYPE,
        EncodedPayload,
        FlowerEngineError,
        decode_content,
        encode_for_flower,
        make_content,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
