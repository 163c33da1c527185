"""Where along a run does a variant fall behind FedAvg? Windowed accuracy gaps from a
reproduction's JSON.

    python benchmarks/curve_gap.py benchmarks/results/reproduction/CLAIM/CLAIM.json \
        [MORE.json ...] [--windows 4]

The rounds are cut into equal windows. For every variant and window it prints the mean
test accuracy over the evaluations in that window, the gap to the FedAvg run of the same
seed (same evaluation rounds), as mean ± std over seeds, the swing (the mean absolute
change in accuracy from one evaluation to the next inside the window, in points, mean
over seeds), and the variant's sparsity at the window's last round. Single evaluations
on pathological non-IID splits swing by many points; window means show when a gap opens
(e.g. as the sparsity schedule nears its target) and whether it closes.

Several JSON files of one claim (for example a variant run later with its own ``--tag``,
and the committed FedAvg runs of the same seeds) are read as one: their curves are
merged, and a run found in two files must have the same curve in both. With
``--windows 10`` the last window is the last 10% of the rounds, the "last-10%" columns
of ``reproduce.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reproduce import CLAIMS, fedavg_reference

_KEY = re.compile(r"^(?P<label>.*) seed (?P<seed>\d+)$")


def window_gaps(
    curves: dict[str, list[dict[str, Any]]], windows: int, reference: Mapping[str, str]
) -> list[dict[str, Any]]:
    """One row per (variant, window): mean accuracy, gap to FedAvg (same seed), swing
    between consecutive evaluations, sparsity.

    ``reference`` maps a variant's label to its FedAvg variant's (``reproduce.fedavg_reference``).
    """
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for key, pts in curves.items():
        m = _KEY.match(key)
        if m is None:
            raise SystemExit(f"curve key {key!r} is not 'LABEL seed N'")
        runs.setdefault(m["label"], {})[int(m["seed"])] = pts
    labels = list(runs)
    last = max(p["round"] for per in runs.values() for pts in per.values() for p in pts)
    edges = [round(last * i / windows) for i in range(windows + 1)]
    rows = []
    for label in labels:
        ref_label = reference.get(label)
        for lo, hi in itertools.pairwise(edges):
            accs, gaps, spars, swings = [], [], [], []
            for seed, pts in sorted(runs[label].items()):
                mine = {p["round"]: p for p in pts if lo < p["round"] <= hi}
                evald = {r: p["acc"] for r, p in mine.items() if p.get("acc") is not None}
                if not evald:
                    continue
                accs.append(statistics.fmean(evald.values()))
                seq = [evald[r] for r in sorted(evald)]
                if len(seq) > 1:
                    swings.append(
                        100 * statistics.fmean(abs(b - a) for a, b in itertools.pairwise(seq))
                    )
                spars.append(mine[max(mine)].get("sparsity", 0.0))
                ref = runs.get(ref_label or "", {}).get(seed)
                if ref is None:
                    continue
                theirs = {p["round"]: p["acc"] for p in ref if p.get("acc") is not None}
                common = sorted(set(evald) & set(theirs))
                if common:
                    gaps.append(100 * statistics.fmean(evald[r] - theirs[r] for r in common))
            if not accs:
                continue
            rows.append(
                {
                    "variant": label,
                    "rounds": f"{lo + 1}-{hi}",
                    "seeds": len(accs),
                    "acc": 100 * statistics.fmean(accs),
                    "gap": statistics.fmean(gaps) if gaps else None,
                    "gap_std": statistics.stdev(gaps) if len(gaps) > 1 else None,
                    "swing": statistics.fmean(swings) if swings else None,
                    "sparsity": 100 * statistics.fmean(spars) if spars else None,
                }
            )
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| variant | rounds | seeds | mean acc % | vs FedAvg (pt) | swing (pt) "
        "| sparsity at end % |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        gap = "—" if r["gap"] is None else f"{r['gap']:+.2f}"
        if r["gap_std"] is not None:
            gap += f" ± {r['gap_std']:.2f}"
        sp = "—" if r["sparsity"] is None else f"{r['sparsity']:.1f}"
        sw = "—" if r["swing"] is None else f"{r['swing']:.2f}"
        lines.append(
            f"| {r['variant']} | {r['rounds']} | {r['seeds']} | {r['acc']:.2f} | {gap} | {sw} "
            f"| {sp} |"
        )
    return "\n".join(lines)


def merged_curves(results: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """The claim and the union of the curves of ``(name, reproduce.py JSON)`` pairs.

    Raises
    ------
    ValueError
        The files are of different claims, or one run has different curves in two files.
    """
    claim = results[0][1]["claim"]
    curves: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for name, result in results:
        if result["claim"] != claim:
            raise ValueError(f"{name} is of claim {result['claim']!r}, not {claim!r}")
        for key, pts in result["curves"].items():
            if key in curves and curves[key] != pts:
                raise ValueError(f"{key!r} has different curves in {seen[key]} and {name}")
            curves[key], seen[key] = pts, seen.get(key, name)
    return claim, curves


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "result", type=Path, nargs="+", help="CLAIM.json files of one claim (reproduce.py)"
    )
    p.add_argument("--windows", type=int, default=4, help="equal windows of rounds (default 4)")
    args = p.parse_args(argv)
    if args.windows < 1:
        p.error("--windows must be at least 1")
    try:
        name, curves = merged_curves(
            [(str(path), json.loads(path.read_text())) for path in args.result]
        )
        claim = CLAIMS[name]
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read a claim's curves: {exc}", file=sys.stderr)
        return 2
    print(markdown(window_gaps(curves, args.windows, fedavg_reference(claim))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
