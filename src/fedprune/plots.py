"""PNG plots of a run: accuracy against rounds and against cumulative megabytes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MB = 1e6


def _evaluated(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r.get("test_accuracy") is not None]


def plot_run(records: Sequence[Mapping[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """Write ``accuracy.png`` and ``accuracy_vs_mb.png``; return their paths."""
    ev = _evaluated(records)
    paths: list[Path] = []
    if not ev:
        return paths
    rounds = [r["round"] for r in ev]
    acc = [100 * r["test_accuracy"] for r in ev]
    mb = [(r["cum_bytes_up"] + r["cum_bytes_down"]) / MB for r in ev]
    dense_mb = [(r["cum_dense_bytes_up"] + r["cum_dense_bytes_down"]) / MB for r in ev]
    spars = [100 * r["sparsity"] for r in ev]

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(rounds, acc, marker=".", label="test accuracy")
    avg = [
        (r["round"], 100 * r["average_test_accuracy"])
        for r in ev
        if r.get("average_test_accuracy") is not None
    ]
    if avg:  # federation.average_decay > 0
        ax.plot(*zip(*avg, strict=True), marker=".", alpha=0.8, label="moving average")
        ax.legend(loc="lower left")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax2 = ax.twinx()
    ax2.plot(rounds, spars, color="tab:red", alpha=0.6, label="sparsity")
    ax2.set_ylabel("weight sparsity (%)", color="tab:red")
    ax2.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out_dir / "accuracy.png"
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(mb, acc, marker=".", label="measured (encoded bytes)")
    ax.plot(dense_mb, acc, linestyle="--", alpha=0.6, label="same rounds, dense fp32")
    ax.set_xlabel("cumulative MB communicated (up + down)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = out_dir / "accuracy_vs_mb.png"
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)
    return paths
