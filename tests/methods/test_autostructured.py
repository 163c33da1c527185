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
    AutoStructuredClient,
    AutoStructuredServer,
    band_keep,
)
from fedprune.methods.base import ModelSpec, state_of
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


def test_registered_and_needs_a_conv_model() -> None:
    info = get_method("autostructured")
    assert info.server is AutoStructuredServer and info.client is AutoStructuredClient
    cfg = load_config(overrides=["method=autostructured"])
    spec = ModelSpec("fc", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="no prunable convolution"):
        AutoStructuredServer(cfg, spec, spec.build())


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
