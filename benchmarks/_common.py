"""Small helpers shared by the benchmark scripts: CPU time, medians, machine facts, tables."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
from collections.abc import Sequence
from typing import Any

import torch


def seed_list(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """``--seeds`` as a list of integers, each once; a usage error (exit 2) otherwise."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds expects comma-separated integers, got {text!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must list at least one seed, each once, got {text!r}")
    return seeds


def cpu_seconds() -> float:
    """CPU seconds of this process plus its reaped children (fork pools joined so far)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def load_average() -> str:
    """The 1/5/15-minute load averages (other processes compete for the cores)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median(xs: Sequence[float]) -> float:
    """Median of the samples (NaN for none)."""
    return statistics.median(xs) if xs else float("nan")


def machine() -> str:
    """One line: cores, CPU, torch version and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width text table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.3f}"
    return str(c)
