"""Wire codec: exact round trips, honest and minimal sizes, strict decoding."""

from __future__ import annotations

import contextlib
import json
import math
import struct
import tracemalloc
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedprune.core.codec import (
    FORMAT_VERSION,
    MAX_NUMEL,
    Payload,
    TensorFormat,
    TensorSpec,
    decode_arrays,
    decode_payload,
    decode_tensor,
    encode_arrays,
    encode_payload,
    encode_tensor,
    encoded_size,
    join_payload,
    split_payload,
)
from fedprune.errors import DecodeError

FULL_FORMATS = (TensorFormat.DENSE, TensorFormat.BITMASK, TensorFormat.COO)

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
FLOATS = {torch.float32, torch.float64, torch.float16, torch.bfloat16}
FP16_SOURCES = {torch.float32, torch.float64}
BITS = {torch.float64: torch.int64, torch.float32: torch.int32}
FORMATS: list[TensorFormat | None] = [None, *FULL_FORMATS]

# hypothesis runs examples inside one test call; the autouse env fixture is harmless there
HSET = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def header_len(ndim: int) -> int:
    return 8 + 4 * ndim


def make_tensor(
    dtype: torch.dtype,
    shape: tuple[int, ...],
    density: float,
    seed: int,
    specials: bool = False,
) -> torch.Tensor:
    """A tensor whose entries are non-zero with probability ``density``."""
    rng = np.random.default_rng(seed)
    keep = np.asarray(rng.random(shape) < density)
    if dtype is torch.bool:
        return torch.from_numpy(np.asarray(keep, dtype=np.bool_).copy())
    if dtype in FLOATS:
        vals = np.asarray(rng.normal(0.0, 10.0, shape))
        if specials and vals.size:
            flat = vals.reshape(-1)
            picks = rng.integers(0, flat.size, 4)
            flat[picks] = [math.nan, math.inf, -math.inf, -0.0]
            keep.reshape(-1)[picks] = True
        t = torch.from_numpy(np.where(keep, vals, 0.0)).to(dtype)
    else:
        info = torch.iinfo(dtype)
        ints = rng.integers(info.min, info.max, shape, endpoint=True)
        t = torch.from_numpy(np.where(keep, ints, 0).astype(np.int64)).to(dtype)
    return t.contiguous()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bit pattern, so that NaN and -0.0 compare exactly."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    if t.dtype in BITS:
        return t.view(BITS[t.dtype])
    return t


def assert_same(got: torch.Tensor, want: torch.Tensor, *, nan_payload: bool = True) -> None:
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    assert got.is_contiguous()
    if not nan_payload and want.is_floating_point():
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(bits(got)[~nan], bits(want)[~nan])
    else:
        assert torch.equal(bits(got), bits(want))


def expected_after(t: torch.Tensor, fp16: bool) -> torch.Tensor:
    return t.half().to(t.dtype) if fp16 and t.dtype in FP16_SOURCES else t


def decode_strict(buf: bytes | bytearray | memoryview) -> torch.Tensor:
    """decode_tensor with warnings as errors (a read-only numpy view makes torch warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return decode_tensor(buf)


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple) | st.sampled_from(
    [(), (0,), (1,), (300,), (3, 0, 5), (17, 19), (2, 3, 4, 5, 1)]
)
densities = st.sampled_from([0.0, 0.03, 0.5, 1.0]) | st.floats(0.0, 1.0)
tensors = st.builds(
    make_tensor,
    dtype=st.sampled_from(DTYPES),
    shape=shapes,
    density=densities,
    seed=st.integers(0, 2**32 - 1),
    specials=st.booleans(),
)


# --------------------------------------------------------------------------------------
# tensor round trips


@settings(HSET, max_examples=150)
@given(t=tensors)
def test_round_trip_every_format(t: torch.Tensor) -> None:
    for fp16 in (False, True):
        want = expected_after(t, fp16)
        for fmt in FORMATS:
            buf = encode_tensor(t, fp16=fp16, fmt=fmt)
            assert isinstance(buf, bytes)
            assert len(buf) == encoded_size(t, fp16=fp16, fmt=fmt)
            if fmt is not None:
                assert buf[4] == fmt
            got = decode_strict(buf)
            assert_same(got, want, nan_payload=not fp16)


@settings(HSET, max_examples=150)
@given(t=tensors, fp16=st.booleans())
def test_auto_format_is_the_smallest(t: torch.Tensor, fp16: bool) -> None:
    sizes = [len(encode_tensor(t, fp16=fp16, fmt=f)) for f in FULL_FORMATS]
    auto = encode_tensor(t, fp16=fp16)
    assert len(auto) == min(sizes) == encoded_size(t, fp16=fp16)
    # ties go to DENSE, then BITMASK
    assert auto[4] == sizes.index(min(sizes))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_as_numpy_and_torch(dtype: torch.dtype) -> None:
    t = make_tensor(dtype, (4, 5), 0.5, seed=1)
    assert_same(decode_strict(encode_tensor(t)), t)
    if dtype is not torch.bfloat16:  # numpy has no bfloat16
        arr = t.numpy()
        for fmt in FORMATS:
            assert_same(decode_strict(encode_tensor(arr, fmt=fmt)), t)


def test_numpy_big_endian_and_non_contiguous_inputs() -> None:
    a = np.arange(12, dtype=">f4").reshape(3, 4) - 5
    want = torch.from_numpy(a.astype("<f4"))
    assert_same(decode_strict(encode_tensor(a)), want)
    t = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    assert_same(decode_strict(encode_tensor(t)), t.contiguous())
    assert_same(decode_strict(encode_tensor(a.T)), want.t().contiguous())


def test_requires_grad_and_scalars() -> None:
    t = torch.tensor(3.5, requires_grad=True)
    got = decode_strict(encode_tensor(t))
    assert got.shape == () and got.item() == 3.5 and not got.requires_grad
    for dtype in DTYPES:
        s = torch.ones((), dtype=dtype)
        for fmt in FORMATS:
            assert_same(decode_strict(encode_tensor(s, fmt=fmt)), s)


def test_zero_size_tensors_keep_their_shape() -> None:
    for dtype in DTYPES:
        t = torch.zeros((3, 0, 7), dtype=dtype)
        for fmt in FORMATS:
            got = decode_strict(encode_tensor(t, fmt=fmt))
            assert got.shape == (3, 0, 7) and got.dtype == dtype


def test_special_values_are_bit_exact() -> None:
    t = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45, 3.0])
    for fmt in FORMATS:
        assert_same(decode_strict(encode_tensor(t, fmt=fmt)), t)
    # -0.0 is a non-zero bit pattern: it is sent, not dropped
    assert decode_tensor(encode_tensor(t, fmt=TensorFormat.COO))[1].item() == 0.0
    assert math.copysign(1.0, decode_tensor(encode_tensor(t, fmt=TensorFormat.COO))[1]) == -1.0


def test_fp16_is_lossy_and_matches_torch_half() -> None:
    t = torch.tensor([1.0 + 2**-11 + 2**-40, 1e-9, 70000.0, -70000.0, 0.1], dtype=torch.float64)
    got = decode_strict(encode_tensor(t, fp16=True))
    assert got.dtype == torch.float64
    assert torch.equal(got, t.half().double())
    assert got[1] == 0 and got[2] == math.inf and got[3] == -math.inf  # flushed, overflowed
    # non-float tensors ignore the flag
    i = torch.arange(10, dtype=torch.int32)
    assert encode_tensor(i, fp16=True) == encode_tensor(i)
    h = torch.randn(10).bfloat16()
    assert encode_tensor(h, fp16=True) == encode_tensor(h)


def test_decoded_tensor_owns_writable_memory() -> None:
    t = make_tensor(torch.float32, (50,), 0.5, seed=3)
    for fmt in FORMATS:
        buf = bytearray(encode_tensor(t, fmt=fmt))
        got = decode_strict(memoryview(buf))
        got.add_(1.0)  # writable
        buf[-1] ^= 0xFF  # and not a view on the buffer
        assert torch.equal(got, t + 1.0)
        assert got.is_contiguous()


# --------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize(
    ("numel", "width"),
    [(1, 1), (200, 1), (256, 1), (257, 2), (65_536, 2), (65_537, 4), (70_000, 4)],
)
def test_coo_index_width_is_the_narrowest(numel: int, width: int) -> None:
    t = torch.zeros(numel)
    t[-1] = 2.0
    buf = encode_tensor(t, fmt=TensorFormat.COO)
    # header + nnz (4) + width byte (1) + one index + one float32 value
    assert len(buf) == header_len(1) + 5 + width + 4
    assert buf[header_len(1) + 4] == width
    assert_same(decode_strict(buf), t)


def test_index_width_helper_covers_uint64() -> None:
    from fedprune.core.codec import _index_width

    assert _index_width(0) == 1
    assert _index_width(2**32) == 4
    assert _index_width(2**32 + 1) == 8


def test_sparse_float32_is_much_smaller_than_dense() -> None:
    n, nnz = 100_000, 10_000
    rng = np.random.default_rng(0)
    t = torch.zeros(n)
    t[torch.from_numpy(rng.choice(n, nnz, replace=False))] = torch.rand(nnz) + 1.0
    dense = header_len(1) + 4 * n
    bitmask = header_len(1) + 4 + n // 8 + 4 * nnz
    coo = header_len(1) + 5 + nnz * (4 + 4)
    assert len(encode_tensor(t, fmt=TensorFormat.DENSE)) == dense
    assert len(encode_tensor(t, fmt=TensorFormat.COO)) == coo
    auto = encode_tensor(t)
    assert auto[4] == TensorFormat.BITMASK
    assert len(auto) == bitmask == 52_516
    assert len(auto) < 0.2 * dense
    assert len(encode_tensor(t, fp16=True)) == header_len(1) + 4 + n // 8 + 2 * nnz


def test_bool_masks_cost_one_bit_per_entry() -> None:
    m = make_tensor(torch.bool, (118_000,), 0.5, seed=0)
    buf = encode_tensor(m)
    assert buf[4] == TensorFormat.DENSE
    assert len(buf) == header_len(1) + 118_000 // 8
    assert len(encode_tensor(m, fmt=TensorFormat.BITMASK)) == header_len(1) + 4 + 118_000 // 8
    assert_same(decode_strict(buf), m)
    odd = make_tensor(torch.bool, (3, 7), 0.5, seed=1)  # 21 bits -> 3 bytes
    assert len(encode_tensor(odd, fmt=TensorFormat.DENSE)) == header_len(2) + 3
    # a nearly empty mask goes COO with no values section
    sparse = torch.zeros(118_000, dtype=torch.bool)
    sparse[[5, 70_000]] = True
    buf = encode_tensor(sparse)
    assert buf[4] == TensorFormat.COO and len(buf) == header_len(1) + 5 + 2 * 4
    assert_same(decode_strict(buf), sparse)


def test_ties_prefer_dense_then_bitmask() -> None:
    # int8, 8 entries, 3 non-zeros: DENSE 8 == BITMASK 4+1+3 < COO 5+3*2
    t = torch.tensor([1, 0, 2, 0, 0, 3, 0, 0], dtype=torch.int8)
    assert encode_tensor(t)[4] == TensorFormat.DENSE
    # all zeros: BITMASK 5 == COO 5 < DENSE 8
    assert encode_tensor(torch.zeros(8, dtype=torch.int8))[4] == TensorFormat.BITMASK
    # empty: DENSE 0 < BITMASK 4 < COO 5
    assert encode_tensor(torch.zeros(0))[4] == TensorFormat.DENSE


def test_header_layout() -> None:
    t = torch.zeros(3, 4, dtype=torch.float64)
    buf = encode_tensor(t, fmt=TensorFormat.DENSE, fp16=True)
    assert buf[:3] == b"FPT"
    assert buf[3] == FORMAT_VERSION
    assert buf[4] == TensorFormat.DENSE
    assert buf[5] == 1 and buf[6] == 2  # float64 sent as float16
    assert buf[7] == 2 and struct.unpack_from("<2I", buf, 8) == (3, 4)
    assert len(buf) == header_len(2) + 12 * 2


def test_encode_rejects_unsupported_inputs() -> None:
    with pytest.raises(TypeError, match="complex64"):
        encode_tensor(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="numpy dtype"):
        encode_tensor(np.zeros(2, dtype=np.uint32))
    with pytest.raises(TypeError, match="list"):
        encode_tensor([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dimensions"):
        encode_tensor(torch.zeros((1,) * 9))
    with pytest.raises(ValueError, match="format"):
        encode_tensor(torch.zeros(2), fmt=7)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decode_tensor("FPT")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# strict tensor decoding


def small_buffers() -> list[bytes]:
    t = torch.tensor([[0.0, 1.5, 0.0], [-2.0, 0.0, 0.0]])
    m = torch.tensor([True, False, True, True, False])
    return [encode_tensor(x, fmt=f) for x in (t, m) for f in FULL_FORMATS] + [
        encode_tensor(torch.tensor(7, dtype=torch.int16))
    ]


def test_every_truncation_is_rejected() -> None:
    for buf in small_buffers():
        for cut in range(len(buf)):
            with pytest.raises(DecodeError):
                decode_tensor(buf[:cut])


def test_trailing_bytes_are_rejected() -> None:
    for buf in small_buffers():
        with pytest.raises(DecodeError, match="trailing"):
            decode_tensor(buf + b"\x00")


def patched(buf: bytes, pos: int, value: int) -> bytes:
    b = bytearray(buf)
    b[pos] = value
    return bytes(b)


def test_header_fields_are_checked() -> None:
    buf = encode_tensor(torch.tensor([1.0, 0.0, 2.0]), fmt=TensorFormat.DENSE)
    for pos in range(3):
        with pytest.raises(DecodeError, match="magic"):
            decode_tensor(patched(buf, pos, buf[pos] ^ 0x20))
    with pytest.raises(DecodeError, match="unsupported codec version 2"):
        decode_tensor(patched(buf, 3, 2))
    with pytest.raises(DecodeError, match="unsupported codec version 0"):
        decode_tensor(patched(buf, 3, 0))
    with pytest.raises(DecodeError, match="format"):
        decode_tensor(patched(buf, 4, 4))
    with pytest.raises(DecodeError, match="no reference"):  # 3 is VALUES
        decode_tensor(patched(buf, 4, 3))
    with pytest.raises(DecodeError, match="dtype code 10"):
        decode_tensor(patched(buf, 5, 10))
    with pytest.raises(DecodeError, match="value dtype code 255"):
        decode_tensor(patched(buf, 6, 255))
    with pytest.raises(DecodeError, match="dimensions"):
        decode_tensor(patched(buf, 7, 9))
    # int32 values cannot be sent as float16, nor float16 as float32
    ints = encode_tensor(torch.arange(4, dtype=torch.int32))
    with pytest.raises(DecodeError, match="transported"):
        decode_tensor(patched(ints, 6, 2))
    with pytest.raises(DecodeError, match="transported"):
        decode_tensor(patched(buf, 6, 1))
    with pytest.raises(TypeError):
        decode_tensor(None)  # type: ignore[arg-type]


def coo_buffer(numel: int, idx: list[int], vals: list[float]) -> bytes:
    head = b"FPT" + bytes([FORMAT_VERSION, TensorFormat.COO, 0, 0, 1]) + struct.pack("<I", numel)
    return (
        head
        + struct.pack("<IB", len(idx), 1)
        + bytes(idx)
        + np.asarray(vals, dtype="<f4").tobytes()
    )


def test_coo_indices_are_checked() -> None:
    good = coo_buffer(10, [1, 4, 9], [1.0, 2.0, 3.0])
    assert decode_tensor(good).tolist() == [0, 1, 0, 0, 2, 0, 0, 0, 0, 3]
    with pytest.raises(DecodeError, match="strictly increasing"):
        decode_tensor(coo_buffer(10, [4, 1, 9], [1.0, 2.0, 3.0]))
    with pytest.raises(DecodeError, match="strictly increasing"):
        decode_tensor(coo_buffer(10, [1, 4, 4], [1.0, 2.0, 3.0]))
    with pytest.raises(DecodeError, match="out of range"):
        decode_tensor(coo_buffer(10, [1, 4, 10], [1.0, 2.0, 3.0]))
    with pytest.raises(DecodeError, match="non-zeros"):
        decode_tensor(coo_buffer(2, [0, 1, 2], [1.0, 2.0, 3.0]))
    with pytest.raises(DecodeError, match="index width"):
        decode_tensor(patched(good, header_len(1) + 4, 2))


def test_bitmask_popcount_and_padding_are_checked() -> None:
    t = torch.tensor([0.0, 1.0, 0.0, 2.0, 3.0])  # 5 entries: 3 padding bits
    buf = encode_tensor(t, fmt=TensorFormat.BITMASK)
    mask_at = header_len(1) + 4
    assert buf[mask_at] == 0b01011000
    with pytest.raises(DecodeError, match="set bits"):
        decode_tensor(patched(buf, mask_at, 0b11011000))
    with pytest.raises(DecodeError, match="set bits"):
        decode_tensor(patched(buf, mask_at, 0b01010000))
    with pytest.raises(DecodeError, match="padding"):
        decode_tensor(patched(buf, mask_at, 0b01010001))
    with pytest.raises(DecodeError, match="non-zeros"):
        decode_tensor(patched(buf, header_len(1), 6))
    dense_mask = encode_tensor(torch.tensor([True, False, True]), fmt=TensorFormat.DENSE)
    with pytest.raises(DecodeError, match="padding"):
        decode_tensor(patched(dense_mask, header_len(1), dense_mask[-1] | 1))


def test_gigantic_shapes_are_rejected_without_allocating() -> None:
    def header(fmt: int, shape: tuple[int, ...], dtype: int = 1) -> bytes:
        return (
            b"FPT"
            + bytes([FORMAT_VERSION, fmt, dtype, dtype, len(shape)])
            + struct.pack(f"<{len(shape)}I", *shape)
        )

    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="elements"):
            decode_tensor(header(0, (2**20, 2**20, 2**20)))
        with pytest.raises(DecodeError, match="elements"):
            decode_tensor(header(2, (MAX_NUMEL + 1,)) + struct.pack("<IB", 0, 4))
        with pytest.raises(DecodeError, match="elements"):
            decode_tensor(header(0, (2**32 - 1,) * 8))
        # within the element bound, the buffer's own length bounds what it may allocate
        with pytest.raises(DecodeError, match="may expand"):
            decode_tensor(header(0, (2**15, 2**15)) + b"\x00" * 64)
        with pytest.raises(DecodeError, match="may expand"):
            decode_tensor(header(1, (2**15, 2**15)) + struct.pack("<I", 5))
        # issue 14: 17 bytes declaring 2**31 float64 zeros in COO (16 GiB)
        forged = header(2, (2**31,)) + struct.pack("<IB", 0, 4)
        assert len(forged) == 17
        with pytest.raises(DecodeError, match="may expand"):
            decode_tensor(forged)
        # with a schema, the expected shape decides before anything is allocated
        with pytest.raises(DecodeError, match="expected"):
            decode_tensor(forged, expect=TensorSpec((3,), torch.float64))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def buffers_for_fuzzing() -> list[bytes]:
    out = small_buffers()
    for dtype in (torch.float32, torch.int8, torch.bfloat16, torch.bool):
        t = make_tensor(dtype, (4, 70), 0.1, seed=2)
        out += [encode_tensor(t, fmt=f) for f in FULL_FORMATS]
    return out


FUZZ_TENSORS = buffers_for_fuzzing()


def decodes_or_decode_error(fn: Any, buf: bytes) -> None:
    with contextlib.suppress(DecodeError):
        fn(buf)


@settings(HSET, max_examples=150)
@given(data=st.binary(max_size=80), prefix=st.sampled_from([b"", b"FPT\x01", b"FPT\x01\x02\x00"]))
def test_random_bytes_raise_only_decode_error(data: bytes, prefix: bytes) -> None:
    decodes_or_decode_error(decode_tensor, prefix + data)
    decodes_or_decode_error(decode_payload, b"FPP\x01" + data)
    decodes_or_decode_error(decode_payload, data)


@settings(HSET, max_examples=300)
@given(
    which=st.integers(0, len(FUZZ_TENSORS) - 1),
    pos=st.integers(0, 10_000),
    value=st.integers(0, 255),
    op=st.sampled_from(["set", "insert", "delete"]),
)
def test_mutated_tensor_buffers_raise_only_decode_error(
    which: int, pos: int, value: int, op: str
) -> None:
    b = bytearray(FUZZ_TENSORS[which])
    pos %= len(b)
    if op == "set":
        b[pos] = value
    elif op == "insert":
        b.insert(pos, value)
    else:
        del b[pos]
    decodes_or_decode_error(decode_tensor, bytes(b))


# --------------------------------------------------------------------------------------
# payloads


def sample_payload() -> Payload:
    return Payload(
        arrays={
            "layer.weight": make_tensor(torch.float32, (6, 5), 0.3, seed=4),
            "layer.mask": make_tensor(torch.bool, (6, 5), 0.3, seed=4),
            "count": torch.tensor(17, dtype=torch.int64),
            "bias": torch.zeros(5, dtype=torch.float64),
        },
        config={
            "round": 3,
            "lr": 0.05,
            "prune": True,
            "name": "fédprune",
            "widths": [16, 32, None],
            "shape": (3, 4),  # type: ignore[dict-item]
            "nested": {"a": {"b": [1.5, "x", False]}},
        },
        metrics={
            "loss": 0.25,
            "n": 12,
            "nan": math.nan,
            "inf": math.inf,
            "ninf": -math.inf,
            "np": np.float32(0.5),  # type: ignore[dict-item]
        },
    )


def test_payload_round_trip() -> None:
    p = sample_payload()
    q = decode_payload(encode_payload(p))
    assert list(q.arrays) == list(p.arrays)
    for name, t in p.arrays.items():
        assert_same(q.arrays[name], t)
    assert q.config == {**p.config, "shape": [3, 4]}  # tuples come back as lists
    assert q.metrics["loss"] == 0.25 and q.metrics["n"] == 12.0 and q.metrics["np"] == 0.5
    assert all(isinstance(v, float) for v in q.metrics.values())
    assert math.isnan(q.metrics["nan"])
    assert q.metrics["inf"] == math.inf and q.metrics["ninf"] == -math.inf
    assert list(q.metrics) == list(p.metrics)


def test_payload_layout_and_size() -> None:
    p = sample_payload()
    buf = encode_payload(p)
    assert buf[:3] == b"FPP" and buf[3] == FORMAT_VERSION
    (hlen,) = struct.unpack_from("<I", buf, 4)
    header = json.loads(buf[8 : 8 + hlen])
    assert set(header) == {"config", "metrics", "arrays"}
    assert header["metrics"]["nan"] == "NaN" and header["metrics"]["ninf"] == "-Infinity"
    arrays = encode_arrays(p.arrays)
    assert header["arrays"] == [[k, len(v)] for k, v in arrays.items()]
    assert len(buf) == 8 + hlen + sum(len(v) for v in arrays.values())
    assert buf[8 + hlen :] == b"".join(arrays.values())


def test_payload_fp16_and_empty() -> None:
    p = sample_payload()
    q = decode_payload(encode_payload(p, fp16=True))
    w = p.arrays["layer.weight"]
    assert torch.equal(q.arrays["layer.weight"], w.half().float())
    assert_same(q.arrays["layer.mask"], p.arrays["layer.mask"])
    e = decode_payload(encode_payload(Payload()))
    assert e.arrays == {} and e.config == {} and e.metrics == {}


def test_encode_arrays_round_trip_in_order() -> None:
    p = sample_payload()
    bufs = encode_arrays(p.arrays, fp16=False)
    assert list(bufs) == list(p.arrays)
    got = decode_arrays(bufs)
    assert list(got) == list(p.arrays)
    for name, t in p.arrays.items():
        assert_same(got[name], t)
    bufs["bias"] = bufs["bias"][:-1]
    with pytest.raises(DecodeError, match="'bias'"):
        decode_arrays(bufs)


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"x": object()}, TypeError, r"config\.x"),
        ({"x": {1, 2}}, TypeError, "set"),
        ({"x": np.int64(3)}, TypeError, "int64"),
        ({"x": {1: "a"}}, TypeError, "not a str"),
        ({"x": [1.0, math.nan]}, ValueError, r"config\.x\[1\]"),
        ({"x": math.inf}, ValueError, "NaN/Infinity"),
        ({"x": "\ud800"}, ValueError, "JSON"),
    ],
)
def test_non_json_config_is_a_programming_error(
    config: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        encode_payload(Payload(config=config))


def test_bad_metrics_and_names_are_programming_errors() -> None:
    with pytest.raises(TypeError, match="not a number"):
        encode_payload(Payload(metrics={"ok": True}))
    with pytest.raises(TypeError, match="not a number"):
        encode_payload(Payload(metrics={"x": "1.0"}))  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="not a str"):
        encode_payload(Payload(arrays={1: torch.zeros(1)}))  # type: ignore[dict-item]


def raw_payload(header: Any, tail: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return b"FPP" + bytes([FORMAT_VERSION]) + struct.pack("<I", len(text)) + text + tail


def test_payload_truncations_and_trailing_bytes_are_rejected() -> None:
    p = sample_payload()
    buf = encode_payload(p)
    for cut in range(len(buf)):
        with pytest.raises(DecodeError):
            decode_payload(buf[:cut])
    with pytest.raises(DecodeError, match="trailing"):
        decode_payload(buf + b"\x00")
    with pytest.raises(DecodeError, match="magic"):
        decode_payload(patched(buf, 0, ord("X")))
    with pytest.raises(DecodeError, match="unsupported codec version 9"):
        decode_payload(patched(buf, 3, 9))
    with pytest.raises(DecodeError, match="magic"):
        decode_payload(encode_tensor(torch.zeros(3)))


T = encode_tensor(torch.arange(3.0))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (raw_payload([1, 2]), "not an object"),
        (raw_payload({"config": {}, "metrics": {}}), "keys"),
        (raw_payload({"config": {}, "metrics": {}, "arrays": [], "x": 1}), "keys"),
        (raw_payload({"config": [], "metrics": {}, "arrays": []}), "config"),
        (raw_payload({"config": {}, "metrics": [], "arrays": []}), "metrics"),
        (raw_payload({"config": {}, "metrics": {"a": "1"}, "arrays": []}), "not a number"),
        (raw_payload({"config": {}, "metrics": {"a": True}, "arrays": []}), "not a number"),
        (raw_payload({"config": {}, "metrics": {"a": None}, "arrays": []}), "not a number"),
        (raw_payload({"config": {}, "metrics": {}, "arrays": {}}), "list"),
        (raw_payload({"config": {}, "metrics": {}, "arrays": [["a"]]}, T), "entry"),
        (raw_payload({"config": {}, "metrics": {}, "arrays": [["a", -1]]}), "entry"),
        (raw_payload({"config": {}, "metrics": {}, "arrays": [["a", True]]}), "entry"),
        (raw_payload({"config": {}, "metrics": {}, "arrays": [[1, len(T)]]}, T), "entry"),
        (
            raw_payload({"config": {}, "metrics": {}, "arrays": [["a", 0], ["a", 0]]}),
            "not unique",
        ),
        (
            raw_payload({"config": {}, "metrics": {}, "arrays": [["a", len(T) + 1]]}, T),
            "truncated",
        ),
        (raw_payload({"config": {}, "metrics": {}, "arrays": [["a", 2]]}, T), "trailing"),
        (raw_payload({"config": {}, "metrics": {}, "arrays": [["a", 3]]}, T[:3]), "'a'"),
        (raw_payload(b'{"config":{"x":NaN},"metrics":{},"arrays":[]}'), "NaN"),
        (raw_payload(b'{"config":{"x":1e999},"metrics":{},"arrays":[]}'), "overflows"),
        (raw_payload(b'{"config":{},"config":{},"metrics":{},"arrays":[]}'), "duplicate"),
        (raw_payload(b'{"config":{},"metrics":{},"arrays":[]'), "invalid"),
        (raw_payload(b'{"config":{"x":"\xff"},"metrics":{},"arrays":[]}'), "UTF-8"),
        (raw_payload(b"[" * 100_000 + b"]" * 100_000), "invalid"),
        (raw_payload(b'{"config":{"x":' + b"9" * 5000 + b'},"metrics":{},"arrays":[]}'), "invalid"),
    ],
)
def test_malformed_payload_headers_are_rejected(raw: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_payload(raw)


def test_split_and_join_payload_round_trip() -> None:
    p = sample_payload()
    buf = encode_payload(p)
    parts = split_payload(buf)
    (hlen,) = struct.unpack_from("<I", buf, 4)
    assert parts.head == buf[:8] and parts.header == buf[8 : 8 + hlen]
    assert parts.arrays == encode_arrays(p.arrays)  # the per-tensor buffers, in order
    assert list(parts.arrays) == list(p.arrays)
    assert parts.nbytes == len(buf)
    assert join_payload(parts.head, parts.header, parts.arrays) == buf
    # the buffers may come in any order: they are joined in the header's
    shuffled = dict(reversed(list(parts.arrays.items())))
    assert join_payload(parts.head, parts.header, shuffled) == buf
    assert split_payload(memoryview(bytearray(buf))).arrays == parts.arrays
    empty = encode_payload(Payload())
    e = split_payload(empty)
    assert e.arrays == {} and join_payload(e.head, e.header, {}) == empty


def test_split_payload_checks_the_framing() -> None:
    buf = encode_payload(sample_payload())
    for cut in range(len(buf)):
        with pytest.raises(DecodeError):
            split_payload(buf[:cut])
    with pytest.raises(DecodeError, match="trailing"):
        split_payload(buf + b"\x00")
    with pytest.raises(DecodeError, match="magic"):
        split_payload(patched(buf, 0, ord("X")))
    with pytest.raises(DecodeError, match="not unique"):
        split_payload(raw_payload({"config": {}, "metrics": {}, "arrays": [["a", 0], ["a", 0]]}))
    with pytest.raises(DecodeError, match="invalid"):
        split_payload(raw_payload(b'{"config":{},"metrics":{},"arrays":[]'))


def test_join_payload_checks_the_pieces_against_each_other() -> None:
    parts = split_payload(encode_payload(sample_payload()))
    head, header, arrays = parts.head, parts.header, parts.arrays
    name = next(iter(arrays))
    with pytest.raises(DecodeError, match="8 bytes"):
        join_payload(head[:-1], header, arrays)
    with pytest.raises(DecodeError, match="magic"):
        join_payload(b"XPP" + head[3:], header, arrays)
    with pytest.raises(DecodeError, match="version"):
        join_payload(patched(head, 3, 9), header, arrays)
    with pytest.raises(DecodeError, match="announces"):
        join_payload(head, header + b" ", arrays)
    with pytest.raises(DecodeError, match="invalid"):
        join_payload(head, header[:-1] + b"]", arrays)
    with pytest.raises(DecodeError, match="missing"):
        join_payload(head, header, {k: v for k, v in arrays.items() if k != name})
    with pytest.raises(DecodeError, match="unknown"):
        join_payload(head, header, {**arrays, "extra": b""})
    with pytest.raises(DecodeError, match=f"'{name}'.*says"):
        join_payload(head, header, {**arrays, name: arrays[name][:-1]})
    # lengths right but a tensor buffer corrupt: joined, and decode_payload refuses it
    bad = join_payload(head, header, {**arrays, name: b"FPX" + arrays[name][3:]})
    with pytest.raises(DecodeError, match="magic"):
        decode_payload(bad)


def test_raw_payload_helper_is_valid() -> None:
    ok = raw_payload(
        {"config": {"k": [1]}, "metrics": {"m": "Infinity"}, "arrays": [["a", len(T)]]}, T
    )
    q = decode_payload(ok)
    assert q.config == {"k": [1]} and q.metrics == {"m": math.inf}
    assert torch.equal(q.arrays["a"], torch.arange(3.0))


FUZZ_PAYLOAD = encode_payload(
    Payload(
        arrays={"w": make_tensor(torch.float32, (3, 40), 0.1, seed=5), "m": torch.ones(9) > 0},
        config={"a": [1, 2.5, "s"], "b": {"c": None}},
        metrics={"loss": 1.0},
    )
)


@settings(HSET, max_examples=300)
@given(
    pos=st.integers(0, len(FUZZ_PAYLOAD) - 1),
    value=st.integers(0, 255),
    op=st.sampled_from(["set", "insert", "delete"]),
)
def test_mutated_payloads_raise_only_decode_error(pos: int, value: int, op: str) -> None:
    b = bytearray(FUZZ_PAYLOAD)
    if op == "set":
        b[pos] = value
    elif op == "insert":
        b.insert(pos, value)
    else:
        del b[pos]
    decodes_or_decode_error(decode_payload, bytes(b))
