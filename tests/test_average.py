"""``federation.average_decay``: a server-side moving average of the global models,
evaluated beside the model every evaluation round and saved with the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedprune.config import RunConfig, load_config
from fedprune.core.aggregation import ModelAverage
from fedprune.errors import ConfigError
from fedprune.experiment import run_experiment

FC = ["model.name=fc", "model.hidden=32"]


def _cfg(tmp_path: Path, name: str, *extra: str) -> RunConfig:
    return load_config(
        overrides=[
            f"out='{tmp_path}'",
            f"name='{name}'",
            "data.num_clients=6",
            "federation.clients_per_round=3",
            "train.local_epochs=1",
            *FC,
            *extra,
        ]
    )


# ------------------------------------------------------------------------ the average


def test_average_follows_the_formula_and_keeps_the_mask() -> None:
    avg = ModelAverage(0.75)
    w1 = {"w": torch.tensor([4.0, 8.0, -4.0]), "n": torch.tensor(3)}
    w2 = {"w": torch.tensor([0.0, 4.0, 4.0]), "n": torch.tensor(5)}
    avg.update(w1)
    assert torch.equal(avg.state["w"], w1["w"]) and avg.rounds == 1
    assert avg.state["w"] is not w1["w"]  # a copy: later training cannot change it
    avg.update(w2, {"w": torch.tensor([True, True, False])})
    # 0.75 * w1 + 0.25 * w2 = [3, 7, -2]; the mask zeroes the third entry
    assert torch.allclose(avg.state["w"], torch.tensor([3.0, 7.0, 0.0]))
    assert int(avg.state["n"]) == 5 and avg.rounds == 2  # counters follow the model


def test_average_starts_again_when_the_architecture_changes() -> None:
    avg = ModelAverage(0.5)
    avg.update({"w": torch.ones(4)})
    avg.update({"w": torch.zeros(4)})
    assert avg.rounds == 2
    avg.update({"w": torch.full((2,), 7.0)})  # structured pruning shrank the layer
    assert avg.rounds == 1 and torch.equal(avg.state["w"], torch.full((2,), 7.0))


def test_average_state_round_trips() -> None:
    avg = ModelAverage(0.9)
    avg.update({"w": torch.randn(3, 2)})
    avg.update({"w": torch.randn(3, 2)})
    back = ModelAverage(0.9)
    back.load_state_dict(avg.state_dict())
    assert back.rounds == 2 and torch.equal(back.state["w"], avg.state["w"])


@pytest.mark.parametrize(
    "bad", [{"state": [1, 2], "rounds": 1}, {"state": {"w": 3.0}, "rounds": 1}, {"rounds": "2"}]
)
def test_a_damaged_saved_average_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="saved moving average"):
        ModelAverage(0.5).load_state_dict(bad)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_average_needs_a_decay_below_one(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        ModelAverage(decay)


@pytest.mark.parametrize("bad", ["1", "1.5", "-0.2"])
def test_config_refuses_a_decay_outside_zero_to_one(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="average_decay"):
        _cfg(tmp_path, "x", f"federation.average_decay={bad}")


# ------------------------------------------------------------------------- in a run


def test_run_evaluates_and_saves_the_average_of_its_global_models(tmp_path: Path) -> None:
    """FedAvg's rounds do not depend on the run's length, so the 1-, 2- and 3-round runs'
    final models are the global models of rounds 1-3 of the 3-round run."""
    finals = [
        run_experiment(
            _cfg(tmp_path, f"r{n}", "method=fedavg", f"federation.rounds={n}")
        ).model.state_dict()
        for n in (1, 2)
    ]
    res = run_experiment(
        _cfg(
            tmp_path, "avg", "method=fedavg", "federation.rounds=3", "federation.average_decay=0.5"
        )
    )
    w3 = load_file(str(res.run_dir / "model.safetensors"))
    average = load_file(str(res.run_dir / "model_average.safetensors"))
    assert average.keys() == w3.keys()
    for k, t in w3.items():
        if t.is_floating_point():
            want = 0.25 * finals[0][k] + 0.25 * finals[1][k] + 0.5 * t
            assert torch.allclose(average[k], want, atol=1e-6), k
    # training is unchanged: the same final model as without the average
    plain = run_experiment(_cfg(tmp_path, "plain", "method=fedavg", "federation.rounds=3"))
    for k, t in plain.model.state_dict().items():
        assert torch.equal(t, w3[k]), k
    assert "average_test_accuracy" not in plain.records[-1]
    assert not (plain.run_dir / "model_average.safetensors").exists()
    assert "final_average_accuracy" not in plain.summary
    # evaluated every round; the summary and metrics.jsonl carry it
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["method_metrics"]["average_rounds"] for r in recs] == [1, 2, 3]
    assert all(0.0 <= r["average_test_accuracy"] <= 1.0 for r in recs)
    # round 1's average is round 1's model
    assert recs[0]["average_test_accuracy"] == recs[0]["test_accuracy"]
    assert res.summary["final_average_accuracy"] == recs[-1]["average_test_accuracy"]
    assert res.summary["best_average_accuracy"] == max(r["average_test_accuracy"] for r in recs)


def test_average_of_a_pruned_run_is_as_sparse_as_its_model(tmp_path: Path) -> None:
    res = run_experiment(
        _cfg(
            tmp_path,
            "sparse",
            "method=fedsparsify-global",
            "federation.rounds=4",
            "federation.average_decay=0.9",
        )
    )
    model = load_file(str(res.run_dir / "model.safetensors"))
    average = load_file(str(res.run_dir / "model_average.safetensors"))
    assert res.summary["final_sparsity"] > 0.3
    pruned = 0
    for k, t in model.items():
        if k.endswith("weight"):
            zeros = t == 0
            pruned += int(zeros.sum())
            assert torch.all(average[k][zeros] == 0), k
            # the average differs from the model where it keeps weights
            assert not torch.equal(average[k], t), k
    assert pruned > 0


def _shrinking(tmp_path: Path, rounds: int) -> RunConfig:
    """A structured run whose model shrinks in its first rounds, with the average on."""
    return _cfg(
        tmp_path,
        "shrunk",
        "method=autostructured",
        "model.name=twocnn",
        "model.hidden=16",
        "structured.k=1.0",
        f"federation.rounds={rounds}",
        "federation.average_decay=0.5",
    )


def test_average_of_a_shrinking_run_has_the_final_architecture(tmp_path: Path) -> None:
    res = run_experiment(_shrinking(tmp_path, rounds=4))
    assert res.summary["final_params"] < res.summary["dense_params"]  # it did shrink
    model = load_file(str(res.run_dir / "model.safetensors"))
    average = load_file(str(res.run_dir / "model_average.safetensors"))
    assert {k: v.shape for k, v in average.items()} == {k: v.shape for k, v in model.items()}
    # the average starts again in each round whose architecture differs from the last
    changed = 0
    for prev, rec in zip(res.records, res.records[1:], strict=False):
        n, before = rec["method_metrics"]["average_rounds"], prev["method_metrics"]
        if rec["params"] != prev["params"]:
            changed += 1
            assert n == 1, rec["round"]
        else:
            assert n == before["average_rounds"] + 1, rec["round"]
    assert changed > 0


# ------------------------------------------------------- export, compare, report


def test_export_and_report_of_the_average(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedprune.cli import main
    from fedprune.export import load_final_model, read_architecture
    from fedprune.report import write_report

    run = run_experiment(_shrinking(tmp_path, rounds=3)).run_dir
    final, average = load_final_model(run), load_final_model(run, "average")
    saved = load_file(str(run / "model_average.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in average.state_dict().items())
    assert any(not torch.equal(v, final.state_dict()[k]) for k, v in average.state_dict().items())
    # the average has the final (shrunk) architecture, so it exports like the model
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    assert main(["export", str(run), "--weights", "average"]) == 0
    path = run / "model_average.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, *read_architecture(run)["input_shape"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), average(x), atol=1e-4)
        assert not torch.allclose(average(x), final(x), atol=1e-4)
    assert not (run / "model.onnx").exists()  # the final model's default file is untouched
    capsys.readouterr()
    assert main(["export", str(run), "--weights", "best"]) == 2
    assert "unknown weights 'best'" in capsys.readouterr().err
    # the HTML report shows the average's accuracy, per round and at the end
    summary = json.loads((run / "summary.json").read_text())
    summary["latency"] = {"speedup": 1.234}  # as `fedprune latency` stores it
    (run / "summary.json").write_text(json.dumps(summary))
    page = write_report(run).read_text()
    assert "moving average of the global models" in page and "average acc" in page
    assert f"{100 * summary['final_average_accuracy']:.2f}%" in page
    assert "1.23x" in page


def test_export_of_a_run_without_an_average_names_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedprune.cli import main
    from fedprune.report import write_report

    res = run_experiment(_cfg(tmp_path, "plain", "method=fedavg", "federation.rounds=1"))
    assert main(["export", str(res.run_dir), "--weights", "average"]) == 2
    err = capsys.readouterr().err
    assert "model_average.safetensors" in err and "federation.average_decay" in err
    page = write_report(res.run_dir).read_text()
    assert "average acc" not in page and "moving average" not in page


def test_compare_adds_the_average_column_only_when_runs_keep_one(tmp_path: Path) -> None:
    from fedprune.compare import run_compare

    common = [f"out='{tmp_path}'", "federation.rounds=2", "data.num_clients=4"]
    common += ["federation.clients_per_round=2", *FC]
    cfg = load_config(overrides=[*common, "federation.average_decay=0.5"])
    out, rows = run_compare(cfg, ["fedavg", "fedsparsify-global"], seeds=[0, 1], out=tmp_path / "a")
    md = (out / "comparison.md").read_text()
    assert "| average acc % |" in md
    for row in rows:
        sums = [
            json.loads((out / "runs" / f"{row['method']}-seed{s}" / "summary.json").read_text())
            for s in (0, 1)
        ]
        mean = sum(s["final_average_accuracy"] for s in sums) / 2
        assert row["final_average_accuracy"] == pytest.approx(mean)
        cells = [c.strip() for c in md.split(f"| {row['method']} |")[1].split("|")]
        assert cells[2].startswith(f"{100 * mean:,.2f}")  # after final and best accuracy
    plain_out, _ = run_compare(load_config(overrides=common), ["fedavg"], out=tmp_path / "b")
    assert "average acc" not in (plain_out / "comparison.md").read_text()
