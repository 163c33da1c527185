"""Config sections of the built-in methods that have a section of their own.

A method's section is a dataclass of :func:`fedprune.params.key` fields; the method's
registration (``fedprune.registry``) names it, and ``[section]`` in a config file or
``--set section.key=value`` then reaches it. These live here, not in the method modules,
so reading a configuration never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedprune.params import key

_BIG = 1_000_000


@dataclass
class StructuredConfig:
    """Automatic structured pruning (``autostructured``): the band rule and when it runs."""

    k: float = key(
        2.0, "keep filters whose L1 norm lies within mean ± k·std of their layer", gt=0, le=100
    )
    two_sided: bool = key(True, "drop both tails (the paper); false: only unusually small filters")
    patience: int = key(3, "stop proposing after this many rejected proposals", ge=1, le=_BIG)
    max_prune_round: int = key(
        50, "no proposals after this round (training continues)", ge=0, le=_BIG
    )
    start_round: int = key(1, "first round after which a proposal is made", ge=1, le=_BIG)
    inherit_weights: bool = key(
        True, "surviving filters keep their weights; false re-initialises (the authors' code)"
    )
    round_to: int = key(
        1, "kept widths rounded to a multiple of this (at least it); 1 = the paper", ge=1, le=1024
    )
    prune_linear: bool = key(
        True, "hidden linear units are pruned too; false: only convolutions (the paper)"
    )
    max_drop: float = key(
        0.0,
        "accuracy guard: roll back a proposal whose federated validation accuracy fell by "
        "more than this (0.015 = 1.5 points); 0 = off, the paper's accept rule",
        ge=0,
        le=1,
    )
    recovery_rounds: int = key(
        2, "rounds a guarded proposal is trained before it is measured", ge=0, le=_BIG
    )
    guard_z: float = key(
        0.0,
        "accuracy guard: roll back only if the drop exceeds max_drop by this many paired "
        "standard errors; 0 = on the measured drop alone (needs max_drop > 0)",
        ge=0,
        le=10,
    )
    k_schedule: str = key(
        "fixed",
        "fixed: k stays; adaptive: k narrows while the guard accepts, widens after a "
        "rollback (needs max_drop > 0)",
        choices=("fixed", "adaptive"),
    )


@dataclass
class AutoFlipConfig:
    """AutoFLIP (methods.md §2): loss exploration, guidance-driven hybrid pruning."""

    explore_fraction: float = key(
        1.0, "share of clients that explore before round 1 (seeded; at least one)", gt=0, le=1
    )
    explore_epochs: int = key(150, "most local epochs of an explorer", ge=1, le=100_000)
    explore_patience: int = key(
        40, "stop exploring after this many epochs without a lower training loss", ge=1, le=100_000
    )
    explore_lr: float = key(0.0, "exploration learning rate (0 = train.lr)", ge=0, le=1000)
    threshold: float = key(
        0.3, "T_p: quantile of normalised guidance (and of unit scores) that is pruned", ge=0, lt=1
    )
    threshold_rule: str = key(
        "share",
        "`share`: prune exactly floor(T_p·N) entries, ties broken by position; `strict`: "
        "the paper's `G > tau`, which also prunes every entry tied at tau",
        choices=("share", "strict"),
    )
    structured: bool = key(True, "also remove whole low-guidance units physically")
    regrow: bool = key(
        False, "each round's mask replaces the one in force; else monotone within the T_p budget"
    )
    refresh: bool = key(True, "recompute the unstructured mask every round from the guidance")
    normalisation: str = key(
        "minmax",
        "per-tensor scaling of the guidance (robust: median/IQR)",
        choices=("minmax", "robust"),
    )
    compat: str = key(
        "paper",
        "`paper`: the method as published; `authors-code`: what the authors' code does "
        "(methods.md §2.7): chained explorers, global model pre-trained on their data, "
        "no structured step, mask applied once and not enforced (docs/autoflip.md)",
        choices=("paper", "authors-code"),
    )
