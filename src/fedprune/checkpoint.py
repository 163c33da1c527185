"""Atomic per-round checkpoints, and what ``fedprune run --resume`` reads back.

After every round the run directory holds ``checkpoint.safetensors``: one safetensors
file whose tensors are the global weights, masks, server momentum and any other tensor
state of the method, and whose metadata (JSON) holds the rest: the round, the method's
other state, the client sampler's RNG state, the traffic and time counters, every
round's record, and fingerprints of the config, the data partition and the initial
weights. No pickle is involved in writing or reading it.

Writing is atomic: the file is written to ``checkpoint.safetensors.tmp``, flushed to
disk, then renamed over the previous checkpoint, so a run killed at any moment (also
during the write) leaves the previous round's checkpoint intact. A SHA-256 digest over
the metadata and every tensor is stored with it; a checkpoint that was edited or damaged
is refused on resume. (The digest detects changes; it does not authenticate: anyone who
can write the folder can also recompute it.)

State trees
-----------
Method and engine state is a tree of ``None``, ``bool``, ``int``, ``float``, ``str``,
tensors, lists, tuples and dicts with ``str`` or ``int`` keys. :func:`pack` turns it into
JSON plus named tensors, :func:`unpack` back, exactly (non-finite floats and integer
dict keys included).

Fault injection
---------------
``FEDPRUNE_FAULT=<point>@<round>`` makes the process kill itself with SIGKILL at
``point`` of round ``round``, so tests can crash a run at the worst moments:
``after-metrics`` (the round is in ``metrics.jsonl`` but not checkpointed),
``checkpoint-partial`` (half of the temporary file written) and ``checkpoint-rename``
(temporary file complete, not yet renamed). A setup checkpoint (written during a long
setup phase such as AutoFLIP's exploration) has round 0; ``setup-checkpoint@N`` kills
the process right after the N-th setup checkpoint it wrote
(:meth:`fedprune.experiment.PreparedRun.checkpointer`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fedprune.engines.common import RoundRecord
from fedprune.errors import UserInputError

CHECKPOINT = "checkpoint.safetensors"
FORMAT = 1
_META = "fedprune.checkpoint"
_DIGEST = "fedprune.digest"
FAULT_ENV = "FEDPRUNE_FAULT"

__all__ = [
    "CHECKPOINT",
    "Checkpoint",
    "CheckpointError",
    "fault_point",
    "load_checkpoint",
    "pack",
    "save_checkpoint",
    "unpack",
]


class CheckpointError(UserInputError):
    """A checkpoint is unreadable, damaged, edited, or does not fit the run."""


# ------------------------------------------------------------------------ state trees


def pack(value: Any, tensors: dict[str, torch.Tensor], path: str = "state") -> Any:
    """``value`` as JSON, its tensors stored in ``tensors`` under their tree path.

    Raises
    ------
    TypeError
        A value of another type (the message names its path in the tree).
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, torch.Tensor):
        # no copy: the checkpoint is written before anything can change the tensor, and
        # a copy of every tensor doubled the memory a large setup checkpoint needed
        tensors[path] = value.detach().cpu().contiguous()
        return {"$tensor": path}
    if isinstance(value, list):
        return [pack(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [pack(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, str | int):
                raise TypeError(f"cannot checkpoint {path}: key {k!r} is not a str or int")
            items.append([k, pack(v, tensors, f"{path}/{k}")])
        return {"$dict": items}
    raise TypeError(f"cannot checkpoint {path}: values of type {type(value).__name__}")


def unpack(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack`.

    Raises
    ------
    ValueError
        A malformed tree or a reference to a missing tensor.
    """
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if isinstance(node, list):
        return [unpack(v, tensors) for v in node]
    if isinstance(node, dict) and len(node) == 1:
        ((tag, body),) = node.items()
        if tag == "$tensor" and isinstance(body, str):
            if body not in tensors:
                raise ValueError(f"tensor {body!r} is missing")
            return tensors[body]
        if tag == "$float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "$tuple" and isinstance(body, list):
            return tuple(unpack(v, tensors) for v in body)
        if tag == "$dict" and isinstance(body, list):
            out = {}
            for item in body:
                if not (isinstance(item, list) and len(item) == 2):
                    raise ValueError("malformed dict entry")
                k, v = item
                if isinstance(k, bool) or not isinstance(k, str | int):
                    raise ValueError(f"malformed dict key {k!r}")
                out[k] = unpack(v, tensors)
            return out
    raise ValueError(f"malformed state node {str(node)[:60]!r}")


# ------------------------------------------------------------------------ the file


@dataclass
class Checkpoint:
    """Everything needed to continue a run after round ``round``.

    Attributes
    ----------
    round
        The last finished round (0: a setup checkpoint, written before round 1 while a
        long setup phase is under way; ``engine["in_setup"]`` is then true).
    server
        The method's server-half state (:meth:`ServerMethod.checkpoint_state`).
    engine
        The engine's state: sampler RNG, traffic and time counters.
    records
        The metrics records of rounds ``1..round``.
    fingerprints
        ``config_sha``, ``partition_sha``, ``init_sha`` and ``method`` of the run.
    """

    round: int
    server: dict[str, Any]
    engine: dict[str, Any]
    records: list[RoundRecord]
    fingerprints: dict[str, str]


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` (contiguous), without a copy."""
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().data


def _digest(meta: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(meta.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_raw(t))
    return h.hexdigest()


def fault_point(point: str, rnd: int) -> None:
    """Kill this process with SIGKILL if ``FEDPRUNE_FAULT`` names ``point@rnd`` (tests)."""
    if os.environ.get(FAULT_ENV) == f"{point}@{rnd}":
        os.kill(os.getpid(), signal.SIGKILL)


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_safetensors(fh: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write ``tensors`` to ``fh`` in the safetensors layout, one tensor at a time.

    The layout: the header's length (u64, little-endian), the JSON header (each tensor's
    dtype, shape and byte range; ``__metadata__``), padded with spaces to 8 bytes, then the
    tensors' bytes back to back. ``safetensors.torch.save`` builds the whole file in
    memory, and its conversion copies every tensor once more: three copies of a 5 GB
    AutoFLIP setup checkpoint (100 explorers' guidance on FEMNIST's CNN) did not fit in
    24 GB. Files are read back with ``safetensors.safe_open`` as before. Returns the
    number of bytes written."""
    header: dict[str, Any] = {"__metadata__": metadata}
    names = sorted(tensors)
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"cannot checkpoint {name}: dtype {t.dtype}")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    for name in names:
        if tensors[name].numel():
            fh.write(_raw(tensors[name]))
    return 8 + len(raw) + offset


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> int:
    """Write ``RUN_DIR/checkpoint.safetensors`` atomically; return its size in bytes."""
    tensors: dict[str, torch.Tensor] = {}
    body = {
        "format": FORMAT,
        "round": ckpt.round,
        "fingerprints": ckpt.fingerprints,
        "server": pack(ckpt.server, tensors, "server"),
        "engine": pack(ckpt.engine, tensors, "engine"),
        "records": pack(ckpt.records, tensors, "records"),
    }
    meta = json.dumps(body, separators=(",", ":"))
    metadata = {_META: meta, _DIGEST: _digest(meta, tensors)}
    path = run_dir / CHECKPOINT
    tmp = run_dir / (CHECKPOINT + ".tmp")
    partial = os.environ.get(FAULT_ENV) == f"checkpoint-partial@{ckpt.round}"
    with open(tmp, "wb") as fh:
        size = _write_safetensors(fh, tensors, metadata)
        if partial:
            fh.truncate(size // 2)
        fh.flush()
        os.fsync(fh.fileno())
    fault_point("checkpoint-partial", ckpt.round)
    fault_point("checkpoint-rename", ckpt.round)
    os.replace(tmp, path)
    _fsync_dir(run_dir)
    return size


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint of ``run_dir`` (None if it has none yet).

    Raises
    ------
    CheckpointError
        The file is not a safetensors file, was written by another format version,
        fails its digest, or holds a malformed state tree.
    """
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    where = repr(str(path))
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # safetensors raises its own error types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{where} is not a readable checkpoint ({first})") from None
    meta, digest = metadata.get(_META), metadata.get(_DIGEST)
    if meta is None or digest is None:
        raise CheckpointError(f"{where} is not a fedprune checkpoint (no fedprune metadata)")
    if _digest(meta, tensors) != digest:
        raise CheckpointError(
            f"{where} fails its integrity check: it was edited or damaged after it was written"
        )
    try:
        body = json.loads(meta)
        if body.get("format") != FORMAT:
            raise CheckpointError(
                f"{where} has checkpoint format {body.get('format')!r}; this fedprune reads "
                f"format {FORMAT}"
            )
        return Checkpoint(
            round=int(body["round"]),
            server=unpack(body["server"], tensors),
            engine=unpack(body["engine"], tensors),
            records=unpack(body["records"], tensors),
            fingerprints=dict(body["fingerprints"]),
        )
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where} holds a malformed state: {exc}") from None
