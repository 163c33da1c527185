"""Issue 14 in the in-process engine: values-only messages change bytes, never results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedprune.config import load_config
from fedprune.core.codec import Support
from fedprune.engines.references import ReferenceBook
from fedprune.experiment import run_experiment
from fedprune.methods.base import ClientMethod


def _cfg(tmp_path: Path, name: str, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        overrides=[
            f"out='{tmp_path}'",
            f"name='{name}'",
            "federation.rounds=4",
            "data.num_clients=5",
            "federation.clients_per_round=3",
            "train.local_epochs=1",
            "engine.checkpoint=false",
            *extra,
        ]
    )


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "method",
    [
        ("method=fedsparsify-global", "pruning.final_sparsity=0.9"),
        ("method=fedsparsify-local", "pruning.final_sparsity=0.9"),
        ("method=prunefl", "pruning.readjust_every=2"),  # explicit masks, regrowth
    ],
)
def test_values_only_changes_bytes_not_results(tmp_path: Path, method: tuple[str, ...]) -> None:
    extra = (*method, "engine.fail_rate=0.2")  # failed and new clients fall back
    lean = run_experiment(_cfg(tmp_path, "lean", *extra))
    full = run_experiment(_cfg(tmp_path, "full", *extra, "engine.values_only=false"))
    _same_weights(lean.model.state_dict(), full.model.state_dict())
    for a, b in zip(lean.records, full.records, strict=True):
        assert a["test_accuracy"] == b["test_accuracy"]
        assert a["bytes_up"] <= b["bytes_up"] and a["bytes_down"] <= b["bytes_down"]
    total = lean.summary["total_bytes_up"] + lean.summary["total_bytes_down"]
    assert total < full.summary["total_bytes_up"] + full.summary["total_bytes_down"]


def test_worker_processes_decode_against_the_clients_memory(tmp_path: Path) -> None:
    extra = ("method=fedsparsify-global", "pruning.final_sparsity=0.9")
    one = run_experiment(_cfg(tmp_path, "one", *extra))
    two = run_experiment(_cfg(tmp_path, "two", *extra, "engine.workers=2"))
    _same_weights(one.model.state_dict(), two.model.state_dict())
    assert [r["bytes_up"] for r in one.records] == [r["bytes_up"] for r in two.records]
    assert [r["bytes_down"] for r in one.records] == [r["bytes_down"] for r in two.records]


def test_bf16_and_compression_run(tmp_path: Path) -> None:
    extra = ("method=fedsparsify-global", "pruning.final_sparsity=0.5")
    base = run_experiment(_cfg(tmp_path, "base", *extra))
    bf16 = run_experiment(_cfg(tmp_path, "bf16", *extra, "engine.wire_dtype='bfloat16'"))
    comp = run_experiment(_cfg(tmp_path, "comp", *extra, "engine.compress=true"))
    _same_weights(base.model.state_dict(), comp.model.state_dict())  # lossless
    assert comp.summary["total_bytes_up"] < base.summary["total_bytes_up"]
    assert bf16.summary["total_bytes_down"] < 0.6 * base.summary["total_bytes_down"]


def test_an_unexpected_array_in_a_reply_drops_only_that_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fit = ClientMethod.fit

    def evil_fit(self, payload, data):  # type: ignore[no-untyped-def]
        reply = fit(self, payload, data)
        if data.cid == 0:
            reply.arrays["evil"] = torch.zeros(4)
        return reply

    monkeypatch.setattr(ClientMethod, "fit", evil_fit)
    res = run_experiment(_cfg(tmp_path, "evil", "method=fedavg", "federation.clients_per_round=0"))
    for rec in res.records:
        assert rec["clients"] == 4
        assert "unexpected array" in rec["failures"][0]


def test_reference_book_state_round_trips() -> None:
    rng = np.random.default_rng(0)
    a = {"w": Support(rng.random(1000) < 0.1), "b": Support(np.ones(7, dtype=bool))}
    b = {"w": Support(rng.random(1000) < 0.2)}
    book = ReferenceBook()
    book.commit(3, a)
    book.commit(1, a)
    book.commit(2, b)
    state = book.state_dict()
    assert len(state["sets"]) == 2  # shared sets saved once
    again = ReferenceBook()
    again.load_state_dict(state)
    assert len(again) == 3 and again.of(3) == a and again.of(2) == b and again.of(5) is None
    assert again.of(1) is again.of(3)
    again.load_state_dict(None)
    assert len(again) == 0
