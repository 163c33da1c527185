from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedprune.config import load_config
from fedprune.core.codec import Payload, decode_payload, encode_payload
from fedprune.core.structured import example_input, replay
from fedprune.errors import ConfigError
from fedprune.experiment import run_experiment
from fedprune.methods import get_method
from fedprune.methods.autostructured import (
    GUARD_PREFIX,
    K_STEP,
    AutoStructuredClient,
    AutoStructuredServer,
    band_keep,
    band_ranking,
    paired_drop_se,
)
from fedprune.methods.base import ClientReply, ModelSpec, state_of
from fedprune.models import build_model
from fedprune.rundir import load_weights

SPEC = ModelSpec("gap-cnn", (1, 28, 28), 62)


def _set_filter_norms(conv: torch.nn.Conv2d, norms: list[float]) -> None:
    """Give every filter of ``conv`` the L1 norm asked for (all entries equal)."""
    with torch.no_grad():
        per = conv.weight[0].numel()
        for j, n in enumerate(norms):
            conv.weight[j].fill_(n / per)


def _server(*extra: str, rounds: int = 10) -> AutoStructuredServer:
    cfg = load_config(overrides=["method=autostructured", f"federation.rounds={rounds}", *extra])
    return AutoStructuredServer(cfg, SPEC, SPEC.build(seed=0))


def test_band_rule_on_a_hand_built_layer_drops_both_tails() -> None:
    server = _server()
    # 30 ordinary filters (norm 5), one tiny (0) and one huge (10): mean 5, std 1.25
    norms = [5.0] * 30 + [0.0, 10.0]
    _set_filter_norms(server.model.conv1, norms)
    keep = server.propose(server.model)["conv1"]
    assert keep == list(range(30))  # both tails dropped
    two = band_keep(torch.tensor(norms), 2.0)
    low = band_keep(torch.tensor(norms), 2.0, two_sided=False)
    assert two == list(range(30)) and low == [*range(30), 31]  # one-sided keeps the large one
    # a wide band keeps everything; population std (ddof=0) decides the edge
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])  # mean 2, population std sqrt(2)
    assert band_keep(scores, 1.0) == [1, 2, 3]
    assert band_keep(scores, 2.0**0.5) == [0, 1, 2, 3, 4]  # |0 - 2| = 2 = k * std: kept
    # equal scores are all kept; at least one filter always survives
    assert band_keep(torch.full((7,), 0.3), 0.5) == list(range(7))
    assert band_keep(torch.tensor([0.0, 10.0]), 0.5) == [0]


def test_accept_only_fewer_params_patience_and_max_round() -> None:
    server = _server("structured.patience=2", "structured.max_prune_round=6")
    for conv in (server.model.conv1, server.model.conv2):
        _set_filter_norms(conv, [1.0] * conv.out_channels)  # nothing outside the band
    m1 = server.after_aggregate(1, [])
    assert m1["accepted"] == 0.0 and m1["patience"] == 1.0 and server.history == []
    # an outlier filter now: the proposal saves parameters, is accepted, patience resets
    _set_filter_norms(server.model.conv1, [1.0] * 31 + [50.0])
    m2 = server.after_aggregate(2, [])
    assert m2["accepted"] == 1.0 and m2["patience"] == 0.0 and m2["width/conv1"] == 31.0
    assert server.model.conv1.out_channels == 31 and server.model.conv2.in_channels == 31
    assert server.history == [{"layer": "conv1", "width": 32, "keep": list(range(31))}]
    # two rejections in a row stop pruning for good
    assert server.after_aggregate(3, [])["accepted"] == 0.0
    m4 = server.after_aggregate(4, [])
    assert m4["accepted"] == 0.0 and m4["pruning_active"] == 0.0
    _set_filter_norms(server.model.conv1, [1.0] * 30 + [50.0])
    assert "accepted" not in server.after_aggregate(5, [])
    assert server.model.conv1.out_channels == 31

    late = _server("structured.max_prune_round=2", "structured.start_round=2")
    _set_filter_norms(late.model.conv1, [1.0] * 31 + [50.0])
    assert "accepted" not in late.after_aggregate(1, [])  # before start_round
    assert "accepted" not in late.after_aggregate(3, [])  # after max_prune_round
    last = _server(rounds=3)
    _set_filter_norms(last.model.conv1, [1.0] * 31 + [50.0])
    assert "accepted" not in last.after_aggregate(3, [])  # never after the last round


def test_reinitialisation_option_is_seeded_and_fresh() -> None:
    inherit = _server()
    fresh_a = _server("structured.inherit_weights=false")
    fresh_b = _server("structured.inherit_weights=false")
    for s in (inherit, fresh_a, fresh_b):
        _set_filter_norms(s.model.conv1, [1.0] * 31 + [50.0])
        assert s.after_aggregate(1, [])["accepted"] == 1.0
    assert torch.all(inherit.model.conv1.weight == 1.0 / 25)  # inherited survivors
    assert not torch.allclose(fresh_a.model.conv1.weight, inherit.model.conv1.weight)
    assert torch.equal(fresh_a.model.conv1.weight, fresh_b.model.conv1.weight)
    assert fresh_a.history == inherit.history


def test_architecture_travels_as_json_and_the_client_rebuilds_once() -> None:
    server = _server()
    _set_filter_norms(server.model.conv1, [1.0] * 31 + [50.0])
    plain = server.configure_fit(1, [0])[0]
    assert "arch" not in plain.config  # no history: FedAvg's payload is unchanged
    server.after_aggregate(1, [])
    payload = decode_payload(encode_payload(server.configure_fit(2, [0])[0]))
    assert payload.config["arch"] == server.history
    client = AutoStructuredClient(server.cfg, SPEC)
    model = client.model_for(payload)
    assert model.conv1.out_channels == 31
    assert all(torch.equal(v, state_of(server.model)[k]) for k, v in state_of(model).items())
    assert client.model_for(payload) is model  # same history: cached model reused
    assert client.model_for(plain).conv1.out_channels == 32  # another history: rebuilt


def test_registered_and_runs_on_mlps_unless_conv_only() -> None:
    info = get_method("autostructured")
    assert info.server is AutoStructuredServer and info.client is AutoStructuredClient
    cfg = load_config(overrides=["method=autostructured"])
    spec = ModelSpec("fc", (1, 8, 8), 10)
    server = AutoStructuredServer(cfg, spec, spec.build())
    assert server.layers == ["fc1", "fc2"]  # hidden units; never the classifier
    conv_only = load_config(overrides=["method=autostructured", "structured.prune_linear=false"])
    with pytest.raises(ConfigError, match="has none besides its classifier"):
        AutoStructuredServer(conv_only, spec, spec.build())


def test_impossible_guard_combinations_are_config_errors() -> None:
    base = ["method=autostructured", "data.local_test_fraction=0.2"]
    with pytest.raises(ConfigError, match="needs the accuracy guard"):
        _server(*base, "structured.k_schedule=adaptive")
    with pytest.raises(ConfigError, match="local_test_fraction"):
        _server("structured.max_drop=0.01")
    _server(*base, "structured.max_drop=0.01", "structured.k_schedule=adaptive")
    with pytest.raises(ConfigError, match=r"guard_z > 0 .* needs the guard"):
        _server(*base, "structured.guard_z=2")
    _server(*base, "structured.max_drop=0.01", "structured.guard_z=2")


def test_rounded_widths_keep_the_best_ranked_units_in_multiples() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        width = int(torch.randint(9, 80, (1,), generator=g))
        scores = torch.rand(width, generator=g, dtype=torch.float64) * 3
        scores[: trial % 4] += 10  # a few large outliers
        for two_sided in (True, False):
            for k in (0.3, 0.8, 1.5, 2.5):
                plain = band_keep(scores, k, two_sided=two_sided)
                kept = band_keep(scores, k, two_sided=two_sided, round_to=8)
                n = len(kept)
                assert n == width or (n % 8 == 0 and n >= 8), (width, n)
                rank = band_ranking(scores, two_sided=two_sided)
                assert kept == sorted(rank[:n])  # the best-ranked n units
                assert sorted(rank[: len(plain)]) == plain  # the band is a prefix
                if n <= len(plain):
                    assert set(kept) <= set(plain)  # rounding down drops the worst kept
                else:
                    assert set(plain) <= set(kept)  # rounding up adds the best dropped
    # two-sided ranking: closest to the mean first; one-sided: largest first
    scores = torch.tensor([5.0, 0.0, 5.1, 9.0, 4.9])
    assert band_ranking(scores)[:3] == [4, 0, 2]  # mean 4.8
    assert band_ranking(scores, two_sided=False)[0] == 3


def test_server_rounds_every_pruned_layer_to_multiples() -> None:
    server = _server("structured.round_to=8", "structured.k=1.0")
    _set_filter_norms(server.model.conv1, [1.0] * 27 + [5.0, 6.0, 7.0, 8.0, 9.0])
    keep = server.propose(server.model)
    assert keep["conv1"] == list(range(24))  # band keeps 27 -> 24, the 24 closest to mean
    assert all(len(v) % 8 == 0 for v in keep.values())
    assert server.after_aggregate(1, [])["width/conv1"] == 24.0


def _guarded(*extra: str, rounds: int = 20) -> AutoStructuredServer:
    return _server(
        "data.local_test_fraction=0.2",
        "structured.max_drop=0.02",
        "structured.recovery_rounds=1",
        "structured.k=1.0",
        *extra,
        rounds=rounds,
    )


def _judge_replies(
    new: float, old: float, total: float = 100.0, *, disagree: float | None = None
) -> list[ClientReply]:
    """One client's judge counts; ``disagree`` samples only one model gets right (default:
    the fewest possible, |old - new|, all one way)."""
    d = abs(old - new) if disagree is None else disagree
    metrics = {
        "num_examples": 10.0,
        "guard_correct_new": new,
        "guard_correct_old": old,
        "guard_new_only": (d - (old - new)) / 2,
        "guard_old_only": (d + (old - new)) / 2,
        "guard_total": total,
    }
    return [ClientReply(0, Payload(metrics=metrics))]


def test_paired_standard_error_of_the_drop_matches_the_per_sample_differences() -> None:
    gen = torch.Generator().manual_seed(3)
    for n, p_new, p_old in ((40, 0.5, 0.6), (300, 0.35, 0.4), (7, 0.9, 0.1)):
        new = torch.rand(n, generator=gen) < p_new
        old = torch.rand(n, generator=gen) < p_old
        diff = old.double() - new.double()
        want = float(diff.std(unbiased=True) / n**0.5)
        got = paired_drop_se(float((new & ~old).sum()), float((old & ~new).sum()), float(n))
        assert abs(got - want) < 1e-12, (n, got, want)
    assert paired_drop_se(0.0, 0.0, 300.0) == 0.0  # the models agree everywhere
    assert paired_drop_se(1.0, 0.0, 1.0) == 0.0  # one sample: no spread to measure


@pytest.mark.parametrize(
    ("z", "total", "disagree", "rolled_back"),
    [
        # a 5-point drop (limit 2) on 100 samples, 60 of them disagreeing: se 7.8 points
        (0.0, 100, 60, True),  # z = 0: rolled back on the measured drop alone
        (2.0, 100, 60, False),  # 5 - 2 * 7.8 < 2: noise, accepted
        # the same drop on 1000 samples, only 50 disagreeing (all against the proposal):
        # se 0.69 points, 5 - 2 * 0.69 > 2: rolled back
        (2.0, 1000, 50, True),
    ],
)
def test_guard_z_weighs_the_drop_by_its_paired_standard_error(
    z: float, total: int, disagree: int, rolled_back: bool
) -> None:
    server = _guarded(f"structured.guard_z={z}")
    _set_filter_norms(server.model.conv1, [1.0] * 31 + [50.0])
    assert server.after_aggregate(1, [])["proposed"] == 1.0
    server.after_aggregate(2, [])
    new, old = 0.70 * total, 0.75 * total
    m3 = server.after_aggregate(3, _judge_replies(new, old, total, disagree=disagree))
    se = paired_drop_se((disagree - (old - new)) / 2, (disagree + (old - new)) / 2, total)
    assert m3["guard_drop"] == pytest.approx(0.05)
    assert m3["guard_drop_se"] == pytest.approx(se)
    assert m3["guard_disagreements"] == disagree
    assert (m3["guard_drop"] - z * se > 0.02) == rolled_back  # the rule, max_drop 0.02
    assert m3.get("rolled_back") == (1.0 if rolled_back else None)
    assert m3["accepted"] == (0.0 if rolled_back else 1.0)


def test_guard_rolls_back_to_the_previous_architecture_and_weights_exactly() -> None:
    server = _guarded()
    with torch.no_grad():
        server.model.conv1.weight.normal_(generator=torch.Generator().manual_seed(1))
    _set_filter_norms(server.model.conv1, [1.0] * 31 + [50.0])
    before = state_of(server.model)
    m1 = server.after_aggregate(1, [])
    assert m1["proposed"] == 1.0 and m1["on_trial"] == 1.0 and "accepted" not in m1
    assert server.model.conv1.out_channels < 32 and server.history  # trained on trial
    # round 2 trains the proposal (recovery_rounds = 1); round 3 is the judge round
    assert "accepted" not in server.after_aggregate(2, [])
    assert not any(k.startswith(GUARD_PREFIX) for k in server.configure_fit(2, [0])[0].arrays)
    payload = server.configure_fit(3, [0, 1])[0]
    assert payload.config["guard_arch"] == []
    assert all(torch.equal(payload.arrays[GUARD_PREFIX + k], v) for k, v in before.items())
    with torch.no_grad():  # whatever training did to the proposal is discarded
        server.model.conv1.weight.add_(1.0)
    m3 = server.after_aggregate(3, _judge_replies(new=50, old=90))
    assert m3["accepted"] == 0.0 and m3["rolled_back"] == 1.0 and m3["patience"] == 1.0
    assert abs(m3["guard_drop"] - 0.4) < 1e-12 and m3["guard_samples"] == 100.0
    assert server.history == [] and server.model.conv1.out_channels == 32
    after = state_of(server.model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert "proposed" not in m3  # the fixed schedule waits a round before proposing again
    assert server.after_aggregate(4, [])["proposed"] == 1.0


def test_guard_accepts_within_max_drop_and_adaptive_k_steps() -> None:
    server = _guarded("structured.k_schedule=adaptive")
    _set_filter_norms(server.model.conv1, [1.0] * 31 + [50.0])
    m1 = server.after_aggregate(1, [])
    k1 = m1["k"]
    assert m1["proposed"] == 1.0
    server.after_aggregate(2, [])
    m3 = server.after_aggregate(3, _judge_replies(new=89, old=90))  # 1 point: within 2
    assert m3["accepted"] == 1.0 and server.accepted_rounds == [1] and m3["patience"] == 0.0
    assert m3.get("proposed") == 1.0  # adaptive: the next, bolder proposal at once
    assert m3["k"] <= k1 * K_STEP + 1e-12
    kept_params = m3["proposal_params"]
    # a rollback: the next proposal is gentler and keeps more than the rejected one
    server.after_aggregate(4, [])
    m5 = server.after_aggregate(5, _judge_replies(new=10, old=90))
    assert m5["rolled_back"] == 1.0 and server.ceiling == kept_params
    assert m5["proposed"] == 1.0 and m5["proposal_params"] > kept_params
    assert m5["k"] > m3["k"]


def test_nothing_to_prune_counts_against_patience_under_the_guard() -> None:
    server = _guarded("structured.patience=2")
    for conv in (server.model.conv1, server.model.conv2):
        _set_filter_norms(conv, [1.0] * conv.out_channels)
    assert server.after_aggregate(1, [])["proposed"] == 0.0
    m2 = server.after_aggregate(2, [])
    assert m2["patience"] == 2.0 and m2["pruning_active"] == 0.0


def test_guarded_proposals_need_a_judge_round_within_the_run() -> None:
    server = _guarded(rounds=4)  # recovery 1: a proposal after round 2 is judged in 4
    _set_filter_norms(server.model.conv1, [1.0] * 31 + [50.0])
    server.active = True
    assert "proposed" not in server.after_aggregate(3, [])
    assert server.after_aggregate(2, [])["proposed"] == 1.0


def test_three_round_run_shrinks_and_clients_train_the_small_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real_fit = AutoStructuredClient.fit

    def spy(self: AutoStructuredClient, payload: Payload, data):  # type: ignore[no-untyped-def]
        reply = real_fit(self, payload, data)
        seen.append(int(reply.arrays["conv1.weight"].shape[0]))
        return reply

    monkeypatch.setattr(AutoStructuredClient, "fit", spy)
    cfg = load_config(
        overrides=[
            f"out='{tmp_path}'",
            "name='as'",
            "method=autostructured",
            "model.name=twocnn",
            "model.hidden=16",
            "data.num_clients=4",
            "federation.clients_per_round=3",
            "federation.rounds=3",
            "train.local_epochs=1",
            "structured.k=1.0",
        ]
    )
    res = run_experiment(cfg)
    recs, s = res.records, res.summary
    assert s["final_params"] < s["dense_params"] and s["final_flops"] < s["dense_flops"]
    assert recs[0]["method_metrics"]["accepted"] == 1.0
    # round 1 ships the dense model; later rounds ship (and train) the shrunk one
    assert recs[1]["bytes_down"] < recs[0]["bytes_down"]
    assert recs[1]["bytes_up"] < recs[0]["bytes_up"]
    assert seen[:3] == [16, 16, 16] and max(seen[3:]) < 16
    assert s["communication_reduction"] > 1.0
    # the run directory rebuilds the final model: zoo + JSON history + safetensors
    arch = json.loads((res.run_dir / "architecture.json").read_text())
    assert arch["history"] and arch["history"][0]["layer"] == "conv1"
    fresh = build_model("twocnn", tuple(arch["input_shape"]), arch["num_classes"], hidden=16)
    replay(fresh, arch["history"], example_input(arch["input_shape"]))
    fresh.load_state_dict(load_weights(res.run_dir))
    x = torch.randn(2, *arch["input_shape"])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), res.model.eval()(x))


def _guard_cfg(tmp_path: Path, name: str, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        overrides=[
            f"out='{tmp_path}'",
            f"name='{name}'",
            "method=autostructured",
            "model.name=fc",
            "model.hidden=32",
            "data.num_clients=6",
            "data.local_test_fraction=0.3",
            "federation.clients_per_round=4",
            "federation.rounds=7",
            "train.local_epochs=1",
            "structured.k=1.0",
            "structured.round_to=8",
            "structured.max_drop=0.01",
            "structured.recovery_rounds=1",
            *extra,
        ]
    )


def test_rolled_back_rounds_and_their_bytes_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fit = AutoStructuredClient.fit

    def failing_guard(self: AutoStructuredClient, payload: Payload, data):  # type: ignore[no-untyped-def]
        reply = real_fit(self, payload, data)
        if "guard_total" in reply.metrics:  # the proposal looks useless: always roll back
            reply.metrics["guard_correct_new"] = 0.0
        return reply

    monkeypatch.setattr(AutoStructuredClient, "fit", failing_guard)
    res = run_experiment(_guard_cfg(tmp_path, "rb", "structured.patience=5"))
    recs = res.records
    mm = [r["method_metrics"] for r in recs]
    dense = res.summary["dense_params"]
    assert mm[0]["proposed"] == 1.0 and mm[2]["rolled_back"] == 1.0
    assert mm[3]["proposed"] == 1.0 and mm[5]["rolled_back"] == 1.0
    assert recs[0]["params"] == recs[1]["params"] < dense == recs[2]["params"]
    # on trial, round 2 ships the small model both ways; the judge round 3 also ships the
    # snapshot down; round 7 (dense again, nothing on trial) is the reference
    assert (
        recs[1]["bytes_up"] < recs[6]["bytes_up"] and recs[1]["bytes_down"] < recs[6]["bytes_down"]
    )
    assert recs[2]["bytes_down"] > recs[6]["bytes_down"]
    assert sum(r["bytes_up"] for r in recs) == res.summary["total_bytes_up"]
    assert sum(r["bytes_down"] for r in recs) == res.summary["total_bytes_down"]
    assert recs[-1]["cum_bytes_down"] == res.summary["total_bytes_down"]
    assert res.summary["final_params"] == res.summary["dense_params"]  # nothing survived
    assert all(m.get("accepted") != 1.0 for m in mm)


def test_clients_report_paired_counts_in_judge_rounds(tmp_path: Path) -> None:
    res = run_experiment(_guard_cfg(tmp_path, "pairs", "structured.patience=5"))
    judged = [r["method_metrics"] for r in res.records if "guard_samples" in r["method_metrics"]]
    assert judged
    for m in judged:
        n = m["guard_samples"]
        new, old = round(m["guard_accuracy"] * n), round(m["guard_baseline"] * n)
        d = m["guard_disagreements"]
        # the disagreements split into new-only and old-only counts whose difference is
        # the difference of the two models' correct counts
        assert d >= abs(old - new) and (d - abs(old - new)) % 2 == 0
        assert d <= n
        se = paired_drop_se((d - (old - new)) / 2, (d + (old - new)) / 2, n)
        assert m["guard_drop_se"] == pytest.approx(se)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_round", [2, 3])
def test_resume_with_a_proposal_on_trial_is_exact(tmp_path: Path, crash_round: int) -> None:
    """tests/test_checkpoint.py's pattern: a crash while a proposal is on trial (2) or in
    its judge round (3); the resumed run equals the uninterrupted one."""
    from fedprune.checkpoint import load_checkpoint
    from fedprune.experiment import resume_experiment

    extra = ("structured.k_schedule=adaptive", "structured.max_drop=0.0001")
    ref = run_experiment(_guard_cfg(tmp_path, "ref", *extra))
    assert ref.records[0]["method_metrics"]["proposed"] == 1.0

    def crash(rec: dict[str, object]) -> None:
        if rec["round"] == crash_round:
            raise _Crash

    with pytest.raises(_Crash):
        run_experiment(_guard_cfg(tmp_path, "crashed", *extra), on_round=crash)
    ckpt = load_checkpoint(tmp_path / "crashed")
    assert ckpt is not None and ckpt.round == crash_round - 1
    res = resume_experiment(tmp_path / "crashed")
    untimed = ("round_s", "wall_s")
    for a, b in zip(ref.records, res.records, strict=True):
        drop = [k for k in a if k in untimed or k.startswith("time_")]
        assert {k: v for k, v in a.items() if k not in drop} == {
            k: v for k, v in b.items() if k not in drop
        }
    ref_state, got = ref.model.state_dict(), res.model.state_dict()
    assert ref_state.keys() == got.keys()
    assert all(torch.equal(ref_state[k], got[k]) for k in ref_state)
