"""What each client holds from the server: the references of values-only broadcasts.

A broadcast tensor can travel values-only (:attr:`~fedprune.core.codec.TensorFormat.VALUES`)
when its receiver already holds a support that contains its non-zeros: the support of the
same array in the last broadcast that client received. :class:`ReferenceBook` keeps, per
client, the supports of that broadcast (one dict shared by every client that received the
same one). A client's entry is committed when its reply arrives, so the server's view and
the client's memory never disagree: a client that failed keeps its previous entry, a new
client has none (its broadcast is sent in full format).

The book is engine state: it is saved in checkpoints (:meth:`ReferenceBook.state_dict`,
the supports as packed bits) so that a resumed run sends exactly the bytes an
uninterrupted one sends.

An engine whose clients keep their memory themselves (the Flower engine: in a node's
``context.state``) cannot hand it along with the buffer; both ends then name a support
set by its :func:`fingerprint`, and the server only encodes against a set whose
fingerprint its client confirmed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedprune.config import EngineConfig
from fedprune.core.codec import Payload, References, Support, encode_payload, supports_of

if TYPE_CHECKING:
    from fedprune.engines.common import CheckpointFn, RoundRecord

__all__ = ["ENGINE_KEY", "ReferenceBook", "encode_reply", "fingerprint"]

ENGINE_KEY = "references"
"""Where a checkpoint's engine state keeps the book (the same key on every engine)."""


def fingerprint(supports: References) -> str:
    """A short name of a support set: 32 hex digits of a BLAKE2b digest of every array's
    name, size and packed bitmask (sorted by name).

    Equal sets have equal fingerprints; different sets collide with probability about
    2**-128, and a values-only tensor decoded against a colliding set still fails the
    codec's own count and CRC-32 check.
    """
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(supports):
        s = supports[name]
        raw = name.encode("utf-8")
        h.update(len(raw).to_bytes(4, "little"))
        h.update(raw)
        h.update(s.numel.to_bytes(8, "little"))
        h.update(np.packbits(s.mask).tobytes())
    return h.hexdigest()


def encode_reply(reply: Payload, received: Payload, engine: EngineConfig) -> bytes:
    """A client's reply buffer: values-only against the supports of what it received
    (``engine.values_only``), values compressed with ``engine.compress``.

    Every client path of an engine encodes its replies here (the per-client path and the
    batched cohort path alike), so that the server decodes them against the same
    references (:func:`~fedprune.core.codec.supports_of` of the broadcast it sent).
    """
    refs = supports_of(received.arrays) if engine.values_only else None
    return encode_payload(reply, references=refs, compress=engine.compress)


class ReferenceBook:
    """Per-client supports of the last broadcast each client acknowledged."""

    def __init__(self) -> None:
        self._held: dict[int, dict[str, Support]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def of(self, cid: int) -> dict[str, Support] | None:
        """The supports client ``cid`` holds (``None``: nothing, send in full)."""
        return self._held.get(cid)

    def commit(self, cid: int, supports: dict[str, Support]) -> None:
        """Client ``cid`` now holds ``supports`` (share one dict among the clients that
        received the same broadcast)."""
        self._held[cid] = supports

    def forget(self, cid: int) -> None:
        """Client ``cid`` holds nothing the server knows of (its next broadcast is sent
        in full format)."""
        self._held.pop(cid, None)

    def clients(self) -> list[int]:
        """The clients with an entry, sorted."""
        return sorted(self._held)

    # -- checkpoints -------------------------------------------------------------------
    def saving(self, checkpoint: CheckpointFn | None) -> CheckpointFn | None:
        """``checkpoint`` with this book added to the engine state it saves
        (under :data:`ENGINE_KEY`)."""
        if checkpoint is None:
            return None
        inner = checkpoint

        def save(rnd: int, records: list[RoundRecord], state: dict[str, Any]) -> int | None:
            return inner(rnd, records, {**state, ENGINE_KEY: self.state_dict()})

        return save

    def state_dict(self) -> dict[str, Any]:
        """A state tree: each distinct support set once (packed bits), and who holds it."""
        sets: list[dict[str, Any]] = []
        index: dict[int, int] = {}
        clients: list[list[int]] = []
        for cid, held in sorted(self._held.items()):
            i = index.get(id(held))
            if i is None:
                i = index[id(held)] = len(sets)
                sets.append(
                    {
                        name: [s.numel, torch.from_numpy(np.packbits(s.mask))]
                        for name, s in held.items()
                    }
                )
            clients.append([cid, i])
        return {"sets": sets, "clients": clients}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Inverse of :meth:`state_dict` (``None``: an older checkpoint, start empty)."""
        self._held = {}
        if not state:
            return
        sets = [
            {
                name: Support(np.unpackbits(bits.numpy(), count=int(numel)).view(np.bool_))
                for name, (numel, bits) in entry.items()
            }
            for entry in state["sets"]
        ]
        for cid, i in state["clients"]:
            self._held[int(cid)] = sets[int(i)]
