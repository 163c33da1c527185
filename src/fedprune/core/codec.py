"""Wire codec: tensors and whole messages to compact, honest bytes.

Every payload between a client and the server goes through this module, in the in-process
engine as well as on Flower, and the byte counts the project reports are ``len()`` of the
buffers built here. No pickle and no ``eval``: the format is a small binary header, raw
little-endian values and a JSON header for messages.

Tensor buffer
-------------
All integers are little-endian.

=========  ==========  ==============================================================
offset     size        field
=========  ==========  ==============================================================
0          3           magic ``b"FPT"``
3          1           format version (:data:`FORMAT_VERSION`, currently 1)
4          1           format: 0 DENSE, 1 BITMASK, 2 COO (:class:`TensorFormat`)
5          1           dtype code of the tensor (see below)
6          1           dtype code of the transported values (equal to the dtype code,
                       or float16 for a float32/float64 tensor sent with ``fp16=True``)
7          1           ``ndim`` (0..8)
8          4 × ndim    shape, one uint32 per dimension (``numel`` <= :data:`MAX_NUMEL`)
8 + 4·nd   ...         body, by format (below)
=========  ==========  ==============================================================

The header is ``8 + 4 * ndim`` bytes (12 for a vector, 16 for a matrix). Bodies, with
``n = numel``, ``nnz`` the number of non-zero entries and ``vs`` the value item size:

- **DENSE**: the ``n`` values (``n * vs`` bytes); for bool tensors ``np.packbits`` of the
  flattened tensor (``ceil(n / 8)`` bytes, padding bits zero).
- **BITMASK**: ``nnz`` (uint32), ``np.packbits`` of ``t != 0`` over the flattened tensor
  (``ceil(n / 8)`` bytes, big-endian bit order, padding bits zero), then the ``nnz``
  non-zero values in flat order (nothing for bool: every non-zero is ``True``).
- **COO**: ``nnz`` (uint32), index width in bytes (uint8: 1, 2, 4 or 8, always the
  narrowest unsigned type that holds ``n - 1``), the ``nnz`` flat indices (strictly
  increasing), then the ``nnz`` values (nothing for bool).

"Non-zero" is decided on the bit pattern of the transported values, so ``-0.0`` and NaN
count as non-zero and every tensor round-trips bit for bit (with ``fp16=True``: bit for
bit equal to ``t.half()`` cast back to the original dtype).

Dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16 (sent as its raw 2-byte bits),
4 int64, 5 int32, 6 int16, 7 int8, 8 uint8, 9 bool.

``fmt=None`` picks the smallest format for the tensor, computed arithmetically from
``n`` and ``nnz``; ties go to DENSE, then BITMASK.

``fp16=True`` is **lossy**: float32 and float64 values travel as IEEE float16 (rounded to
nearest, values beyond ±65504 become ±inf, tiny values flush to zero) and are decoded
back to the original dtype. Other dtypes ignore the flag.

Message buffer
--------------
=========  ==========  ==============================================================
offset     size        field
=========  ==========  ==============================================================
0          3           magic ``b"FPP"``
3          1           format version (:data:`FORMAT_VERSION`)
4          4           ``h``: length of the JSON header (uint32)
8          h           UTF-8 JSON object with exactly the keys ``config``,
                       ``metrics`` and ``arrays`` (``[[name, length], ...]`` in order)
8 + h      ...         the tensor buffers, concatenated in the order of ``arrays``
=========  ==========  ==============================================================

The JSON is strict: no ``NaN``/``Infinity`` tokens, no duplicate keys. Non-finite
metrics travel as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` and are
decoded back to floats; a non-finite float inside ``config`` is rejected at encode time.

A transport that carries the pieces separately (the Flower engine: one ``Array`` per
tensor) cuts a message with :func:`split_payload` (head, JSON header, tensor buffers; the
framing checked) and rejoins it with :func:`join_payload` (head, header, names and
lengths checked against each other) before :func:`decode_payload`; only this module
knows the layout above.

Decoding is strict: every malformed buffer (bad magic, version, codes, lengths, counts,
indices, padding, JSON) raises :class:`fedprune.errors.DecodeError` with a one-line
message, and a header cannot make the decoder allocate more than :data:`MAX_NUMEL`
elements. Non-finite tensor values are allowed here; validating them is a separate layer.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt
import torch

from fedprune.errors import DecodeError

__all__ = [
    "FORMAT_VERSION",
    "MAX_NDIM",
    "MAX_NUMEL",
    "Payload",
    "PayloadParts",
    "TensorFormat",
    "decode_arrays",
    "decode_payload",
    "decode_tensor",
    "encode_arrays",
    "encode_payload",
    "encode_tensor",
    "encoded_size",
    "join_payload",
    "split_payload",
]

FORMAT_VERSION: Final[int] = 1
"""Version byte written into every tensor and message buffer."""

MAX_NDIM: Final[int] = 8
"""Most dimensions a tensor on the wire may have."""

MAX_NUMEL: Final[int] = 2**31
"""Most elements a tensor on the wire may have (bounds what a hostile header can allocate)."""

TENSOR_MAGIC: Final[bytes] = b"FPT"
PAYLOAD_MAGIC: Final[bytes] = b"FPP"

TensorLike: TypeAlias = "torch.Tensor | npt.NDArray[Any]"
BytesLike: TypeAlias = "bytes | bytearray | memoryview"

_HEADER = struct.Struct("<3sBBBBB")  # magic, version, format, dtype, value dtype, ndim
_U32 = struct.Struct("<I")
_COO_HEAD = struct.Struct("<IB")  # nnz, index width
_PAYLOAD_HEAD = struct.Struct("<3sBI")  # magic, version, JSON header length


class TensorFormat(enum.IntEnum):
    """Body layout of an encoded tensor."""

    DENSE = 0
    BITMASK = 1
    COO = 2


@dataclass(frozen=True)
class _DType:
    code: int
    name: str
    torch_dtype: torch.dtype
    wire: np.dtype[Any]  # little-endian storage dtype (bfloat16 -> <u2)
    is_bool: bool = False

    @property
    def itemsize(self) -> int:
        return int(self.wire.itemsize)


_DTYPES: Final[tuple[_DType, ...]] = (
    _DType(0, "float32", torch.float32, np.dtype("<f4")),
    _DType(1, "float64", torch.float64, np.dtype("<f8")),
    _DType(2, "float16", torch.float16, np.dtype("<f2")),
    _DType(3, "bfloat16", torch.bfloat16, np.dtype("<u2")),
    _DType(4, "int64", torch.int64, np.dtype("<i8")),
    _DType(5, "int32", torch.int32, np.dtype("<i4")),
    _DType(6, "int16", torch.int16, np.dtype("<i2")),
    _DType(7, "int8", torch.int8, np.dtype("i1")),
    _DType(8, "uint8", torch.uint8, np.dtype("u1")),
    _DType(9, "bool", torch.bool, np.dtype("?"), is_bool=True),
)
_BY_CODE: Final[dict[int, _DType]] = {d.code: d for d in _DTYPES}
_BY_TORCH: Final[dict[torch.dtype, _DType]] = {d.torch_dtype: d for d in _DTYPES}
# numpy arrays are looked up by (kind, itemsize) so that either byte order is accepted.
_BY_NUMPY: Final[dict[tuple[str, int], _DType]] = {
    (d.wire.kind, d.wire.itemsize): d for d in _DTYPES if d.name != "bfloat16"
}
_F16: Final[_DType] = _BY_CODE[2]
_FP16_SOURCES: Final[frozenset[int]] = frozenset({0, 1})  # float32, float64
_UINT_OF_SIZE: Final[dict[int, np.dtype[Any]]] = {
    1: np.dtype("u1"),
    2: np.dtype("<u2"),
    4: np.dtype("<u4"),
    8: np.dtype("<u8"),
}
_INDEX_DTYPES: Final[dict[int, np.dtype[Any]]] = _UINT_OF_SIZE  # by index width in bytes


# --------------------------------------------------------------------------------------
# sizes


def _index_width(numel: int) -> int:
    """Byte width of the narrowest unsigned type that holds every flat index ``< numel``."""
    top = max(numel - 1, 0)
    if top < 2**8:
        return 1
    if top < 2**16:
        return 2
    if top < 2**32:
        return 4
    return 8


def _header_size(ndim: int) -> int:
    return _HEADER.size + 4 * ndim


def _body_sizes(numel: int, nnz: int, vdt: _DType) -> tuple[int, int, int]:
    """Body sizes of DENSE, BITMASK and COO for a tensor with ``numel``/``nnz``."""
    mask_bytes = (numel + 7) // 8
    vs = 0 if vdt.is_bool else vdt.itemsize
    dense = mask_bytes if vdt.is_bool else numel * vs
    bitmask = 4 + mask_bytes + nnz * vs
    coo = _COO_HEAD.size + nnz * (_index_width(numel) + vs)
    return dense, bitmask, coo


def _pick(sizes: tuple[int, int, int]) -> TensorFormat:
    # ``index`` returns the first minimum: ties go to DENSE, then BITMASK.
    return TensorFormat(sizes.index(min(sizes)))


# --------------------------------------------------------------------------------------
# encoding


@dataclass
class _Prepared:
    dtype: _DType  # dtype of the tensor
    vdtype: _DType  # dtype of the transported values
    shape: tuple[int, ...]
    flat: npt.NDArray[Any]  # 1-D, contiguous, little-endian, in vdtype's wire dtype

    @property
    def numel(self) -> int:
        return int(self.flat.size)

    def nonzero_mask(self) -> npt.NDArray[np.bool_]:
        if self.vdtype.is_bool:
            return self.flat.view(np.uint8) != 0
        return self.flat.view(_UINT_OF_SIZE[self.vdtype.itemsize]) != 0

    def count_nonzero(self) -> int:
        if self.vdtype.is_bool:
            return int(np.count_nonzero(self.flat.view(np.uint8)))
        return int(np.count_nonzero(self.flat.view(_UINT_OF_SIZE[self.vdtype.itemsize])))


def _prepare(t: TensorLike, fp16: bool) -> _Prepared:
    if isinstance(t, torch.Tensor):
        if t.layout != torch.strided:
            raise TypeError(f"cannot encode a tensor with layout {t.layout}; use .to_dense()")
        dt = _BY_TORCH.get(t.dtype)
        if dt is None:
            raise TypeError(
                f"cannot encode dtype {t.dtype}; supported: {', '.join(d.name for d in _DTYPES)}"
            )
        x = t.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        vdt = dt
        if fp16 and dt.code in _FP16_SOURCES:
            x = x.to(torch.float16)
            vdt = _F16
        x = x.contiguous()
        shape = tuple(int(s) for s in x.shape)
        bf16 = vdt.name == "bfloat16"
        arr = x.view(torch.int16).numpy().view(np.uint16) if bf16 else x.numpy()
    elif isinstance(t, np.ndarray):
        found = _BY_NUMPY.get((t.dtype.kind, t.dtype.itemsize))
        if found is None:
            raise TypeError(
                f"cannot encode numpy dtype {t.dtype}; supported: "
                f"{', '.join(d.name for d in _DTYPES if d.name != 'bfloat16')}"
            )
        dt = vdt = found
        arr = t
        if fp16 and dt.code in _FP16_SOURCES:
            with np.errstate(over="ignore"):  # overflow to ±inf is the documented loss
                arr = arr.astype(np.float16)
            vdt = _F16
        shape = tuple(int(s) for s in arr.shape)
    else:
        raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(t).__name__}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"cannot encode a tensor with {len(shape)} dimensions (max {MAX_NDIM})")
    if any(s >= 2**32 for s in shape):
        raise ValueError(f"cannot encode shape {shape}: a dimension does not fit in uint32")
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise ValueError(f"cannot encode a tensor of {numel} elements (max {MAX_NUMEL})")
    # no copy for contiguous little-endian input; byte-swaps big-endian numpy input
    flat = np.ascontiguousarray(arr.reshape(-1), dtype=vdt.wire)
    return _Prepared(dt, vdt, shape, flat)


def _header(fmt: TensorFormat, p: _Prepared) -> bytes:
    ndim = len(p.shape)
    return _HEADER.pack(
        TENSOR_MAGIC, FORMAT_VERSION, int(fmt), p.dtype.code, p.vdtype.code, ndim
    ) + struct.pack(f"<{ndim}I", *p.shape)


def _check_fmt(fmt: TensorFormat | int | None) -> TensorFormat | None:
    if fmt is None:
        return None
    try:
        return TensorFormat(fmt)
    except ValueError:
        raise ValueError(
            f"unknown tensor format {fmt!r}; expected one of {list(TensorFormat)}"
        ) from None


def encode_tensor(t: TensorLike, *, fp16: bool = False, fmt: TensorFormat | None = None) -> bytes:
    """Encode one tensor for the wire.

    Parameters
    ----------
    t : torch.Tensor or numpy.ndarray
        A strided tensor of dtype float32, float64, float16, bfloat16, int64, int32,
        int16, int8, uint8 or bool, on any device (it is copied to the CPU), of any
        shape with at most :data:`MAX_NDIM` dimensions and :data:`MAX_NUMEL` elements.
    fp16 : bool, default False
        Send float32/float64 values as float16 (lossy; decoded back to the original
        dtype). Ignored for every other dtype.
    fmt : TensorFormat or None, default None
        Force a body format; ``None`` picks the smallest one for this tensor.

    Returns
    -------
    bytes
        The encoded tensor (layout in the module docstring).

    Raises
    ------
    TypeError
        Unsupported input type, dtype or layout.
    ValueError
        Too many dimensions or elements, or an unknown ``fmt``.
    """
    fmt = _check_fmt(fmt)
    p = _prepare(t, fp16)
    mask: npt.NDArray[np.bool_] | None = None
    nnz = 0
    if fmt is not TensorFormat.DENSE:
        mask = p.nonzero_mask()
        nnz = int(np.count_nonzero(mask))
        if fmt is None:
            fmt = _pick(_body_sizes(p.numel, nnz, p.vdtype))
    parts: list[bytes | npt.NDArray[Any]] = [_header(fmt, p)]
    if fmt is TensorFormat.DENSE:
        # a bool mask is sent as packed bits even when dense
        parts.append(np.packbits(p.flat) if p.vdtype.is_bool else p.flat)
    elif fmt is TensorFormat.BITMASK:
        assert mask is not None
        parts += [_U32.pack(nnz), np.packbits(mask)]
        if not p.vdtype.is_bool:
            # gather by index: much faster than boolean indexing for scattered masks
            parts.append(p.flat[np.flatnonzero(mask)])
    else:  # COO
        assert mask is not None
        idx = np.flatnonzero(mask)
        width = _index_width(p.numel)
        parts += [_COO_HEAD.pack(nnz, width), idx.astype(_INDEX_DTYPES[width])]
        if not p.vdtype.is_bool:
            parts.append(p.flat[idx])
    # one copy of each part straight into the result
    return b"".join(x if isinstance(x, bytes) else x.data.cast("B") for x in parts)


def encoded_size(t: TensorLike, *, fp16: bool = False, fmt: TensorFormat | None = None) -> int:
    """Length of ``encode_tensor(t, fp16=fp16, fmt=fmt)``, without building the buffer.

    Parameters
    ----------
    t : torch.Tensor or numpy.ndarray
        As for :func:`encode_tensor`.
    fp16 : bool, default False
        As for :func:`encode_tensor`.
    fmt : TensorFormat or None, default None
        As for :func:`encode_tensor`.

    Returns
    -------
    int
        The exact encoded length in bytes.
    """
    fmt = _check_fmt(fmt)
    p = _prepare(t, fp16)
    head = _header_size(len(p.shape))
    if fmt is TensorFormat.DENSE:
        return head + _body_sizes(p.numel, 0, p.vdtype)[0]
    sizes = _body_sizes(p.numel, p.count_nonzero(), p.vdtype)
    return head + (min(sizes) if fmt is None else sizes[int(fmt)])


# --------------------------------------------------------------------------------------
# decoding


@contextlib.contextmanager
def _decode_errors(what: str) -> Iterator[None]:
    """Turn the low-level errors a hostile buffer can provoke into :class:`DecodeError`."""
    try:
        yield
    except DecodeError:
        raise
    except (struct.error, ValueError, IndexError, OverflowError, TypeError, RecursionError) as e:
        raise DecodeError(f"malformed {what}: {e}") from e


def _as_view(buf: BytesLike, what: str) -> memoryview:
    if not isinstance(buf, bytes | bytearray | memoryview):
        raise TypeError(f"{what} must be bytes, bytearray or memoryview, got {type(buf).__name__}")
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1 or not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return mv


def _values(mv: memoryview, dtype: np.dtype[Any], count: int, offset: int) -> npt.NDArray[Any]:
    """A read-only view of ``count`` items at ``offset`` (lengths were checked before)."""
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.frombuffer(mv, dtype=dtype, count=count, offset=offset)


def _unpack_mask(mv: memoryview, numel: int, offset: int, what: str) -> npt.NDArray[np.bool_]:
    nbytes = (numel + 7) // 8
    packed = _values(mv, np.dtype("u1"), nbytes, offset)
    rem = numel % 8
    if rem and int(packed[-1]) & (0xFF >> rem):
        raise DecodeError(f"{what}: padding bits after the last element are not zero")
    return np.unpackbits(packed, count=numel).view(np.bool_)


def _storage(dt: _DType) -> np.dtype[Any]:
    """Native-order numpy dtype that holds decoded values of ``dt`` (bf16 as int16 bits)."""
    if dt.name == "bfloat16":
        return np.dtype(np.int16)
    return dt.wire.newbyteorder("=")


def _to_tensor(arr: npt.NDArray[Any], dt: _DType, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.from_numpy(arr.reshape(shape))
    if dt.name == "bfloat16":
        out = out.view(torch.bfloat16)
    return out


def decode_tensor(buf: BytesLike) -> torch.Tensor:
    """Decode a buffer made by :func:`encode_tensor`.

    Parameters
    ----------
    buf : bytes, bytearray or memoryview
        Exactly one encoded tensor, with no trailing bytes.

    Returns
    -------
    torch.Tensor
        A contiguous, writable CPU tensor that owns its memory, of the original dtype and
        shape.

    Raises
    ------
    DecodeError
        The buffer is malformed: wrong magic, unsupported version, unknown format or
        dtype code, too many dimensions or elements, wrong total length, ``nnz`` larger
        than the tensor, COO indices not strictly increasing or out of range, a bitmask
        whose popcount differs from ``nnz`` or whose padding bits are set.
    """
    mv = _as_view(buf, "tensor buffer")
    try:
        return _decode_tensor(mv)
    except DecodeError:
        raise
    except (struct.error, ValueError, IndexError, OverflowError, TypeError) as e:
        raise DecodeError(f"malformed tensor buffer: {e}") from e


def _decode_tensor(mv: memoryview) -> torch.Tensor:
    n = len(mv)
    if n < _HEADER.size:
        raise DecodeError(f"tensor buffer too short: {n} bytes, the header needs at least 8")
    magic, version, fmt_code, code, vcode, ndim = _HEADER.unpack_from(mv, 0)
    if magic != TENSOR_MAGIC:
        raise DecodeError(f"not a tensor buffer: magic {magic!r}, expected {TENSOR_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise DecodeError(f"unsupported codec version {version}")
    if fmt_code not in TensorFormat._value2member_map_:
        raise DecodeError(f"unknown tensor format code {fmt_code}")
    fmt = TensorFormat(fmt_code)
    dt = _BY_CODE.get(code)
    if dt is None:
        raise DecodeError(f"unknown dtype code {code}")
    vdt = _BY_CODE.get(vcode)
    if vdt is None:
        raise DecodeError(f"unknown value dtype code {vcode}")
    if vdt is not dt and not (vdt is _F16 and dt.code in _FP16_SOURCES):
        raise DecodeError(f"dtype {dt.name} cannot be transported as {vdt.name}")
    if ndim > MAX_NDIM:
        raise DecodeError(f"tensor has {ndim} dimensions, at most {MAX_NDIM} are allowed")
    off = _header_size(ndim)
    if n < off:
        raise DecodeError(f"tensor buffer truncated: {n} bytes, the header needs {off}")
    shape = struct.unpack_from(f"<{ndim}I", mv, _HEADER.size)
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise DecodeError(f"tensor shape {shape} has {numel} elements, more than {MAX_NUMEL}")

    nnz = 0
    if fmt is TensorFormat.DENSE:
        expected = off + _body_sizes(numel, 0, vdt)[0]
    else:
        fixed = 4 if fmt is TensorFormat.BITMASK else _COO_HEAD.size
        if n < off + fixed:
            raise DecodeError(
                f"tensor buffer truncated: {n} bytes, {fmt.name} header ends at {off + fixed}"
            )
        nnz = _U32.unpack_from(mv, off)[0]
        if nnz > numel:
            raise DecodeError(f"{fmt.name} tensor claims {nnz} non-zeros but has {numel} elements")
        if fmt is TensorFormat.COO:
            width = mv[off + 4]
            if width != _index_width(numel):
                raise DecodeError(
                    f"COO index width {width} bytes, expected {_index_width(numel)} "
                    f"for {numel} elements"
                )
        expected = off + _body_sizes(numel, nnz, vdt)[int(fmt)]
    if n < expected:
        raise DecodeError(f"tensor buffer truncated: {n} bytes, expected {expected}")
    if n > expected:
        raise DecodeError(f"tensor buffer has {n - expected} trailing bytes (expected {expected})")

    store = _storage(dt)
    if fmt is TensorFormat.DENSE:
        if vdt.is_bool:
            return _to_tensor(_unpack_mask(mv, numel, off, "DENSE bool tensor"), dt, shape)
        out = np.array(_values(mv, vdt.wire, numel, off), dtype=store, copy=True)
        return _to_tensor(out, dt, shape)

    if fmt is TensorFormat.BITMASK:
        off += 4
        bits = _unpack_mask(mv, numel, off, "BITMASK tensor")
        if vdt.is_bool:
            pop = int(np.count_nonzero(bits))
        else:
            # scatter by index: much faster than boolean indexing for scattered masks
            idx = np.flatnonzero(bits)
            pop = int(idx.size)
        if pop != nnz:
            raise DecodeError(f"BITMASK tensor: bitmask has {pop} set bits, nnz says {nnz}")
        if vdt.is_bool:
            return _to_tensor(bits, dt, shape)
        out = np.zeros(numel, dtype=store)
        out[idx] = _values(mv, vdt.wire, nnz, off + (numel + 7) // 8)
        return _to_tensor(out, dt, shape)

    # COO
    off += _COO_HEAD.size
    width = _index_width(numel)
    idx = _values(mv, _INDEX_DTYPES[width], nnz, off)
    if nnz:
        if nnz > 1 and not bool(np.all(idx[1:] > idx[:-1])):
            raise DecodeError("COO tensor: indices are not strictly increasing")
        if int(idx[-1]) >= numel:
            raise DecodeError(f"COO tensor: index {int(idx[-1])} out of range for {numel} elements")
    out = np.zeros(numel, dtype=store)
    if vdt.is_bool:
        out[idx] = True
    else:
        out[idx] = _values(mv, vdt.wire, nnz, off + nnz * width)
    return _to_tensor(out, dt, shape)


# --------------------------------------------------------------------------------------
# messages

ConfigValue: TypeAlias = "bool | int | float | str | list[Any] | dict[str, Any] | None"


@dataclass(eq=False)
class Payload:
    """One message between a client and the server.

    Attributes
    ----------
    arrays : dict[str, torch.Tensor]
        Named tensors, in order (weights, masks, ...).
    config : dict[str, ConfigValue]
        JSON-serialisable settings: ``None``, bool, int, finite float, str, lists (tuples
        are accepted and come back as lists) and dicts with string keys.
    metrics : dict[str, float]
        Numbers (int or float; non-finite allowed); decoded as floats.

    Notes
    -----
    Equality is identity (``eq=False``): tensors have no single truth value.
    """

    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, ConfigValue] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


_MAX_JSON_DEPTH: Final[int] = 64
_NONFINITE_OUT: Final[dict[str, float]] = {
    "NaN": math.nan,
    "Infinity": math.inf,
    "-Infinity": -math.inf,
}


def _check_json(value: Any, path: str, depth: int = 0) -> None:
    if depth > _MAX_JSON_DEPTH:
        raise ValueError(f"config value at {path} is nested deeper than {_MAX_JSON_DEPTH}")
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"config value at {path} is {value!r}; JSON has no NaN/Infinity")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_json(v, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"config key {k!r} at {path} is not a str")
            _check_json(v, f"{path}.{k}", depth + 1)
        return
    raise TypeError(
        f"config value at {path} has type {type(value).__name__}, which is not JSON "
        "(use None, bool, int, float, str, list or dict)"
    )


def _metric_out(name: Any, value: Any) -> float | str:
    if not isinstance(name, str):
        raise TypeError(f"metric name {name!r} is not a str")
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        raise TypeError(f"metric {name!r} is {value!r} ({type(value).__name__}), not a number")
    if isinstance(value, np.complexfloating):
        raise TypeError(f"metric {name!r} is complex")
    f = float(value)
    if math.isfinite(f):
        return int(value) if isinstance(value, int | np.integer) else f
    return "NaN" if math.isnan(f) else ("Infinity" if f > 0 else "-Infinity")


def encode_arrays(arrays: Mapping[str, TensorLike], *, fp16: bool = False) -> dict[str, bytes]:
    """Encode each tensor to its own buffer (Flower carries each in its own ``Array``).

    Parameters
    ----------
    arrays : Mapping[str, torch.Tensor]
        Named tensors; order is preserved.
    fp16 : bool, default False
        As for :func:`encode_tensor`.

    Returns
    -------
    dict[str, bytes]
        One buffer per name, each made by :func:`encode_tensor` with ``fmt=None``.
    """
    out: dict[str, bytes] = {}
    for name, t in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"array name {name!r} is not a str")
        out[name] = encode_tensor(t, fp16=fp16)
    return out


def decode_arrays(bufs: Mapping[str, BytesLike]) -> dict[str, torch.Tensor]:
    """Decode buffers made by :func:`encode_arrays`, keeping their order.

    Parameters
    ----------
    bufs : Mapping[str, bytes]
        One encoded tensor per name.

    Returns
    -------
    dict[str, torch.Tensor]
        The decoded tensors.

    Raises
    ------
    DecodeError
        A buffer is malformed; the message names the array.
    """
    out: dict[str, torch.Tensor] = {}
    for name, buf in bufs.items():
        try:
            out[name] = decode_tensor(buf)
        except DecodeError as e:
            raise DecodeError(f"array {name!r}: {e}") from e
    return out


def encode_payload(p: Payload, *, fp16: bool = False) -> bytes:
    """Encode a whole message: a JSON header followed by the tensor buffers.

    Parameters
    ----------
    p : Payload
        The message. ``config`` must be JSON (see :class:`Payload`); metrics must be
        numbers.
    fp16 : bool, default False
        As for :func:`encode_tensor`, applied to every array.

    Returns
    -------
    bytes
        The encoded message (layout in the module docstring).

    Raises
    ------
    TypeError
        A config value is not JSON, a key or name is not a str, a metric is not a number.
    ValueError
        A config float is NaN or infinite, or a config string cannot be encoded as UTF-8.
    """
    if not isinstance(p.config, dict):
        raise TypeError(f"Payload.config must be a dict, got {type(p.config).__name__}")
    if not isinstance(p.metrics, dict):
        raise TypeError(f"Payload.metrics must be a dict, got {type(p.metrics).__name__}")
    _check_json(p.config, "config")
    metrics = {name: _metric_out(name, v) for name, v in p.metrics.items()}
    bufs = encode_arrays(p.arrays, fp16=fp16)
    header = {
        "config": p.config,
        "metrics": metrics,
        "arrays": [[name, len(b)] for name, b in bufs.items()],
    }
    try:
        text = json.dumps(header, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        raw = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"payload has a string that is not valid UTF-8 (JSON cannot carry it): {e.reason}"
        ) from e
    except ValueError as e:  # unreachable after _check_json, kept as a clear message
        raise ValueError(f"payload config is not JSON-serialisable: {e}") from e
    except TypeError as e:
        raise TypeError(f"payload config is not JSON-serialisable: {e}") from e
    if len(raw) >= 2**32:
        raise ValueError("payload JSON header is larger than 4 GiB")
    return b"".join(
        [_PAYLOAD_HEAD.pack(PAYLOAD_MAGIC, FORMAT_VERSION, len(raw)), raw, *bufs.values()]
    )


def _reject_constant(token: str) -> Any:
    raise DecodeError(f"payload JSON contains {token}, which is not valid JSON")


def _finite_float(token: str) -> float:
    f = float(token)
    if not math.isfinite(f):
        raise DecodeError(f"payload JSON number {token[:40]} overflows a float")
    return f


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DecodeError(f"payload JSON has duplicate key {k[:80]!r}")
        out[k] = v
    return out


def decode_payload(buf: BytesLike) -> Payload:
    """Decode a buffer made by :func:`encode_payload`.

    Parameters
    ----------
    buf : bytes, bytearray or memoryview
        Exactly one encoded message, with no trailing bytes.

    Returns
    -------
    Payload
        The message; arrays in their original order, metrics as floats.

    Raises
    ------
    DecodeError
        The buffer is malformed: magic, version, header length, JSON (not UTF-8, invalid,
        non-finite tokens, duplicate keys, wrong keys or types), array names not unique,
        array lengths that do not add up to the buffer, or a malformed tensor.
    """
    mv = _as_view(buf, "payload buffer")
    with _decode_errors("payload buffer"):
        return _decode_payload(mv)


def _read_head(mv: memoryview) -> int:
    """Check a message buffer's 8-byte head; the JSON header's length."""
    n = len(mv)
    if n < _PAYLOAD_HEAD.size:
        raise DecodeError(f"payload buffer too short: {n} bytes, the header needs 8")
    magic, version, hlen = _PAYLOAD_HEAD.unpack_from(mv, 0)
    if magic != PAYLOAD_MAGIC:
        raise DecodeError(f"not a payload buffer: magic {magic!r}, expected {PAYLOAD_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise DecodeError(f"unsupported codec version {version}")
    return int(hlen)


_Index: TypeAlias = "list[tuple[str, int]]"


def _parse_header(raw: memoryview) -> tuple[dict[str, Any], dict[str, float], _Index]:
    """Parse and check a message's JSON header: ``(config, metrics, [(name, length)])``."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError(f"payload JSON header is not UTF-8: {e.reason}") from e
    try:
        header = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_no_duplicates,
        )
    except DecodeError:
        raise
    except (ValueError, RecursionError) as e:
        raise DecodeError(f"payload JSON header is invalid: {str(e)[:120]}") from e
    if not isinstance(header, dict):
        raise DecodeError("payload JSON header is not an object")
    if set(header) != {"config", "metrics", "arrays"}:
        raise DecodeError(
            f"payload JSON header has keys {sorted(header)[:10]}, "
            "expected ['arrays', 'config', 'metrics']"
        )
    config, raw_metrics, entries = header["config"], header["metrics"], header["arrays"]
    if not isinstance(config, dict):
        raise DecodeError("payload config is not a JSON object")
    if not isinstance(raw_metrics, dict):
        raise DecodeError("payload metrics is not a JSON object")
    metrics: dict[str, float] = {}
    for name, v in raw_metrics.items():
        if isinstance(v, str) and v in _NONFINITE_OUT:
            metrics[name] = _NONFINITE_OUT[v]
        elif isinstance(v, int | float) and not isinstance(v, bool):
            metrics[name] = float(v)
        else:
            raise DecodeError(f"payload metric {name[:80]!r} is not a number")
    if not isinstance(entries, list):
        raise DecodeError("payload arrays is not a JSON list")
    index: list[tuple[str, int]] = []
    seen: set[str] = set()
    for entry in entries:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], int)
            or isinstance(entry[1], bool)
            or entry[1] < 0
        ):
            raise DecodeError("payload arrays entry is not [name, length >= 0]")
        name, length = entry
        if name in seen:
            raise DecodeError(f"payload array name {name[:80]!r} is not unique")
        seen.add(name)
        index.append((name, length))
    return config, metrics, index


def _split(
    mv: memoryview,
) -> tuple[int, dict[str, Any], dict[str, float], list[tuple[str, int, int]]]:
    """Check a whole message's framing: ``(hlen, config, metrics, [(name, begin, length)])``."""
    n = len(mv)
    hlen = _read_head(mv)
    start = _PAYLOAD_HEAD.size
    if n < start + hlen:
        raise DecodeError(
            f"payload buffer truncated: {n} bytes, JSON header ends at {start + hlen}"
        )
    config, metrics, index = _parse_header(mv[start : start + hlen])
    pos = start + hlen
    spans: list[tuple[str, int, int]] = []
    for name, length in index:
        spans.append((name, pos, length))
        pos += length
    if pos != n:
        if pos > n:
            raise DecodeError(f"payload buffer truncated: {n} bytes, arrays end at {pos}")
        raise DecodeError(f"payload buffer has {n - pos} trailing bytes")
    return hlen, config, metrics, spans


def _decode_payload(mv: memoryview) -> Payload:
    _, config, metrics, spans = _split(mv)
    arrays: dict[str, torch.Tensor] = {}
    for name, begin, length in spans:
        try:
            arrays[name] = decode_tensor(mv[begin : begin + length])
        except DecodeError as e:
            raise DecodeError(f"payload array {name[:80]!r}: {e}") from e
    return Payload(arrays=arrays, config=config, metrics=metrics)


# --------------------------------------------------------------------------------------
# a message buffer's framing, for transports that carry its pieces separately


@dataclass(frozen=True, eq=False)
class PayloadParts:
    """A message buffer cut along its own framing (see :func:`split_payload`).

    Attributes
    ----------
    head : bytes
        The 8-byte message head: magic, version, length of ``header``.
    header : bytes
        The UTF-8 JSON header (config, metrics, and the name and length of every tensor
        buffer).
    arrays : dict[str, bytes]
        The tensor buffers (each what :func:`encode_tensor` makes), in the header's order.
    """

    head: bytes
    header: bytes
    arrays: dict[str, bytes]

    @property
    def nbytes(self) -> int:
        """Length of the whole message buffer (what the engines count)."""
        return len(self.head) + len(self.header) + sum(len(b) for b in self.arrays.values())


def split_payload(buf: BytesLike) -> PayloadParts:
    """Cut a buffer made by :func:`encode_payload` into head, JSON header and tensor buffers.

    Every check of :func:`decode_payload` on the framing applies (magic, version, lengths,
    the JSON header, array names and lengths adding up to the buffer); the tensor buffers
    themselves are not decoded here (:func:`decode_payload` of the joined buffer, or
    :func:`decode_tensor`, checks them).

    Parameters
    ----------
    buf : bytes, bytearray or memoryview
        Exactly one encoded message.

    Returns
    -------
    PayloadParts
        ``join_payload(parts.head, parts.header, parts.arrays) == bytes(buf)``.

    Raises
    ------
    DecodeError
        The framing is malformed.
    """
    mv = _as_view(buf, "payload buffer")
    with _decode_errors("payload buffer"):
        hlen, _, _, spans = _split(mv)
    start = _PAYLOAD_HEAD.size
    return PayloadParts(
        bytes(mv[:start]),
        bytes(mv[start : start + hlen]),
        {name: bytes(mv[begin : begin + length]) for name, begin, length in spans},
    )


def join_payload(head: BytesLike, header: BytesLike, arrays: Mapping[str, BytesLike]) -> bytes:
    """Join the pieces of :func:`split_payload` back into one message buffer.

    Parameters
    ----------
    head : bytes
        The 8-byte message head.
    header : bytes
        The JSON header the head announces.
    arrays : Mapping[str, bytes]
        One tensor buffer per name of the header, in any order; they are joined in the
        header's order.

    Returns
    -------
    bytes
        The message buffer, ready for :func:`decode_payload` (which decodes the tensors).

    Raises
    ------
    DecodeError
        A head that is not a message head or announces another header length, a
        malformed header, names that differ from the header's, or a buffer whose length
        differs from the header's entry.
    """
    hv = _as_view(head, "payload head")
    jv = _as_view(header, "payload header")
    if len(hv) != _PAYLOAD_HEAD.size:
        raise DecodeError(f"payload head must be {_PAYLOAD_HEAD.size} bytes, got {len(hv)}")
    hlen = _read_head(hv)
    if hlen != len(jv):
        raise DecodeError(f"payload head announces a {hlen}-byte JSON header, got {len(jv)}")
    with _decode_errors("payload header"):
        _, _, index = _parse_header(jv)
    names = [name for name, _ in index]
    if set(names) != set(arrays):
        missing = sorted(set(names) - set(arrays))[:5]
        extra = sorted(str(k)[:80] for k in set(arrays) - set(names))[:5]
        raise DecodeError(
            f"payload arrays do not match the header's names (missing {missing}, unknown {extra})"
        )
    bufs = [hv, jv]
    for name, length in index:
        b = _as_view(arrays[name], f"payload array {name[:80]!r}")
        if len(b) != length:
            raise DecodeError(
                f"payload array {name[:80]!r}: the header says {length} bytes, got {len(b)}"
            )
        bufs.append(b)
    return b"".join(bufs)
