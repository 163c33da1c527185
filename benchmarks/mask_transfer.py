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
- with ``--dense``, the non-IID split under one-shot masks at 90% taken from the final
  model of the FedAvg run of either split: by magnitude (one global threshold), and from
  the non-IID one with each layer's weights spread evenly over its output units, by
  distance from the initial weights, by weight x input spread, and at random (see
  :data:`DENSE`), to tell whether non-IID magnitudes give a bad mask, and whether
  another score of the same model gives a better one. It also prints how far each
  FedAvg model's weights moved from their initial values;
- with ``--average``, FedAvg and Global 0.9 trained again on the non-IID split with a
  moving average of their global models kept on the server (``federation.average_decay
  = 0.9``), to compare the averages' test accuracy:
  is the gap to FedAvg round-to-round noise that averaging removes?

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

from _common import seed_list
from fedprune.core.masks import Masks, apply_masks, prunable_names
from fedprune.core.select import select_lowest
from fedprune.errors import ConfigError
from fedprune.experiment import load_federation, model_spec, state_fingerprint
from fedprune.methods.base import ClientMethod, ServerMethod
from fedprune.params import key
from fedprune.registry import MethodInfo, register
from fedprune.rundir import AVERAGE_WEIGHTS, read_metrics
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


AVERAGED = {"fedavg": "fedavg", "global-0.9": "fedsparsify-global"}
"""Source variant -> its method, trained again with ``federation.average_decay``."""

AVERAGE_DECAY = 0.9
"""Weight of the previous average at each round."""


def ema_run(variant: str, seed: int, out: Path) -> Path:
    """The run directory :func:`ema_model` trains ``variant`` of ``seed`` in; the average
    is its ``model_average.safetensors``."""
    return out / "runs" / f"non-IID-{variant}-ema-seed{seed}"


def ema_model(
    variant: str, seed: int, out: Path, resume: bool, extra: Sequence[str]
) -> dict[str, Any]:
    """Train the source ``variant`` (a key of :data:`AVERAGED`) again on the non-IID split
    (its config and seed) with a moving average of its global models, which the run
    writes; the test accuracy of its final model and of the average."""
    rd = ema_run(variant, seed, out)
    path = rd / AVERAGE_WEIGHTS
    cfg = load_config(
        CONFIG,
        [
            f"method='{AVERAGED[variant]}'",
            f"federation.average_decay={AVERAGE_DECAY}",
            f"seed={seed}",
            *extra,
        ],
    )
    print(f"non-IID data, {variant} with a moving average, seed {seed} -> {rd}", flush=True)
    run_one(cfg, rd, resume)
    if not path.is_file():
        raise SystemExit(f"{rd} finished without writing {path}")
    source = source_run("non-IID", variant, seed)
    final = accuracy_on_test(load_file(rd / "model.safetensors"), seed)
    average = accuracy_on_test(load_file(path), seed)
    print(
        f"  last-10% accuracy {100 * tail_of(rd):.2f}% (the source run: "
        f"{100 * tail_of(source):.2f}%); test accuracy of the final model "
        f"{100 * final:.2f}%, of the moving average {100 * average:.2f}%",
        flush=True,
    )
    return {"variant": variant, "seed": seed, "final_model": final, "moving_average": average}


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
    "FedAvg non-IID, global": ("non-IID", "global"),
    "FedAvg IID, global": ("IID", "global"),
    "FedAvg non-IID, per unit": ("non-IID", "per unit"),
    "FedAvg non-IID, moved from init": ("non-IID", "moved"),
    "FedAvg IID, moved from init": ("IID", "moved"),
    "FedAvg non-IID, weight x input std": ("non-IID", "activation"),
    "FedAvg non-IID, random per layer": ("non-IID", "random"),
    "FedAvg non-IID moving average, global": ("non-IID EMA", "global"),
}
"""``--dense``: mask label -> (split, rule) of a one-shot mask at 90% of the weights, from
the final model of that split's FedAvg run: its largest weights by magnitude with one
global threshold (``global``); the same number of weights per layer spread evenly over
the layer's output units, each unit keeping its largest incoming weights (``per
unit``); or the weights that moved furthest from their initial values, ``|w - w0|``,
with one global threshold (``moved``); or, with the per-layer counts of ``global``, each
layer's largest ``|w_ij| * std(x_j)``, ``std(x_j)`` the standard deviation of the layer's
input ``j`` over all clients' training samples (``activation``: Wanda's score with the
spread instead of the norm of the input, so a weight on a constant input, which acts as
a bias, scores 0; clients could report the sums and sums of squares, 2 x 784 numbers for
``fc1``); or, with the same per-layer counts, positions drawn at random (``random``,
seeded by the run's seed). Split ``non-IID EMA``: the moving average of the non-IID
FedAvg run's global models over the rounds (:class:`EmaFedAvgServer`, decay 0.9, about
the last 10 rounds) instead of its final model. Trained on the non-IID split only."""


@functools.cache
def federation(seed: int) -> Any:
    """The source runs' federation (clients' data and test set) for ``seed``."""
    return load_federation(load_config(CONFIG, [f"seed={seed}"]))


def initial_model(seed: int) -> torch.nn.Module:
    """The source runs' model as a run of ``seed`` builds it (its initial weights)."""
    return model_spec(load_config(CONFIG, [f"seed={seed}"]), federation(seed)).build(seed=seed)


def loaded(model_state: dict[str, torch.Tensor], seed: int) -> torch.nn.Module:
    """The source runs' model with ``model_state`` loaded, in eval mode."""
    model = initial_model(seed)
    model.load_state_dict(model_state)
    return model.eval()


def accuracy_on_test(model_state: dict[str, torch.Tensor], seed: int) -> float:
    """Accuracy of ``model_state`` on the global test set."""
    fed = federation(seed)
    with torch.no_grad():
        logits = loaded(model_state, seed)(fed.x_test)
    return float((logits.argmax(1) == fed.y_test).float().mean())


def input_std(model_state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Per linear layer's weight name: the standard deviation of each of its inputs over
    every client's training samples, with ``model_state`` loaded into the source runs'
    model."""
    fed = federation(seed)
    model = loaded(model_state, seed)
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    count = 0

    def hook(name: str) -> Any:
        def record(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], _o: Any) -> None:
            x = args[0].flatten(1)
            sums[name] = sums.get(name, 0) + x.sum(0, dtype=torch.float64)
            squares[name] = squares.get(name, 0) + x.pow(2).sum(0, dtype=torch.float64)

        return record

    handles = [
        m.register_forward_hook(hook(f"{n}.weight"))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        for client in fed.clients:
            for chunk in client.x_train.split(1024):
                model(chunk)
                count += len(chunk)
    for h in handles:
        h.remove()
    return {
        n: (squares[n] / count - (v / count) ** 2).clamp(min=0).sqrt().float()
        for n, v in sums.items()
    }


@functools.cache
def initial_weights(seed: int) -> dict[str, torch.Tensor]:
    """The weights the source runs of ``seed`` started from (checked by ``init_sha``)."""
    model = initial_model(seed)
    sha = json.loads((source_run("non-IID", "fedavg", seed) / "summary.json").read_text())
    if sha.get("init_sha") != state_fingerprint(model.state_dict()):
        raise SystemExit(f"seed {seed}: the rebuilt initial model differs from the source run's")
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def one_shot_mask(
    model: dict[str, torch.Tensor],
    rule: str,
    init: dict[str, torch.Tensor] | None = None,
    spread: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Keep 10% of the weight matrices' entries by ``rule`` (see :data:`DENSE`); ``init``
    (the initial weights) is needed for ``moved``, ``spread`` (:func:`input_std`) for
    ``activation``; ``seed`` draws the ``random`` positions."""
    if rule == "moved":
        assert init is not None
        weights = {n: (t - init[n]).abs() for n, t in model.items() if n.endswith("weight")}
    else:
        weights = {n: t.abs() for n, t in model.items() if n.endswith("weight")}
    keep = select_lowest(weights, 0.9)
    if rule in ("activation", "random"):
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for n, w in weights.items():
            if rule == "random":
                score = torch.rand(w.numel(), generator=gen)
            else:
                assert spread is not None
                score = (w * spread[n].unsqueeze(0)).flatten()
            m = torch.zeros_like(score)
            m[score.topk(int(keep[n].sum())).indices] = 1.0
            out[n] = m.view_as(w)
        return out
    if rule != "per unit":
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


def movement(seed: int) -> list[dict[str, Any]]:
    """Per split and weight tensor of the FedAvg runs: how far the final weights moved
    from the initial ones (RMS), how much the final magnitudes still follow the initial
    ones (Pearson correlation of ``|w|`` and ``|w0|``), and the share of the 10% largest
    final weights that were already among the 10% largest initial weights (10% if
    unrelated)."""
    init = initial_weights(seed)
    out = []
    for split in SOURCES:
        final = load_file(source_run(split, "fedavg", seed) / "model.safetensors")
        for n, w in final.items():
            if not n.endswith("weight"):
                continue
            w0 = init[n]
            k = max(1, w.numel() // 10)
            top = set(w.abs().flatten().topk(k).indices.tolist())
            top0 = set(w0.abs().flatten().topk(k).indices.tolist())
            pair = torch.stack([w.abs().flatten(), w0.abs().flatten()])
            out.append(
                {
                    "seed": seed,
                    "split": split,
                    "tensor": n,
                    "init_rms": float(w0.pow(2).mean().sqrt()),
                    "moved_rms": float((w - w0).pow(2).mean().sqrt()),
                    "corr_final_init": float(torch.corrcoef(pair)[0, 1]),
                    "top10_from_init": len(top & top0) / k,
                }
            )
    return out


def mask_file(label: str, seed: int, out: Path) -> Path:
    """The model file whose zeros are the mask ``label`` (a split, or a :data:`MIXED` or
    :data:`DENSE` one)."""
    if label in SOURCES:
        return source_run(label, "global-0.9", seed) / "model.safetensors"
    if label in DENSE:
        split, rule = DENSE[label]
        if split == "non-IID EMA":
            dense = load_file(ema_run("fedavg", seed, out) / AVERAGE_WEIGHTS)
        else:
            dense = load_file(source_run(split, "fedavg", seed) / "model.safetensors")
        mixed = one_shot_mask(
            dense,
            rule,
            init=initial_weights(seed) if rule == "moved" else None,
            spread=input_std(dense, seed) if rule == "activation" else None,
            seed=seed,
        )
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
        "--average",
        action="store_true",
        help="train FedAvg and Global 0.9 again on the non-IID split with a moving average "
        "of their global models, and compare the averages' test accuracy",
    )
    p.add_argument(
        "--dense",
        action="store_true",
        help="also train the non-IID split under one-shot magnitude masks of the FedAvg runs",
    )
    args = p.parse_args(argv)
    seeds = seed_list(p, args.seeds)
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
    averaged = ["fedavg"] if args.dense else []
    if args.average:
        averaged = list(AVERAGED)
    averages = [ema_model(v, s, args.out, args.resume, args.extra) for s in seeds for v in averaged]
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
    moved = [m for seed in seeds for m in movement(seed)] if args.dense else []
    if moved:
        print(
            "\n| seed | split | tensor | initial RMS | moved RMS, final − initial "
            "| corr(abs final, abs initial) | top 10% final also top 10% initial |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for m in moved:
            print(
                f"| {m['seed']} | {m['split']} | {m['tensor']} | {m['init_rms']:.4f} "
                f"| {m['moved_rms']:.4f} | {m['corr_final_init']:.3f} "
                f"| {100 * m['top10_from_init']:.1f}% |"
            )
    if averages:
        print(
            "\n| non-IID run | seeds | final model, test acc % "
            "| moving average of its global models (decay 0.9), test acc % "
            "| vs FedAvg's, final (pt) | vs FedAvg's, average (pt) |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        fedavg = {a["seed"]: a for a in averages if a["variant"] == "fedavg"}  # always run
        keys = ("final_model", "moving_average")
        for v in averaged:
            sel = [a for a in averages if a["variant"] == v]
            accs = [_fmt([100 * a[k] for a in sel]) for k in keys]
            gaps = [_fmt([100 * (a[k] - fedavg[a["seed"]][k]) for a in sel]) for k in keys]
            print(f"| {v} | {len(sel)} | " + " | ".join(accs + gaps) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/mask_transfer.py " + " ".join(argv or sys.argv[1:])
    payload = {
        "command": command,
        "seeds": seeds,
        "runs": rows,
        "table": table,
        "overlap": overlap,
        "movement": moved,
        "moving_average": averages,
    }
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
