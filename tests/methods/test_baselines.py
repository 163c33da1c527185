from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedprune.config import RunConfig, load_config
from fedprune.core.codec import Payload, decode_payload, encode_payload
from fedprune.core.criteria import Magnitude
from fedprune.core.masks import count_kept, count_total, mask_sparsity
from fedprune.core.select import prune_count, select_lowest
from fedprune.data.federation import ClientData
from fedprune.errors import ConfigError
from fedprune.methods.base import MASK_PREFIX, ClientMethod, ClientReply, ModelSpec
from fedprune.methods.grasp import GraSPServer
from fedprune.methods.masked import BaselineServer, SaliencyClient
from fedprune.methods.omp import OMPServer
from fedprune.methods.prunefl import IMPORTANCE_PREFIX, PruneFLClient, PruneFLServer, param_costs
from fedprune.methods.random_pruning import RandomServer
from fedprune.methods.registry import get_method
from fedprune.methods.snip import SNIPServer

TINY = ModelSpec("fc", (1, 1, 3), 2, hidden=4)  # fc: 3 -> 4 -> 4 -> 2, 36 weights
SMALL = ModelSpec("fc", (1, 1, 3), 2, hidden=8)  # 3 -> 8 -> 8 -> 2, 104 weights
FC = ModelSpec("fc", (1, 1, 2), 2)  # fc: 2 -> 128 -> 128 -> 2


class CodecIO:
    """A one-client-per-call FederatedIO that encodes both ways, like the engine."""

    def __init__(self, client: ClientMethod, data: list[ClientData]) -> None:
        self.client = client
        self.data = data
        self.num_clients = len(data)
        self.calls: list[tuple[str, int]] = []

    def exchange(self, task: str, payloads: Mapping[int, Payload]) -> list[ClientReply]:
        out = []
        for cid, p in payloads.items():
            self.calls.append((task, cid))
            back = self.client.handle(task, decode_payload(encode_payload(p)), self.data[cid])
            out.append(ClientReply(cid, decode_payload(encode_payload(back))))
        return out


def _data(cid: int, n: int, shape: tuple[int, ...], scale: float = 1.0) -> ClientData:
    g = torch.Generator().manual_seed(cid)
    x = scale * torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return ClientData(cid=cid, x_train=x, y_train=y, x_test=None, y_test=None)


def _cfg(*extra: str) -> RunConfig:
    # These tests feed replies with noise at pruned positions to check that the server
    # re-applies its mask; validation (on by default) would reject them outright, which
    # test_noise_at_pruned_positions_is_rejected_by_default checks separately.
    return load_config(overrides=["validation.check_mask=false", *extra])


def _noisy_replies(server: BaselineServer, seed: int) -> list[ClientReply]:
    """Two clients whose weights moved everywhere (pruned positions included)."""
    g = torch.Generator().manual_seed(seed)
    replies = []
    for cid in range(2):
        arrays = {
            k: (v + 0.01 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
            for k, v in server.model.state_dict().items()
        }
        replies.append(ClientReply(cid, Payload(arrays=arrays, metrics={"num_examples": 5.0})))
    return replies


def _zeros_in_scope(server: BaselineServer) -> int:
    return sum(int((t == 0).sum()) for t in server.prunable().values())


# ----------------------------------------------------------------------- helpers


def test_lowest_masks_prunes_an_exact_count_with_ties_by_position() -> None:
    scores = {"a": torch.tensor([3.0, 1.0, 1.0]), "b": torch.tensor([[1.0, -2.0], [5.0, 0.0]])}
    m = select_lowest(scores, 0.5)  # floor(0.5 * 7) = 3 lowest: -2, 0, first 1
    assert m["a"].tolist() == [True, False, True]
    assert m["b"].tolist() == [[True, False], [True, False]]
    per = select_lowest(scores, 0.5, per_layer=True)  # 1 of a, 2 of b
    assert per["a"].tolist() == [True, False, True]
    assert per["b"].tolist() == [[True, False], [True, False]]
    assert count_kept(select_lowest(scores, 0.0)) == 7
    with pytest.raises(ValueError):
        select_lowest(scores, 1.0)


def test_param_costs_follow_flops_per_weight() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 3))
    costs = param_costs(model, (1, 4, 4), ["0.weight", "2.weight", "2.bias"])
    # conv: 2 * 16 output positions per weight; linear: 2 per weight -> ratio 16
    assert costs == {"0.weight": 16.0, "2.weight": 1.0, "2.bias": 1.0}


def test_registry_knows_the_baselines() -> None:
    for name, server in [
        ("omp", OMPServer),
        ("snip", SNIPServer),
        ("grasp", GraSPServer),
        ("random", RandomServer),
        ("prunefl", PruneFLServer),
    ]:
        assert get_method(name).server is server


# ------------------------------------------------------------------- SNIP, GraSP


def _hand_scores(
    model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """g and Hg over the flattened scope, by torch.autograd.functional (independently)."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].flatten() for n in names]).double()

    def loss(w: torch.Tensor) -> torch.Tensor:
        p = {k: v.double() for k, v in params.items()}
        for n, chunk in zip(names, torch.split(w, sizes), strict=True):
            p[n] = chunk.view_as(params[n])
        logits = torch.func.functional_call(model.double(), p, (x.double(),))
        return nn.functional.cross_entropy(logits, y)

    g = torch.autograd.functional.jacobian(loss, flat)
    h = torch.autograd.functional.hessian(loss, flat)
    model.float()
    return flat, g, h @ g


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_saliency_masks_match_a_hand_computation(method: str) -> None:
    cfg = _cfg(f"method={method}", "pruning.final_sparsity=0.5", "train.batch_size=16", "seed=3")
    server_cls = SNIPServer if method == "snip" else GraSPServer
    model = SMALL.build(seed=1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    server = server_cls(cfg, SMALL, model)
    gen = torch.Generator().manual_seed(1)
    x, y = 2 * torch.randn(16, 1, 1, 3, generator=gen), torch.randint(0, 2, (16,), generator=gen)
    data = [ClientData(0, x, y, None, None)]  # one batch = the whole client set
    io = CodecIO(SaliencyClient(cfg, SMALL), data)
    server.setup(io)
    assert io.calls == [(method, 0)]

    ref = SMALL.build()
    ref.load_state_dict(init)
    flat_w, g, hg = _hand_scores(ref, server.scope, x, y)
    expected_scores = (g * flat_w).abs() if method == "snip" else hg * flat_w
    k = prune_count(0.5, flat_w.numel())
    ranked = expected_scores.sort().values
    assert ranked[k] - ranked[k - 1] > 1e-4 * ranked.abs().max()  # no tie at the threshold
    expected = torch.ones_like(flat_w, dtype=torch.bool)
    expected[torch.argsort(expected_scores)[:k]] = False

    assert server.masks is not None
    got = torch.cat([server.masks[n].flatten() for n in server.scope])
    assert torch.equal(got, expected)
    assert mask_sparsity(server.masks) == k / flat_w.numel()
    if method == "grasp":  # the sign matters: removing the top of Hg*w is a different mask
        wrong = torch.ones_like(expected)
        wrong[torch.argsort(-expected_scores)[:k]] = False
        assert not torch.equal(got, wrong)
    # the mask is applied to the initial model before round 1, with +0.0
    for n in server.scope:
        w = server.model.state_dict()[n]
        assert torch.equal(w, torch.where(server.masks[n], init[n], torch.zeros(())))
        assert not torch.signbit(w[~server.masks[n]]).any()
    # fixed for all training: aggregation keeps it, clients train under the zeros
    assert server.round_config(1)["mask"] == "nonzero"
    out = server.aggregate_fit(1, _noisy_replies(server, 0))
    assert out["target_sparsity"] == 0.5
    assert torch.equal(torch.cat([server.masks[n].flatten() for n in server.scope]), expected)


# ------------------------------------------------------------------------- OMP


def test_omp_prunes_exactly_once_at_the_configured_round() -> None:
    cfg = _cfg("federation.rounds=5", "pruning.prune_round=3", "pruning.final_sparsity=0.7")
    server = OMPServer(cfg, FC, FC.build(seed=0))
    total = sum(t.numel() for t in server.prunable().values())
    k = prune_count(0.7, total)
    first = None
    for rnd in range(1, 6):
        cfg_r = server.round_config(rnd)
        out = server.aggregate_fit(rnd, _noisy_replies(server, rnd))
        if rnd < 3:
            assert cfg_r["mask"] == "none"
            assert server.masks is None and out["target_sparsity"] == 0.0
            assert _zeros_in_scope(server) == 0
            continue
        assert server.masks is not None and out["target_sparsity"] == 0.7
        assert count_total(server.masks) - count_kept(server.masks) == k
        assert _zeros_in_scope(server) == k  # exact and constant, although clients moved
        if rnd == 3:
            first = {n: m.clone() for n, m in server.masks.items()}
        else:
            assert cfg_r["mask"] == "nonzero"
            assert first is not None
            assert all(torch.equal(first[n], server.masks[n]) for n in first)


def test_omp_prune_round_default_and_validation() -> None:
    assert OMPServer(_cfg("federation.rounds=100"), FC, FC.build(seed=0)).prune_round == 90
    assert OMPServer(_cfg("federation.rounds=1"), FC, FC.build(seed=0)).prune_round == 1
    with pytest.raises(ConfigError, match=r"pruning\.prune_round"):
        OMPServer(_cfg("federation.rounds=3", "pruning.prune_round=4"), FC, FC.build(seed=0))


# ----------------------------------------------------------------------- random


@pytest.mark.parametrize("per_layer", [False, True])
def test_random_hits_the_schedule_exactly_and_is_monotone(per_layer: bool) -> None:
    cfg = _cfg(
        "federation.rounds=4",
        "pruning.final_sparsity=0.6",
        f"pruning.per_layer={str(per_layer).lower()}",
    )
    server = RandomServer(cfg, FC, FC.build(seed=0))
    initial = {n: t.clone() for n, t in server.prunable().items()}
    prev = None
    for rnd in range(1, 5):
        out = server.aggregate_fit(rnd, _noisy_replies(server, rnd))
        target = server.schedule.sparsity(rnd)
        assert out["target_sparsity"] == target
        if server.masks is None:
            assert target == 0.0
            continue
        if per_layer:
            for m in server.masks.values():
                assert m.numel() - int(m.sum()) == prune_count(target, m.numel())
        else:
            total = count_total(server.masks)
            assert total - count_kept(server.masks) == prune_count(target, total)
        assert _zeros_in_scope(server) == count_total(server.masks) - count_kept(server.masks)
        if prev is not None:
            assert all(not torch.any(m & ~prev[n]) for n, m in server.masks.items())
        prev = {n: m.clone() for n, m in server.masks.items()}
    assert out["target_sparsity"] == pytest.approx(0.6)
    assert prev is not None
    mag = select_lowest(Magnitude()(initial), 0.6, per_layer=per_layer)
    same = sum(int((mag[n] == prev[n]).sum()) for n in prev)
    assert same < 0.7 * count_total(prev)  # random ~ 0.6^2 + 0.4^2 = 52% agreement
    other = RandomServer(_cfg("seed=1"), FC, FC.build(seed=0))
    assert not all(torch.equal(other.ranks[n], server.ranks[n]) for n in server.ranks)


# ---------------------------------------------------------------------- PruneFL


def test_prunefl_readjustment_regrows_and_hits_its_density() -> None:
    cfg = _cfg("federation.rounds=4", "pruning.readjust_every=2")
    server = PruneFLServer(cfg, FC, FC.build(seed=0))
    total = sum(t.numel() for t in server.prunable().values())
    # an initial mask (as from setup): prune the first 40% of each tensor
    init = {}
    for n, t in server.prunable().items():
        m = torch.ones(t.numel(), dtype=torch.bool)
        m[: int(0.4 * t.numel())] = False
        init[n] = m.view_as(t)
    server.install_masks(init, monotone=False)
    assert [server.round_config(r)["importance"] for r in range(1, 5)] == [
        False,
        True,
        False,
        False,
    ]
    assert server.round_config(1)["mask"] == "explicit"

    # importance: large on a few pruned positions of the first layer, else small
    name = server.scope[0]
    regrow = (~init[name]).flatten().nonzero().flatten()[:10]
    replies = _noisy_replies(server, 1)
    g = torch.Generator().manual_seed(0)
    for r in replies:
        for n, t in server.prunable().items():
            imp = torch.rand(t.shape, generator=g)
            if n == name:
                imp.view(-1)[regrow] = 100.0
            r.payload.arrays[IMPORTANCE_PREFIX + n] = imp
    out = server.aggregate_fit(1, replies)  # not a readjustment round
    assert "regrown" not in out and server.masks is not None
    assert all(torch.equal(server.masks[n], init[n]) for n in init)

    out = server.aggregate_fit(2, replies)
    density = 1 - 0.3 * 0.5 ** (2 / 4)
    assert server.masks is not None
    assert count_kept(server.masks) == total - prune_count(1 - density, total)
    assert out["target_sparsity"] == pytest.approx(1 - density)
    assert out["regrown"] >= 10
    assert server.masks[name].view(-1)[regrow].all()
    # a regrown weight restarts at exactly +0.0, and clients are told it is kept
    w = server.model.state_dict()[name].view(-1)[regrow]
    assert torch.equal(w, torch.zeros_like(w)) and not torch.signbit(w).any()
    payload = server.configure_fit(3, [0])[0]
    assert torch.equal(payload.arrays[MASK_PREFIX + name], server.masks[name])


@pytest.mark.parametrize("flops_costs", [False, True])
def test_prunefl_importance_is_divided_by_the_cost_model(
    flops_costs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PruneFLServer, "flops_costs", flops_costs)
    spec = ModelSpec("twocnn", (1, 12, 12), 3, hidden=2)  # conv costs 100 and 16, fc 1
    server = PruneFLServer(_cfg(), spec, spec.build(seed=0))
    imp = {
        n: torch.full_like(t, 50.0 if "conv" in n else 1.0) for n, t in server.prunable().items()
    }
    masks = server.select(imp, 0.998)  # prunes 204 of 102,138 entries
    pruned = {n: int((~m).sum()) for n, m in masks.items()}
    if flops_costs:  # conv1: 50 / 100 < fc: 1 / 1 < conv2: 50 / 16
        assert pruned == {
            "conv1.weight": 50,
            "conv2.weight": 0,
            "fc1.weight": 154,
            "classifier.weight": 0,
        }
    else:
        assert pruned == {
            "conv1.weight": 0,
            "conv2.weight": 0,
            "fc1.weight": 204,
            "classifier.weight": 0,
        }


def test_prunefl_client_reports_dense_squared_gradients() -> None:
    cfg = _cfg("method=prunefl", "train.batch_size=4")
    server = PruneFLServer(cfg, SMALL, SMALL.build(seed=0))
    name = server.scope[0]
    m = torch.ones_like(server.prunable()[name], dtype=torch.bool)
    m[:, 0] = False  # input feature 0 pruned for every hidden unit
    server.install_masks(
        {**{n: torch.ones_like(t, dtype=torch.bool) for n, t in server.prunable().items()}, name: m}
    )
    client = PruneFLClient(cfg, SMALL)
    data = _data(0, 12, (1, 1, 3), scale=2.0)
    payload = server.configure_fit(2, [0])[0]
    payload.config["importance"] = True
    reply = client.handle("fit", decode_payload(encode_payload(payload)), data)
    imp = reply.arrays[IMPORTANCE_PREFIX + name]
    assert imp.shape == m.shape and bool((imp >= 0).all())
    assert bool((imp[:, 0] > 0).any())  # pruned entries get an importance too
    assert torch.equal(reply.arrays[name][:, 0], torch.zeros(8))  # but stay pruned
    payload.config["importance"] = False
    reply = client.handle("fit", payload, data)
    assert not any(k.startswith(IMPORTANCE_PREFIX) for k in reply.arrays)


def test_prunefl_initial_mask_from_one_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PruneFLServer, "init_iterations", 2)
    monkeypatch.setattr(PruneFLServer, "init_epochs", 1)
    cfg = _cfg("method=prunefl", "federation.rounds=10", "seed=5")
    server = PruneFLServer(cfg, TINY, TINY.build(seed=0))
    data = [_data(c, 16, (1, 1, 3)) for c in range(3)]
    io = CodecIO(PruneFLClient(cfg, TINY), data)
    server.setup(io)
    assert len(io.calls) == 1 and io.calls[0][0] == "prunefl_init"
    assert server.masks is not None
    total = count_total(server.masks)
    assert count_kept(server.masks) == total - prune_count(0.3, total)
    assert _zeros_in_scope(server) == total - count_kept(server.masks)


# --------------------------------------------------------------------- end to end


def _run(tmp_path: Path, method: str, *extra: str) -> list[dict[str, Any]]:
    from fedprune.experiment import run_experiment

    cfg = load_config(
        overrides=[
            f"method={method}",
            f"out='{tmp_path}'",
            "federation.rounds=3",
            "data.num_clients=4",
            "federation.clients_per_round=3",
            "pruning.final_sparsity=0.8",
            *extra,
        ]
    )
    res = run_experiment(cfg)
    assert res.summary["method"] == method and len(res.records) == 3
    return res.records


def test_end_to_end_omp(tmp_path: Path) -> None:
    recs = _run(tmp_path, "omp", "pruning.prune_round=2")
    assert [r["sparsity"] for r in recs[:1]] == [0.0]
    assert recs[1]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert recs[2]["sparsity"] == recs[1]["sparsity"]
    assert [r["method_metrics"]["target_sparsity"] for r in recs] == [0.0, 0.8, 0.8]


def test_end_to_end_random(tmp_path: Path) -> None:
    recs = _run(tmp_path, "random")
    sp = [r["sparsity"] for r in recs]
    assert sp == sorted(sp) and sp[-1] == pytest.approx(0.8, abs=1e-4)
    assert [r["method_metrics"]["target_sparsity"] for r in recs] == pytest.approx([0.0, 0.7, 0.8])


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_end_to_end_saliency_counts_setup_traffic(tmp_path: Path, method: str) -> None:
    recs = _run(tmp_path, method)
    for r in recs:
        assert r["sparsity"] == pytest.approx(0.8, abs=1e-4)
    # round 1 carries the setup exchange: the model down, the dense scores up
    assert recs[0]["bytes_up"] > 1.5 * recs[1]["bytes_up"]
    assert recs[0]["bytes_up"] > 1.5 * recs[2]["bytes_up"]
    assert recs[0]["bytes_down"] > recs[1]["bytes_down"]


def test_end_to_end_prunefl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PruneFLServer, "init_iterations", 2)
    monkeypatch.setattr(PruneFLServer, "init_epochs", 2)
    recs = _run(tmp_path, "prunefl", "pruning.readjust_every=1")
    expected = [0.3 * 0.5 ** (r / 3) for r in (1, 2, 2)]  # no readjustment after the last round
    mm = [r["method_metrics"] for r in recs]
    assert [m["target_sparsity"] for m in mm] == pytest.approx(expected, abs=1e-4)
    for r, m in zip(recs, mm, strict=True):
        assert m["mask_sparsity"] == pytest.approx(m["target_sparsity"], abs=1e-4)
        # regrown weights are still exactly zero until trained
        assert r["sparsity"] >= m["mask_sparsity"] - 1e-4
    # importance travels up on readjustment rounds only
    assert recs[1]["bytes_up"] > 1.5 * recs[2]["bytes_up"]


def test_noise_at_pruned_positions_is_rejected_by_default() -> None:
    server = OMPServer(
        load_config(overrides=["federation.rounds=2", "pruning.prune_round=1"]),
        FC,
        FC.build(seed=0),
    )
    server.aggregate_fit(1, _noisy_replies(server, 0))  # prunes at the end of round 1
    before = {k: v.clone() for k, v in server.model.state_dict().items()}
    out = server.aggregate_fit(2, _noisy_replies(server, 1))
    assert out["rejected"] == 2
    assert all("pruned positions" in r for r in out["rejections"].values())
    for k, v in server.model.state_dict().items():
        assert torch.equal(v, before[k]), "a rejected round leaves the global model as it was"
