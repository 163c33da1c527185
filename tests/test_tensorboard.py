from __future__ import annotations

from pathlib import Path

import pytest

from fedprune.config import load_config
from fedprune.experiment import run_experiment


def test_tensorboard_scalars_match_the_round_records(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(
        overrides=[
            f"out='{tmp_path}'",
            "name='tb'",
            "federation.rounds=3",
            "data.num_clients=4",
            "engine.tensorboard=true",
        ]
    )
    res = run_experiment(cfg)
    acc = EventAccumulator(str(res.run_dir / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("accuracy/test")]
    want = [(r["round"], r["test_accuracy"]) for r in res.records]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(got, want, strict=True))
    spars = [e.value for e in acc.Scalars("model/sparsity")]
    assert spars[-1] == pytest.approx(res.summary["final_sparsity"], abs=1e-6)
