"""Mask transfer: is it *which* weights a pruned run keeps, or *training* sparse, that costs
accuracy in FedSparsify's 100-client non-IID environment?

REPRODUCTION.md finds that FedSparsify Global at 90% loses about 4.4 points to FedAvg
with 100 two-class clients (10 per round), and only about 0.7 with IID clients. This
script trains FedAvg under a *fixed* mask, taken from the final model of a finished
FedSparsify run, from round 1 (same seed, so the same initial weights the source run
started from), on either split:

- the mask of the IID run, trained on the non-IID split, and the other way round;
- each run's own final mask on its own split (the calibration: what a fixed mask from
  round 1 costs against pruning progressively);
- with ``--mix``, the non-IID split under masks mixed per layer (``fc1`` from the IID
  run and the rest from the non-IID run, and the other way round), to find the layer
  whose mask matters. A mixed mask keeps a slightly different number of weights (the
  two runs split the global budget differently between layers); the table shows it;
- with ``--dense``, the non-IID split under one-shot magnitude masks at 90% taken from
  the final model of the FedAvg run of either split (one global threshold), and from the
  non-IID one with each layer's weights spread evenly over its output units, to tell
  whether non-IID magnitudes give a bad mask, and whether it is their spread over units.

If the non-IID split trains as well under the IID run's mask as under its own, the mask
is not the cause; if it trains better, the non-IID run chose a worse mask. The source
runs are the run directories ``reproduce.py fedsparsify-fmnist-100c`` leaves (non-IID)
and the same with ``--set data.partition=iid --out .../100c-iid`` (IID).

Usage (needs the source runs of every seed asked for)::

    FEDPRUNE_DATA=../shared/data python benchmarks/mask_transfer.py --seeds 0,1,2 --resume

It prints one table row per (split, mask source), with the last-10% accuracy and its gap
to FedAvg of the same seed and split (read from the source claims' FedAvg runs), and
writes ``benchmarks/results/reproduction/mask-transfer/mask-transfer.json``.

The ``fixed-mask`` method is also a small example of a method written outside fedprune:
importing this module registers it (``[fixedmask] source``, a ``model.safetensors``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedprune.core.masks import Masks, apply_masks, prunable_names
from fedprune.core.select import select_lowest
from fedprune.errors import ConfigError
from fedprune.methods.base import ClientMethod, ServerMethod
from fedprune.params import key
from fedprune.registry import MethodInfo, register
from fedprune.rundir import read_metrics
from reproduce import RESULTS, ROOT, _ms, _slug, load_config, run_one, tail_accuracy

CONFIG = ROOT / "configs" / "fedsparsify-fmnist-100c-noniid.toml"
SOURCES = {
    "non-IID": RESULTS / "fedsparsify-fmnist-100c" / "runs",
    "IID": RESULTS / "100c-iid" / "fedsparsify-fmnist-100c" / "runs",
}
"""Split -> the source claim's run directories (``global-0.9-seedN``, ``fedavg-seedN``)."""
PARTITION = {"non-IID": [], "IID": ["data.partition='iid'"]}


@dataclass
class FixedMaskConfig:
    """``[fixedmask]``: where the mask comes from."""

    source: str = key("", "model.safetensors whose zeros in the pruning scope are the mask")


def load_mask(path: Path, names: Sequence[str], shapes: dict[str, torch.Size]) -> Masks:
    """The non-zero pattern of ``path``'s tensors ``names``; ConfigError naming a problem."""
    if not path.is_file():
        raise ConfigError(f"fixedmask.source {path} is not a file")
    tensors = load_file(str(path))
    masks: Masks = {}
    for n in names:
        if n not in tensors:
            raise ConfigError(f"fixedmask.source {path} has no tensor {n}")
        if tensors[n].shape != shapes[n]:
            raise ConfigError(
                f"fixedmask.source {path}: {n} has shape {tuple(tensors[n].shape)}, "
                f"the model {tuple(shapes[n])}"
            )
        masks[n] = tensors[n] != 0
    return masks


class FixedMaskServer(ServerMethod):
    """FedAvg under one mask, read from a finished run's model, in force from round 1."""

    name = "fixed-mask"
    mask_mode = "nonzero"

    def __init__(self, cfg: Any, spec: Any, model: torch.nn.Module) -> None:
        super().__init__(cfg, spec, model)
        self.opts: FixedMaskConfig = cfg.section("fixedmask")
        self.scope = prunable_names(model, cfg.pruning.scope)
        shapes = {n: p.shape for n, p in model.named_parameters()}
        self.source_masks = load_mask(Path(self.opts.source), self.scope, shapes)
        kept = sum(int(m.sum()) for m in self.source_masks.values())
        self.sparsity = 1 - kept / sum(m.numel() for m in self.source_masks.values())

    def setup(self, io: Any) -> None:
        self.masks = self.source_masks
        apply_masks(self.model, self.masks)

    def after_aggregate(self, rnd: int, replies: list[Any]) -> dict[str, float]:
        return {"target_sparsity": self.sparsity}


register(
    MethodInfo(
        "fixed-mask",
        FixedMaskServer,
        ClientMethod,
        "FedAvg under the zeros of a given model.safetensors, from round 1.",
        "benchmarks/mask_transfer.py",
        section="fixedmask",
        config=FixedMaskConfig,
    ),
    replace=True,
)


def source_run(split: str, variant: str, seed: int) -> Path:
    return SOURCES[split] / f"{variant}-seed{seed}"


@functools.cache
def tail_of(run_dir: Path) -> float:
    """Last-10% accuracy of a finished run directory."""
    acc = tail_accuracy(read_metrics(run_dir))
    if acc is None:
        raise SystemExit(f"{run_dir} has no test accuracy")
    return acc


def _units(mask: torch.Tensor) -> dict[str, float]:
    """How a weight matrix's kept entries spread over its output units (rows)."""
    per_row = mask.sum(dim=1).float()
    top = per_row.sort(descending=True).values[:10].sum()
    return {
        "units_with_inputs": int((per_row > 0).sum()),
        "median_per_unit": float(per_row.median()),
        "top10_share": float(top / per_row.sum()) if per_row.sum() > 0 else 0.0,
    }


def mask_overlap(seed: int) -> list[dict[str, Any]]:
    """Per weight tensor: weights kept by the non-IID and the IID run's final mask, the
    Jaccard overlap of the two (a random pair of masks of those sizes overlaps by about
    the product of their densities), and how each spreads over the output units."""
    a, b = (load_file(source_run(s, "global-0.9", seed) / "model.safetensors") for s in SOURCES)
    out = []
    for n in a:
        if n.endswith("weight"):
            ma, mb = a[n] != 0, b[n] != 0
            out.append(
                {
                    "seed": seed,
                    "tensor": n,
                    "size": ma.numel(),
                    "kept_noniid": int(ma.sum()),
                    "kept_iid": int(mb.sum()),
                    "jaccard": float((ma & mb).sum() / (ma | mb).sum()),
                    "units_noniid": _units(ma),
                    "units_iid": _units(mb),
                }
            )
    return out


MIXED = {"IID fc1": ("fc1.",), "IID fc2 + classifier": ("fc2.", "classifier.")}
"""``--mix``: mask label -> the tensors whose mask comes from the IID run (the rest from
the non-IID run); trained on the non-IID split only."""


DENSE = {
    "FedAvg non-IID, global": ("non-IID", False),
    "FedAvg IID, global": ("IID", False),
    "FedAvg non-IID, per unit": ("non-IID", True),
}
"""``--dense``: mask label -> (split, per unit) of a one-shot magnitude mask at 90% of the
weights, from the final model of that split's FedAvg run: one global threshold, or the
same number of weights per layer spread evenly over the layer's output units (each
unit keeps its largest incoming weights); trained on the non-IID split only."""


def magnitude_mask(model: dict[str, torch.Tensor], per_unit: bool) -> dict[str, torch.Tensor]:
    """Keep the 10% largest weights (one global threshold over the weight matrices); with
    ``per_unit`` each layer keeps as many, spread evenly over its rows (output units)."""
    weights = {n: t.abs() for n, t in model.items() if n.endswith("weight")}
    keep = select_lowest(weights, 0.9)
    if not per_unit:
        return {n: m.float() for n, m in keep.items()}
    out = {}
    for n, w in weights.items():
        rows, total = w.shape[0], int(keep[n].sum())
        quota = [total // rows + (1 if r < total % rows else 0) for r in range(rows)]
        m = torch.zeros_like(w)
        for r, q in enumerate(quota):
            m[r, w[r].topk(min(q, w.shape[1])).indices] = 1.0
        out[n] = m
    return out


def mask_file(label: str, seed: int, out: Path) -> Path:
    """The model file whose zeros are the mask ``label`` (a split, or a :data:`MIXED` or
    :data:`DENSE` one)."""
    if label in SOURCES:
        return source_run(label, "global-0.9", seed) / "model.safetensors"
    if label in DENSE:
        split, per_unit = DENSE[label]
        dense = load_file(source_run(split, "fedavg", seed) / "model.safetensors")
        mixed = magnitude_mask(dense, per_unit)
    else:
        noniid, iid = (
            load_file(source_run(s, "global-0.9", seed) / "model.safetensors") for s in SOURCES
        )
        mixed = {n: (iid if n.startswith(MIXED[label]) else noniid)[n] for n in noniid}
    path = out / "masks" / f"{_slug(label)}-seed{seed}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(mixed, str(path))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--resume", action="store_true", help="reuse and continue run directories")
    p.add_argument("--out", type=Path, default=RESULTS / "mask-transfer")
    p.add_argument("--set", dest="extra", action="append", default=[], help="key=value")
    p.add_argument(
        "--mix",
        action="store_true",
        help="also train the non-IID split under masks mixed per layer from the two runs",
    )
    p.add_argument(
        "--dense",
        action="store_true",
        help="also train the non-IID split under one-shot magnitude masks of the FedAvg runs",
    )
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for split in SOURCES:
        for seed in seeds:
            for variant in ("fedavg", "global-0.9"):
                rd = source_run(split, variant, seed)
                if not (rd / "summary.json").is_file():
                    raise SystemExit(f"source run {rd} is not finished; run reproduce.py first")
    conditions = [(split, mask) for split in SOURCES for mask in SOURCES]
    if args.mix:
        conditions += [("non-IID", label) for label in MIXED]
    if args.dense:
        conditions += [("non-IID", label) for label in DENSE]
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        for split, mask_from in conditions:
            src = mask_file(mask_from, seed, args.out)
            cfg = load_config(
                CONFIG,
                [
                    "method='fixed-mask'",
                    f"fixedmask.source='{src}'",
                    f"seed={seed}",
                    *PARTITION[split],
                    *args.extra,
                ],
            )
            rd = args.out / "runs" / f"{split}-data-{_slug(mask_from)}-mask-seed{seed}"
            print(f"{split} data, {mask_from} run's mask, seed {seed} -> {rd}", flush=True)
            summary, records = run_one(cfg, rd, args.resume)
            acc = tail_accuracy(records)
            assert acc is not None
            rows.append(
                {
                    "split": split,
                    "mask_from": mask_from,
                    "seed": seed,
                    "tail_accuracy": acc,
                    "fedavg_tail": tail_of(source_run(split, "fedavg", seed)),
                    "progressive_tail": tail_of(source_run(split, "global-0.9", seed)),
                    "sparsity": summary["final_sparsity"],
                }
            )
    print(
        "\n| data | mask from | seeds | fixed mask, last-10% acc % | vs FedAvg (pt) "
        "| progressive (Global 0.9) vs FedAvg (pt) | sparsity % |"
        "\n| --- | --- | --- | --- | --- | --- | --- |"
    )
    table = []
    for split, mask_from in conditions:
        sel = [r for r in rows if r["split"] == split and r["mask_from"] == mask_from]
        gaps = [100 * (r["tail_accuracy"] - r["fedavg_tail"]) for r in sel]
        prog = [100 * (r["progressive_tail"] - r["fedavg_tail"]) for r in sel]
        accs = [100 * r["tail_accuracy"] for r in sel]
        sparsity = [100 * r["sparsity"] for r in sel]
        cell = {
            "split": split,
            "mask_from": mask_from,
            "seeds": len(sel),
            "acc": _ms(accs),
            "gap_pt": _ms(gaps),
            "progressive_gap_pt": _ms(prog),
            "sparsity": _ms(sparsity),
        }
        table.append(cell)
        if mask_from in SOURCES:
            what = f"{mask_from} run"
        elif mask_from in MIXED:
            what = f"mixed: {mask_from}"
        else:
            what = f"90% of {mask_from}"
        print(
            f"| {split} | {what} | {len(sel)} | {_fmt(accs)} | {_fmt(gaps)} "
            f"| {_fmt(prog)} | {_fmt(sparsity)} |"
        )
    overlap = [o for seed in seeds for o in mask_overlap(seed)]
    print(
        "\n| seed | tensor | weights | kept, non-IID / IID run | Jaccard "
        "| units with inputs | median kept per unit | top-10 units' share % |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for o in overlap:
        u, v = o["units_noniid"], o["units_iid"]
        print(
            f"| {o['seed']} | {o['tensor']} | {o['size']} | {o['kept_noniid']} / "
            f"{o['kept_iid']} | {o['jaccard']:.3f} "
            f"| {u['units_with_inputs']} / {v['units_with_inputs']} "
            f"| {u['median_per_unit']:g} / {v['median_per_unit']:g} "
            f"| {100 * u['top10_share']:.1f} / {100 * v['top10_share']:.1f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/mask_transfer.py " + " ".join(argv or sys.argv[1:])
    payload = {"command": command, "seeds": seeds, "runs": rows, "table": table, "overlap": overlap}
    path = args.out / "mask-transfer.json"
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"\nwritten: {path}")
    return 0


def _fmt(values: Sequence[float]) -> str:
    """Mean ± std in two decimals (the ± part whenever there are several seeds)."""
    mean, std = _ms(values)
    assert mean is not None and std is not None
    return f"{mean:.2f}" + (f" ± {std:.2f}" if len(values) > 1 else "")


if __name__ == "__main__":
    sys.exit(main())
