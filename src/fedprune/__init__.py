"""fedprune: federated learning that prunes the model while it trains.

The public facade. Typical use::

    from fedprune import load_config, run_experiment
    result = run_experiment(load_config(overrides=["method=fedavg", "federation.rounds=5"]))
    print(result.summary["final_accuracy"], result.run_dir)

Names are imported lazily, so ``import fedprune.core.codec`` does not load the data
stack (pandas, pyarrow) or the engines.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "RunConfig": "fedprune.config",
    "load_config": "fedprune.config",
    "Payload": "fedprune.core.codec",
    "decode_payload": "fedprune.core.codec",
    "encode_payload": "fedprune.core.codec",
    "ConfigError": "fedprune.errors",
    "DataError": "fedprune.errors",
    "DecodeError": "fedprune.errors",
    "FedpruneError": "fedprune.errors",
    "UserInputError": "fedprune.errors",
    "RunResult": "fedprune.experiment",
    "load_federation": "fedprune.experiment",
    "run_experiment": "fedprune.experiment",
}

__all__ = [
    "ConfigError",
    "DataError",
    "DecodeError",
    "FedpruneError",
    "Payload",
    "RunConfig",
    "RunResult",
    "UserInputError",
    "__version__",
    "decode_payload",
    "encode_payload",
    "load_config",
    "load_federation",
    "run_experiment",
]

if TYPE_CHECKING:  # pragma: no cover
    from fedprune.config import RunConfig, load_config
    from fedprune.core.codec import Payload, decode_payload, encode_payload
    from fedprune.errors import ConfigError, DataError, DecodeError, FedpruneError, UserInputError
    from fedprune.experiment import RunResult, load_federation, run_experiment


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedprune' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
