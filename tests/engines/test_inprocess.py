from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fedprune.engines.inprocess as inprocess
import fedprune.engines.references as references
from fedprune.config import load_config
from fedprune.core.codec import encode_payload
from fedprune.experiment import run_experiment

ROUND_KEYS = {
    "round",
    "test_accuracy",
    "test_loss",
    "sparsity",
    "params",
    "nonzero_params",
    "flops",
    "effective_flops",
    "bytes_up",
    "bytes_down",
    "cum_bytes_up",
    "cum_bytes_down",
    "clients",
    "wall_s",
}
SUMMARY_KEYS = {
    "method",
    "dataset",
    "model",
    "rounds",
    "final_accuracy",
    "best_accuracy",
    "dense_params",
    "final_params",
    "final_nonzero_params",
    "dense_flops",
    "final_flops",
    "final_effective_flops",
    "total_bytes_up",
    "total_bytes_down",
    "dense_bytes_up",
    "dense_bytes_down",
    "wall_s",
}


def _cfg(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        overrides=[
            f"out='{tmp_path}'",
            "federation.rounds=3",
            "data.num_clients=4",
            "federation.clients_per_round=3",
            *extra,
        ]
    )


def test_bytes_counted_are_the_encoded_buffer_lengths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[bytes] = []

    def spy(p, **kw):  # type: ignore[no-untyped-def]
        buf = encode_payload(p, **kw)
        made.append(buf)
        return buf

    # broadcasts are encoded by the engine, replies by references.encode_reply
    monkeypatch.setattr(inprocess, "encode_payload", spy)
    monkeypatch.setattr(references, "encode_payload", spy)
    seen: list[tuple[str, bytes]] = []
    marks: list[int] = []
    with inprocess.tap_messages(lambda d, task, cid, buf, refs: seen.append((d, buf))):
        res = run_experiment(
            _cfg(tmp_path, "method=fedsparsify-global", "pruning.final_sparsity=0.8"),
            on_round=lambda rec: marks.append(len(seen)),
        )
    recs = res.records
    # every counted message is a buffer the codec made, counted once per recipient
    assert all(any(buf is m for m in made) for _, buf in seen)
    start = 0
    for r, end in zip(recs, marks, strict=True):
        msgs = seen[start:end]
        down = [b for d, b in msgs if d == "down"]
        up = [b for d, b in msgs if d == "up"]
        assert len(down) == len(up) == r["clients"]
        assert r["bytes_down"] == sum(map(len, down)) and r["bytes_up"] == sum(map(len, up))
        start = end
    assert (
        res.summary["total_bytes_up"]
        == recs[-1]["cum_bytes_up"]
        == sum(r["bytes_up"] for r in recs)
    )
    # sparse payloads are cheaper than dense fp32 ones once pruned
    assert recs[-1]["bytes_down"] < 0.5 * recs[-1]["dense_bytes_down"]
    assert res.summary["final_sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_run_directory_contract(tmp_path: Path) -> None:
    res = run_experiment(_cfg(tmp_path, "method=fedavg"))
    d = res.run_dir
    for name in (
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "model.safetensors",
        "architecture.json",
        "accuracy.png",
        "accuracy_vs_mb.png",
        "label_distribution.png",
    ):
        assert (d / name).is_file(), name
    lines = (d / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        assert set(json.loads(line)) >= ROUND_KEYS
    summary = json.loads((d / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["rounds"] == 3 and summary["method"] == "fedavg"
    assert summary["dense_bytes_down"] == 3 * 3 * 4 * sum(
        t.numel() for t in res.model.state_dict().values()
    )
    from safetensors.torch import load_file

    saved = load_file(str(d / "model.safetensors"))
    for k, v in res.model.state_dict().items():
        assert torch.equal(saved[k], v)


def test_worker_processes_give_the_same_result(tmp_path: Path) -> None:
    a = run_experiment(_cfg(tmp_path, "name='a'", "engine.workers=1"))
    b = run_experiment(_cfg(tmp_path, "name='b'", "engine.workers=2"))
    for k, v in a.model.state_dict().items():
        assert torch.allclose(v, b.model.state_dict()[k], atol=1e-6), k
    assert [r["bytes_up"] for r in a.records] == [r["bytes_up"] for r in b.records]


def test_same_seed_same_run_and_other_seed_differs(tmp_path: Path) -> None:
    a = run_experiment(_cfg(tmp_path, "name='a'"))
    b = run_experiment(_cfg(tmp_path, "name='b'"))
    c = run_experiment(_cfg(tmp_path, "name='c'", "seed=1"))
    assert a.summary["final_accuracy"] == b.summary["final_accuracy"]
    assert [r["sampled"] for r in a.records] == [r["sampled"] for r in b.records]
    assert any(not torch.equal(v, c.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_engine_round_equals_a_plain_loop_bit_for_bit(tmp_path: Path) -> None:
    """Same batches (derive_seed(derive_seed(seed, round), cid)), same FedAvg: same weights."""
    from fedprune.core.aggregation import weighted_average
    from fedprune.core.sampling import derive_seed
    from fedprune.core.training import TrainSettings, train_local
    from fedprune.experiment import load_federation
    from fedprune.methods.base import ModelSpec

    cfg = _cfg(tmp_path, "method=fedavg", "federation.rounds=2", "seed=7")
    fed = load_federation(cfg)
    res = run_experiment(cfg, fed=fed)
    spec = ModelSpec(cfg.model.name, fed.input_shape, fed.num_classes)
    global_state = spec.build(seed=cfg.seed).state_dict()
    for rec in res.records:
        states, weights = [], []
        for cid in rec["sampled"]:
            model = spec.build()
            model.load_state_dict(global_state)
            gen = torch.Generator().manual_seed(
                derive_seed(derive_seed(cfg.seed, rec["round"]), cid)
            )
            c = fed.clients[cid]
            s = TrainSettings(cfg.train.local_epochs, cfg.train.batch_size, cfg.train.lr)
            train_local(model, c.x_train, c.y_train, s, generator=gen)
            states.append(model.state_dict())
            weights.append(c.num_train)
        global_state = weighted_average(states, weights)
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, global_state[k]), k
