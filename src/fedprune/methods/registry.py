"""Method registry: name -> (server half, client half)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from fedprune.errors import ConfigError
from fedprune.methods.base import ClientMethod, ServerMethod
from fedprune.methods.fedavg import FedAvgClient, FedAvgServer


@dataclass(frozen=True)
class MethodInfo:
    """A registered method."""

    name: str
    server: type[ServerMethod]
    client: type[ClientMethod]
    description: str
    paper: str


_METHODS: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> None:
    """Add a method to the registry (names are unique)."""
    if info.name in _METHODS:
        raise ValueError(f"method {info.name!r} is already registered")
    _METHODS[info.name] = info


def get_method(name: str) -> MethodInfo:
    """Look a method up by name; ConfigError (with a suggestion) if unknown or not built."""
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"method {name!r} is not available{hint}; available: {', '.join(_METHODS)}"
        )
    return _METHODS[name]


def list_methods() -> list[MethodInfo]:
    """All registered methods."""
    return list(_METHODS.values())


register(
    MethodInfo(
        "fedavg",
        FedAvgServer,
        FedAvgClient,
        "Dense federated averaging (FedAvgM with federation.aggregation=fedavgm).",
        "McMahan et al. 2017",
    )
)


def _register_builtin() -> None:
    from fedprune.methods.fedsparsify import (
        FedSparsifyClient,
        FedSparsifyGlobalServer,
        FedSparsifyLocalClient,
        FedSparsifyLocalServer,
    )

    register(
        MethodInfo(
            "fedsparsify-global",
            FedSparsifyGlobalServer,
            FedSparsifyClient,
            "Progressive magnitude pruning on the server after FedAvg (polynomial schedule).",
            "Stripelis et al. 2022 (FedSparsify)",
        )
    )
    register(
        MethodInfo(
            "fedsparsify-local",
            FedSparsifyLocalServer,
            FedSparsifyLocalClient,
            "Clients purge to the schedule; the server merges by majority vote.",
            "Stripelis et al. 2022 (FedSparsify)",
        )
    )
    from fedprune.methods.autostructured import AutoStructuredClient, AutoStructuredServer

    register(
        MethodInfo(
            "autostructured",
            AutoStructuredServer,
            AutoStructuredClient,
            "Server drops filters outside mean +- k*std of their layer's L1 norms; "
            "the model shrinks.",
            "Nguyen, Le, Avila 2024 (automatic structured pruning)",
        )
    )
    from fedprune.methods.baselines import (
        BaselineClient,
        GraSPServer,
        OMPServer,
        PruneFLClient,
        PruneFLServer,
        RandomServer,
        SaliencyClient,
        SNIPServer,
    )

    register(
        MethodInfo(
            "omp",
            OMPServer,
            BaselineClient,
            "One-shot global magnitude pruning at pruning.prune_round, then masked fine-tuning.",
            "Stripelis et al. 2022 (FedSparsify baseline)",
        )
    )
    register(
        MethodInfo(
            "snip",
            SNIPServer,
            SaliencyClient,
            "Fixed mask at initialisation from one client's |g*w| saliency (one batch).",
            "Lee et al. 2019 (SNIP)",
        )
    )
    register(
        MethodInfo(
            "grasp",
            GraSPServer,
            SaliencyClient,
            "Fixed mask at initialisation from one client's (Hg)*w scores (lowest removed).",
            "Wang et al. 2020 (GraSP)",
        )
    )
    register(
        MethodInfo(
            "random",
            RandomServer,
            BaselineClient,
            "FedSparsify's schedule, pruning a fixed random permutation instead of magnitudes.",
            "Stripelis et al. 2022 (FedSparsify baseline)",
        )
    )
    register(
        MethodInfo(
            "prunefl",
            PruneFLServer,
            PruneFLClient,
            "Initial mask at one client, then importance-driven mask readjustment with regrowth.",
            "Jiang et al. 2022 (PruneFL)",
        )
    )
    from fedprune.methods.autoflip import AutoFlipClient, AutoFlipServer

    register(
        MethodInfo(
            "autoflip",
            AutoFlipServer,
            AutoFlipClient,
            "Loss exploration from one theta_0, guidance-driven unit removal + weight mask.",
            "Internò et al. 2024 (AutoFLIP)",
        )
    )


_register_builtin()
