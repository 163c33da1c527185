"""The method registry: the single source of method names, their config sections and halves.

A method is registered once, as a :class:`MethodInfo`: its name, its server and client
halves (classes, or ``"module:Class"`` references resolved on first use, the form entry
points use), a description, its paper, and optionally its own config section (a dataclass
of :func:`fedprune.params.key` fields, reached as ``[section]`` in a config file and
``--set section.key=value``). ``load_config`` accepts a method and a section only if they
are registered here, so a registered method works in ``fedprune run``, ``compare``,
checkpoints and the Flower engines without editing fedprune.

Built-in methods register through the same call as user methods (:data:`BUILTIN`). Third
parties register in code (``fedprune.registry.register(...)``), through the
``fedprune.methods`` entry-point group (the entry point's object is a ``MethodInfo`` or a
list of them), or by naming their module in ``FEDPRUNE_PLUGINS`` (comma-separated module
names, imported on first lookup; the Flower engine passes it on to its client processes).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import logging
import os
import re
from collections.abc import Iterable
from typing import Any

from fedprune.errors import ConfigError, elide
from fedprune.sections import AutoFlipConfig, StructuredConfig

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fedprune.methods"
PLUGINS_ENV = "FEDPRUNE_PLUGINS"
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
#: Sections every configuration has (``fedprune.config.RunConfig``'s own fields); a method
#: section may not reuse these names.
CORE_SECTIONS = frozenset(
    {
        "method",
        "seed",
        "out",
        "name",
        "data",
        "model",
        "train",
        "federation",
        "pruning",
        "validation",
        "engine",
        "sections",
    }
)


def _resolve(ref: type | str, what: str) -> Any:
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{what}: cannot load {ref!r} ({elide(str(exc), 80)})") from None
    return obj


class MethodInfo:
    """A registered method (see the module docstring).

    Parameters
    ----------
    name
        Lower-case name used by ``method = ...`` (letters, digits, ``-``, ``_``).
    server, client
        The two halves (subclasses of ``fedprune.methods.base.ServerMethod`` /
        ``ClientMethod``) or ``"module:Class"`` references to them.
    description, paper
        One line each, shown by ``fedprune methods``.
    section, config
        The method's own config section name and its dataclass type (or reference).
        Several methods may share a section (give each the same name and type).
    """

    def __init__(
        self,
        name: str,
        server: type | str,
        client: type | str,
        description: str = "",
        paper: str = "",
        *,
        section: str | None = None,
        config: type | str | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"method name {name!r} must match {_NAME.pattern}")
        if (section is None) != (config is None):
            raise ValueError(f"method {name!r}: give both section and config, or neither")
        if section is not None and (not _NAME.match(section) or section in CORE_SECTIONS):
            raise ValueError(f"method {name!r}: section name {section!r} is reserved or invalid")
        self.name = name
        self._server = server
        self._client = client
        self.description = description
        self.paper = paper
        self.section = section
        self._config = config

    @property
    def server(self) -> Any:
        """The server half's class."""
        if isinstance(self._server, str):
            self._server = _resolve(self._server, f"method {self.name!r}")
        return self._server

    @property
    def client(self) -> Any:
        """The client half's class."""
        if isinstance(self._client, str):
            self._client = _resolve(self._client, f"method {self.name!r}")
        return self._client

    @property
    def config(self) -> type | None:
        """The dataclass of the method's own section (None if it has none)."""
        if isinstance(self._config, str):
            self._config = _resolve(self._config, f"method {self.name!r}")
        if self._config is not None and not dataclasses.is_dataclass(self._config):
            raise ConfigError(f"method {self.name!r}: its config must be a dataclass")
        return self._config

    @property
    def module(self) -> str:
        """The module that defines the server half (what a client process must import)."""
        ref = self._server
        return ref.partition(":")[0] if isinstance(ref, str) else ref.__module__

    def __repr__(self) -> str:
        return f"MethodInfo({self.name!r}, section={self.section!r})"


_METHODS: dict[str, MethodInfo] = {}
_loaded_plugins: set[str] = set()
_entry_points_loaded = False


def register(info: MethodInfo, *, replace: bool = False) -> MethodInfo:
    """Add a method (names are unique unless ``replace``); returns ``info``."""
    if not isinstance(info, MethodInfo):
        raise TypeError(f"register() takes a MethodInfo, got {type(info).__name__}")
    if info.name in _METHODS and not replace:
        raise ValueError(f"method {info.name!r} is already registered")
    if info.section is not None:
        for other in _METHODS.values():
            same = other.section == info.section and other.name != info.name
            if same and other._config is not info._config and other.config is not info.config:
                raise ValueError(
                    f"section {info.section!r} is already used by method {other.name!r} "
                    "with another config class"
                )
    _METHODS[info.name] = info
    return info


def unregister(name: str) -> None:
    """Remove a method (for tests and interactive use)."""
    _METHODS.pop(name, None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party plugin must not break fedprune
            log.warning("fedprune: plugin entry point %r failed to load: %s", ep.name, exc)
            continue
        items: Iterable[Any] = obj if isinstance(obj, list | tuple) else [obj]
        for item in items:
            if isinstance(item, MethodInfo) and item.name not in _METHODS:
                register(item)


def load_plugins(modules: str | Iterable[str] | None = None) -> None:
    """Import plugin modules (default: ``$FEDPRUNE_PLUGINS``) and the entry points."""
    if modules is None:
        modules = os.environ.get(PLUGINS_ENV, "")
    names = modules.split(",") if isinstance(modules, str) else list(modules)
    for mod in (m.strip() for m in names):
        if not mod or mod in _loaded_plugins:
            continue
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise ConfigError(
                f"{PLUGINS_ENV}: cannot import plugin module {mod!r} ({elide(str(exc), 80)})"
            ) from None
        _loaded_plugins.add(mod)
    _load_entry_points()


def get_method(name: str) -> MethodInfo:
    """Look a method up by name; ConfigError (with a suggestion) if unknown."""
    load_plugins()
    if name not in _METHODS:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"method: unknown value {elide(repr(name), 40)}{hint}; "
            f"choose from {', '.join(_METHODS)}"
        )
    return _METHODS[name]


def list_methods() -> list[MethodInfo]:
    """All registered methods (plugins included)."""
    load_plugins()
    return list(_METHODS.values())


def method_names() -> tuple[str, ...]:
    """Names of all registered methods, built-in first."""
    return tuple(m.name for m in list_methods())


def sections() -> dict[str, type]:
    """Method section name -> dataclass type, over all registered methods."""
    out: dict[str, type] = {}
    for m in list_methods():
        if m.section is not None and m.section not in out:
            cls = m.config
            assert cls is not None
            out[m.section] = cls
    return out


def plugin_modules(name: str) -> list[str]:
    """Modules a fresh process must import to know method ``name`` (empty if built-in)."""
    info = get_method(name)
    return [] if info.name in _BUILTIN_NAMES else [info.module]


_M = "fedprune.methods."
BUILTIN: tuple[MethodInfo, ...] = (
    MethodInfo(
        "fedavg",
        _M + "fedavg:FedAvgServer",
        _M + "fedavg:FedAvgClient",
        "Dense federated averaging (FedAvgM with federation.aggregation=fedavgm).",
        "McMahan et al. 2017",
    ),
    MethodInfo(
        "fedsparsify-global",
        _M + "fedsparsify:FedSparsifyGlobalServer",
        _M + "fedsparsify:FedSparsifyClient",
        "Progressive magnitude pruning on the server after FedAvg (polynomial schedule).",
        "Stripelis et al. 2022 (FedSparsify)",
    ),
    MethodInfo(
        "fedsparsify-local",
        _M + "fedsparsify:FedSparsifyLocalServer",
        _M + "fedsparsify:FedSparsifyLocalClient",
        "Clients purge to the schedule; the server merges by majority vote.",
        "Stripelis et al. 2022 (FedSparsify)",
    ),
    MethodInfo(
        "autoflip",
        _M + "autoflip:AutoFlipServer",
        _M + "autoflip:AutoFlipClient",
        "Loss exploration from one theta_0 (every explorer trains up to "
        "autoflip.explore_epochs=150 epochs before round 1; progress shown, resumable), "
        "then guidance-driven unit removal + weight mask. autoflip.compat=authors-code: "
        "the authors' code (chained explorers, pre-trained model, mask not enforced).",
        "Internò et al. 2024 (AutoFLIP)",
        section="autoflip",
        config=AutoFlipConfig,
    ),
    MethodInfo(
        "autostructured",
        _M + "autostructured:AutoStructuredServer",
        _M + "autostructured:AutoStructuredClient",
        "Server drops filters outside mean +- k*std of their layer's L1 norms; the model shrinks.",
        "Nguyen, Le, Avila 2024 (automatic structured pruning)",
        section="structured",
        config=StructuredConfig,
    ),
    MethodInfo(
        "omp",
        _M + "omp:OMPServer",
        _M + "masked:BaselineClient",
        "One-shot global magnitude pruning at pruning.prune_round, then masked fine-tuning.",
        "Stripelis et al. 2022 (FedSparsify baseline)",
    ),
    MethodInfo(
        "snip",
        _M + "snip:SNIPServer",
        _M + "masked:SaliencyClient",
        "Fixed mask at initialisation from one client's |g*w| saliency (one batch).",
        "Lee et al. 2019 (SNIP)",
    ),
    MethodInfo(
        "grasp",
        _M + "grasp:GraSPServer",
        _M + "masked:SaliencyClient",
        "Fixed mask at initialisation from one client's (Hg)*w scores (lowest removed).",
        "Wang et al. 2020 (GraSP)",
    ),
    MethodInfo(
        "random",
        _M + "random_pruning:RandomServer",
        _M + "masked:BaselineClient",
        "FedSparsify's schedule, pruning a fixed random permutation instead of magnitudes.",
        "Stripelis et al. 2022 (FedSparsify baseline)",
    ),
    MethodInfo(
        "prunefl",
        _M + "prunefl:PruneFLServer",
        _M + "prunefl:PruneFLClient",
        "Initial mask at one client, then importance-driven mask readjustment with regrowth.",
        "Jiang et al. 2022 (PruneFL)",
    ),
)
_BUILTIN_NAMES = frozenset(m.name for m in BUILTIN)
for _info in BUILTIN:
    register(_info)
