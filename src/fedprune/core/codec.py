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
4          1           format: 0 DENSE, 1 BITMASK, 2 COO, 3 VALUES (:class:`TensorFormat`),
                       plus 0x80 (:data:`COMPRESSED`) when the values are compressed
5          1           dtype code of the tensor (see below)
6          1           dtype code of the transported values (equal to the dtype code,
                       or float16/bfloat16 for a float32/float64 tensor sent lossy)
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

- **VALUES** (values only, against a reference the receiver holds: a :class:`Support`,
  e.g. the support of the same array in the last message it received):

  - 4 bytes: ``r``, the kept positions of the reference (uint32);
  - 4 bytes: CRC-32 (``zlib.crc32``) of the reference packed as BITMASK packs a mask;
  - 1 byte: the change code (:class:`Change`), then its body: 0 NONE, nothing (the
    support is the reference); 1 RANKMASK, ``ceil(r / 8)`` bytes, a packed bit per kept
    position of the reference in flat order (1 = still kept, padding bits zero); 2
    RANKGAPS, ``k`` (uint32) removed positions and ``g`` (uint32) bytes, then ``g``
    bytes of ``k`` LEB128 varints: the rank (among the reference's kept positions) of
    the first removed one, then each next rank minus the previous minus one;
  - the values at the kept positions, in flat order (none for bool).

  With NONE the values include the zeros at kept positions; the encoder picks the
  smallest of the three (first minimum in that order) and sends VALUES only when every
  non-zero lies inside the reference and it beats the best full format. A decoder
  whose reference has another count or CRC raises :class:`DecodeError`.

Values section. Raw: the values, ``vs`` bytes each, little-endian. Compressed
(``compress=True``, flag 0x80): for each byte plane ``i = 0 .. vs-1`` (byte ``i`` of
every value, little-endian order), a uint32 ``w`` then ``w & 0x7fffffff`` bytes: the
plane itself (``w`` = its length, which must be the value count) or, when bit 31 is
set, its zlib stream, which must inflate to exactly the value count. The encoder keeps
the raw layout when compression wins nothing.

"Non-zero" is decided on the bit pattern of the transported values, so ``-0.0`` and NaN
count as non-zero and every tensor round-trips bit for bit (with ``fp16=True``: bit for
bit equal to ``t.half()`` cast back to the original dtype).

Dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16 (sent as its raw 2-byte bits),
4 int64, 5 int32, 6 int16, 7 int8, 8 uint8, 9 bool.

``fmt=None`` picks the smallest format for the tensor, computed arithmetically from
``n`` and ``nnz``; ties go to DENSE, then BITMASK (and VALUES only when strictly smaller).

``fp16=True`` (``wire_dtype="float16"``) is **lossy**: float32 and float64 values travel as
IEEE float16 (rounded to nearest, values beyond ±65504 become ±inf, tiny values flush to
zero) and are decoded back to the original dtype. ``wire_dtype="bfloat16"`` keeps
float32's range with 8 bits of mantissa (rounded as torch rounds). Other dtypes ignore
both.

``fmt=None`` only picks a full format whose decoded size is at most
:func:`expansion_bound` of its buffer (``64 * length + 1 MiB``): a COO tensor of a few
non-zeros among many millions goes BITMASK instead, so that a decoder can bound what a
buffer may allocate by its own length.

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
indices, padding, JSON, another reference) raises :class:`fedprune.errors.DecodeError`
with a one-line message. No buffer makes the decoder allocate more than a bound: with a
:class:`Schema` (``expect=``) unknown and missing arrays are rejected before any tensor
is decoded and each tensor's shape and dtype before it is allocated; without one, the
full-format tensors of a buffer may decode to at most :func:`expansion_bound` of its
length (values-only tensors are bounded by the receiver's own reference). Non-finite
tensor values are allowed here; validating them is a separate layer.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt
import torch

from fedprune.errors import DecodeError

__all__ = [
    "COMPRESSED",
    "EXPANSION_SLACK",
    "FORMAT_VERSION",
    "MAX_EXPANSION",
    "MAX_NDIM",
    "MAX_NUMEL",
    "Change",
    "Payload",
    "PayloadParts",
    "References",
    "Schema",
    "Support",
    "TensorFormat",
    "TensorSpec",
    "decode_arrays",
    "decode_payload",
    "decode_tensor",
    "encode_arrays",
    "encode_payload",
    "encode_tensor",
    "encoded_size",
    "expansion_bound",
    "join_payload",
    "pack_delivery",
    "split_payload",
    "supports_of",
    "unpack_delivery",
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
_VALUES_HEAD = struct.Struct("<IIB")  # reference count, reference CRC-32, change code
_GAPS_HEAD = struct.Struct("<II")  # removed count, varint bytes
_PLANE_ZLIB: Final[int] = 1 << 31

COMPRESSED: Final[int] = 0x80
"""Flag in the format byte: the values section is byte-plane shuffled and compressed."""

ZLIB_LEVEL: Final[int] = 6
"""zlib level of compressed value planes."""

MAX_EXPANSION: Final[int] = 64
"""Without a schema, a buffer of ``n`` bytes decodes to at most ``64 * n +``
:data:`EXPANSION_SLACK` bytes of full-format tensors (a float64 BITMASK is 64x)."""

EXPANSION_SLACK: Final[int] = 2**20
"""Bytes any buffer may decode to beyond ``MAX_EXPANSION`` times its length."""


class TensorFormat(enum.IntEnum):
    """Body layout of an encoded tensor."""

    DENSE = 0
    BITMASK = 1
    COO = 2
    VALUES = 3
    """Values only, at the positions of a reference support the receiver holds."""


_FULL_FORMATS: Final[tuple[TensorFormat, ...]] = (
    TensorFormat.DENSE,
    TensorFormat.BITMASK,
    TensorFormat.COO,
)


class Change(enum.IntEnum):
    """How a VALUES body says which positions of its reference it keeps."""

    NONE = 0
    """All of them (values for every kept position, zeros included)."""
    RANKMASK = 1
    """A packed bit per kept position of the reference (1 = still kept)."""
    RANKGAPS = 2
    """The removed positions' ranks among the reference's kept ones, gap-coded varints."""


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
_LOSSY: Final[dict[str, _DType]] = {"float16": _F16, "bfloat16": _BY_CODE[3]}
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


# --------------------------------------------------------------------------------------
# references (what a receiver already knows) and schemas (what it expects)


class Support:
    """The positions of one tensor that may be non-zero, as a receiver holds them.

    A values-only tensor (:attr:`TensorFormat.VALUES`) is encoded and decoded against a
    support both ends hold: the reference. Its identity on the wire is its number of
    kept positions and the CRC-32 (``zlib.crc32``) of its bitmask packed as BITMASK
    packs it; a decoder holding a different reference raises :class:`DecodeError`.

    Parameters
    ----------
    mask : array-like of bool
        The kept positions, over the flattened tensor.
    """

    __slots__ = ("_positions", "count", "crc", "mask")

    def __init__(self, mask: npt.ArrayLike) -> None:
        m = np.ascontiguousarray(np.asarray(mask, dtype=np.bool_).reshape(-1))
        if m.size > MAX_NUMEL:
            raise ValueError(f"a support of {m.size} positions is larger than {MAX_NUMEL}")
        self.mask: npt.NDArray[np.bool_] = m
        self.count = int(np.count_nonzero(m))
        self.crc = zlib.crc32(np.packbits(m).data)
        self._positions: npt.NDArray[np.int64] | None = None

    @property
    def numel(self) -> int:
        """Positions of the tensor (kept or not)."""
        return int(self.mask.size)

    def positions(self) -> npt.NDArray[np.int64]:
        """The kept flat positions, increasing (computed once)."""
        if self._positions is None:
            self._positions = np.flatnonzero(self.mask)
        return self._positions

    @classmethod
    def of(cls, t: TensorLike, *, fp16: bool = False, wire_dtype: str | None = None) -> Support:
        """The support of ``t`` as a receiver decodes it: the positions whose transported
        value is non-zero by bit pattern (after the lossy cast, if any)."""
        return cls(_prepare(t, _lossy(fp16, wire_dtype)).nonzero_mask())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Support):
            return NotImplemented
        return (self.numel, self.count, self.crc) == (other.numel, other.count, other.crc) and (
            bool(np.array_equal(self.mask, other.mask))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Support(numel={self.numel}, count={self.count}, crc={self.crc:#010x})"


References: TypeAlias = "Mapping[str, Support]"
"""The supports a receiver holds, by array name."""


def supports_of(
    arrays: Mapping[str, TensorLike], *, fp16: bool = False, wire_dtype: str | None = None
) -> dict[str, Support]:
    """:meth:`Support.of` of every array (what the receiver of ``arrays`` will hold)."""
    return {name: Support.of(t, fp16=fp16, wire_dtype=wire_dtype) for name, t in arrays.items()}


@dataclass(frozen=True)
class TensorSpec:
    """The shape (and dtype, unless ``None``) a receiver expects for one array."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class Schema:
    """What a receiver expects of a message's arrays, checked before anything is decoded.

    Attributes
    ----------
    arrays : Mapping[str, TensorSpec]
        The expected arrays.
    required : bool
        Every name of ``arrays`` must be present.
    prefixed : bool
        Also accept ``"<prefix>/<name>"`` for a name of ``arrays`` (per-parameter
        side data such as ``importance/fc1.weight``): the shape of ``<name>``, any dtype.
    """

    arrays: Mapping[str, TensorSpec]
    required: bool = True
    prefixed: bool = False

    @classmethod
    def of(
        cls, state: Mapping[str, torch.Tensor], *, required: bool = True, prefixed: bool = False
    ) -> Schema:
        """The schema of a state dict (names, shapes, dtypes)."""
        specs = {k: TensorSpec(tuple(int(s) for s in v.shape), v.dtype) for k, v in state.items()}
        return cls(specs, required=required, prefixed=prefixed)

    def spec(self, name: str) -> TensorSpec | None:
        """The spec ``name`` must satisfy, or ``None`` when the name is not expected."""
        found = self.arrays.get(name)
        if found is None and self.prefixed and "/" in name:
            base = self.arrays.get(name.split("/", 1)[1])
            if base is not None:
                found = TensorSpec(base.shape, None)
        return found

    def check_names(self, names: list[str]) -> None:
        """Raise :class:`DecodeError` for an unexpected name or a missing one."""
        unknown = [n for n in names if self.spec(n) is None]
        if unknown:
            shown = ", ".join(repr(n[:80]) for n in unknown[:3])
            raise DecodeError(f"unexpected array(s) {shown} ({len(unknown)} in all)")
        if self.required:
            missing = [n for n in self.arrays if n not in set(names)]
            if missing:
                shown = ", ".join(repr(n[:80]) for n in missing[:3])
                raise DecodeError(f"missing array(s) {shown} ({len(missing)} in all)")


class _Budget:
    """Bytes that decoding may still allocate for tensors no schema or reference bounds."""

    def __init__(self, nbytes: int) -> None:
        self.left = nbytes

    def take(self, nbytes: int, shape: tuple[int, ...]) -> None:
        if nbytes > self.left:
            raise DecodeError(
                f"tensor shape {shape} declares {nbytes} bytes of elements, more than the "
                f"{max(self.left, 0)} this buffer may expand to (no schema given)"
            )
        self.left -= nbytes


def expansion_bound(length: int) -> int:
    """Most bytes of tensors that a buffer of ``length`` bytes may decode to without a
    schema (values-only tensors, bounded by the receiver's reference, not counted)."""
    return MAX_EXPANSION * length + EXPANSION_SLACK


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
        return int(np.count_nonzero(self.nonzero_mask()))


def _lossy(fp16: bool, wire_dtype: str | None) -> _DType | None:
    """The lossy value dtype asked for (``None``: lossless)."""
    if wire_dtype in (None, "", "float32"):
        return _F16 if fp16 else None
    found = _LOSSY.get(str(wire_dtype))
    if found is None:
        raise ValueError(
            f"unknown wire dtype {wire_dtype!r}; expected 'float32', 'float16' or 'bfloat16'"
        )
    if fp16 and found is not _F16:
        raise ValueError(f"fp16=True contradicts wire_dtype={wire_dtype!r}")
    return found


def _to_bf16_bits(arr: npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
    """Round float32/float64 values to bfloat16 (as torch does); their raw bits."""
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("=")))
    bits: npt.NDArray[np.uint16] = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return bits


def _prepare(t: TensorLike, lossy: _DType | None) -> _Prepared:
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
        if lossy is not None and dt.code in _FP16_SOURCES:
            x = x.to(lossy.torch_dtype)
            vdt = lossy
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
        if lossy is not None and dt.code in _FP16_SOURCES:
            if lossy is _F16:
                with np.errstate(over="ignore"):  # overflow to ±inf is the documented loss
                    arr = arr.astype(np.float16)
            else:
                arr = _to_bf16_bits(arr).reshape(arr.shape)
            vdt = lossy
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


def _header(fmt: TensorFormat, p: _Prepared, compressed: bool = False) -> bytes:
    ndim = len(p.shape)
    code = int(fmt) | (COMPRESSED if compressed else 0)
    return _HEADER.pack(
        TENSOR_MAGIC, FORMAT_VERSION, code, p.dtype.code, p.vdtype.code, ndim
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


def _varint_sizes(v: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """LEB128 byte count of each value (values < 2**35)."""
    out = np.ones(v.size, dtype=np.int64)
    for bits in (7, 14, 21, 28):
        out += v >= (1 << bits)
    return out


def _varint_encode(v: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """LEB128 (7 bits per byte, low group first, high bit = more bytes follow)."""
    sizes = _varint_sizes(v)
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    starts = np.cumsum(sizes) - sizes
    for j in range(int(sizes.max(initial=0))):
        sel = sizes > j
        group = ((v[sel] >> (7 * j)) & 0x7F).astype(np.uint8)
        more = (sizes[sel] > j + 1).astype(np.uint8) << 7
        out[starts[sel] + j] = group | more
    return out


def _varint_decode(b: npt.NDArray[np.uint8], count: int, what: str) -> npt.NDArray[np.int64]:
    ends = np.flatnonzero(b < 0x80)
    if ends.size != count or (b.size and int(ends[-1]) != b.size - 1):
        raise DecodeError(f"{what}: {ends.size} varints in {b.size} bytes, expected {count}")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lens = ends - starts + 1
    if int(lens.max()) > 5:
        raise DecodeError(f"{what}: a varint is longer than 5 bytes")
    out = np.zeros(count, dtype=np.int64)
    for j in range(int(lens.max())):
        sel = lens > j
        out[sel] |= (b[starts[sel] + j].astype(np.int64) & 0x7F) << (7 * j)
    return out


@dataclass
class _ValuesPlan:
    """How a tensor is sent values-only against a reference."""

    change: Change
    keep: npt.NDArray[np.int64]  # flat positions whose values are sent
    change_body: list[bytes | npt.NDArray[Any]]
    size: int  # body size with raw values


def _plan_values(p: _Prepared, ref: Support) -> _ValuesPlan | None:
    """The smallest values-only body for ``p`` against ``ref``; ``None`` when ``p`` has a
    non-zero outside the reference (then only the full formats can carry it)."""
    if ref.numel != p.numel:
        return None
    nz = p.nonzero_mask()
    if bool(np.any(nz & ~ref.mask)):
        return None
    pos = ref.positions()
    kept = nz[pos]
    vs = 0 if p.vdtype.is_bool else p.vdtype.itemsize
    n_kept = int(np.count_nonzero(kept))
    removed = np.flatnonzero(~kept)
    fixed = _VALUES_HEAD.size
    options: list[tuple[int, Change]] = []
    if not p.vdtype.is_bool or removed.size == 0:
        options.append((fixed + ref.count * vs, Change.NONE))
    options.append((fixed + (ref.count + 7) // 8 + n_kept * vs, Change.RANKMASK))
    gaps = np.diff(removed, prepend=-1) - 1
    gap_bytes = int(_varint_sizes(gaps).sum())
    options.append((fixed + _GAPS_HEAD.size + gap_bytes + n_kept * vs, Change.RANKGAPS))
    size, change = min(options, key=lambda o: o[0])  # first minimum: NONE, RANKMASK, GAPS
    if change is Change.NONE:
        return _ValuesPlan(change, pos, [], size)
    keep = pos[kept]
    if change is Change.RANKMASK:
        return _ValuesPlan(change, keep, [np.packbits(kept)], size)
    body: list[bytes | npt.NDArray[Any]] = [
        _GAPS_HEAD.pack(int(removed.size), gap_bytes),
        _varint_encode(gaps),
    ]
    return _ValuesPlan(change, keep, body, size)


def _value_block(
    vals: npt.NDArray[Any], compress: bool
) -> tuple[list[bytes | npt.NDArray[Any]], bool]:
    """The values section: raw, or (``compress``) byte planes each zlib-compressed when that
    is smaller. Returns the parts and whether the compressed layout is used."""
    raw: list[bytes | npt.NDArray[Any]] = [vals]
    if not compress or vals.size == 0:
        return raw, False
    vs = vals.dtype.itemsize
    planes = vals.view(np.uint8).reshape(-1, vs).T
    parts: list[bytes | npt.NDArray[Any]] = []
    total = 0
    for i in range(vs):
        plane = np.ascontiguousarray(planes[i])
        packed = zlib.compress(plane.data, ZLIB_LEVEL)
        if len(packed) < plane.size:
            parts += [_U32.pack(len(packed) | _PLANE_ZLIB), packed]
            total += 4 + len(packed)
        else:
            parts += [_U32.pack(plane.size), plane]
            total += 4 + plane.size
    if total >= vals.nbytes:
        return raw, False
    return parts, True


def encode_tensor(
    t: TensorLike,
    *,
    fp16: bool = False,
    fmt: TensorFormat | None = None,
    wire_dtype: str | None = None,
    reference: Support | None = None,
    compress: bool = False,
) -> bytes:
    """Encode one tensor for the wire.

    Parameters
    ----------
    t : torch.Tensor or numpy.ndarray
        A strided tensor of dtype float32, float64, float16, bfloat16, int64, int32,
        int16, int8, uint8 or bool, on any device (it is copied to the CPU), of any
        shape with at most :data:`MAX_NDIM` dimensions and :data:`MAX_NUMEL` elements.
    fp16 : bool, default False
        Send float32/float64 values as float16 (lossy; decoded back to the original
        dtype). Ignored for every other dtype. Same as ``wire_dtype="float16"``.
    fmt : TensorFormat or None, default None
        Force a body format; ``None`` picks the smallest one for this tensor among the
        full formats whose decoded size is within :func:`expansion_bound` of the buffer,
        and VALUES when a ``reference`` allows it and it is smaller still.
    wire_dtype : {"float32", "float16", "bfloat16"} or None
        Transported type of float32/float64 values: ``"bfloat16"`` keeps float32's range
        with 8 bits of mantissa (lossy, rounded as ``torch.Tensor.to(torch.bfloat16)``).
    reference : Support or None
        The support the receiver holds for this tensor: VALUES is possible when every
        non-zero of ``t`` lies inside it.
    compress : bool, default False
        Byte-plane shuffle the values and zlib-compress each plane where that is
        smaller (lossless; the values section keeps its raw layout when nothing is won).

    Returns
    -------
    bytes
        The encoded tensor (layout in the module docstring).

    Raises
    ------
    TypeError
        Unsupported input type, dtype or layout.
    ValueError
        Too many dimensions or elements, an unknown ``fmt`` or ``wire_dtype``, or
        ``fmt=VALUES`` that the reference cannot carry.
    """
    fmt = _check_fmt(fmt)
    p = _prepare(t, _lossy(fp16, wire_dtype))
    return _encode_prepared(p, fmt, reference, compress)


def _encode_prepared(
    p: _Prepared, fmt: TensorFormat | None, reference: Support | None, compress: bool
) -> bytes:
    plan: _ValuesPlan | None = None
    if reference is not None and fmt in (None, TensorFormat.VALUES):
        plan = _plan_values(p, reference)
    if fmt is TensorFormat.VALUES and plan is None:
        raise ValueError("VALUES needs a reference of the same size holding every non-zero")
    mask: npt.NDArray[np.bool_] | None = None
    nnz = 0
    if fmt not in (TensorFormat.DENSE, TensorFormat.VALUES):
        mask = p.nonzero_mask()
        nnz = int(np.count_nonzero(mask))
        if fmt is None:
            fmt = _pick_full(p, nnz)
            if plan is not None and plan.size < _body_sizes(p.numel, nnz, p.vdtype)[int(fmt)]:
                fmt = TensorFormat.VALUES
    assert fmt is not None
    parts: list[bytes | npt.NDArray[Any]] = []
    vals: npt.NDArray[Any] | None = None
    if fmt is TensorFormat.DENSE:
        # a bool mask is sent as packed bits even when dense
        if p.vdtype.is_bool:
            parts.append(np.packbits(p.flat))
        else:
            vals = p.flat
    elif fmt is TensorFormat.BITMASK:
        assert mask is not None
        parts += [_U32.pack(nnz), np.packbits(mask)]
        # gather by index: much faster than boolean indexing for scattered masks
        vals = p.flat[np.flatnonzero(mask)]
    elif fmt is TensorFormat.COO:
        assert mask is not None
        idx = np.flatnonzero(mask)
        width = _index_width(p.numel)
        parts += [_COO_HEAD.pack(nnz, width), idx.astype(_INDEX_DTYPES[width])]
        vals = p.flat[idx]
    else:  # VALUES
        assert plan is not None and reference is not None
        parts += [_VALUES_HEAD.pack(reference.count, reference.crc, int(plan.change))]
        parts += plan.change_body
        vals = p.flat[plan.keep]
    compressed = False
    if vals is not None and not p.vdtype.is_bool:
        block, compressed = _value_block(vals, compress)
        parts += block
    # one copy of each part straight into the result
    head = _header(fmt, p, compressed)
    return head + b"".join(x if isinstance(x, bytes) else x.data.cast("B") for x in parts)


def _decoded_nbytes(p: _Prepared) -> int:
    return p.numel * p.dtype.wire.itemsize


def _pick_full(p: _Prepared, nnz: int) -> TensorFormat:
    """The smallest full format whose decoded size stays within the expansion bound
    (ties go to DENSE, then BITMASK); BITMASK (at most 64x) always qualifies."""
    sizes = _body_sizes(p.numel, nnz, p.vdtype)
    head = _header_size(len(p.shape))
    need = _decoded_nbytes(p)
    ok = [
        f
        for f in _FULL_FORMATS
        if f is TensorFormat.BITMASK or need <= expansion_bound(head + sizes[int(f)])
    ]
    return min(ok, key=lambda f: sizes[int(f)])  # the first minimum: DENSE, then BITMASK


def encoded_size(
    t: TensorLike,
    *,
    fp16: bool = False,
    fmt: TensorFormat | None = None,
    wire_dtype: str | None = None,
) -> int:
    """Length of ``encode_tensor(t, fp16=fp16, fmt=fmt, wire_dtype=wire_dtype)`` (no
    reference, no compression), without building the buffer.

    Parameters
    ----------
    t : torch.Tensor or numpy.ndarray
        As for :func:`encode_tensor`.
    fp16 : bool, default False
        As for :func:`encode_tensor`.
    fmt : TensorFormat or None, default None
        A full format (DENSE, BITMASK, COO) or ``None``.
    wire_dtype : str or None
        As for :func:`encode_tensor`.

    Returns
    -------
    int
        The exact encoded length in bytes.
    """
    fmt = _check_fmt(fmt)
    if fmt is TensorFormat.VALUES:
        raise ValueError("encoded_size has no reference: VALUES cannot be sized here")
    p = _prepare(t, _lossy(fp16, wire_dtype))
    head = _header_size(len(p.shape))
    if fmt is TensorFormat.DENSE:
        return head + _body_sizes(p.numel, 0, p.vdtype)[0]
    nnz = p.count_nonzero()
    sizes = _body_sizes(p.numel, nnz, p.vdtype)
    return head + sizes[int(_pick_full(p, nnz) if fmt is None else fmt)]


# --------------------------------------------------------------------------------------
# decoding


@contextlib.contextmanager
def _decode_errors(what: str) -> Iterator[None]:
    """Turn the low-level errors a hostile buffer can provoke into :class:`DecodeError`."""
    try:
        yield
    except DecodeError:
        raise
    except (
        struct.error,
        ValueError,
        IndexError,
        OverflowError,
        TypeError,
        RecursionError,
        zlib.error,
    ) as e:
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


def _need(mv: memoryview, end: int, what: str) -> None:
    if len(mv) < end:
        raise DecodeError(f"{what} truncated: {len(mv)} bytes, expected at least {end}")


def _unpack_mask(mv: memoryview, numel: int, offset: int, what: str) -> npt.NDArray[np.bool_]:
    nbytes = (numel + 7) // 8
    _need(mv, offset + nbytes, what)
    packed = _values(mv, np.dtype("u1"), nbytes, offset)
    rem = numel % 8
    if rem and int(packed[-1]) & (0xFF >> rem):
        raise DecodeError(f"{what}: padding bits after the last element are not zero")
    return np.unpackbits(packed, count=numel).view(np.bool_)


def _read_values(
    mv: memoryview, off: int, count: int, vdt: _DType, compressed: bool, what: str
) -> tuple[npt.NDArray[Any], int]:
    """The values section at ``off``: ``(values in vdt's wire dtype, offset after it)``."""
    if vdt.is_bool:
        return np.empty(0, dtype=vdt.wire), off
    vs = vdt.itemsize
    if not compressed:
        end = off + count * vs
        _need(mv, end, f"{what}")
        return _values(mv, vdt.wire, count, off), end
    planes = np.empty((vs, count), dtype=np.uint8)
    for i in range(vs):
        _need(mv, off + 4, f"{what} (compressed plane {i})")
        word = _U32.unpack_from(mv, off)[0]
        off += 4
        length, packed = word & ~_PLANE_ZLIB, bool(word & _PLANE_ZLIB)
        _need(mv, off + length, f"{what} (compressed plane {i})")
        chunk = mv[off : off + length]
        off += length
        if not packed:
            if length != count:
                raise DecodeError(f"{what}: raw plane {i} has {length} bytes, expected {count}")
            planes[i] = np.frombuffer(chunk, dtype=np.uint8)
            continue
        d = zlib.decompressobj()
        out = d.decompress(chunk, count)  # never more than the plane's size
        if len(out) != count or not d.eof or d.unused_data or d.unconsumed_tail:
            raise DecodeError(f"{what}: compressed plane {i} does not inflate to {count} bytes")
        planes[i] = np.frombuffer(out, dtype=np.uint8)
    return np.ascontiguousarray(planes.T).view(vdt.wire).reshape(-1), off


def _storage(dt: _DType) -> np.dtype[Any]:
    """Native-order numpy dtype that holds decoded values of ``dt`` (bf16 as int16 bits)."""
    if dt.name == "bfloat16":
        return np.dtype(np.int16)
    return dt.wire.newbyteorder("=")


def _widen(vals: npt.NDArray[Any], vdt: _DType, dt: _DType) -> npt.NDArray[Any]:
    """Transported values as the tensor's storage dtype (bfloat16 bits widened exactly)."""
    if vdt is dt or vdt.name != "bfloat16":
        return vals
    f32 = (vals.astype(np.uint32) << 16).view(np.float32)
    return f32 if dt.name == "float32" else f32.astype(np.float64)


def _to_tensor(arr: npt.NDArray[Any], dt: _DType, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.from_numpy(arr.reshape(shape))
    if dt.name == "bfloat16":
        out = out.view(torch.bfloat16)
    return out


def decode_tensor(
    buf: BytesLike,
    *,
    expect: TensorSpec | None = None,
    reference: Support | None = None,
) -> torch.Tensor:
    """Decode a buffer made by :func:`encode_tensor`.

    Parameters
    ----------
    buf : bytes, bytearray or memoryview
        Exactly one encoded tensor, with no trailing bytes.
    expect : TensorSpec or None
        The shape (and dtype) the receiver expects; checked before anything is
        allocated. Without it, a full-format tensor may decode to at most
        :func:`expansion_bound` ``(len(buf))`` bytes.
    reference : Support or None
        The support the receiver holds for this tensor (needed for VALUES).

    Returns
    -------
    torch.Tensor
        A contiguous, writable CPU tensor that owns its memory, of the original dtype and
        shape.

    Raises
    ------
    DecodeError
        The buffer is malformed: wrong magic, unsupported version, unknown format or
        dtype code, too many dimensions or elements, more elements than the expansion
        bound or another shape or dtype than expected, wrong total length, ``nnz``
        larger than the tensor, COO indices not strictly increasing or out of range, a
        bitmask whose popcount differs from ``nnz`` or whose padding bits are set, a
        values-only tensor without or with another reference than the encoder's.
    """
    mv = _as_view(buf, "tensor buffer")
    with _decode_errors("tensor buffer"):
        return _decode_tensor(mv, expect, reference, None)


def _decode_tensor(
    mv: memoryview,
    spec: TensorSpec | None,
    reference: Support | None,
    budget: _Budget | None,
) -> torch.Tensor:
    n = len(mv)
    if n < _HEADER.size:
        raise DecodeError(f"tensor buffer too short: {n} bytes, the header needs at least 8")
    magic, version, fmt_byte, code, vcode, ndim = _HEADER.unpack_from(mv, 0)
    if magic != TENSOR_MAGIC:
        raise DecodeError(f"not a tensor buffer: magic {magic!r}, expected {TENSOR_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise DecodeError(f"unsupported codec version {version}")
    compressed = bool(fmt_byte & COMPRESSED)
    fmt_code = fmt_byte & ~COMPRESSED
    if fmt_code not in TensorFormat._value2member_map_:
        raise DecodeError(f"unknown tensor format code {fmt_byte}")
    fmt = TensorFormat(fmt_code)
    dt = _BY_CODE.get(code)
    if dt is None:
        raise DecodeError(f"unknown dtype code {code}")
    vdt = _BY_CODE.get(vcode)
    if vdt is None:
        raise DecodeError(f"unknown value dtype code {vcode}")
    if vdt is not dt and not (vdt in _LOSSY.values() and dt.code in _FP16_SOURCES):
        raise DecodeError(f"dtype {dt.name} cannot be transported as {vdt.name}")
    if compressed and vdt.is_bool:
        raise DecodeError("a bool tensor has no values section to compress")
    if ndim > MAX_NDIM:
        raise DecodeError(f"tensor has {ndim} dimensions, at most {MAX_NDIM} are allowed")
    off = _header_size(ndim)
    if n < off:
        raise DecodeError(f"tensor buffer truncated: {n} bytes, the header needs {off}")
    shape = tuple(struct.unpack_from(f"<{ndim}I", mv, _HEADER.size))
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise DecodeError(f"tensor shape {shape} has {numel} elements, more than {MAX_NUMEL}")
    if spec is not None:
        if shape != spec.shape:
            raise DecodeError(f"tensor has shape {shape}, expected {spec.shape}")
        if spec.dtype is not None and dt.torch_dtype != spec.dtype:
            raise DecodeError(f"tensor has dtype {dt.name}, expected {spec.dtype}")
    if fmt is TensorFormat.VALUES:
        if reference is None:
            raise DecodeError("values-only tensor, but the receiver holds no reference for it")
        if reference.numel != numel:
            raise DecodeError(
                f"values-only tensor of {numel} elements, the reference has {reference.numel}"
            )
    elif spec is None:  # the buffer's own length bounds what it may allocate
        need = numel * dt.wire.itemsize
        (budget or _Budget(expansion_bound(n))).take(need, shape)

    store = _storage(dt)
    what = f"{fmt.name} tensor"
    if fmt is TensorFormat.DENSE:
        if vdt.is_bool:
            bits = _unpack_mask(mv, numel, off, "DENSE bool tensor")
            _no_trailing(mv, off + (numel + 7) // 8)
            return _to_tensor(bits, dt, shape)
        vals, end = _read_values(mv, off, numel, vdt, compressed, what)
        _no_trailing(mv, end)
        out = np.array(_widen(vals, vdt, dt), dtype=store, copy=True)
        return _to_tensor(out, dt, shape)

    if fmt is TensorFormat.VALUES:
        assert reference is not None
        keep = _values_support(mv, off, reference)
        off = keep[1]
        positions = keep[0]
        out = np.zeros(numel, dtype=store)
        if vdt.is_bool:
            _no_trailing(mv, off)
            out[positions] = True
            return _to_tensor(out, dt, shape)
        vals, end = _read_values(mv, off, int(positions.size), vdt, compressed, what)
        _no_trailing(mv, end)
        out[positions] = _widen(vals, vdt, dt)
        return _to_tensor(out, dt, shape)

    fixed = 4 if fmt is TensorFormat.BITMASK else _COO_HEAD.size
    if n < off + fixed:
        raise DecodeError(
            f"tensor buffer truncated: {n} bytes, {fmt.name} header ends at {off + fixed}"
        )
    nnz = _U32.unpack_from(mv, off)[0]
    if nnz > numel:
        raise DecodeError(f"{fmt.name} tensor claims {nnz} non-zeros but has {numel} elements")
    if fmt is TensorFormat.BITMASK:
        off += 4
        _need(mv, off + (numel + 7) // 8 + (0 if compressed else nnz * _vsize(vdt)), what)
        bits = _unpack_mask(mv, numel, off, "BITMASK tensor")
        off += (numel + 7) // 8
        if vdt.is_bool:
            pop = int(np.count_nonzero(bits))
        else:
            # scatter by index: much faster than boolean indexing for scattered masks
            idx = np.flatnonzero(bits)
            pop = int(idx.size)
        if pop != nnz:
            raise DecodeError(f"BITMASK tensor: bitmask has {pop} set bits, nnz says {nnz}")
        if vdt.is_bool:
            _no_trailing(mv, off)
            return _to_tensor(bits, dt, shape)
        vals, end = _read_values(mv, off, nnz, vdt, compressed, what)
        _no_trailing(mv, end)
        out = np.zeros(numel, dtype=store)
        out[idx] = _widen(vals, vdt, dt)
        return _to_tensor(out, dt, shape)

    # COO
    width = mv[off + 4]
    if width != _index_width(numel):
        raise DecodeError(
            f"COO index width {width} bytes, expected {_index_width(numel)} for {numel} elements"
        )
    off += _COO_HEAD.size
    _need(mv, off + nnz * width + (0 if compressed else nnz * _vsize(vdt)), what)
    idx = _values(mv, _INDEX_DTYPES[width], nnz, off)
    off += nnz * width
    if nnz:
        if nnz > 1 and not bool(np.all(idx[1:] > idx[:-1])):
            raise DecodeError("COO tensor: indices are not strictly increasing")
        if int(idx[-1]) >= numel:
            raise DecodeError(f"COO tensor: index {int(idx[-1])} out of range for {numel} elements")
    out = np.zeros(numel, dtype=store)
    if vdt.is_bool:
        _no_trailing(mv, off)
        out[idx] = True
        return _to_tensor(out, dt, shape)
    vals, end = _read_values(mv, off, nnz, vdt, compressed, what)
    _no_trailing(mv, end)
    out[idx] = _widen(vals, vdt, dt)
    return _to_tensor(out, dt, shape)


def _vsize(vdt: _DType) -> int:
    return 0 if vdt.is_bool else vdt.itemsize


def _no_trailing(mv: memoryview, end: int) -> None:
    if len(mv) > end:
        raise DecodeError(f"tensor buffer has {len(mv) - end} trailing bytes (expected {end})")


def _values_support(mv: memoryview, off: int, ref: Support) -> tuple[npt.NDArray[np.int64], int]:
    """Check a VALUES body's reference and read its change: ``(kept positions, offset of
    the values section)``."""
    _need(mv, off + _VALUES_HEAD.size, "VALUES tensor")
    count, crc, change = _VALUES_HEAD.unpack_from(mv, off)
    off += _VALUES_HEAD.size
    if count != ref.count or crc != ref.crc:
        raise DecodeError(
            f"VALUES tensor was encoded against another reference ({count} kept, CRC "
            f"{crc:#010x}; the receiver holds {ref.count} kept, CRC {ref.crc:#010x})"
        )
    pos = ref.positions()
    if change == Change.NONE:
        return pos, off
    if change == Change.RANKMASK:
        kept = _unpack_mask(mv, count, off, "VALUES tensor change mask")
        return pos[kept], off + (count + 7) // 8
    if change == Change.RANKGAPS:
        _need(mv, off + _GAPS_HEAD.size, "VALUES tensor change")
        k, nbytes = _GAPS_HEAD.unpack_from(mv, off)
        off += _GAPS_HEAD.size
        if k > count:
            raise DecodeError(f"VALUES tensor removes {k} of {count} kept positions")
        _need(mv, off + nbytes, "VALUES tensor change")
        gaps = _varint_decode(_values(mv, np.dtype("u1"), nbytes, off), k, "VALUES change")
        if k and int(gaps.max()) >= count:
            raise DecodeError("VALUES tensor change: a gap exceeds the reference")
        ranks = np.cumsum(gaps + 1) - 1
        if k and int(ranks[-1]) >= count:
            raise DecodeError("VALUES tensor change: a removed rank is out of range")
        kept = np.ones(count, dtype=np.bool_)
        kept[ranks] = False
        return pos[kept], off + nbytes
    raise DecodeError(f"VALUES tensor has unknown change code {change}")


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


def encode_arrays(
    arrays: Mapping[str, TensorLike],
    *,
    fp16: bool = False,
    wire_dtype: str | None = None,
    references: References | None = None,
    compress: bool = False,
) -> dict[str, bytes]:
    """Encode each tensor to its own buffer (Flower carries each in its own ``Array``).

    Parameters
    ----------
    arrays : Mapping[str, torch.Tensor]
        Named tensors; order is preserved.
    fp16, wire_dtype, compress
        As for :func:`encode_tensor`.
    references : Mapping[str, Support] or None
        The supports the receiver holds, by name (VALUES where they allow it).

    Returns
    -------
    dict[str, bytes]
        One buffer per name, each made by :func:`encode_tensor` with ``fmt=None``. The
        buffers together decode to at most :func:`expansion_bound` of their total length
        (values-only tensors aside): a tensor that would exceed it is sent as BITMASK.
    """
    lossy = _lossy(fp16, wire_dtype)
    refs = references or {}
    out: dict[str, bytes] = {}
    prepared: dict[str, _Prepared] = {}
    for name, t in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"array name {name!r} is not a str")
        p = prepared[name] = _prepare(t, lossy)
        out[name] = _encode_prepared(p, None, refs.get(name), compress)

    # a payload shares one expansion budget: re-encode the most expanding COO tensors
    # (the only format beyond 64x) as BITMASK until the whole fits
    def over() -> int:
        need = sum(
            _decoded_nbytes(prepared[k])
            for k, b in out.items()
            if (b[4] & ~COMPRESSED) != TensorFormat.VALUES
        )
        return need - expansion_bound(sum(len(b) for b in out.values()))

    if over() > 0:
        coo = [k for k, b in out.items() if (b[4] & ~COMPRESSED) == TensorFormat.COO]
        coo.sort(key=lambda k: _decoded_nbytes(prepared[k]) / len(out[k]), reverse=True)
        for k in coo:
            out[k] = _encode_prepared(prepared[k], TensorFormat.BITMASK, None, compress)
            if over() <= 0:
                break
    return out


def decode_arrays(
    bufs: Mapping[str, BytesLike],
    *,
    expect: Schema | None = None,
    references: References | None = None,
) -> dict[str, torch.Tensor]:
    """Decode buffers made by :func:`encode_arrays`, keeping their order.

    Parameters
    ----------
    bufs : Mapping[str, bytes]
        One encoded tensor per name.
    expect : Schema or None
        Names, shapes and dtypes the receiver expects (checked before decoding).
        Without it the buffers together may decode to at most :func:`expansion_bound`
        of their total length.
    references : Mapping[str, Support] or None
        The supports the receiver holds (needed for values-only tensors).

    Returns
    -------
    dict[str, torch.Tensor]
        The decoded tensors.

    Raises
    ------
    DecodeError
        A buffer is malformed or unexpected; the message names the array.
    """
    views = {name: _as_view(buf, f"array {name!r}") for name, buf in bufs.items()}
    return _decode_tensors(list(views.items()), expect, references, "array")


def _decode_tensors(
    items: list[tuple[str, memoryview]],
    expect: Schema | None,
    references: References | None,
    what: str,
) -> dict[str, torch.Tensor]:
    if expect is not None:
        with _decode_errors("payload"):
            expect.check_names([name for name, _ in items])
    budget = _Budget(expansion_bound(sum(len(mv) for _, mv in items)))
    refs = references or {}
    out: dict[str, torch.Tensor] = {}
    for name, mv in items:
        spec = expect.spec(name) if expect is not None else None
        try:
            with _decode_errors("tensor buffer"):
                out[name] = _decode_tensor(mv, spec, refs.get(name), budget)
        except DecodeError as e:
            raise DecodeError(f"{what} {name[:80]!r}: {e}") from e
    return out


def encode_payload(
    p: Payload,
    *,
    fp16: bool = False,
    wire_dtype: str | None = None,
    references: References | None = None,
    compress: bool = False,
) -> bytes:
    """Encode a whole message: a JSON header followed by the tensor buffers.

    Parameters
    ----------
    p : Payload
        The message. ``config`` must be JSON (see :class:`Payload`); metrics must be
        numbers.
    fp16, wire_dtype, compress : optional
        As for :func:`encode_tensor`, applied to every array.
    references : Mapping[str, Support] or None
        The supports the receiver holds, by array name: a tensor whose non-zeros lie
        inside its reference is sent values-only when that is smaller.

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
    bufs = encode_arrays(
        p.arrays, fp16=fp16, wire_dtype=wire_dtype, references=references, compress=compress
    )
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


def decode_payload(
    buf: BytesLike,
    *,
    expect: Schema | None = None,
    references: References | None = None,
) -> Payload:
    """Decode a buffer made by :func:`encode_payload`.

    Parameters
    ----------
    buf : bytes, bytearray or memoryview
        Exactly one encoded message, with no trailing bytes.
    expect : Schema or None
        The arrays the receiver expects: an unknown or missing name is rejected before
        any tensor is decoded, and each tensor's shape and dtype before it is allocated.
        Without a schema the tensors may decode to at most :func:`expansion_bound`
        ``(len(buf))`` bytes (values-only tensors aside, which the references bound).
    references : Mapping[str, Support] or None
        The supports the receiver holds, by array name (needed for values-only tensors).
        With neither ``expect`` nor ``references``, ``buf`` may also be a delivery
        (:func:`pack_delivery`), decoded against the memory it carries.

    Returns
    -------
    Payload
        The message; arrays in their original order, metrics as floats.

    Raises
    ------
    DecodeError
        The buffer is malformed: magic, version, header length, JSON (not UTF-8, invalid,
        non-finite tokens, duplicate keys, wrong keys or types), array names not unique,
        array lengths that do not add up to the buffer, arrays the schema does not
        expect or misses, or a malformed tensor (another reference included).
    """
    mv = _as_view(buf, "payload buffer")
    if expect is None and references is None and mv[:3] == DELIVERY_MAGIC:
        mv, carried = unpack_delivery(mv)  # a receiver's own memory came with the buffer
        references = carried
    with _decode_errors("payload buffer"):
        _, config, metrics, spans = _split(mv)
    items = [(name, mv[begin : begin + length]) for name, begin, length in spans]
    arrays = _decode_tensors(items, expect, references, "payload array")
    return Payload(arrays=arrays, config=config, metrics=metrics)


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


# --------------------------------------------------------------------------------------
# a receiver's memory, handed along with a buffer inside one process tree

_DELIVERY_HEAD = struct.Struct("<3sBI")  # magic, version, length of the wire buffer
DELIVERY_MAGIC: Final[bytes] = b"FPD"


def pack_delivery(wire: BytesLike, memory: References | None) -> bytes:
    """A wire buffer together with the supports its receiver holds, for an engine that
    runs the receiver in another process of its own (the in-process engine's workers).

    Layout: magic ``b"FPD"``, version, ``w`` (uint32), the ``w`` bytes of the wire
    buffer, then a message buffer whose arrays are the supports as bool tensors. Only
    the wire buffer crosses the simulated network (and is counted); the rest is the
    receiver's own memory.
    """
    w = _as_view(wire, "wire buffer")
    arrays = {name: torch.from_numpy(s.mask) for name, s in (memory or {}).items()}
    mem = encode_payload(Payload(arrays=arrays))
    return b"".join([_DELIVERY_HEAD.pack(DELIVERY_MAGIC, FORMAT_VERSION, len(w)), w, mem])


def unpack_delivery(buf: BytesLike) -> tuple[memoryview, dict[str, Support]]:
    """Inverse of :func:`pack_delivery`: ``(wire buffer, receiver's supports)``.

    Raises
    ------
    DecodeError
        The buffer is not a delivery.
    """
    mv = _as_view(buf, "delivery")
    _need(mv, _DELIVERY_HEAD.size, "delivery")
    magic, version, w = _DELIVERY_HEAD.unpack_from(mv, 0)
    if magic != DELIVERY_MAGIC or version != FORMAT_VERSION:
        raise DecodeError(f"not a delivery: magic {magic!r}, version {version}")
    start = _DELIVERY_HEAD.size
    _need(mv, start + w, "delivery")
    mem = decode_payload(mv[start + w :])
    return mv[start : start + w], {k: Support(t.numpy()) for k, t in mem.arrays.items()}
