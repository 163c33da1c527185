"""Which classes does a run's final model get right? Per-class accuracy on the central
test set, for one or more run directories.

    FEDPRUNE_DATA=/work/shared/data python benchmarks/per_class.py RUN_DIR [RUN_DIR ...]

Each run's final model is rebuilt from its run directory (``architecture.json`` and
``model.safetensors``, as ``fedprune export`` does) and evaluated on the global test split
of the data set its ``config.toml`` names. It prints one Markdown row per run: the overall
accuracy (the run's ``final_accuracy`` when the run ended on an evaluation) and the
accuracy on each class's test samples, in percent. Runs of a plugin method need its
module in ``FEDPRUNE_PLUGINS`` (for example ``mask_transfer`` for ``fixed-mask``; this
folder is on the import path). Used in REPRODUCTION.md to show where
a pruned model loses against FedAvg (spread over all classes, or a few).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fedprune.config import load_config
from fedprune.data.datasets import load_dataset
from fedprune.export import load_final_model
from fedprune.registry import load_plugins
from fedprune.rundir import CONFIG


def per_class_accuracy(run_dir: Path) -> tuple[float, list[float]]:
    """Overall and per-class top-1 accuracy (0..1) of ``run_dir``'s final model."""
    cfg = load_config(run_dir / CONFIG)
    bundle = load_dataset(cfg.data.dataset, cfg.data.data_dir or None)
    x = torch.as_tensor(bundle.test.x)
    y = torch.as_tensor(bundle.test.y).long()
    model = load_final_model(run_dir).eval()
    with torch.no_grad():
        pred = torch.cat([model(xb).argmax(dim=1) for xb in x.split(1024)])
    hit = (pred == y).float()
    classes = [
        float(hit[y == c].mean()) if bool((y == c).any()) else float("nan")
        for c in range(bundle.num_classes)
    ]
    return float(hit.mean()), classes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories")
    args = p.parse_args(argv)
    load_plugins()  # $FEDPRUNE_PLUGINS: a plugin method's config section must be known
    rows = [(run, *per_class_accuracy(run)) for run in args.runs]
    k = max(len(c) for _r, _a, c in rows)
    print("| run | acc % | " + " | ".join(f"class {c}" for c in range(k)) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in range(k)) + " |")
    for run, acc, classes in rows:
        cells = " | ".join(f"{100 * v:.1f}" for v in classes)
        print(f"| {run} | {100 * acc:.2f} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
