"""Flower's run config <-> fedprune's :class:`~fedprune.config.RunConfig`.

``flwr run`` passes the app's run config (``[tool.flwr.app.config]`` in
``pyproject.toml`` plus ``--run-config`` overrides): fedprune's config keys with dotted
names (``"data.dataset" = "digits"``, ``"federation.rounds" = 2``) and the engine's own
``flower.*`` keys (:class:`FlowerOptions`). :func:`config_from_run_config` turns it into
a validated :class:`~fedprune.config.RunConfig`; keys left out keep their defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedprune import registry
from fedprune.config import RunConfig, config_from_dict, config_to_flat
from fedprune.errors import ConfigError, elide

__all__ = [
    "FlowerOptions",
    "config_from_run_config",
    "run_config_defaults",
    "run_config_from_config",
]

_FLOWER_PREFIX = "flower."


@dataclass
class FlowerOptions:
    """Engine settings (run-config keys ``flower.<name>``, dashes for underscores)."""

    round_timeout: float = 3600.0
    """Seconds to wait for a round's (or a setup phase's) replies."""
    node_wait: float = 300.0
    """Seconds to wait for all SuperNodes to connect before round 1."""
    poll_interval: float = 0.5
    """Seconds between two pulls for replies (Flower's deployment grid waits 3 s)."""
    resume: str = ""
    """ServerApp: continue the unfinished run in this run directory (a path on the
    ServerApp's machine) from its checkpoint, with its own ``config.toml``."""
    plugins: str = ""
    """Comma-separated modules that register plugin methods (``fedprune.registry``),
    imported by every ServerApp and ClientApp process before the config is read."""


def run_config_from_config(cfg: RunConfig) -> dict[str, bool | int | float | str]:
    """A config as Flower run-config values (dotted keys; ``flower.plugins`` names the
    module of a plugin method so that client processes can import it)."""
    out = config_to_flat(cfg)
    plugins = registry.plugin_modules(cfg.method)
    if plugins:
        out[_FLOWER_PREFIX + "plugins"] = ",".join(plugins)
    return out


def run_config_defaults() -> dict[str, bool | int | float | str]:
    """What ``[tool.flwr.app.config]`` holds: every fedprune key and ``flower.*`` key."""
    out = run_config_from_config(RunConfig())
    out["engine.name"] = "flower"
    for f in fields(FlowerOptions):
        default = f.default
        key = _FLOWER_PREFIX + f.name.replace("_", "-")
        out[key] = default if isinstance(default, str) else float(default)  # type: ignore[arg-type]
    return out


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """The validated fedprune config and engine options from a Flower run config.

    Keys are dotted fedprune keys (``"pruning.final_sparsity"``) or ``flower.*``; keys
    not given keep their defaults; ``engine.name`` is always ``"flower"``.

    Raises
    ------
    ConfigError
        An unknown key, a wrong type or an impossible value (the message names the key).
    """
    nested: dict[str, Any] = {}
    options = FlowerOptions()
    known = {f.name for f in fields(FlowerOptions)}
    for key, value in run_config.items():
        if key.startswith(_FLOWER_PREFIX):
            name = key[len(_FLOWER_PREFIX) :].replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown Flower run-config key {elide(repr(key), 60)}")
            if name in ("resume", "plugins"):
                if not isinstance(value, str):
                    raise ConfigError(f"{key} must be a string, got {elide(repr(value), 40)}")
                setattr(options, name, value)
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{key} must be a positive number of seconds, got {value!r}")
            setattr(options, name, float(value))
            continue
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part!r} is a value, not a table")
            node = child
        node[last] = value
    if options.plugins:
        registry.load_plugins(options.plugins)  # before the method name is checked
    engine = nested.setdefault("engine", {})
    if isinstance(engine, dict):
        engine["name"] = "flower"
    return config_from_dict(nested), options
