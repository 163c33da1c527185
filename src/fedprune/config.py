"""Run configuration: one dataclass per component, loaded from TOML with dotted overrides.

A configuration is a tree of small dataclasses (:class:`RunConfig` at the root). It can
be read from a TOML file whose tables are the component names::

    seed = 0
    [data]
    dataset = "fashion-mnist"
    partition = "dirichlet"
    [pruning]
    final_sparsity = 0.9

and overridden by ``--set section.key=value`` strings (values parsed as TOML literals,
falling back to plain strings). Every key is validated up front; an unknown key gets the
closest valid key suggested, a wrong type or an impossible value gets a one-line
:class:`~fedprune.errors.ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from fedprune.errors import ConfigError

METHODS: tuple[str, ...] = (
    "fedavg",
    "fedsparsify-global",
    "fedsparsify-local",
    "autoflip",
    "autostructured",
    "omp",
    "snip",
    "grasp",
    "random",
    "prunefl",
)
ENGINES: tuple[str, ...] = ("inprocess", "flower")


@dataclass
class DataConfig:
    """Which data set, where its files are, and how it is split among clients."""

    dataset: str = "digits"
    data_dir: str = ""
    partition: str = "iid"
    num_clients: int = 10
    alpha: float = 0.5
    classes_per_client: int = 2
    local_test_fraction: float = 0.0
    min_size: int = 1


@dataclass
class ModelConfig:
    """Which model of the zoo; ``hidden`` = 0 keeps the paper's width."""

    name: str = "fc"
    hidden: int = 0


@dataclass
class TrainConfig:
    """Local training on each client."""

    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_decay: float = 1.0
    """Multiplicative per-round decay: round r trains with ``lr * lr_decay**(r-1)``."""


@dataclass
class FederationConfig:
    """The server's round loop."""

    rounds: int = 20
    clients_per_round: float = 0
    """A count (>= 1), a fraction of the clients (in (0, 1)), or 0 for all clients."""
    aggregation: str = "fedavg"
    """``fedavg``, ``fedavgm`` (server momentum, as in AutoFLIP), or the robust
    coordinate-wise ``median`` / ``trimmed_mean`` (unweighted)."""
    server_momentum: float = 0.9
    trim_fraction: float = 0.1
    """``trimmed_mean``: drop this fraction of the largest and smallest values per entry."""
    eval_every: int = 1
    local_eval: bool = False
    min_clients: int = 1
    """A round needs at least this many sound replies; otherwise it is retried."""
    max_retries: int = 2
    """Retries of a round (each with a fresh client sample) before the run stops."""


@dataclass
class PruningConfig:
    """Magnitude-pruning schedule shared by FedSparsify and the schedule-based baselines."""

    final_sparsity: float = 0.8
    initial_sparsity: float = 0.0
    start_round: int = 1
    frequency: int = 1
    exponent: float = 3.0
    schedule: str = "polynomial"
    nnz_rate: float = 0.02
    scope: str = "weights"
    per_layer: bool = False
    merge: str = "majority"
    prune_round: int = 0
    """OMP: the round after which the one-shot prune happens (0 = 90% of the rounds)."""
    readjust_every: int = 50


@dataclass
class ValidationConfig:
    """Checks every client update must pass before aggregation."""

    max_update_norm: float = 0.0
    """Reject updates whose L2 norm (reply minus global) exceeds this; 0 = no bound."""
    max_examples: int = 0
    """Reject sample counts above this; 0 = no bound (2**31 - 1)."""
    check_mask: bool = True
    """Reject non-zero values at positions the global mask prunes."""


@dataclass
class StructuredConfig:
    """Automatic structured pruning (``autostructured``): the band rule and when it runs."""

    k: float = 2.0
    """Keep filters whose L1 norm lies within mean +- k * std of their layer."""
    two_sided: bool = True
    """Drop both tails (the paper); false drops only unusually small filters."""
    patience: int = 3
    """Stop pruning after this many consecutive rejected proposals."""
    max_prune_round: int = 50
    """No pruning after this round (training goes on to the last round)."""
    start_round: int = 1
    """First round after whose aggregation a proposal is made."""
    inherit_weights: bool = True
    """Surviving filters keep their weights; false re-initialises the shrunk model."""


@dataclass
class EngineConfig:
    """How rounds are executed and payloads are encoded."""

    name: str = "inprocess"
    workers: int = 1
    """In-process engine: train clients in this many worker processes (1 = in the main one)."""
    fp16: bool = False
    """Send floating-point values as float16 on the wire (lossy)."""
    tensorboard: bool = False
    """Also log each round's metrics to ``RUN_DIR/tensorboard`` (needs tensorboard)."""
    fail_rate: float = 0.0
    """Failure injection for tests and benchmarks: each sampled client of a round fails
    (raises) with this probability, decided by a seeded draw per (round, client)."""
    checkpoint: bool = True
    """Write ``RUN_DIR/checkpoint.safetensors`` atomically after every round (what
    ``fedprune run --resume RUN_DIR`` continues from)."""
    threads: int = 1
    """torch threads of the main process (0 = torch's default). One thread per process is
    the fast setting on small CPU machines; use ``workers`` to occupy more cores."""


@dataclass
class AutoFlipConfig:
    """AutoFLIP (methods.md §2): loss exploration, guidance-driven hybrid pruning."""

    explore_fraction: float = 1.0
    """Fraction of the clients that explore (seeded choice; at least one)."""
    explore_epochs: int = 150
    """Most local epochs of an explorer (the paper's 150)."""
    explore_patience: int = 40
    """Stop exploring after this many epochs without a lower mean training loss."""
    explore_lr: float = 0.0
    """Learning rate of exploration (``train.optimizer``); 0 = ``train.lr``."""
    threshold: float = 0.3
    """``T_p``: the quantile of normalised guidance (and of unit scores) that is pruned."""
    structured: bool = True
    """Also remove whole low-guidance units (filters, hidden neurons) physically."""
    regrow: bool = False
    """Each round's mask replaces the one in force; else monotone within the T_p budget."""
    refresh: bool = True
    """Recompute the unstructured mask every round from the participants' guidance."""
    normalisation: str = "minmax"
    """Per-tensor scaling of the guidance: ``minmax`` or ``robust`` ((G - median) / IQR)."""


@dataclass
class RunConfig:
    """The whole configuration of one run."""

    method: str = "fedsparsify-global"
    seed: int = 0
    out: str = "runs"
    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    autoflip: AutoFlipConfig = field(default_factory=AutoFlipConfig)

    def validate(self) -> RunConfig:
        """Check every value that can be checked without loading data; return ``self``."""
        _check_choice("method", self.method, METHODS)
        _check_choice("engine.name", self.engine.name, ENGINES)
        _check_choice("train.optimizer", self.train.optimizer, ("sgd", "adam"))
        _check_choice(
            "federation.aggregation",
            self.federation.aggregation,
            ("fedavg", "fedavgm", "median", "trimmed_mean"),
        )
        _check_choice("pruning.schedule", self.pruning.schedule, ("polynomial", "nnz_rate"))
        _check_choice("pruning.scope", self.pruning.scope, ("weights", "all"))
        _check_choice(
            "pruning.merge", self.pruning.merge, ("majority", "majority_nnz", "nnz_average")
        )
        _check(self.data.num_clients >= 1, "data.num_clients", "must be >= 1")
        _check(self.data.alpha > 0, "data.alpha", "must be > 0")
        _check(self.data.classes_per_client >= 1, "data.classes_per_client", "must be >= 1")
        _check(
            0.0 <= self.data.local_test_fraction < 1.0,
            "data.local_test_fraction",
            "must be in [0, 1)",
        )
        _check(self.model.hidden >= 0, "model.hidden", "must be >= 0 (0 = paper default)")
        _check(self.train.local_epochs >= 1, "train.local_epochs", "must be >= 1")
        _check(self.train.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.train.lr > 0, "train.lr", "must be > 0")
        _check(self.train.momentum >= 0, "train.momentum", "must be >= 0")
        _check(self.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0 < self.train.lr_decay <= 1, "train.lr_decay", "must be in (0, 1]")
        _check(self.federation.rounds >= 1, "federation.rounds", "must be >= 1")
        cpr = self.federation.clients_per_round
        _check(cpr >= 0, "federation.clients_per_round", "must be >= 0 (a count, a fraction or 0)")
        if cpr >= 1:
            _check(
                float(cpr).is_integer(),
                "federation.clients_per_round",
                f"must be a whole count when >= 1, got {cpr}",
            )
            _check(
                cpr <= self.data.num_clients,
                "federation.clients_per_round",
                f"is {int(cpr)} but there are only {self.data.num_clients} clients",
            )
        _check(
            0 <= self.federation.server_momentum < 1,
            "federation.server_momentum",
            "must be in [0, 1)",
        )
        _check(self.federation.eval_every >= 1, "federation.eval_every", "must be >= 1")
        _check(self.federation.min_clients >= 1, "federation.min_clients", "must be >= 1")
        _check(
            self.federation.min_clients <= self.clients_per_round(),
            "federation.min_clients",
            f"is {self.federation.min_clients} but only {self.clients_per_round()} clients "
            "are sampled per round",
        )
        _check(self.federation.max_retries >= 0, "federation.max_retries", "must be >= 0")
        _check(0 <= self.engine.fail_rate < 1, "engine.fail_rate", "must be in [0, 1)")
        _check(
            0 <= self.federation.trim_fraction < 0.5,
            "federation.trim_fraction",
            "must be in [0, 0.5)",
        )
        _check(self.validation.max_update_norm >= 0, "validation.max_update_norm", "must be >= 0")
        _check(self.validation.max_examples >= 0, "validation.max_examples", "must be >= 0")
        p = self.pruning
        _check(0.0 <= p.final_sparsity < 1.0, "pruning.final_sparsity", "must be in [0, 1)")
        _check(0.0 <= p.initial_sparsity < 1.0, "pruning.initial_sparsity", "must be in [0, 1)")
        _check(
            p.initial_sparsity <= p.final_sparsity,
            "pruning.initial_sparsity",
            "must be <= pruning.final_sparsity",
        )
        _check(p.start_round >= 1, "pruning.start_round", "must be >= 1")
        _check(p.frequency >= 1, "pruning.frequency", "must be >= 1")
        _check(p.exponent > 0, "pruning.exponent", "must be > 0")
        _check(0 < p.nnz_rate < 1, "pruning.nnz_rate", "must be in (0, 1)")
        _check(p.prune_round >= 0, "pruning.prune_round", "must be >= 0")
        _check(p.readjust_every >= 1, "pruning.readjust_every", "must be >= 1")
        st = self.structured
        _check(st.k > 0, "structured.k", "must be > 0")
        _check(st.patience >= 1, "structured.patience", "must be >= 1")
        _check(st.max_prune_round >= 0, "structured.max_prune_round", "must be >= 0")
        _check(st.start_round >= 1, "structured.start_round", "must be >= 1")
        _check(self.engine.workers >= 1, "engine.workers", "must be >= 1")
        _check(self.engine.threads >= 0, "engine.threads", "must be >= 0")
        af = self.autoflip
        _check(0 < af.explore_fraction <= 1, "autoflip.explore_fraction", "must be in (0, 1]")
        _check(af.explore_epochs >= 1, "autoflip.explore_epochs", "must be >= 1")
        _check(af.explore_patience >= 1, "autoflip.explore_patience", "must be >= 1")
        _check(af.explore_lr >= 0, "autoflip.explore_lr", "must be >= 0 (0 = train.lr)")
        _check(0 <= af.threshold < 1, "autoflip.threshold", "must be in [0, 1)")
        _check_choice("autoflip.normalisation", af.normalisation, ("minmax", "robust"))
        return self

    def clients_per_round(self) -> int:
        """The number of clients sampled each round."""
        cpr = self.federation.clients_per_round
        if cpr == 0:
            return self.data.num_clients
        if cpr >= 1:
            return int(cpr)
        return max(1, int(cpr * self.data.num_clients))


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {why}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: unknown value {value!r}{hint}; choose from {', '.join(choices)}")


# --------------------------------------------------------------------------- loading


def _all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(_all_keys(t, f"{prefix}{f.name}."))  # type: ignore[arg-type]
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key(key: str) -> ConfigError:
    sections = sorted({k.split(".")[0] for k in _all_keys() if "." in k})
    candidates = sections if "." not in key else _all_keys()
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a TOML value to the field's type, or raise a ConfigError naming the key."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(typ, types.UnionType):  # pragma: no cover - no such fields yet
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(full)
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a table of keys, got {value!r}")
            _apply(getattr(obj, key), value, f"{full}.")
        else:
            if isinstance(value, dict):
                raise ConfigError(f"{full} is a value, not a table")
            setattr(obj, key, _coerce(full, value, typ))


def _parse_literal(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``section.key=value`` into the key and its parsed value."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    return key, _parse_literal(text.strip())


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    values: typing.Mapping[str, Any] | None = None,
) -> RunConfig:
    """Build and validate a :class:`RunConfig`.

    Parameters
    ----------
    path
        A TOML file (optional). Its tables are the components of :class:`RunConfig`.
    overrides
        ``key=value`` strings applied after the file, e.g. ``"pruning.final_sparsity=0.9"``.
    values
        Dotted keys mapped to already-typed values (what CLI flags set), applied last.

    Raises
    ------
    ConfigError
        Unreadable file, unknown key, wrong type or impossible value.
    """
    cfg = RunConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
        _apply(cfg, data)
    for item in overrides:
        key, value = parse_override(item)
        _apply(cfg, _nest(key, value))
    for key, value in (values or {}).items():
        if value is not None:
            _apply(cfg, _nest(key, value))
    return cfg.validate()


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The configuration as nested plain dicts (TOML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def config_to_toml(cfg: RunConfig) -> str:
    """The fully resolved configuration as TOML text (what ``config.toml`` holds)."""
    return tomli_w.dumps(config_to_dict(cfg))


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Inverse of :func:`config_to_dict` (validates)."""
    cfg = RunConfig()
    _apply(cfg, data)
    return cfg.validate()
