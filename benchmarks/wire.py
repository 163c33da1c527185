"""Wire format at the limit (issue 14): total bytes against the values-only limit.

Workload: Fashion-MNIST, model ``fc`` (118,282 parameters), 10 clients (sort-and-deal, 2
classes per client: the reproduction's non-IID split), every client every round, SGD lr
0.02, batch 32, seed 1990, ``--rounds`` rounds (default 30) x 1 local epoch: a shortened
version of benchmarks/fedsparsify.py's 40-round setting. Runs:

* ``fedavg``;
* ``fedsparsify-global`` and ``fedsparsify-local`` at 90% final sparsity (polynomial
  schedule, exponent 3, from round 1);
* ``autoflip`` in a small setting (same data, FedAvgM 0.9, one exploration epoch);
* FedSparsify-Global and FedAvg again with ``engine.values_only=false`` (the previous
  wire format: bitmask or COO per tensor) and with ``engine.compress=true``.

For every counted message (tapped from the in-process engine,
:func:`fedprune.engines.inprocess.tap_messages`) the script computes the values-only
limit of a lossless message whose receiver knows what it holds: the message's head and
JSON header, plus per tensor its header (8 + 4 ndim bytes), 4 bytes per non-zero value
(the transported item size), and the information content of its support given the
receiver's reference, ``log2 C(|reference|, |removed|)`` bits when the support lies inside
the reference (the mask change), ``log2 C(numel, nnz)`` bits when there is no usable
reference (a first message). Bytes are ``len()`` of the real buffers.

``--codec-timing`` only times encoding and decoding one fc payload with and without
compression (medians of 15).

Usage::

    FEDPRUNE_DATA=/work/shared/data python benchmarks/wire.py [--rounds 30] [--quick]
    python benchmarks/wire.py --codec-timing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import load_average, machine
from fedprune.config import load_config
from fedprune.core.codec import References, Support, decode_payload, split_payload
from fedprune.engines.inprocess import tap_messages
from fedprune.experiment import run_experiment

SEED = 1990
VALUE_SIZE = {0: 4, 1: 8, 2: 2, 3: 2, 4: 8, 5: 4, 6: 2, 7: 1, 8: 1, 9: 0}
"""Transported item size by the codec's dtype code (bool values are implied)."""

BASE = {
    "data.dataset": "fashion-mnist",
    "model.name": "fc",
    "data.num_clients": 10,
    "data.partition": "sort-and-deal",
    "data.classes_per_client": 2,
    "federation.clients_per_round": 0,
    "train.local_epochs": 1,
    "train.lr": 0.02,
    "train.batch_size": 32,
    "seed": SEED,
    "engine.checkpoint": False,
    "engine.threads": 1,
}
RUNS: dict[str, dict[str, Any]] = {
    "fedavg": {"method": "fedavg"},
    "fedsparsify-global": {"method": "fedsparsify-global", "pruning.final_sparsity": 0.9},
    "fedsparsify-local": {"method": "fedsparsify-local", "pruning.final_sparsity": 0.9},
    "autoflip": {
        "method": "autoflip",
        "federation.aggregation": "fedavgm",
        "federation.server_momentum": 0.9,
        "autoflip.explore_epochs": 1,
    },
    "fedavg (values_only=false)": {"method": "fedavg", "engine.values_only": False},
    "fedsparsify-global (values_only=false)": {
        "method": "fedsparsify-global",
        "pruning.final_sparsity": 0.9,
        "engine.values_only": False,
    },
    "fedavg (compress)": {"method": "fedavg", "engine.compress": True},
    "fedsparsify-global (compress)": {
        "method": "fedsparsify-global",
        "pruning.final_sparsity": 0.9,
        "engine.compress": True,
    },
}


def _log2_choose(n: int, k: int) -> float:
    if k <= 0 or k >= n:
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def message_limit(buf: bytes, refs: References | None) -> tuple[int, int]:
    """``(values-only limit, of which the support/mask-change part)`` of one message."""
    parts = split_payload(buf)
    payload = decode_payload(buf, references=refs)
    total = len(parts.head) + len(parts.header)
    change_bits = 0.0
    for name, t in payload.arrays.items():
        raw = parts.arrays[name]
        vs = VALUE_SIZE[raw[6]]
        sup = Support.of(t)
        total += 8 + 4 * t.dim() + vs * sup.count
        ref = (refs or {}).get(name)
        if ref is not None and ref.numel == sup.numel and not np.any(sup.mask & ~ref.mask):
            change_bits += _log2_choose(ref.count, ref.count - sup.count)
        else:
            change_bits += _log2_choose(sup.numel, sup.count)
    change = math.ceil(change_bits / 8)
    return total + change, change


def run_one(label: str, rounds: int, out: str) -> dict[str, Any]:
    values = {**BASE, **RUNS[label], "federation.rounds": rounds, "out": out}
    values["name"] = label.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "-")
    cfg = load_config(None, [], values)
    sums = {"down": 0, "up": 0, "limit": 0, "change_limit": 0, "messages": 0}

    def tap(direction: str, task: str, cid: int, buf: bytes, refs: References | None) -> None:
        sums[direction] += len(buf)
        limit, change = message_limit(buf, refs)
        sums["limit"] += limit
        sums["change_limit"] += change
        sums["messages"] += 1

    t0 = time.perf_counter()
    with tap_messages(tap):
        res = run_experiment(cfg)
    wall = time.perf_counter() - t0
    last = res.records[-1]
    total = int(last["cum_bytes_up"] + last["cum_bytes_down"])
    assert total == sums["up"] + sums["down"], (total, sums)  # the tap sees every byte
    return {
        "label": label,
        "overrides": RUNS[label],
        "total_bytes": total,
        "bytes_up": int(last["cum_bytes_up"]),
        "bytes_down": int(last["cum_bytes_down"]),
        "limit_bytes": sums["limit"],
        "limit_change_bytes": sums["change_limit"],
        "over_limit": total / sums["limit"] - 1.0,
        "messages": sums["messages"],
        "final_sparsity": float(last["sparsity"]),
        "final_accuracy": last.get("test_accuracy"),
        "wall_s": wall,
    }


def codec_timing(repeats: int = 15) -> None:
    """Encode/decode time of one fc payload, plain vs compressed (medians)."""
    import statistics

    from fedprune.core.codec import Payload, encode_payload
    from fedprune.core.masks import apply_masks
    from fedprune.core.select import select_lowest
    from fedprune.models import build_model

    model = build_model("fc", (1, 28, 28), 10, seed=0)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    scores = {n: p.detach().abs() for n, p in params.items() if p.dim() > 1}
    apply_masks(model, select_lowest(scores, 0.9))
    pruned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    print("\n| payload | compress | bytes | encode ms | decode ms |\n|---|---|---|---|---|")
    for label, state in (("fc, dense (init)", dense), ("fc, 90% pruned (init)", pruned)):
        p = Payload(arrays=state)
        for compress in (False, True):
            enc, dec = [], []
            buf = b""
            for _ in range(repeats):
                t = time.perf_counter()
                buf = encode_payload(p, compress=compress)
                enc.append(time.perf_counter() - t)
                t = time.perf_counter()
                decode_payload(buf)
                dec.append(time.perf_counter() - t)
            print(
                f"| {label} | {compress} | {len(buf):,} | {1e3 * statistics.median(enc):.2f} | "
                f"{1e3 * statistics.median(dec):.2f} |"
            )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds")
    ap.add_argument("--only", nargs="*", default=None, help="run only these labels")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/wire"))
    ap.add_argument("--codec-timing", action="store_true", help="only time the codec")
    args = ap.parse_args(argv)
    if args.codec_timing:
        codec_timing()
        return
    rounds = 3 if args.quick else args.rounds
    argv_list = sys.argv[1:] if argv is None else argv
    env = os.environ.get("FEDPRUNE_DATA")
    prefix = [f"FEDPRUNE_DATA={shlex.quote(env)}"] if env else []
    command = " ".join([*prefix, "python", "benchmarks/wire.py", *map(shlex.quote, argv_list)])
    print("# Wire format at the limit\n")
    print(f"- command: {command}")
    print(f"- machine: {machine()}; load {load_average()}; {rounds} rounds x 1 local epoch\n")
    labels = args.only or list(RUNS)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="wire-bench-") as tmp:
        for label in labels:
            results[label] = r = run_one(label, rounds, tmp)
            print(
                f"{label}: {r['total_bytes']:,} B, limit {r['limit_bytes']:,} B "
                f"({100 * r['over_limit']:+.2f}%), acc {r['final_accuracy']}, "
                f"{r['wall_s']:.0f} s",
                flush=True,
            )
    print("\n| run | total MB | values-only limit MB | over the limit | vs FedAvg |")
    print("|---|---|---|---|---|")
    fedavg = results.get("fedavg")
    for label, r in results.items():
        base = None
        if "compress" in label:
            base = results.get("fedavg (compress)")
        elif "values_only=false" in label:
            base = results.get("fedavg (values_only=false)")
        else:
            base = fedavg
        vs = f"{base['total_bytes'] / r['total_bytes']:.3f}x less" if base else "-"
        print(
            f"| {label} | {r['total_bytes'] / 1e6:.3f} | {r['limit_bytes'] / 1e6:.3f} | "
            f"{100 * r['over_limit']:+.2f}% | {vs} |"
        )
    for method in ("fedavg", "fedsparsify-global"):
        plain, comp = results.get(method), results.get(f"{method} (compress)")
        if plain and comp:
            saved = 1 - comp["total_bytes"] / plain["total_bytes"]
            print(f"\ncompression saves {100 * saved:.2f}% of {method}'s total bytes")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "wire", "command": command, "rounds": rounds, "runs": results}
    (args.out / "wire.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.out / 'wire.json'}")


if __name__ == "__main__":
    main()
