"""Issue 12: the typed round record, the method's own namespace, the metrics channel and
the Engine protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedprune import registry
from fedprune.config import load_config
from fedprune.engines.common import ACCOUNTING_KEYS, Engine, RoundRecord
from fedprune.experiment import make_engine, prepare_run, run_experiment
from fedprune.methods.base import ClientMethod, ServerMethod


class _Greedy(ServerMethod):
    """Reports figures named like accounting keys, from setup and from after_aggregate."""

    name = "greedy-test"

    def setup(self, io: Any) -> None:
        self.report(sparsity=-1.0, from_setup=1.0)

    def configure_fit(self, rnd: int, cids: list[int]) -> Any:
        self.report(configured=float(rnd))
        return super().configure_fit(rnd, cids)

    def after_aggregate(self, rnd: int, replies: list[Any]) -> dict[str, float]:
        return {"bytes_up": 123.0, "round": 99.0, "test_accuracy": 2.0}


@pytest.fixture
def greedy():  # type: ignore[no-untyped-def]
    registry.register(registry.MethodInfo("greedy-test", _Greedy, ClientMethod), replace=True)
    yield
    registry.unregister("greedy-test")


def test_method_metrics_cannot_overwrite_accounting_keys(tmp_path: Path, greedy) -> None:  # type: ignore[no-untyped-def]
    cfg = load_config(
        overrides=[f"out='{tmp_path}'", "method='greedy-test'", "federation.rounds=2"]
    )
    res = run_experiment(cfg)
    r1, r2 = res.records
    assert r1["round"] == 1 and r2["round"] == 2
    assert r1["bytes_up"] > 1000 and 0 <= r1["test_accuracy"] <= 1 and r1["sparsity"] == 0
    assert r1["method_metrics"] == {
        "sparsity": -1.0,
        "from_setup": 1.0,
        "configured": 1.0,
        "bytes_up": 123.0,
        "round": 99.0,
        "test_accuracy": 2.0,
    }
    # setup figures only in round 1; each round's configure figure in its own record
    assert "from_setup" not in r2["method_metrics"] and r2["method_metrics"]["configured"] == 2.0
    # the record's keys are the declared ones
    for r in res.records:
        assert set(r) <= set(RoundRecord.__annotations__), set(r) - set(RoundRecord.__annotations__)
        assert "method_metrics" not in ACCOUNTING_KEYS


def test_every_key_of_a_real_record_is_declared(tmp_path: Path) -> None:
    cfg = load_config(
        overrides=[
            f"out='{tmp_path}'",
            "federation.rounds=2",
            "federation.local_eval=true",
            "data.local_test_fraction=0.2",
            "engine.fail_rate=0.3",
        ]
    )
    for r in run_experiment(cfg).records:
        assert set(r) <= set(RoundRecord.__annotations__), set(r) - set(RoundRecord.__annotations__)
        assert r["method_metrics"]["target_sparsity"] >= 0


def test_engines_implement_the_protocol(tmp_path: Path) -> None:
    run = prepare_run(load_config(overrides=[f"out='{tmp_path}'", "federation.rounds=1"]))
    assert isinstance(make_engine(run), Engine)
    pytest.importorskip("flwr")
    from fedprune.engines.flower import FlowerSimulationEngine

    assert isinstance(FlowerSimulationEngine.__new__(FlowerSimulationEngine), Engine)
