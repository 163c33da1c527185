"""Client failures: dropped with a reason, rounds retried, runs stopped cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedprune.cli import main
from fedprune.config import load_config
from fedprune.engines.common import injected_failure
from fedprune.errors import RoundFailedError
from fedprune.experiment import run_experiment


def _cfg(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        overrides=[f"out='{tmp_path}'", "data.num_clients=10", "federation.rounds=6", *extra]
    )


def test_thirty_percent_failing_clients_the_run_completes_and_counts_them(tmp_path: Path) -> None:
    res = run_experiment(_cfg(tmp_path, "engine.fail_rate=0.3", "name='a'"))
    recs = res.records
    assert len(recs) == 6
    failed = sum(r.get("failed", 0) for r in recs)
    assert 6 <= failed <= 30, failed  # about 0.3 * 60 = 18
    for r in recs:
        n_failed = r.get("failed", 0)
        assert r["clients"] == 10 - n_failed, "failed clients are dropped from the round"
        for cid, reason in r.get("failures", {}).items():
            assert "InjectedFailure" in reason and int(cid) in r["sampled"]
    lines = (res.run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(line).get("failed", 0) for line in lines) == failed
    assert res.summary["final_accuracy"] > 0.5
    # deterministic, and independent of the worker count
    again = run_experiment(_cfg(tmp_path, "engine.fail_rate=0.3", "name='b'", "engine.workers=2"))
    assert [r.get("failures") for r in again.records] == [r.get("failures") for r in recs]
    for k, v in res.model.state_dict().items():
        assert torch.allclose(v, again.model.state_dict()[k], atol=1e-6), k


def test_injection_is_a_seeded_draw() -> None:
    draws = [injected_failure(0.3, 12345, cid) for cid in range(1000)]
    assert draws == [injected_failure(0.3, 12345, cid) for cid in range(1000)]
    assert 250 < sum(draws) < 350
    assert not any(injected_failure(0.0, 1, cid) for cid in range(100))


def test_too_few_clients_retries_then_stops_cleanly(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        "engine.fail_rate=0.9",
        "federation.min_clients=8",
        "federation.max_retries=1",
        "name='stop'",
    )
    with pytest.raises(RoundFailedError, match=r"federation\.min_clients=8"):
        run_experiment(cfg)


def test_a_round_with_enough_answers_after_a_retry(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        "engine.fail_rate=0.3",
        "federation.min_clients=9",
        "federation.max_retries=30",
        "federation.rounds=3",
        "name='retry'",
    )
    res = run_experiment(cfg)
    assert all(r["clients"] >= 9 for r in res.records)
    assert any(r.get("attempts", 1) > 1 for r in res.records)


def test_cli_stops_with_one_line_and_keeps_finished_rounds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "run",
            "--out",
            str(tmp_path),
            "--name",
            "x",
            "--clients",
            "10",
            "--rounds",
            "30",
            "--set",
            "engine.fail_rate=0.6",
            "--set",
            "federation.min_clients=8",
            "--set",
            "federation.max_retries=0",
            "--quiet",
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 1 and len(err) == 1 and "min_clients" in err[0]
    finished = tmp_path / "x" / "metrics.jsonl"
    n = len(finished.read_text().splitlines()) if finished.exists() else 0
    assert f"the {n} finished rounds are saved" in err[0]
