"""The cohort path (``engine.cohort``): a round's clients trained as one batched
computation give what the per-client path gives.

Tolerances. In float64 the batched computation is the same arithmetic as ``train_local``
up to summation order: every model of the zoo, SGD (momentum, weight decay) and Adam,
masks, unequal clients with short last batches, BatchNorm and dropout agree within
max |Δ| ≤ 1e-9 on every weight and buffer. In float32 (what runs use) the order of
summation inside different kernels (grouped vs plain convolution, ``baddbmm`` vs
``addmm``) differs by rounding; one round of every method on the FC model agrees within
max |Δ| ≤ 1e-5, and the zeros of the pruned positions are exact. (Rounding differences
grow with BatchNorm on small batches exactly as they do on the per-client path itself
between one and two torch threads.)
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fedprune.engines.cohort as cohort_engine
from fedprune.config import load_config
from fedprune.core.cohort import CohortMember, cohort_support, train_cohort
from fedprune.core.training import TrainSettings, make_optimizer, train_local
from fedprune.experiment import resume_experiment, run_experiment
from fedprune.models import build_model

REPO = Path(__file__).resolve().parents[2]

# (name, input shape, classes, hidden): small inputs keep the test fast
ZOO = [
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
    ("vgg16", (3, 32, 32), 10, None),
]
SIZES = [6, 3, 10]  # batch 4: 2, 1 and 3 steps per epoch, short last batches, padding
HEAVY = {"vgg11", "vgg16"}  # 9-15 M parameters at 32x32: one epoch, fewer examples
HEAVY_SIZES = [2, 4, 6]


@pytest.fixture
def float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _members(
    name: str, shape: tuple[int, int, int], classes: int, hidden: int | None
) -> tuple[nn.Module, list[tuple[nn.Module, CohortMember, int]]]:
    out = []
    for j, n in enumerate(HEAVY_SIZES if name in HEAVY else SIZES):
        g = torch.Generator().manual_seed(100 + j)
        x = torch.randn(n, *shape, generator=g)
        y = torch.randint(0, classes, (n,), generator=g)
        model = build_model(name, shape, classes, hidden=hidden, seed=1 + j)
        masks = None
        if j != 1:  # client 1 trains dense
            masks = {
                k: torch.rand(p.shape, generator=g) > 0.3
                for k, p in model.named_parameters()
                if p.dim() > 1
            }
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(7 + j)  # the dropout stream of this client's task
        member = CohortMember(
            x, y, state, masks, torch.Generator().manual_seed(50 + j), torch.get_rng_state()
        )
        out.append((model, member, 7 + j))
    return build_model(name, shape, classes, hidden=hidden, seed=0), out


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize(("name", "shape", "classes", "hidden"), ZOO, ids=[z[0] for z in ZOO])
def test_every_zoo_model_trains_as_train_local_would(
    float64: None,
    name: str,
    shape: tuple[int, int, int],
    classes: int,
    hidden: int | None,
    optimizer: str,
) -> None:
    epochs = 1 if name in HEAVY else 2
    if optimizer == "sgd":
        s = TrainSettings(epochs, 4, 0.05, "sgd", momentum=0.9, weight_decay=1e-3, prox_mu=0.5)
    else:
        s = TrainSettings(epochs, 4, 1e-3, "adam", weight_decay=1e-3)
    arch, clients = _members(name, shape, classes, hidden)
    assert cohort_support(arch) is None
    results = train_cohort(arch, [m for _, m, _ in clients], s)
    for j, ((model, member, seed), res) in enumerate(zip(clients, results, strict=True)):
        torch.manual_seed(seed)
        stats = train_local(
            model,
            member.x,
            member.y,
            s,
            masks=member.masks,
            generator=torch.Generator().manual_seed(50 + j),
        )
        assert res.stats.steps == stats.steps and res.stats.num_examples == stats.num_examples
        assert abs(res.stats.loss - stats.loss) <= 1e-9
        assert torch.equal(res.rng_state, torch.get_rng_state())  # the dropout stream
        for k, v in model.state_dict().items():
            assert res.state[k].dtype == v.dtype and res.state[k].shape == v.shape, k
            assert (res.state[k].double() - v.double()).abs().max().item() <= 1e-9, k
        for k, keep in (member.masks or {}).items():  # pruned entries are exactly +0.0
            pruned = res.state[k][~keep]
            assert bool((pruned == 0).all()) and not bool(torch.signbit(pruned).any()), k


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_padded_client_keeps_its_parameters_and_optimizer_state(
    float64: None, optimizer: str
) -> None:
    """Client 0 has 1 step, client 1 has 4: the 3 padding steps leave client 0 exactly
    where its last real step left it (as torch.optim holds it after train_local)."""
    s = TrainSettings(
        1, 4, 0.05 if optimizer == "sgd" else 1e-3, optimizer, momentum=0.9, prox_mu=0.5
    )
    shape = (1, 6, 6)
    init = build_model("fc", shape, 5, hidden=8, seed=3)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, *shape, generator=g) for n in (4, 16)]
    ys = [torch.randint(0, 5, (n,), generator=g) for n in (4, 16)]
    state = {k: v.clone() for k, v in init.state_dict().items()}
    members = [
        CohortMember(x, y, state, None, torch.Generator().manual_seed(9))
        for x, y in zip(xs, ys, strict=True)
    ]
    padded = train_cohort(init, members, s)[0]

    model = build_model("fc", shape, 5, hidden=8, seed=3)
    opt = make_optimizer(model, s)
    idx = torch.randperm(4, generator=torch.Generator().manual_seed(9))
    loss = nn.functional.cross_entropy(model(xs[0][idx]), ys[0][idx])
    loss.backward()
    opt.step()
    assert padded.stats.steps == 1
    for k, v in model.state_dict().items():
        assert (padded.state[k] - v).abs().max().item() <= 1e-12, k
    for k, p in model.named_parameters():
        ref = opt.state[p]
        got = padded.optimizer_state[k]
        assert set(got) == set(ref), k
        for key, value in ref.items():
            assert (got[key].double() - value.double()).abs().max().item() <= 1e-12, (k, key)
    if optimizer == "adam":
        assert all(float(v["step"]) == 1.0 for v in padded.optimizer_state.values())


def test_unsupported_layers_are_named() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.LayerNorm(4))
    assert cohort_support(model) == "2: no batched form for LayerNorm"


# --------------------------------------------------------------------------- the engine

FC = ["model.name=fc", "model.hidden=32"]
CNN = ["model.name=twocnn", "model.hidden=8"]
METHODS: dict[str, list[str]] = {
    "fedavg": ["method=fedavg", *FC],
    "fedavgm-adam": [
        "method=fedavg",
        "federation.aggregation=fedavgm",
        "train.optimizer=adam",
        "train.lr=0.001",
        *FC,
    ],
    "fedsparsify-global": ["method=fedsparsify-global", *FC],
    "fedsparsify-local": ["method=fedsparsify-local", "federation.aggregation=fedavgm", *FC],
    "omp": ["method=omp", *FC],
    "snip": ["method=snip", *FC],
    "grasp": ["method=grasp", *FC],
    "random": ["method=random", *FC],
    "prunefl": ["method=prunefl", "pruning.readjust_every=2", *FC],
    "autoflip": [
        "method=autoflip",
        "autoflip.explore_epochs=1",
        "autoflip.explore_patience=1",
        "autoflip.explore_fraction=0.5",
        *CNN,
    ],
    "autostructured": ["method=autostructured", "structured.k=1.0", *CNN],
}


def _cfg(tmp_path: Path, name: str, *extra: str) -> Any:
    return load_config(
        overrides=[
            f"out='{tmp_path}'",
            f"name='{name}'",
            "data.num_clients=6",
            "data.partition=dirichlet",  # unequal client sizes
            "federation.clients_per_round=4",
            "federation.rounds=2",
            "train.local_epochs=1",
            "train.batch_size=16",
            *extra,
        ]
    )


@pytest.fixture
def cohort_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many clients each batched computation of the engine trained."""
    calls: list[int] = []
    real = cohort_engine.train_cohort

    def spy(model: nn.Module, members: list[CohortMember], *a: Any, **k: Any) -> Any:
        calls.append(len(members))
        return real(model, members, *a, **k)

    monkeypatch.setattr(cohort_engine, "train_cohort", spy)
    return calls


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_cohort_round_equals_the_per_client_round(
    tmp_path: Path, method: str, cohort_calls: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    extra = [*METHODS[method], "federation.rounds=1"]
    ref = run_experiment(_cfg(tmp_path, "ref", *extra))
    assert not cohort_calls
    with caplog.at_level(logging.INFO, logger="fedprune.engines.inprocess"):
        got = run_experiment(_cfg(tmp_path, "cohort", *extra, "engine.cohort=auto"))
    fallbacks = [r.getMessage() for r in caplog.records if "per-client training" in r.message]
    if cohort_calls:
        assert not fallbacks
        assert sum(cohort_calls) == got.records[0]["clients"]
    else:  # a client half that overrides fit: one line says why
        assert len(fallbacks) == 1 and "overrides fit" in fallbacks[0], fallbacks
    a, b = ref.model.state_dict(), got.model.state_dict()
    assert _max_diff(a, b) <= 1e-5
    for k in a:  # the exact zeros (masks) are the same
        assert torch.equal(a[k] == 0, b[k] == 0), k
    assert ref.records[0]["sampled"] == got.records[0]["sampled"]
    assert ref.records[0]["clients"] == got.records[0]["clients"]


def test_dropout_batchnorm_model_over_rounds_with_chunks_and_workers(
    tmp_path: Path, cohort_calls: list[int]
) -> None:
    """cnn6 (BatchNorm, dropout): chunks of 3 and 2 worker sub-cohorts, every client of
    every round on the cohort path, close to the per-client path."""
    extra = [
        "method=fedavg",
        "model.name=cnn6",
        "data.num_clients=5",
        "federation.rounds=2",
        "train.lr=0.01",
    ]
    ref = run_experiment(_cfg(tmp_path, "ref", *extra))
    one = run_experiment(_cfg(tmp_path, "one", *extra, "engine.cohort=on", "engine.cohort_size=3"))
    assert cohort_calls == [3, 1, 3, 1]
    two = run_experiment(_cfg(tmp_path, "two", *extra, "engine.cohort=on", "engine.workers=2"))
    # float32 rounding grows through BatchNorm on small batches (the per-client path moves
    # as much between 1 and 2 torch threads); the float64 test above shows exactness
    assert _max_diff(ref.model.state_dict(), one.model.state_dict()) <= 1e-3
    assert _max_diff(one.model.state_dict(), two.model.state_dict()) <= 1e-3
    for ra, rb in zip(one.records, two.records, strict=True):  # the train_loss digits vary
        assert ra["clients"] == rb["clients"] and abs(ra["bytes_up"] - rb["bytes_up"]) <= 64


def test_failure_injection_and_validation_on_the_cohort_path(tmp_path: Path) -> None:
    extra = [
        "method=fedsparsify-global",
        *FC,
        "engine.fail_rate=0.4",
        "federation.min_clients=1",
        "validation.max_update_norm=1000",
    ]
    ref = run_experiment(_cfg(tmp_path, "ref", *extra))
    got = run_experiment(_cfg(tmp_path, "cohort", *extra, "engine.cohort=on"))
    assert any(r.get("failed") for r in ref.records)
    for ra, rb in zip(ref.records, got.records, strict=True):
        assert ra.get("failures") == rb.get("failures")
        assert ra["clients"] == rb["clients"] and ra.get("rejected") == rb.get("rejected")
    assert _max_diff(ref.model.state_dict(), got.model.state_dict()) <= 1e-5


class Crash(Exception):
    pass


def test_a_resumed_cohort_run_ends_exactly_like_an_uninterrupted_one(tmp_path: Path) -> None:
    extra = [
        "method=fedsparsify-local",
        "federation.aggregation=fedavgm",
        *FC,
        "federation.rounds=4",
        "engine.cohort=on",
    ]
    ref = run_experiment(_cfg(tmp_path, "ref", *extra))

    def crash(rec: dict[str, Any]) -> None:
        if rec["round"] == 3:
            raise Crash

    with pytest.raises(Crash):
        run_experiment(_cfg(tmp_path, "crashed", *extra), on_round=crash)  # type: ignore[arg-type]
    res = resume_experiment(tmp_path / "crashed")
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, res.model.state_dict()[k]), k
    assert [r["bytes_up"] for r in ref.records] == [r["bytes_up"] for r in res.records]


def test_unavailable_device_falls_back_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cohort_calls: list[int]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with caplog.at_level(logging.INFO, logger="fedprune.engines.inprocess"):
        run_experiment(_cfg(tmp_path, "x", *FC, "engine.cohort=on", "engine.device=cuda"))
    lines = [r.getMessage() for r in caplog.records if "per-client training" in r.message]
    assert len(lines) == 1 and "CUDA" in lines[0]
    assert not cohort_calls


def test_gpu_benchmark_is_skipped_cleanly_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run benchmarks/gpu.py itself")
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "skipped" in out.stdout


def test_fedprox_run_on_the_cohort_path_equals_the_per_client_run(tmp_path: Path) -> None:
    extra = [*METHODS["fedsparsify-global"], "train.prox_mu=0.3", "train.momentum=0.9"]
    ref = run_experiment(_cfg(tmp_path, "ref", *extra))
    got = run_experiment(_cfg(tmp_path, "cohort", *extra, "engine.cohort=on"))
    assert _max_diff(ref.model.state_dict(), got.model.state_dict()) <= 1e-5
    plain = run_experiment(_cfg(tmp_path, "plain", *METHODS["fedsparsify-global"]))
    assert _max_diff(ref.model.state_dict(), plain.model.state_dict()) > 1e-4  # it acts
