from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune.core.aggregation import coordinate_median, trimmed_mean
from fedprune.core.codec import Payload, decode_payload, encode_payload
from fedprune.core.validation import ValidationPolicy, check_reply
from fedprune.errors import DecodeError

GLOBAL = {
    "w": torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]),
    "b": torch.tensor([0.5, -0.5]),
    "n": torch.tensor(3),
}
MASKS = {"w": GLOBAL["w"] != 0}


def _good() -> Payload:
    arrays = {k: v.clone() for k, v in GLOBAL.items()}
    arrays["w"][MASKS["w"]] += 0.1
    return Payload(arrays=arrays, metrics={"num_examples": 10.0})


def test_a_sound_reply_passes() -> None:
    assert check_reply(_good(), GLOBAL, MASKS) is None


def _poison(kind: str) -> Payload:
    p = _good()
    if kind == "nan":
        p.arrays["b"][0] = float("nan")
    elif kind == "inf":
        p.arrays["w"][0, 0] = float("inf")
    elif kind == "mask":
        p.arrays["w"][0, 1] = 0.01
    elif kind == "shape":
        p.arrays["w"] = torch.zeros(3, 2)
    elif kind == "dtype":
        p.arrays["b"] = p.arrays["b"].double()
    elif kind == "missing":
        del p.arrays["b"]
    elif kind == "count0":
        p.metrics["num_examples"] = 0.0
    elif kind == "count_frac":
        p.metrics["num_examples"] = 2.5
    elif kind == "count_huge":
        p.metrics["num_examples"] = 1e12
    elif kind == "norm":
        p.arrays["w"][MASKS["w"]] *= 1e6
    elif kind == "extra_nan":
        p.arrays["importance/w"] = torch.tensor([float("nan")])
    return p


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("nan", "NaN"),
        ("inf", "NaN or infinite"),
        ("mask", "pruned positions"),
        ("shape", "shape"),
        ("dtype", "dtype"),
        ("missing", "missing"),
        ("count0", "num_examples"),
        ("count_frac", "num_examples"),
        ("count_huge", "num_examples"),
        ("norm", "update norm"),
        ("extra_nan", "importance/w"),
    ],
)
def test_poisoned_replies_are_rejected_with_a_reason(kind: str, needle: str) -> None:
    policy = ValidationPolicy(max_update_norm=100.0, max_examples=10_000)
    reason = check_reply(_poison(kind), GLOBAL, MASKS, policy)
    assert reason is not None and needle in reason


def test_mask_check_can_be_disabled() -> None:
    assert check_reply(_poison("mask"), GLOBAL, MASKS, ValidationPolicy(check_mask=False)) is None


VALID_BUF = encode_payload(_good())


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, len(VALID_BUF) - 1), st.integers(0, 255)).map(
            lambda iv: VALID_BUF[: iv[0]] + bytes([iv[1]]) + VALID_BUF[iv[0] + 1 :]
        ),
        st.integers(0, len(VALID_BUF) - 1).map(lambda i: VALID_BUF[:i]),
    )
)
def test_random_and_mutated_bytes_only_ever_fail_cleanly(buf: bytes) -> None:
    """Decoder + validator: a DecodeError, a rejection, or a sound reply; never a crash."""
    try:
        payload = decode_payload(buf)
    except DecodeError:
        return
    reason = check_reply(payload, GLOBAL, MASKS, ValidationPolicy(max_examples=10_000))
    if reason is None:
        # whatever got through is shaped, finite and respects the mask: safe to average
        for k, v in GLOBAL.items():
            assert payload.arrays[k].shape == v.shape
        assert torch.all(payload.arrays["w"][~MASKS["w"]] == 0)


def test_coordinate_median_resists_one_outlier_and_keeps_zeros() -> None:
    states = [
        {"w": torch.tensor([1.0, 0.0])},
        {"w": torch.tensor([2.0, 0.0])},
        {"w": torch.tensor([1e9, 0.0])},
    ]
    out = coordinate_median(states)
    assert torch.equal(out["w"], torch.tensor([2.0, 0.0]))


def test_trimmed_mean_by_hand() -> None:
    states = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    assert trimmed_mean(states, 0.2)["w"].item() == pytest.approx(3.0)
    assert trimmed_mean(states, 0.0)["w"].item() == pytest.approx(22.0)
    with pytest.raises(ValueError):
        trimmed_mean(states, 0.5)
