from __future__ import annotations

import pytest
import torch

from fedprune.config import load_config
from fedprune.core.codec import Payload, decode_payload, encode_payload
from fedprune.core.select import prune_count
from fedprune.errors import ConfigError
from fedprune.methods.base import ClientReply, ModelSpec
from fedprune.methods.fedsparsify import FedSparsifyGlobalServer, FedSparsifyLocalServer

SPEC = ModelSpec("fc", (1, 1, 2), 2)  # fc: 2 -> 128 -> 128 -> 2


def _server(
    cls: type, merge: str = "majority", rounds: int = 4, *extra: str
) -> FedSparsifyLocalServer:
    cfg = load_config(
        overrides=[
            f"pruning.merge={merge}",
            f"federation.rounds={rounds}",
            "pruning.final_sparsity=0.5",
            *extra,
        ]
    )
    return cls(cfg, SPEC, SPEC.build(seed=0))


def _reply(cid: int, server: FedSparsifyLocalServer, first: torch.Tensor, n: int) -> ClientReply:
    arrays = {k: v.clone() for k, v in server.model.state_dict().items()}
    name = server.scope[0]
    arrays[name] = torch.zeros_like(arrays[name])
    arrays[name].view(-1)[: first.numel()] = first
    return ClientReply(cid, Payload(arrays=arrays, metrics={"num_examples": float(n)}))


def test_majority_vote_on_a_hand_built_example() -> None:
    server = _server(FedSparsifyLocalServer)
    name = server.scope[0]
    # three clients, four positions of the first layer (the rest are zero everywhere)
    r1 = _reply(0, server, torch.tensor([1.0, 0.0, 3.0, 0.0]), 1)
    r2 = _reply(1, server, torch.tensor([2.0, 5.0, 0.0, 0.0]), 1)
    r3 = _reply(2, server, torch.tensor([3.0, 0.0, 0.0, 7.0]), 2)
    server.aggregate_fit(1, [r1, r2, r3])
    got = server.model.state_dict()[name].view(-1)[:4]
    # need = max(1, 3 // 2) = 1 vote -> all 4 positions survive (ties kept);
    # majority merge = plain weighted average with purged values counted as 0
    assert torch.allclose(got, torch.tensor([(1 + 2 + 6) / 4, 5 / 4, 3 / 4, 14 / 4]))

    server = _server(FedSparsifyLocalServer, merge="majority_nnz")
    r4 = _reply(3, server, torch.tensor([0.0, 0.0, 0.0, 4.0]), 1)
    server.aggregate_fit(1, [r1, r2, r3, r4])  # need = 2 votes
    got = server.model.state_dict()[name].view(-1)[:4]
    # position 0: kept by r1, r2, r3 (weights 1, 1, 2) -> (1 + 2 + 6) / 4
    # position 1: one vote -> pruned; position 2: one vote -> pruned
    # position 3: kept by r3 (w=2, 7) and r4 (w=1, 4) -> (14 + 4) / 3
    assert torch.allclose(got, torch.tensor([9 / 4, 0.0, 0.0, 6.0]))
    assert server.masks is not None
    assert server.masks[name].view(-1)[:4].tolist() == [True, False, False, True]


def test_local_applies_server_momentum_and_keeps_the_vote_mask() -> None:
    """``federation.aggregation = fedavgm`` reaches the Local merge (it was ignored), and
    the momentum step cannot revive a position the vote removed."""
    plain = _server(FedSparsifyLocalServer, "majority_nnz", 4)
    server = _server(
        FedSparsifyLocalServer,
        "majority_nnz",
        4,
        "federation.aggregation=fedavgm",
        "federation.server_momentum=0.5",
    )
    name = server.scope[0]
    before = server.model.state_dict()[name].view(-1)[:4].clone()
    replies = [
        _reply(0, server, torch.tensor([1.0, 0.0, 3.0, 0.0]), 1),
        _reply(1, server, torch.tensor([2.0, 5.0, 0.0, 4.0]), 1),
        _reply(2, server, torch.tensor([3.0, 0.0, 0.0, 7.0]), 2),
        _reply(3, server, torch.tensor([0.0, 0.0, 0.0, 4.0]), 1),
    ]
    plain.aggregate_fit(1, replies)
    server.aggregate_fit(1, replies)
    merged = plain.model.state_dict()[name].view(-1)[:4]
    got = server.model.state_dict()[name].view(-1)[:4]
    # first round: v = (1 - b) * (theta - merged), theta' = theta - v, then the vote's zeros
    expect = before - 0.5 * (before - merged)
    expect[1] = expect[2] = 0.0  # one vote each of four: removed
    assert torch.allclose(got, expect)
    assert not torch.allclose(got, merged)
    assert server.masks is not None and server.momentum is not None
    assert server.masks[name].view(-1)[:4].tolist() == [True, False, False, True]
    assert torch.all(server.momentum.velocity[name].view(-1)[1:3] == 0)
    assert plain.momentum is None


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_local_refuses_robust_aggregation(rule: str) -> None:
    with pytest.raises(ConfigError, match=f"federation.aggregation = '{rule}' is not supported"):
        _server(FedSparsifyLocalServer, "majority", 4, f"federation.aggregation={rule}")


def test_nnz_average_without_vote() -> None:
    server = _server(FedSparsifyLocalServer, merge="nnz_average")
    name = server.scope[0]
    r1 = _reply(0, server, torch.tensor([1.0, 0.0, 3.0]), 1)
    r2 = _reply(1, server, torch.tensor([3.0, 0.0, 0.0]), 3)
    server.aggregate_fit(1, [r1, r2])
    got = server.model.state_dict()[name].view(-1)[:3]
    assert torch.allclose(got, torch.tensor([10 / 4, 0.0, 3.0]))


def test_global_purge_reaches_schedule_and_is_monotone() -> None:
    server = _server(FedSparsifyGlobalServer, rounds=4)
    replies = [
        ClientReply(
            0, Payload(arrays=dict(server.model.state_dict()), metrics={"num_examples": 1.0})
        )
    ]
    prev = None
    for rnd in range(1, 5):
        out = server.aggregate_fit(rnd, replies)
        assert server.masks is not None or out["target_sparsity"] == 0
        if server.masks is not None:
            kept = sum(int(m.sum()) for m in server.masks.values())
            total = sum(m.numel() for m in server.masks.values())
            assert 1 - kept / total == pytest.approx(out["target_sparsity"], abs=1 / total)
            if prev is not None:
                for n, m in server.masks.items():
                    assert not torch.any(m & ~prev[n])
            prev = {n: m.clone() for n, m in server.masks.items()}
        replies = [
            ClientReply(
                0, Payload(arrays=dict(server.model.state_dict()), metrics={"num_examples": 1.0})
            )
        ]
    assert out["target_sparsity"] == pytest.approx(0.5)


def test_sparse_payload_decodes_to_the_same_tensors() -> None:
    server = _server(FedSparsifyGlobalServer, rounds=1)
    replies = [
        ClientReply(
            0, Payload(arrays=dict(server.model.state_dict()), metrics={"num_examples": 1.0})
        )
    ]
    server.aggregate_fit(1, replies)  # prune to 50%
    payload = server.configure_fit(2, [0])[0]
    buf = encode_payload(payload)
    back = decode_payload(buf)
    dense_bytes = sum(t.numel() * t.element_size() for t in payload.arrays.values())
    assert len(buf) < 0.75 * dense_bytes
    for k, v in payload.arrays.items():
        assert torch.equal(back.arrays[k], v), k


def test_local_and_global_give_different_masks_on_the_same_non_iid_round(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Same data, same clients, same initial weights, one round: the two variants purge
    different things (Global: magnitudes of the average; Local: majority of client purges)."""
    from fedprune.experiment import load_federation, run_experiment

    masks = {}
    fed = None
    for method in ("fedsparsify-global", "fedsparsify-local"):
        cfg = load_config(
            overrides=[
                f"method='{method}'",
                f"out='{tmp_path}'",
                f"name='{method}'",
                "data.partition='sort-and-deal'",
                "data.classes_per_client=2",
                "data.num_clients=5",
                "federation.rounds=1",
                "pruning.final_sparsity=0.5",
            ]
        )
        fed = fed or load_federation(cfg)
        res = run_experiment(cfg, fed=fed)
        masks[method] = {n: p != 0 for n, p in res.model.named_parameters() if n.endswith("weight")}
    g, loc = masks["fedsparsify-global"], masks["fedsparsify-local"]
    differing = sum(int((g[n] != loc[n]).sum()) for n in g)
    total = sum(m.numel() for m in g.values())
    assert differing > 0.01 * total, (differing, total)
    # both still respect the schedule's target within the vote's slack
    for m in (g, loc):
        kept = sum(int(v.sum()) for v in m.values())
        assert kept <= 0.75 * total


def test_global_purge_is_exact_when_live_weights_are_exactly_zero() -> None:
    """Issue 17: live exact zeros tied with pruned entries and took the purge's budget."""
    server = _server(FedSparsifyGlobalServer, rounds=4)
    total = sum(t.numel() for t in server.prunable().values())
    for rnd in range(1, 5):
        arrays = {k: v.clone() for k, v in server.model.state_dict().items()}
        for n in server.scope:
            flat, size = arrays[n].view(-1), arrays[n].numel()
            if rnd == 2:  # 40% exact zeros at the end: more than round 2 prunes (35%)
                flat[-4 * size // 10 :] = 0.0
            elif rnd > 2:  # then live exact zeros *before* the pruned entries
                flat[: 2 * size // 10] = 0.0
        reply = ClientReply(0, Payload(arrays=arrays, metrics={"num_examples": 1.0}))
        out = server.aggregate_fit(rnd, [reply])
        if server.masks is None:
            assert out["target_sparsity"] == 0.0
            continue
        pruned = total - sum(int(m.sum()) for m in server.masks.values())
        assert pruned == prune_count(out["target_sparsity"], total)
