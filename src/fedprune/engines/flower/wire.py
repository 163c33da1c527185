"""The Flower engine's messages: a fedprune codec buffer inside a Flower ``RecordDict``.

A fedprune :class:`~fedprune.core.codec.Payload` is encoded once with
:func:`~fedprune.core.codec.encode_payload` and cut along its own framing by
:func:`~fedprune.core.codec.split_payload` (a head, a JSON header with config, metrics
and the tensor index, then one buffer per tensor). The Flower message carries those
pieces with no byte added or re-encoded:

- ``content["fedprune.arrays"]``: an ``ArrayRecord`` with one ``Array`` per tensor.
  ``data`` is the tensor's codec buffer (byte for byte what
  :func:`~fedprune.core.codec.encode_arrays` makes: dense, bitmask or COO, picked per
  tensor). ``stype`` is :data:`STYPE`. ``dtype`` and ``shape`` describe the decoded
  tensor and are checked against it.
- ``content["fedprune.config"]``: a ``ConfigRecord`` with ``task`` (``"fit"`` or a
  setup task), ``head`` (the codec's head bytes) and ``header`` (the JSON header, as
  text).

The receiver rejoins the pieces with :func:`~fedprune.core.codec.join_payload` (head,
header, names and lengths checked against each other) and decodes them with
:func:`~fedprune.core.codec.decode_payload`, so every check of the codec applies (a
malformed message raises :class:`~fedprune.errors.DecodeError`; the strategy drops such
a reply and logs why). The bytes counted for a message are
``len(head) + len(header) + sum(len(array.data))``: exactly ``len(encode_payload(p))``,
what the in-process engine counts for the same payload. Flower's own framing
(protobuf, HTTP) is not counted, in either engine.

A receiver that knows what to expect passes it to :func:`decode_content`: ``expect`` (a
:class:`~fedprune.core.codec.Schema`, e.g. the strategy's
:func:`~fedprune.core.validation.reply_schema` of the global model) rejects unknown and
missing arrays before any is decoded and forged shapes before anything is allocated;
without it, a buffer can make the decoder allocate at most
:func:`~fedprune.core.codec.expansion_bound` of its own length. ``references`` are the
supports the receiver holds, against which values-only tensors decode
(:func:`encode_for_flower` makes them when given the receiver's references).

**Values-only broadcasts.** A ClientApp keeps the supports of the last broadcast it
decoded in its node's ``context.state`` (:data:`HELD_KEY`: :func:`store_held`,
:func:`load_held`), which Flower keeps per node and run across messages, and names them
by their :func:`~fedprune.engines.references.fingerprint`: ``holds`` in the config of
every ``train`` reply and of its discovery reply. A broadcast encoded against a support
set names that set's fingerprint (``reference`` in its config). A node that does not
hold it, or cannot decode against it, does not guess: it answers with a refusal
(:func:`refusal_content`; ``refused`` in the config, no arrays), and the strategy sends
that client the same payload again in full format.

One ``Array`` per tensor, rather than the whole buffer in one ``Array``, keeps the
message readable with Flower's tools (names, shapes, dtypes, per-tensor sizes), lets
Flower's object store deduplicate and chunk tensors individually, and costs nothing:
the bytes are the same.

This module also holds the node-discovery keys (``query`` messages) and the engine's
error, which the ClientApp and the strategy share. It imports the codec (and with it
torch) on first use, not at import: a ClientApp process that only answers a ``query``
never loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedprune.errors import DecodeError, FedpruneError

if TYPE_CHECKING:
    import torch

    from fedprune.core.codec import Payload, References, Schema, Support

__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "HELD_KEY",
    "HOLDS",
    "NODE_KEY",
    "NUM_PARTITIONS",
    "PARTITION_ID",
    "REFERENCE",
    "REFUSED",
    "STYPE",
    "EncodedPayload",
    "FlowerEngineError",
    "config_field",
    "content_nbytes",
    "decode_content",
    "encode_for_flower",
    "held_fingerprint",
    "load_held",
    "make_content",
    "refusal_content",
    "store_held",
]

STYPE = "fedprune.codec.v1"
"""``Array.stype`` of a tensor buffer made by fedprune's codec (format version 1)."""
ARRAYS_KEY = "fedprune.arrays"
CONFIG_KEY = "fedprune.config"
NODE_KEY = "fedprune.node"
"""``ConfigRecord`` of a discovery ``query`` and its reply (and of a node's state)."""
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
HELD_KEY = "fedprune.held"
"""``ConfigRecord`` in a node's ``context.state``: the supports of the last broadcast its
ClientApp decoded (``fingerprint``, and per array ``names``, ``numel``, ``bits``)."""
REFERENCE = "reference"
"""Config field of a broadcast: the fingerprint of the supports it is encoded against
(absent: a full-format broadcast)."""
HOLDS = "holds"
"""Config field of a reply (``train`` and discovery): the fingerprint of the supports the
node holds now (absent: none)."""
REFUSED = "refused"
"""Config field of a refusal: why the node did not decode a values-only broadcast."""


class FlowerEngineError(FedpruneError, RuntimeError):
    """The Flower runtime cannot run the federation as configured (nodes, partitions)."""


@dataclass(frozen=True)
class EncodedPayload:
    """A payload's codec buffer, cut into what a Flower message carries.

    Attributes
    ----------
    head : bytes
        The codec's message head.
    header : str
        The JSON header (config, metrics, tensor index).
    arrays : list of tuple
        ``(name, buffer, dtype, shape)`` per tensor, in the header's order.
    nbytes : int
        ``len(encode_payload(payload))``: what the engine counts for this message.
    """

    head: bytes
    header: str
    arrays: list[tuple[str, bytes, str, tuple[int, ...]]]
    nbytes: int


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def encode_for_flower(
    payload: Payload,
    *,
    fp16: bool = False,
    wire_dtype: str | None = None,
    references: References | None = None,
    compress: bool = False,
) -> EncodedPayload:
    """Encode ``payload`` with the codec and cut the buffer along its own framing.

    ``fp16``, ``wire_dtype``, ``references`` (the supports the receiver holds: tensors
    inside them travel values-only) and ``compress`` are
    :func:`~fedprune.core.codec.encode_payload`'s.
    """
    from fedprune.core.codec import encode_payload, split_payload

    buf = encode_payload(
        payload, fp16=fp16, wire_dtype=wire_dtype, references=references, compress=compress
    )
    parts = split_payload(buf)
    arrays: list[tuple[str, bytes, str, tuple[int, ...]]] = []
    for name, data in parts.arrays.items():
        t = payload.arrays[name]
        arrays.append((name, data, _dtype_name(t), tuple(t.shape)))
    return EncodedPayload(parts.head, parts.header.decode("utf-8"), arrays, len(buf))


def make_content(
    enc: EncodedPayload,
    task: str,
    *,
    reference: str | None = None,
    holds: str | None = None,
) -> RecordDict:
    """A message's content for one encoded payload (new record objects per message).

    ``reference``: the fingerprint of the supports a broadcast is encoded against;
    ``holds``: the fingerprint of the supports a replying node holds. Neither is part of
    the codec buffer (not counted, like the task name).
    """
    arrays = ArrayRecord(
        {
            name: Array(dtype=dtype, shape=shape, stype=STYPE, data=data)
            for name, data, dtype, shape in enc.arrays
        }
    )
    config = ConfigRecord({"task": task, "head": enc.head, "header": enc.header})
    if reference is not None:
        config[REFERENCE] = reference
    if holds is not None:
        config[HOLDS] = holds
    return RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})


def refusal_content(task: str, reason: str, holds: str | None) -> RecordDict:
    """A node's answer to a values-only broadcast it cannot decode: no payload, the
    reason and the fingerprint of what it holds (the strategy resends in full format)."""
    config = ConfigRecord({"task": task, REFUSED: reason})
    if holds is not None:
        config[HOLDS] = holds
    return RecordDict({CONFIG_KEY: config})


def config_field(content: RecordDict, key: str) -> str | None:
    """A string field of a message's fedprune config record (``None``: absent, or not a
    string)."""
    config = content.get(CONFIG_KEY)
    value = config.get(key) if isinstance(config, ConfigRecord) else None
    return value if isinstance(value, str) else None


# -- what a node holds: the supports of the last broadcast it decoded ------------------


def held_fingerprint(state: RecordDict) -> str | None:
    """The fingerprint of the supports a node's ``context.state`` holds (``None``: none).
    Reads the record only (no torch: a discovery ``query`` answers with it)."""
    rec = state.get(HELD_KEY)
    fp = rec.get("fingerprint") if isinstance(rec, ConfigRecord) else None
    return fp if isinstance(fp, str) else None


def store_held(state: RecordDict, supports: References, fp: str) -> None:
    """Keep ``supports`` (with their fingerprint ``fp``) in a node's ``context.state``,
    replacing what it held: one packed bitmask per array."""
    import numpy as np

    names = list(supports)
    state[HELD_KEY] = ConfigRecord(
        {
            "fingerprint": fp,
            "names": names,
            "numel": [supports[n].numel for n in names],
            "bits": [np.packbits(supports[n].mask).tobytes() for n in names],
        }
    )


def load_held(state: RecordDict) -> tuple[str, dict[str, Support]] | None:
    """The supports a node's ``context.state`` holds and their fingerprint, or ``None``
    when it holds none or the record does not agree with its own fingerprint (a damaged
    record is never used as a reference)."""
    import numpy as np

    from fedprune.core.codec import Support
    from fedprune.engines.references import fingerprint

    rec = state.get(HELD_KEY)
    if not isinstance(rec, ConfigRecord):
        return None
    fp, names, numel, bits = (rec.get(k) for k in ("fingerprint", "names", "numel", "bits"))
    if not (
        isinstance(fp, str)
        and isinstance(names, list)
        and isinstance(numel, list)
        and isinstance(bits, list)
        and len(names) == len(numel) == len(bits)
    ):
        return None
    held: dict[str, Support] = {}
    for name, n, b in zip(names, numel, bits, strict=True):
        if not isinstance(name, str) or not isinstance(b, bytes):
            return None
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 8 * len(b) < n + 8:
            return None
        mask = np.unpackbits(np.frombuffer(b, dtype=np.uint8), count=n).view(np.bool_)
        held[name] = Support(mask)
    if fingerprint(held) != fp:
        return None
    return fp, held


def content_nbytes(content: RecordDict) -> int:
    """The fedprune bytes in a message content, as far as they can be read (for a reply
    that does not decode: it crossed the network all the same)."""
    n = 0
    arrays = content.get(ARRAYS_KEY)
    if isinstance(arrays, ArrayRecord):
        n += sum(len(a.data) for a in arrays.values())
    config = content.get(CONFIG_KEY)
    if isinstance(config, ConfigRecord):
        head, header = config.get("head"), config.get("header")
        n += len(head) if isinstance(head, bytes) else 0
        n += len(header.encode("utf-8", "replace")) if isinstance(header, str) else 0
    return n


def decode_content(
    content: RecordDict,
    *,
    expect: Schema | None = None,
    references: References | None = None,
) -> tuple[str, Payload, int]:
    """Rebuild and decode the payload a message carries.

    Parameters
    ----------
    content : RecordDict
        The message's content.
    expect : Schema or None
        What the receiver expects (the strategy: :func:`~fedprune.core.validation.reply_schema`
        of the global model): unknown or missing arrays and forged shapes are rejected
        before anything is allocated. Without it, what a buffer may allocate is bounded by
        its own length (:func:`~fedprune.core.codec.expansion_bound`).
    references : Mapping[str, Support] or None
        The supports the receiver holds (for values-only tensors).

    Returns
    -------
    tuple
        ``(task, payload, nbytes)`` with ``nbytes`` the codec buffer's length.

    Raises
    ------
    DecodeError
        Records missing or of the wrong type, an ``Array`` that is not a fedprune codec
        buffer, names that disagree with the header, dtype or shape metadata that
        disagree with the buffer, or any malformed codec buffer.
    """
    from fedprune.core.codec import decode_payload, join_payload

    config = content.get(CONFIG_KEY)
    arrays = content.get(ARRAYS_KEY)
    if not isinstance(config, ConfigRecord) or not isinstance(arrays, ArrayRecord):
        raise DecodeError(f"message lacks the {CONFIG_KEY!r}/{ARRAYS_KEY!r} records")
    task, head, header = config.get("task"), config.get("head"), config.get("header")
    if not isinstance(task, str) or not isinstance(head, bytes) or not isinstance(header, str):
        raise DecodeError(f"{CONFIG_KEY!r} needs task (str), head (bytes), header (str)")
    try:
        header_bytes = header.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DecodeError(f"message header is not a codec header: {e}") from e
    buf = join_payload(head, header_bytes, {name: a.data for name, a in arrays.items()})
    for name, a in arrays.items():
        if a.stype != STYPE:
            raise DecodeError(f"array {name[:80]!r} has stype {a.stype!r}")
    payload = decode_payload(buf, expect=expect, references=references)
    for name, t in payload.arrays.items():
        a = arrays[name]
        if a.dtype != _dtype_name(t) or tuple(a.shape) != tuple(t.shape):
            raise DecodeError(
                f"array {name[:80]!r}: metadata {a.dtype}{list(a.shape)} disagrees with "
                f"its buffer ({_dtype_name(t)}{list(t.shape)})"
            )
    return task, payload, len(buf)
