"""Issue 14: values-only tensors, schema decoding, bf16, compression, bounded allocation."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedprune.core.codec import (
    COMPRESSED,
    Change,
    Payload,
    Schema,
    Support,
    TensorFormat,
    decode_payload,
    decode_tensor,
    encode_payload,
    encode_tensor,
    join_payload,
    pack_delivery,
    split_payload,
    supports_of,
    unpack_delivery,
)
from fedprune.core.validation import reply_schema
from fedprune.errors import DecodeError

HSET = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.bool]
HEAD = 9  # VALUES body head: reference count, CRC, change code


def sparse(dtype: torch.dtype, shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    keep = rng.random(shape) < density
    if dtype is torch.bool:
        return torch.from_numpy(keep.copy())
    vals = rng.normal(0.0, 1.0, shape) + np.sign(rng.normal(0.0, 1.0, shape)) * 0.5
    return torch.from_numpy(np.where(keep, vals, 0.0)).to(dtype)


def prune(t: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """``t`` with ``fraction`` of its non-zeros set to zero."""
    rng = np.random.default_rng(seed)
    out = t.clone()
    flat = out.view(-1)
    nz = torch.nonzero(flat != 0).view(-1).numpy()
    drop = nz[rng.random(nz.size) < fraction]
    flat[torch.from_numpy(drop)] = False if t.dtype is torch.bool else 0
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    if t.dtype is torch.float32:
        return t.view(torch.int32)
    if t.dtype is torch.float64:
        return t.view(torch.int64)
    return t


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


# -- values-only round trips ------------------------------------------------------------


@settings(HSET)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.sampled_from([(0,), (1,), (7,), (300,), (17, 19), (3, 4, 5)]),
    density=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    dropped=st.sampled_from([0.0, 0.01, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
    compress=st.booleans(),
)
def test_values_only_round_trips_bit_for_bit(
    dtype: torch.dtype,
    shape: tuple[int, ...],
    density: float,
    dropped: float,
    seed: int,
    compress: bool,
) -> None:
    before = sparse(dtype, shape, density, seed)
    ref = Support.of(before)
    after = prune(before, dropped, seed + 1)
    if dtype is not torch.bool:  # surviving values change, as after training
        after = torch.where(after != 0, after * 1.5, after)
    buf = encode_tensor(after, reference=ref, compress=compress)
    got = decode_tensor(buf, reference=ref)
    assert same(got, after)
    # values-only is never larger than the best full format
    assert len(buf) <= len(encode_tensor(after, compress=compress))


def test_values_only_is_four_bytes_per_value_plus_a_header() -> None:
    t = sparse(torch.float32, (300, 400), 0.1, 0)
    ref = Support.of(t)
    buf = encode_tensor(t, reference=ref)
    assert buf[4] == TensorFormat.VALUES
    assert len(buf) == 8 + 4 * 2 + HEAD + 4 * ref.count
    full = encode_tensor(t)
    assert len(full) - len(buf) > 300 * 400 // 8 - 16  # the bitmask is gone
    # -0.0 and NaN inside the support travel as values
    t.view(-1)[ref.positions()[:2]] = torch.tensor([-0.0, float("nan")])
    assert same(decode_tensor(encode_tensor(t, reference=ref), reference=ref), t)


@pytest.mark.parametrize(
    ("fraction", "change"),
    [(0.0, Change.NONE), (0.004, Change.RANKGAPS), (0.5, Change.RANKMASK)],
)
def test_a_mask_change_is_applied_exactly(fraction: float, change: Change) -> None:
    before = sparse(torch.float32, (200, 300), 0.3, 1)
    ref = Support.of(before)
    after = prune(before, fraction, 2)
    buf = encode_tensor(after, reference=ref)
    assert buf[4] == TensorFormat.VALUES and buf[16 + 8] == change
    got = decode_tensor(buf, reference=ref)
    assert same(got, after)
    assert torch.equal(got != 0, after != 0)  # the new mask, exactly
    # and the same for the boolean mask itself (no values at all)
    mask_ref = Support.of(before != 0)
    mbuf = encode_tensor(after != 0, reference=mask_ref)
    assert mbuf[4] == TensorFormat.VALUES
    assert torch.equal(decode_tensor(mbuf, reference=mask_ref), after != 0)
    if change is Change.NONE:
        assert len(mbuf) == 16 + HEAD


def test_gap_coded_changes_cost_about_a_byte_per_removed_position() -> None:
    before = sparse(torch.float32, (1000, 100), 0.5, 3)
    ref = Support.of(before)
    after = prune(before, 0.02, 4)
    removed = ref.count - int((after != 0).sum())
    buf = encode_tensor(after, reference=ref)
    change_bytes = len(buf) - (16 + HEAD + 4 * (ref.count - removed))
    assert change_bytes <= 8 + 1.3 * removed


def test_a_wrong_or_stale_reference_is_a_decode_error() -> None:
    t = sparse(torch.float32, (50, 40), 0.2, 5)
    ref = Support.of(t)
    buf = encode_tensor(prune(t, 0.1, 6), reference=ref)
    with pytest.raises(DecodeError, match="no reference"):
        decode_tensor(buf)
    with pytest.raises(DecodeError, match="another reference"):  # stale: another count
        decode_tensor(buf, reference=Support.of(prune(t, 0.1, 7)))
    # same count, other positions: the CRC tells
    moved = ref.mask.copy()
    i = int(np.flatnonzero(moved)[0])
    j = int(np.flatnonzero(~moved)[0])
    moved[i], moved[j] = False, True
    other = Support(moved)
    assert other.count == ref.count and other.crc != ref.crc
    with pytest.raises(DecodeError, match="another reference"):
        decode_tensor(buf, reference=other)
    with pytest.raises(DecodeError, match="elements"):
        decode_tensor(buf, reference=Support(np.ones(7, dtype=bool)))


def test_values_outside_the_reference_fall_back_to_the_full_format() -> None:
    t = sparse(torch.float32, (30, 30), 0.2, 8)
    ref = Support.of(t)
    grown = t.clone()
    grown.view(-1)[int(np.flatnonzero(~ref.mask)[0])] = 1.0
    buf = encode_tensor(grown, reference=ref)
    assert buf[4] != TensorFormat.VALUES
    assert same(decode_tensor(buf), grown)
    with pytest.raises(ValueError, match="VALUES"):
        encode_tensor(grown, reference=ref, fmt=TensorFormat.VALUES)


def test_payload_with_references_and_deliveries() -> None:
    state = {"w": sparse(torch.float32, (64, 32), 0.1, 9), "b": sparse(torch.float32, (32,), 1, 9)}
    p = Payload(arrays={**state, "mask/w": state["w"] != 0}, config={"round": 3})
    refs = supports_of(p.arrays)
    full = encode_payload(p)
    lean = encode_payload(p, references=refs)
    assert len(lean) < len(full) - 64 * 32 // 8
    got = decode_payload(lean, references=refs)
    for k, v in p.arrays.items():
        assert same(got.arrays[k], v)
    with pytest.raises(DecodeError, match=r"'w'.*no reference"):
        decode_payload(lean)
    # a delivery carries the receiver's memory beside the wire buffer
    delivery = pack_delivery(lean, refs)
    wire, memory = unpack_delivery(delivery)
    assert bytes(wire) == lean and memory == refs
    assert same(decode_payload(delivery).arrays["w"], state["w"])
    with pytest.raises(DecodeError, match="magic"):  # never where a schema is expected
        decode_payload(delivery, expect=Schema.of(p.arrays))


# -- lossy bf16 and lossless compression ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bf16_matches_torch_and_halves_the_values(dtype: torch.dtype) -> None:
    t = sparse(dtype, (40, 50), 1.0, 10)
    t.view(-1)[:3] = torch.tensor([1e30, -1e-30, float("inf")], dtype=dtype)
    buf = encode_tensor(t, wire_dtype="bfloat16")
    assert buf[6] == 3 and len(buf) == 16 + 2 * t.numel()
    assert same(decode_tensor(buf), t.to(torch.bfloat16).to(dtype))
    npbuf = encode_tensor(t.numpy(), wire_dtype="bfloat16")
    assert npbuf == buf
    with pytest.raises(ValueError, match="contradicts"):
        encode_tensor(t, fp16=True, wire_dtype="bfloat16")
    with pytest.raises(ValueError, match="wire dtype"):
        encode_tensor(t, wire_dtype="float8")


def test_compression_is_lossless_and_smaller_on_weights() -> None:
    torch.manual_seed(0)
    w = torch.nn.Linear(784, 150).weight.detach()
    plain = encode_tensor(w)
    packed = encode_tensor(w, compress=True)
    assert packed[4] & COMPRESSED
    assert len(packed) < 0.9 * len(plain)
    assert same(decode_tensor(packed), w)
    # incompressible values keep the raw layout
    raw = np.frombuffer(np.random.default_rng(0).bytes(4000), dtype=np.int32).copy()
    noise = torch.from_numpy(raw)
    assert encode_tensor(noise, compress=True) == encode_tensor(noise)


def test_a_compression_bomb_is_refused() -> None:
    count = 1000
    bomb = zlib.compress(b"\x00" * 10**7)
    head = b"FPT" + bytes([1, TensorFormat.DENSE | COMPRESSED, 8, 8, 1]) + struct.pack("<I", count)
    buf = head + struct.pack("<I", len(bomb) | 1 << 31) + bomb
    with pytest.raises(DecodeError, match="inflate"):
        decode_tensor(buf)


# -- schemas ------------------------------------------------------------------------------


def model_state() -> dict[str, torch.Tensor]:
    return {
        "fc.weight": sparse(torch.float32, (16, 20), 0.3, 11),
        "fc.bias": sparse(torch.float32, (16,), 1.0, 12),
        "steps": torch.tensor(3, dtype=torch.int64),
    }


def test_replies_are_decoded_against_the_schema() -> None:
    state = model_state()
    schema = reply_schema(state, "fit")
    good = Payload(arrays=dict(state), metrics={"num_examples": 5})
    got = decode_payload(encode_payload(good), expect=schema)
    assert list(got.arrays) == list(state)
    imp = torch.ones(16, 20, dtype=torch.float64)
    side = Payload(arrays={**state, "importance/fc.weight": imp})
    assert "importance/fc.weight" in decode_payload(encode_payload(side), expect=schema).arrays
    cases = {
        "unexpected": {**state, "evil": torch.zeros(3)},
        "missing": {k: v for k, v in state.items() if k != "fc.bias"},
        "shape": {**state, "fc.bias": torch.zeros(17)},
        "dtype": {**state, "fc.bias": torch.zeros(16, dtype=torch.float64)},
        "prefixed shape": {**state, "importance/fc.weight": torch.zeros(20, 16)},
        "prefixed unknown": {**state, "importance/nothing": torch.zeros(1)},
    }
    for what, arrays in cases.items():
        with pytest.raises(DecodeError):
            decode_payload(encode_payload(Payload(arrays=arrays)), expect=schema)
        assert what
    # setup tasks may leave arrays out
    only_side = Payload(arrays={"score/fc.weight": torch.zeros(16, 20)})
    decode_payload(encode_payload(only_side), expect=reply_schema(state, "score"))


def test_unknown_arrays_are_rejected_before_decoding() -> None:
    state = model_state()
    parts = split_payload(encode_payload(Payload(arrays={**state, "evil": torch.zeros(2)})))
    garbage = dict(parts.arrays)
    garbage["evil"] = b"\xff" * len(parts.arrays["evil"])
    buf = join_payload(parts.head, parts.header, garbage)
    with pytest.raises(DecodeError, match="unexpected array"):
        decode_payload(buf, expect=reply_schema(state, "fit"))


def forged_reply(shape: tuple[int, ...], name: str = "evil") -> bytes:
    """A sound reply plus one 17-byte COO tensor of zeros declaring ``shape`` (float64)."""
    state = model_state()
    t = b"FPT" + bytes([1, TensorFormat.COO, 1, 1, len(shape)])
    t += struct.pack(f"<{len(shape)}I", *shape) + struct.pack("<IB", 0, 4)
    parts = split_payload(encode_payload(Payload(arrays=dict(state), metrics={"num_examples": 1})))
    header = json.loads(parts.header)
    header["arrays"].append([name, len(t)])
    raw = json.dumps(header).encode()
    head = b"FPP" + bytes([1]) + struct.pack("<I", len(raw))
    return join_payload(head, raw, {**parts.arrays, name: t})


def test_a_forged_shape_in_a_reply_is_rejected_with_or_without_schema() -> None:
    state = model_state()
    buf = forged_reply((2**31,))
    with pytest.raises(DecodeError, match="may expand"):
        decode_payload(buf)
    with pytest.raises(DecodeError, match="unexpected array"):
        decode_payload(buf, expect=reply_schema(state, "fit"))


_RLIMIT_SCRIPT = textwrap.dedent(
    """
    import resource, struct, sys
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    from core.test_wire_values import forged_reply, model_state
    from fedprune.core.codec import decode_payload, decode_tensor
    from fedprune.core.validation import reply_schema
    from fedprune.engines.flower.wire import decode_content, encode_for_flower, make_content
    from fedprune.errors import DecodeError

    vm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmSize"))
    limit = vm * 1024 + {extra}
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:  # the limit bites
        np.ones(2**27)
        print("limit not enforced"); sys.exit(3)
    except MemoryError:
        pass
    tensor = b"FPT" + bytes([1, 2, 1, 1, 1]) + struct.pack("<I", 2**31) + struct.pack("<IB", 0, 4)
    assert len(tensor) == 17
    state = model_state()
    cases = [
        lambda: decode_tensor(tensor),
        lambda: decode_payload(forged_reply((2**31,))),
        lambda: decode_payload(forged_reply((2**16, 2**15))),
        lambda: decode_payload(forged_reply((2**31,)), expect=reply_schema(state, "fit")),
        lambda: decode_payload(forged_reply((2**31,), "fc.bias")),
    ]
    from fedprune.core.codec import Payload, split_payload
    from flwr.app import Array
    enc = encode_for_flower(Payload(arrays=state))
    content = make_content(enc, "fit")
    arrays = content["fedprune.arrays"]
    arrays["fc.bias"] = Array(dtype="float64", shape=(2**31,), stype=arrays["fc.bias"].stype,
        data=b"FPT" + bytes([1, 2, 1, 1, 1]) + struct.pack("<I", 2**31) + struct.pack("<IB", 0, 4))
    cases.append(lambda: decode_content(content))
    cases.append(lambda: decode_content(content, expect=reply_schema(state, "fit")))
    for i, case in enumerate(cases):
        try:
            case()
        except DecodeError:
            continue
        except MemoryError:
            print("case", i, "MemoryError"); sys.exit(1)
        print("case", i, "decoded"); sys.exit(2)
    print("ok")
    """
)


def test_forged_shapes_are_refused_under_an_address_space_limit() -> None:
    from pathlib import Path

    tests = str(Path(__file__).resolve().parents[1])
    script = _RLIMIT_SCRIPT.format(tests=tests, extra=256 * 2**20)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


# -- fuzz: mutated real payloads raise only DecodeError ---------------------------------


def real_payloads() -> list[tuple[bytes, dict[str, Support]]]:
    """Payloads as the engines send them: an FC model (hidden 16) pruned to 90% by global
    magnitude, in full format, values-only against the previous round's support (with a
    mask change), as a reply, compressed, in bf16, and with explicit masks."""
    from fedprune.core.masks import apply_masks
    from fedprune.core.select import select_lowest
    from fedprune.models import build_model

    model = build_model("fc", (1, 28, 28), 10, hidden=16, seed=0)
    names = [n for n, p in model.named_parameters() if p.dim() > 1]
    params = dict(model.named_parameters())
    scores = {n: params[n].detach().abs() for n in names}
    masks_80 = select_lowest(scores, 0.8)
    apply_masks(model, masks_80)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks_90 = select_lowest(scores, 0.9)
    apply_masks(model, masks_90)
    after = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = {k: torch.where(v != 0, v * 1.01, v) for k, v in after.items()}
    refs_before = supports_of(before)
    refs_after = supports_of(after)
    config = {"task": "fit", "round": 7, "lr": 0.02, "seed": 12345, "mask": "nonzero"}
    metrics = {"num_examples": 600.0, "train_loss": 0.7}
    explicit = {**after, **{f"mask/{n}": m for n, m in masks_90.items()}}
    out = [
        (encode_payload(Payload(arrays=after, config=config)), {}),
        (encode_payload(Payload(arrays=after, config=config), references=refs_before), refs_before),
        (
            encode_payload(Payload(arrays=trained, metrics=metrics), references=refs_after),
            refs_after,
        ),
        (
            encode_payload(
                Payload(arrays=trained, metrics=metrics), references=refs_after, compress=True
            ),
            refs_after,
        ),
        (encode_payload(Payload(arrays=after, config=config), wire_dtype="bfloat16"), {}),
        (
            encode_payload(
                Payload(arrays=explicit, config=config), references=supports_of(explicit)
            ),
            supports_of(explicit),
        ),
    ]
    for buf, refs in out:  # every one is sound to begin with
        decode_payload(buf, references=refs or None)
    return out


def _mutate(buf: bytes, rng: np.random.Generator) -> bytes:
    kind = int(rng.integers(0, 6))
    b = bytearray(buf)
    if kind == 0:  # flip 1-4 bytes
        for pos in rng.integers(0, len(b), int(rng.integers(1, 5))):
            b[int(pos)] ^= int(rng.integers(1, 256))
    elif kind == 1:  # truncate
        del b[int(rng.integers(0, len(b))) :]
    elif kind == 2:  # insert or delete a few bytes
        pos = int(rng.integers(0, len(b)))
        if rng.random() < 0.5:
            b[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
        else:
            del b[pos : pos + int(rng.integers(1, 9))]
    else:  # forge a shape, a count or a length inside a tensor
        parts = split_payload(buf)
        names = list(parts.arrays)
        name = names[int(rng.integers(0, len(names)))]
        t = bytearray(parts.arrays[name])
        ndim = t[7]
        if kind == 3 and ndim:  # a dimension
            dim = int(rng.integers(0, ndim))
            big = int(rng.choice([2**31, 2**32 - 1, 2**16, int(rng.integers(0, 2**32))]))
            struct.pack_into("<I", t, 8 + 4 * dim, big)
        elif kind == 4:  # ndim, format or dtype byte
            t[int(rng.integers(4, 8))] = int(rng.integers(0, 256))
        elif len(t) >= 8 + 4 * ndim + 4:  # the first u32 of the body (nnz, reference count)
            struct.pack_into("<I", t, 8 + 4 * ndim, int(rng.integers(0, 2**32)))
        return join_payload(parts.head, parts.header, {**parts.arrays, name: bytes(t)})
    return bytes(b)


def fuzz(count: int, seed: int) -> int:
    """Decode ``count`` mutated real payloads, with and without a schema; the number that
    still decoded (anything but DecodeError fails the test)."""
    payloads = real_payloads()
    from fedprune.models import build_model

    state = build_model("fc", (1, 28, 28), 10, hidden=16, seed=0).state_dict()
    schema = reply_schema(state, "fit")
    loose = reply_schema(state, "score")  # a setup task: arrays optional
    rng = np.random.default_rng(seed)
    decoded = 0
    for i in range(count):
        buf, refs = payloads[i % len(payloads)]
        bad = _mutate(buf, rng)
        expect = (None, schema, loose)[i % 3]
        try:
            decode_payload(bad, expect=expect, references=refs or None)
            decoded += 1
        except DecodeError:
            pass
    return decoded


def test_fuzz_mutated_real_payloads_raise_only_decode_error() -> None:
    decoded = fuzz(3_000, seed=0)
    assert decoded < 3_000


@pytest.mark.slow
def test_fuzz_100k_mutated_real_payloads() -> None:
    fuzz(100_000, seed=1)
