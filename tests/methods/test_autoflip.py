from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from fedprune.config import RunConfig, load_config
from fedprune.core import structured
from fedprune.core.codec import Payload, decode_payload, encode_payload
from fedprune.core.guidance import unit_layers, unit_masks
from fedprune.core.masks import apply_masks
from fedprune.core.training import TrainSettings
from fedprune.data.federation import ClientData
from fedprune.errors import ConfigError
from fedprune.experiment import run_experiment
from fedprune.methods.autoflip import (
    GUIDANCE_PREFIX,
    AutoFlipClient,
    AutoFlipServer,
    explore_train,
)
from fedprune.methods.base import ClientMethod, ClientReply, ModelSpec, client_generator
from fedprune.methods.registry import get_method

FC = ModelSpec("fc", (1, 1, 6), 3, hidden=8)  # 6 -> 8 -> 8 -> 3
CNN = ModelSpec("twocnn", (1, 12, 12), 3, hidden=4)


class RecordingIO:
    """A FederatedIO that encodes both ways and records what each client received."""

    def __init__(self, client: ClientMethod, data: list[ClientData]) -> None:
        self.client = client
        self.data = data
        self.num_clients = len(data)
        self.received: dict[int, Payload] = {}
        self.tasks: list[str] = []

    def exchange(self, task: str, payloads: Mapping[int, Payload]) -> list[ClientReply]:
        out = []
        self.tasks.append(task)
        for cid, p in payloads.items():
            got = decode_payload(encode_payload(p))
            self.received[cid] = got
            back = self.client.handle(task, got, self.data[cid])
            out.append(ClientReply(cid, decode_payload(encode_payload(back))))
        return out


def _data(cid: int, spec: ModelSpec, n: int = 24) -> ClientData:
    g = torch.Generator().manual_seed(100 + cid)
    x = torch.randn(n, *spec.input_shape, generator=g)
    y = torch.randint(0, spec.num_classes, (n,), generator=g)
    return ClientData(cid=cid, x_train=x, y_train=y, x_test=None, y_test=None)


def _cfg(*extra: str) -> RunConfig:
    return load_config(
        overrides=[
            "method='autoflip'",
            "train.optimizer='adam'",
            "train.lr=0.01",
            "train.batch_size=8",
            "autoflip.explore_epochs=3",
            "autoflip.explore_patience=2",
            *extra,
        ]
    )


def _server(
    cfg: RunConfig, spec: ModelSpec, clients: int = 4
) -> tuple[AutoFlipServer, RecordingIO]:
    model = spec.build(seed=0)
    server = AutoFlipServer(cfg, spec, model)
    io = RecordingIO(AutoFlipClient(cfg, spec), [_data(c, spec) for c in range(clients)])
    return server, io


def test_registry_and_config() -> None:
    info = get_method("autoflip")
    assert info.server is AutoFlipServer and info.client is AutoFlipClient
    cfg = load_config(overrides=["method='autoflip'"])
    assert cfg.autoflip.threshold == 0.3 and cfg.autoflip.explore_epochs == 150
    for bad in (
        "autoflip.threshold=1.0",
        "autoflip.explore_fraction=0",
        "autoflip.explore_epochs=0",
        "autoflip.normalisation='zscore'",
    ):
        with pytest.raises(ConfigError, match="autoflip"):
            load_config(overrides=[bad])


def test_explorers_start_from_identical_weights() -> None:
    cfg = _cfg("autoflip.structured=false")
    server, io = _server(cfg, FC, clients=5)
    theta0 = {k: v.clone() for k, v in server.model.state_dict().items()}
    server.setup(io)
    assert io.tasks == ["explore"]
    assert sorted(io.received) == server.explorers == list(range(5))  # fraction 1.0
    for cid, p in io.received.items():
        assert p.config["task"] == "explore"
        for k, v in theta0.items():
            assert torch.equal(p.arrays[k], v), (cid, k)
    # every explorer's guidance is its own (theta_k - theta_0)^2: recompute one by hand
    client = AutoFlipClient(cfg, FC)
    model = client.model_for(io.received[2])
    explore_train(
        model,
        io.data[2].x_train,
        io.data[2].y_train,
        client.settings(io.received[2]),
        max_epochs=3,
        patience=2,
        generator=client_generator(io.received[2], 2),
    )

    for n, p in model.named_parameters():
        assert torch.allclose(server.guidance[2][n], (p.detach() - theta0[n]) ** 2)
    # explorers differ (different data), so their guidance differs
    assert not torch.equal(server.guidance[0]["fc1.weight"], server.guidance[1]["fc1.weight"])


def test_explorer_choice_is_seeded_and_sized() -> None:
    a, _ = _server(_cfg("autoflip.explore_fraction=0.3", "seed=4"), FC)
    b, _ = _server(_cfg("autoflip.explore_fraction=0.3", "seed=4"), FC)
    assert a.choose_explorers(20) == b.choose_explorers(20)
    assert len(a.choose_explorers(20)) == 6
    assert len(a.choose_explorers(2)) == 1  # at least one


def test_initial_mask_prunes_t_p_and_covers_biases() -> None:
    cfg = _cfg("autoflip.structured=false", "autoflip.threshold=0.4")
    server, io = _server(cfg, FC)
    server.setup(io)
    assert server.masks is not None
    assert set(server.masks) == {n for n, _ in server.model.named_parameters()}
    total = sum(m.numel() for m in server.masks.values())
    pruned = sum(int((~m).sum()) for m in server.masks.values())
    assert pruned >= int(0.4 * total)
    assert pruned <= int(0.4 * total) + 5  # only ties at the threshold add to it
    params = dict(server.model.named_parameters())
    for n, m in server.masks.items():
        assert torch.all(params[n][~m] == 0)


def test_structured_step_shrinks_and_matches_masked_model() -> None:
    cfg = _cfg("autoflip.threshold=0.5")
    server, io = _server(cfg, CNN)
    before = copy.deepcopy(server.model)
    shapes = {n: p.shape for n, p in before.named_parameters()}
    server.setup(io)
    m = server.model
    assert m.conv1.weight.shape[0] == 2 and m.conv2.weight.shape[0] == 4
    assert m.fc1.weight.shape[0] == 256 and m.classifier.weight.shape == (3, 256)
    assert set(server.removed_units) == {"conv1", "conv2", "fc1"}
    assert [e["layer"] for e in server.history] == ["conv1", "conv2", "fc1"]
    rep = server.sparsity_report()
    assert rep["structured_sparsity"] == pytest.approx(0.5)
    assert rep["structured_param_reduction"] > 0.5
    # the shrunk model (without the unstructured mask) computes what the full model
    # computes with the removed units zeroed
    server_nomask = copy.deepcopy(before)
    apply_masks(server_nomask, unit_masks(shapes, unit_layers(before), server.removed_units))
    shrunk = structured.replay(copy.deepcopy(before), server.history, server.example)
    x = torch.randn(5, *CNN.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(shrunk(x), server_nomask(x), atol=1e-5)
    # cutting a tensor set of the initial shapes = replaying the history on it
    full = {n: torch.rand(s, generator=torch.Generator().manual_seed(9)) for n, s in shapes.items()}
    holder = copy.deepcopy(before)
    holder.load_state_dict(full)
    structured.replay(holder, server.history, server.example)
    cut = server.cut(full)
    for n, p in holder.named_parameters():
        assert torch.equal(cut[n], p.detach()), n
    # stored guidance follows the new shapes
    for g in server.guidance.values():
        assert {n: t.shape for n, t in g.items()} == {n: p.shape for n, p in m.named_parameters()}
    # a client rebuilds the shrunk architecture from config["arch"]
    payloads = server.configure_fit(1, [0, 1])
    client = AutoFlipClient(cfg, CNN)
    reply = client.handle("fit", payloads[0], io.data[0])
    sound, rejections = server.validate([ClientReply(0, reply)])
    assert not rejections and len(sound) == 1


def _set_guidance(server: AutoFlipServer, values: dict[int, float]) -> None:
    """Client c's guidance: a fixed random pattern, or its reverse, per client."""
    base = {
        n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
        for i, (n, p) in enumerate(server.model.named_parameters())
    }
    server.guidance = {
        c: {n: (t if s > 0 else 1 - t) for n, t in base.items()} for c, s in values.items()
    }


@pytest.mark.parametrize("regrow", [False, True])
def test_mask_is_monotone_unless_regrowth(regrow: bool) -> None:
    cfg = _cfg("autoflip.structured=false", f"autoflip.regrow={str(regrow).lower()}")
    server, io = _server(cfg, FC)
    server.setup(io)
    _set_guidance(server, {0: 1.0, 1: 1.0, 2: -1.0, 3: -1.0})  # 2, 3 rank in reverse
    server.configure_fit(2, [0, 1])
    first = {n: m.clone() for n, m in server.masks.items()}  # type: ignore[union-attr]
    server.take_reports()
    server.configure_fit(3, [2, 3])
    reports = server.take_reports()
    second = server.masks
    assert second is not None
    grew = sum(int((second[n] & ~first[n]).sum()) for n in first)
    if regrow:
        assert grew > 0
        assert reports["regrown"] == grew
    else:
        assert grew == 0
        for n in first:
            assert torch.all(second[n] <= first[n])
        # the budget (T_p of the entries) is spent: the round's guidance changes nothing,
        # though its own mask disagrees with the one in force
        assert reports["newly_pruned"] == 0
        assert reports["refresh_disagreement"] > 0.1
    # pruned weights are zero in the broadcast model
    params = dict(server.model.named_parameters())
    for n, m in second.items():
        assert torch.all(params[n][~m] == 0)
    # a round without explorers keeps the mask
    server.guidance = {}
    server.configure_fit(4, [0, 1])
    assert all(torch.equal(server.masks[n], second[n]) for n in second)  # type: ignore[index]
    assert server.take_reports()["mask_refreshed"] == 0.0


def test_bad_explorer_replies_are_rejected() -> None:
    cfg = _cfg("autoflip.structured=false")
    server, io = _server(cfg, FC, clients=3)

    class Liar(AutoFlipClient):
        def explore(self, payload: Payload, data: ClientData) -> Payload:
            out = super().explore(payload, data)
            if data.cid == 1:
                out.arrays[GUIDANCE_PREFIX + "fc1.weight"] *= -1
            return out

    io.client = Liar(cfg, FC)
    server.setup(io)
    assert set(server.guidance) == {0, 2}
    assert "negative" in server.explore_rejections[1]


def test_explore_train_stops_early() -> None:
    model = FC.build(seed=0)
    data = _data(0, FC, n=1)
    # lr 0 and one sample: the loss is the same every epoch, so it never improves
    settings = TrainSettings(batch_size=1, lr=0.0, optimizer="sgd")
    epochs, _ = explore_train(
        model, data.x_train, data.y_train, settings, max_epochs=50, patience=3
    )
    assert epochs == 4
    settings = TrainSettings(batch_size=4, lr=0.01, optimizer="adam")
    epochs, _ = explore_train(model, data.x_train, data.y_train, settings, max_epochs=5, patience=5)
    assert epochs == 5


def test_end_to_end_shrinks_flops_and_counts_exploration(tmp_path: Path) -> None:
    cfg = load_config(
        overrides=[
            f"out='{tmp_path}'",
            "method='autoflip'",
            "data.num_clients=4",
            "federation.clients_per_round=2",
            "federation.rounds=3",
            "federation.aggregation='fedavgm'",
            "model.name='twocnn'",
            "model.hidden=4",
            "train.optimizer='adam'",
            "train.lr=0.003",
            "train.local_epochs=1",
            "train.lr_decay=0.99",
            "autoflip.explore_fraction=0.5",
            "autoflip.explore_epochs=2",
            "autoflip.explore_patience=1",
        ]
    )
    res = run_experiment(cfg)
    r1, r2, r3 = res.records
    assert r3["flops"] < res.summary["dense_flops"]
    assert r3["params"] < res.summary["dense_params"]
    assert r3["effective_flops"] < r3["flops"]
    m1, m3 = r1["method_metrics"], r3["method_metrics"]
    assert m1["explorers"] == 2 and m1["explore_sample_epochs"] > 0
    # exploration: 2 explorers each received theta_0 and uploaded a full guidance set,
    # all charged to round 1 (on top of round 1's own traffic)
    dense_model_bytes = 4 * res.summary["dense_params"]
    # (down: theta_0 is dense; up: guidance entries that are exactly 0 travel compactly)
    assert r1["bytes_down"] > r2["bytes_down"] + 2 * dense_model_bytes
    assert r1["bytes_up"] > r2["bytes_up"] + 2 * dense_model_bytes * 0.8
    for r in res.records:
        assert r["rejected"] == 0
        m = r["method_metrics"]
        assert 0 < m["structured_sparsity"] < 1 and 0 < m["unstructured_sparsity"] < 1
        assert m["total_sparsity"] > m["unstructured_sparsity"]
    assert m3["unstructured_sparsity"] >= m1["unstructured_sparsity"]  # monotone


@pytest.mark.parametrize("rule", ["share", "strict"])
def test_threshold_rule_with_tied_guidance(rule: str) -> None:
    """Half of every tensor's guidance is exactly 0 (entries that never moved): the share
    rule prunes exactly floor(T_p * N), the paper's strict rule prunes every tied entry."""
    cfg = _cfg("autoflip.structured=false", f"autoflip.threshold_rule='{rule}'")
    server, io = _server(cfg, FC)
    server.setup(io)
    gen = torch.Generator().manual_seed(3)
    guidance = {}
    for n, p in server.model.named_parameters():
        g = torch.rand(p.shape, generator=gen) + 0.1
        g.view(-1)[: p.numel() // 2] = 0.0
        guidance[n] = g
    server.guidance = {0: guidance}
    masks = server.mask_from([guidance])
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    zeros = sum(int((g == 0).sum()) for g in guidance.values())
    if rule == "share":
        assert pruned == int(0.3 * total)
    else:
        assert pruned >= zeros > int(0.3 * total)  # every tied (zero) entry goes
