"""Do AutoFLIP's two T_p rules prune different weights in a finished (or set-up) run?

    python benchmarks/autoflip_ties.py RUN_DIR [--threshold 0.3]

Reads the explorers' guidance from the run's checkpoint (already cut to the shrunk
architecture), normalises the mean guidance as the run did (``autoflip.normalisation``)
and builds the unstructured mask twice: ``share`` (exactly floor(T_p·N) entries pruned,
ties broken by position) and ``strict`` (the paper's ``G > tau``: every entry tied at the
threshold pruned). Prints how many entries each prunes, how many the two masks differ
in, and how many guidance values are tied. Where the masks agree, the strict variant of a
claim would give exactly the share variant's run, so it need not be run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fedprune.checkpoint import load_checkpoint
from fedprune.config import load_config
from fedprune.core.criteria import Guidance
from fedprune.core.select import select_lowest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--threshold", type=float, default=None, help="T_p (default: the run's)")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.run_dir)
    if ckpt is None or not ckpt.server.get("guidance"):
        print(f"{args.run_dir}: no checkpoint with AutoFLIP guidance", file=sys.stderr)
        return 2
    cfg = load_config(args.run_dir / "config.toml")
    t_p = cfg.autoflip.threshold if args.threshold is None else args.threshold
    values = Guidance(cfg.autoflip.normalisation)(list(ckpt.server["guidance"].values()))
    share = select_lowest(values, t_p, ties="position")
    strict = select_lowest(values, t_p, ties="threshold")
    flat = torch.cat([v.flatten() for v in values.values()])
    pruned = {
        name: sum(int((~m[k]).sum()) for k in values)
        for name, m in (("share", share), ("strict", strict))
    }
    differ = sum(int((share[k] != strict[k]).sum()) for k in values)
    print(f"{args.run_dir.name}: T_p = {t_p:g}, {flat.numel():,} guided entries")
    print(f"  pruned by the share rule:  {pruned['share']:,}")
    print(f"  pruned by the strict rule: {pruned['strict']:,}")
    print(f"  entries where the masks differ: {differ:,}")
    print(
        f"  distinct normalised guidance values: {flat.unique().numel():,} "
        f"({int((flat == 0).sum()):,} exactly 0)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
