"""The cohort path on a CUDA GPU: correctness against the CPU, then speed.

Skipped cleanly (exit 0, one line containing ``skipped``) where torch sees no CUDA
device, so it can run anywhere.

Checks (exit 1 if one fails):

* every model of the zoo (small inputs, 3 clients of unequal size, masks, SGD with
  momentum and Adam): the cohort trained on the GPU in float64 equals ``train_local`` on
  the CPU within max |Δ| ≤ 1e-8 (float64 removes the rounding noise of different kernels;
  dropout masks are drawn on the host from each client's own stream, as on the CPU);
* an engine run (``fedavg``, FC, Fashion-MNIST-shaped synthetic data if the data set is
  absent) with ``engine.cohort=on engine.device=cuda`` against the CPU per-client path:
  max |Δ| ≤ 1e-4 on the final weights (float32), the same bytes on the wire.

Speed (information): the GAP CNN on 20 FEMNIST-sized clients (224 samples each, batch
32, 5 local epochs, synthetic data): per-client loop on the CPU (1 thread) vs the cohort
on the GPU, medians of ``--repeats``.

Usage::

    python benchmarks/gpu.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from _common import machine, median


def _check_zoo() -> list[str]:
    from fedprune.core.cohort import CohortMember, train_cohort
    from fedprune.core.training import TrainSettings, train_local
    from fedprune.models import build_model

    zoo = [
        ("fc", (1, 8, 8), 10, 16),
        ("cnn6", (3, 8, 8), 10, None),
        ("leaf-cnn", (1, 12, 12), 10, None),
        ("gap-cnn", (1, 16, 16), 10, None),
        ("celeba-cnn", (3, 16, 16), 2, None),
        ("resnet7", (3, 12, 12), 2, None),
        ("inception", (1, 15, 15), 10, None),
        ("twocnn", (3, 12, 12), 10, 4),
        ("femnist-cnn", (1, 12, 12), 10, 4),
        ("resnet20", (3, 8, 8), 10, None),
        ("vgg11", (3, 32, 32), 10, None),
    ]
    failures = []
    torch.set_default_dtype(torch.float64)
    try:
        for name, shape, classes, hidden in zoo:
            for opt in ("sgd", "adam"):
                s = TrainSettings(2, 4, 0.05 if opt == "sgd" else 1e-3, opt, momentum=0.9)
                members, refs = [], []
                for j, n in enumerate((6, 3, 10)):
                    g = torch.Generator().manual_seed(j)
                    x = torch.randn(n, *shape, generator=g)
                    y = torch.randint(0, classes, (n,), generator=g)
                    model = build_model(name, shape, classes, hidden=hidden, seed=j)
                    masks = {
                        k: torch.rand(p.shape, generator=g) > 0.3
                        for k, p in model.named_parameters()
                        if p.dim() > 1
                    }
                    state = {k: v.clone() for k, v in model.state_dict().items()}
                    torch.manual_seed(j)
                    gen = torch.Generator().manual_seed(10 + j)
                    members.append(CohortMember(x, y, state, masks, gen, torch.get_rng_state()))
                    torch.manual_seed(j)
                    train_local(
                        model, x, y, s, masks=masks, generator=torch.Generator().manual_seed(10 + j)
                    )
                    refs.append(model.state_dict())
                arch = build_model(name, shape, classes, hidden=hidden, seed=0)
                got = train_cohort(arch, members, s, device="cuda")
                diff = max(
                    (r[k] - res.state[k]).abs().max().item()
                    for r, res in zip(refs, got, strict=True)
                    for k in r
                )
                ok = diff <= 1e-8
                print(f"  {name:12s} {opt:5s} max|Δ| {diff:.1e} {'ok' if ok else 'FAIL'}")
                if not ok:
                    failures.append(f"{name}/{opt}: {diff:.1e}")
    finally:
        torch.set_default_dtype(torch.float32)
    return failures


def _check_engine() -> list[str]:
    import tempfile

    from fedprune.config import load_config
    from fedprune.experiment import run_experiment

    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        base = [
            f"out='{tmp}'",
            "method=fedavg",
            "model.name=fc",
            "data.num_clients=6",
            "federation.clients_per_round=4",
            "federation.rounds=2",
            "engine.checkpoint=false",
        ]
        cpu = run_experiment(load_config(overrides=[*base, "name='cpu'"]))
        gpu = run_experiment(
            load_config(overrides=[*base, "name='gpu'", "engine.cohort=on", "engine.device=cuda"])
        )
    a, b = cpu.model.state_dict(), gpu.model.state_dict()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    same_bytes = [r["bytes_up"] for r in cpu.records] == [r["bytes_up"] for r in gpu.records]
    print(f"  engine fedavg/fc cuda vs cpu: max|Δ| {diff:.1e}, same bytes up: {same_bytes}")
    if diff > 1e-4:
        failures.append(f"engine: {diff:.1e}")
    return failures


def _speed(repeats: int) -> None:
    from fedprune.core.cohort import CohortMember, train_cohort
    from fedprune.core.training import TrainSettings, train_local
    from fedprune.models import build_model

    torch.set_num_threads(1)
    s = TrainSettings(epochs=5, batch_size=32, lr=0.05)
    shape, k, n = (1, 28, 28), 20, 224
    arch = build_model("gap-cnn", shape, 62, seed=0)
    state = {n_: v.clone() for n_, v in arch.state_dict().items()}
    xs = [torch.randn(n, *shape) for _ in range(k)]
    ys = [torch.randint(0, 62, (n,)) for _ in range(k)]

    def per_client() -> None:
        model = build_model("gap-cnn", shape, 62, seed=0)
        for j in range(k):
            model.load_state_dict(state)
            train_local(model, xs[j], ys[j], s, generator=torch.Generator().manual_seed(j))

    def cohort() -> None:
        members = [
            CohortMember(xs[j], ys[j], state, None, torch.Generator().manual_seed(j))
            for j in range(k)
        ]
        train_cohort(arch, members, s, device="cuda")
        torch.cuda.synchronize()

    cohort()  # warm-up (cuDNN autotuning, context)
    tp, tc = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        per_client()
        tp.append(time.perf_counter() - t)
        t = time.perf_counter()
        cohort()
        tc.append(time.perf_counter() - t)
    print(
        f"  GAP CNN, 20 clients x 224, 5 epochs: per-client CPU {median(tp):.2f} s, "
        f"cohort {torch.cuda.get_device_name()} {median(tc):.2f} s, "
        f"{median(tp) / median(tc):.1f}x"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: skipped (torch sees no CUDA device)")
        return 0
    print(machine())
    print("zoo, float64, cohort on cuda vs train_local on cpu:")
    failures = _check_zoo()
    failures += _check_engine()
    print("speed:")
    _speed(args.repeats)
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
