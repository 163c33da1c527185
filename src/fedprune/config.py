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
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from fedprune import registry
from fedprune.errors import ConfigError, elide
from fedprune.params import (
    MAX_INT64,
    KeyRow,
    check_value,
    key_rows,
    spec_of,
    validate_section,
)
from fedprune.params import key as _key
from fedprune.sections import AutoFlipConfig, StructuredConfig

__all__ = [
    "AutoFlipConfig",
    "DataConfig",
    "EngineConfig",
    "FederationConfig",
    "ModelConfig",
    "PruningConfig",
    "RunConfig",
    "StructuredConfig",
    "TrainConfig",
    "ValidationConfig",
    "check_name",
    "config_from_dict",
    "config_to_dict",
    "config_to_toml",
    "key_table",
    "load_config",
]

ENGINES: tuple[str, ...] = ("inprocess", "flower")
_BIG = 1_000_000
"""Upper bound of round, epoch and period counts (a run of a million rounds is a typo)."""
MAX_CLIENTS = 100_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@,-]{0,127}$")


@dataclass
class DataConfig:
    """Which data set, where its files are, and how it is split among clients."""

    dataset: str = _key("digits", "data set (see `fedprune datasets`)", flag="--dataset")
    data_dir: str = _key(
        "", "folder with the files (default: $FEDPRUNE_DATA/NAME)", flag="--data-dir"
    )
    partition: str = _key(
        "iid",
        "`iid`, `dirichlet`, `shards`, `sort-and-deal`, `natural` (writers)",
        flag="--partition",
    )
    num_clients: int = _key(10, "clients in the federation", ge=1, le=MAX_CLIENTS, flag="--clients")
    alpha: float = _key(0.5, "Dirichlet concentration", gt=0, le=1e6)
    classes_per_client: int = _key(2, "for `shards` and `sort-and-deal`", ge=1, le=100_000)
    local_test_fraction: float = _key(0.0, "held-out share of each client's data", ge=0, lt=1)
    min_size: int = _key(1, "minimum samples per client (Dirichlet, natural)", ge=0, le=10**9)


@dataclass
class ModelConfig:
    """Which model of the zoo; ``hidden`` = 0 keeps the paper's width."""

    name: str = _key("fc", "model of the zoo (see `fedprune models`)", flag="--model")
    hidden: int = _key(
        0, "hidden width where the paper has one (0 = paper default; sizes memory)", ge=0, le=4096
    )


@dataclass
class TrainConfig:
    """Local training on each client."""

    local_epochs: int = _key(2, "local epochs per round", ge=1, le=10_000, flag="--local-epochs")
    batch_size: int = _key(
        32, "local batch size (sizes memory)", ge=1, le=65_536, flag="--batch-size"
    )
    lr: float = _key(0.1, "client learning rate", gt=0, le=1000, flag="--lr")
    optimizer: str = _key("sgd", "`sgd` or `adam` (fresh each round)", choices=("sgd", "adam"))
    momentum: float = _key(0.0, "SGD momentum", ge=0, lt=1)
    weight_decay: float = _key(0.0, "L2 weight decay", ge=0, le=10)
    prox_mu: float = _key(
        0.0,
        "FedProx (Li et al. 2020): in local training (not AutoFLIP's exploration), add "
        "`mu/2` times the squared distance to the received model to each client's loss; "
        "0: off",
        ge=0,
        le=100,
    )
    lr_decay: float = _key(1.0, "round r trains with `lr * lr_decay**(r-1)`", gt=0, le=1)


@dataclass
class FederationConfig:
    """The server's round loop."""

    rounds: int = _key(20, "federated rounds", ge=1, le=_BIG, flag="--rounds")
    clients_per_round: float = _key(
        0,
        "a count (>= 1), a fraction of the clients (< 1), or 0 for all",
        ge=0,
        le=MAX_CLIENTS,
        flag="--clients-per-round",
    )
    aggregation: str = _key(
        "fedavg",
        "`fedavg`, `fedavgm` (server momentum), or the robust coordinate-wise, unweighted "
        "`median` / `trimmed_mean`",
        choices=("fedavg", "fedavgm", "median", "trimmed_mean"),
    )
    server_momentum: float = _key(0.9, "beta of FedAvgM", ge=0, lt=1)
    trim_fraction: float = _key(
        0.1, "`trimmed_mean`: share of largest and smallest values dropped per entry", ge=0, lt=0.5
    )
    eval_every: int = _key(
        1, "evaluate the global model every k rounds (and the last)", ge=1, le=_BIG
    )
    local_eval: bool = _key(False, "also evaluate on the clients' local test splits")
    average_decay: float = _key(
        0.0,
        "keep a moving average of the global models (`decay * average + (1 - decay) * "
        "model` after each round), evaluate it beside the model and save it as "
        "`model_average.safetensors`; 0: off",
        ge=0,
        lt=1,
    )
    min_clients: int = _key(
        1,
        "a round needs this many accepted replies (sound, passing validation), else it is "
        "retried with a fresh sample",
        ge=1,
        le=MAX_CLIENTS,
    )
    max_retries: int = _key(
        2, "retries of a round before the run stops (exit 1, finished rounds kept)", ge=0, le=1000
    )


@dataclass
class PruningConfig:
    """Magnitude-pruning schedule shared by FedSparsify and the schedule-based baselines."""

    final_sparsity: float = _key(0.8, "target sparsity at the last round", ge=0, lt=1)
    initial_sparsity: float = _key(0.0, "s_0 of the schedule (<= final_sparsity)", ge=0, lt=1)
    start_round: int = _key(1, "t_0: first pruning round", ge=1, le=_BIG)
    frequency: int = _key(1, "prune every f rounds", ge=1, le=_BIG)
    end_round: int = _key(
        0,
        "`polynomial`: round T at which s_F is reached and then held (0 = the last round)",
        ge=0,
        le=_BIG,
    )
    exponent: float = _key(3.0, "e of the polynomial schedule", gt=0, le=100)
    schedule: str = _key(
        "polynomial",
        "or `nnz_rate` (remove `pruning.nnz_rate` of the non-zeros every f rounds)",
        choices=("polynomial", "nnz_rate"),
    )
    nnz_rate: float = _key(0.02, "`nnz_rate` schedule: share of the non-zeros removed", gt=0, lt=1)
    scope: str = _key(
        "weights",
        "`weights` (conv/linear weights) or `all` (every trainable tensor)",
        choices=("weights", "all"),
    )
    per_layer: bool = _key(False, "one magnitude threshold per tensor instead of one global")
    merge: str = _key(
        "majority",
        "fedsparsify-local merge",
        choices=("majority", "majority_nnz", "nnz_average"),
    )
    prune_round: int = _key(0, "OMP: prune after this round (0 = 90% of the rounds)", ge=0, le=_BIG)
    readjust_every: int = _key(50, "PruneFL: mask readjustment period", ge=1, le=_BIG)


@dataclass
class ValidationConfig:
    """Checks every client update must pass before aggregation."""

    max_update_norm: float = _key(
        0.0,
        "reject updates whose L2 norm (reply - global) exceeds this (0 = no bound)",
        ge=0,
        le=1e30,
    )
    max_examples: int = _key(
        0, "reject sample counts above this (0 = no bound, i.e. 2**31-1)", ge=0, le=2**31 - 1
    )
    check_mask: bool = _key(True, "reject non-zero values at positions the global mask prunes")


@dataclass
class EngineConfig:
    """How rounds are executed and payloads are encoded."""

    name: str = _key("inprocess", "`inprocess` or `flower`", choices=ENGINES, flag="--engine")
    workers: int = _key(
        1, "in-process engine: train clients in this many processes", ge=1, le=64, flag="--workers"
    )
    fp16: bool = _key(False, "send float values as float16 on the wire (lossy)")
    wire_dtype: str = _key(
        "float32",
        "server-to-client float values as `float32` (lossless), `float16` or `bfloat16` "
        "(lossy; `engine.fp16` = `float16`)",
        choices=("float32", "float16", "bfloat16"),
    )
    values_only: bool = _key(
        True,
        "send a tensor as its values alone where the receiver holds its support (both engines)",
    )
    compress: bool = _key(
        False, "byte-plane shuffle + zlib on the values of every tensor (lossless, slower)"
    )
    tensorboard: bool = _key(
        False, "also log each round to `RUN_DIR/tensorboard` (needs tensorboard)"
    )
    fail_rate: float = _key(
        0.0,
        "failure injection: each sampled client of a round fails with this probability (seeded)",
        ge=0,
        lt=1,
    )
    checkpoint: bool = _key(
        True, "write `RUN_DIR/checkpoint.safetensors` after every round (for `--resume`)"
    )
    threads: int = _key(1, "torch threads of the main process (0 = torch's default)", ge=0, le=256)
    cohort: str = _key(
        "off",
        "in-process engine: train a round's clients as one batched computation (`on`, or "
        "`auto`: where the model and method allow; else the per-client path); equal to the "
        "per-client path up to float rounding",
        choices=("auto", "on", "off"),
    )
    cohort_size: int = _key(
        0,
        "cohort path: at most this many clients per batched chunk (0 = automatic: on a cpu as "
        "many as keep a layer's activations under 4 MiB, on a gpu all)",
        ge=0,
        le=100000,
    )
    device: str = _key(
        "cpu",
        "cohort path: where the clients train (`auto`: cuda, else mps, else cpu); the "
        "per-client path trains on the cpu",
        choices=("auto", "cpu", "cuda", "mps"),
    )


def _default_sections() -> dict[str, Any]:
    return {name: cls() for name, cls in registry.sections().items()}


@dataclass
class RunConfig:
    """The whole configuration of one run.

    The core sections are fields; each registered method's own section (``autoflip``,
    ``structured``, a plugin's) lives in :attr:`sections` and is reached as
    ``cfg.section(name)`` (``cfg.autoflip`` and ``cfg.structured`` for the built-ins).
    """

    method: str = _key(
        "fedsparsify-global", "registered method (see `fedprune methods`)", flag="--method"
    )
    seed: int = _key(
        0,
        "fixes partitions, client sampling, initialisation and training",
        ge=0,
        le=MAX_INT64,
        flag="--seed",
    )
    out: str = _key("runs", "folder the run directory goes into", flag="--out")
    name: str = _key(
        "",
        "run directory name, one path component (empty: METHOD_DATASET_MODEL_TIME)",
        flag="--name",
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sections: dict[str, Any] = field(default_factory=_default_sections)

    def section(self, name: str) -> Any:
        """A method section by name (created with its defaults if missing)."""
        sec = self.sections.get(name)
        if sec is None:
            cls = registry.sections().get(name)
            if cls is None:
                raise ConfigError(f"no config section {name!r} is registered")
            sec = self.sections[name] = cls()
        return sec

    @property
    def structured(self) -> StructuredConfig:
        """``[structured]``: the autostructured method's section."""
        sec: StructuredConfig = self.section("structured")
        return sec

    @property
    def autoflip(self) -> AutoFlipConfig:
        """``[autoflip]``: AutoFLIP's section."""
        sec: AutoFlipConfig = self.section("autoflip")
        return sec

    def validate(self) -> RunConfig:
        """Check every value that can be checked without loading data; return ``self``."""
        registry.get_method(self.method)
        check_name("name", self.name)
        for f in fields(self):
            if f.name == "sections":
                continue
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                validate_section(value, f"{f.name}.")
            elif (spec := spec_of(f)) is not None:
                check_value(f.name, value, spec)
        for name, sec in self.sections.items():
            validate_section(sec, f"{name}.")
            extra = getattr(sec, "validate", None)
            if callable(extra):
                extra(self)
        cpr = self.federation.clients_per_round
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
            self.federation.min_clients <= self.clients_per_round(),
            "federation.min_clients",
            f"is {self.federation.min_clients} but only {self.clients_per_round()} clients "
            "are sampled per round",
        )
        p = self.pruning
        _check(
            p.initial_sparsity <= p.final_sparsity,
            "pruning.initial_sparsity",
            "must be <= pruning.final_sparsity",
        )
        _check(
            p.end_round == 0 or p.start_round <= p.end_round <= self.federation.rounds,
            "pruning.end_round",
            f"is {p.end_round} but must be 0 or between pruning.start_round "
            f"({p.start_round}) and federation.rounds ({self.federation.rounds})",
        )
        return self

    def clients_per_round(self) -> int:
        """The number of clients sampled each round."""
        cpr = self.federation.clients_per_round
        if cpr == 0:
            return self.data.num_clients
        if cpr >= 1:
            return int(cpr)
        return max(1, int(cpr * self.data.num_clients))


def check_name(key_name: str, value: str, *, allow_empty: bool = True) -> None:
    """A run or comparison name must be one safe path component (no separators, no '..')."""
    if value == "" and allow_empty:
        return
    if not _NAME.match(value):
        raise ConfigError(
            f"{key_name} must be one path component of letters, digits and ._+=@,- "
            f"(at most 128, not starting with '.' or '-'), got {elide(repr(value), 60)}"
        )


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {why}")


# --------------------------------------------------------------------------- loading


def _declared_rows() -> list[KeyRow]:
    """Every leaf key: the core sections', then each registered method section's."""
    rows = [r for r in key_rows(RunConfig) if r.key != "sections"]
    for name, cls in registry.sections().items():
        rows.extend(key_rows(cls, f"{name}."))
    return rows


def _all_keys() -> list[str]:
    return [r.key for r in _declared_rows()]


def key_table() -> list[tuple[str, str, Any, str, str]]:
    """(key, type, default, accepted values, meaning) for every key: the README's table."""
    rows: list[tuple[str, str, Any, str, str]] = []
    for r in _declared_rows():
        spec = r.spec
        if spec is None:  # pragma: no cover - test_config keeps every key declared
            rows.append((r.key, r.type, r.default, "", ""))
            continue
        if spec.choices is not None:
            accepted = ", ".join(f"`{c}`" for c in spec.choices)
        elif r.type == "bool":
            accepted = "true, false"
        elif r.type == "str":
            accepted = "text"
        else:
            accepted = spec.range_text()
        rows.append((r.key, r.type, r.default, accepted, spec.doc))
    return rows


def _unknown_key(key: str) -> ConfigError:
    keys = _all_keys()
    sections = sorted({k.split(".")[0] for k in keys if "." in k})
    candidates = sections if "." not in key else keys
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {elide(repr(key), 60)}{hint}")


def _show(value: Any) -> str:
    return elide(repr(value), 40)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a TOML value to the field's type, or raise a ConfigError naming the key."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {_show(value)}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be an integer, got {_show(value)}")
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key} must be an integer, got {_show(value)}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {_show(value)}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key} must be a finite number, got {_show(value)}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {_show(value)}")
        if "\x00" in value or len(value) > 4096:
            raise ConfigError(f"{key} must be a string without NUL of at most 4096 characters")
        return value
    if isinstance(typ, types.UnionType):  # pragma: no cover - no such fields yet
        return value
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    top = isinstance(obj, RunConfig)
    method_sections = registry.sections() if top else {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if top and key not in names and key in method_sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a table of keys, got {_show(value)}")
            _apply(obj.section(key), value, f"{full}.")
            continue
        if key not in names or (top and key == "sections"):
            raise _unknown_key(full)
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a table of keys, got {_show(value)}")
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
        raise ConfigError(f"--set expects key=value, got {_show(item)}")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {_show(item)}")
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
            raise ConfigError(f"config file {elide(repr(str(p)), 100)} does not exist")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"config file {elide(repr(str(p)), 80)} is not valid TOML: {elide(str(exc), 80)}"
            ) from None
        _apply(cfg, data)
    for item in overrides:
        key, value = parse_override(item)
        _apply(cfg, _nest(key, value))
    for key, value in (values or {}).items():
        if value is not None:
            _apply(cfg, _nest(key, value))
    return cfg.validate()


def _is_section(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The configuration as nested plain dicts (TOML/JSON serialisable).

    Method sections appear as top-level tables beside the core ones, in registration order.
    """
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name != "sections":
            out[f.name] = dataclasses.asdict(value) if _is_section(value) else value
    for name in registry.sections():
        out[name] = dataclasses.asdict(cfg.section(name))
    for name, sec in cfg.sections.items():  # sections of methods no longer registered
        out.setdefault(name, dataclasses.asdict(sec))
    return out


def config_to_flat(cfg: RunConfig) -> dict[str, Any]:
    """The configuration as dotted keys (``pruning.final_sparsity``) and their values."""

    def flatten(data: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):
                out.update(flatten(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    return flatten(config_to_dict(cfg), "")


def config_to_toml(cfg: RunConfig) -> str:
    """The fully resolved configuration as TOML text (what ``config.toml`` holds)."""
    return tomli_w.dumps(config_to_dict(cfg))


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Inverse of :func:`config_to_dict` (validates)."""
    cfg = RunConfig()
    _apply(cfg, data)
    return cfg.validate()
