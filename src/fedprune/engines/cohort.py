"""The in-process engine's cohort path: a round's ``fit`` tasks trained as one batch.

The client half keeps its per-client steps: for each client, :meth:`ClientMethod.
begin_fit` (decode, model, mask, settings, batch order) and :meth:`ClientMethod.end_fit`
(client-side pruning, the reply) run one client at a time, each inside the seeded RNG
context of :meth:`ClientMethod.run_task`. Only the training loop in between is batched,
by :func:`fedprune.core.cohort.train_cohort`, in chunks of ``engine.cohort_size``
clients (0: on a CPU, as many as keep a layer's activations cache-sized,
:func:`~fedprune.core.cohort.auto_chunk`; on a GPU, all). Each client's dropout stream
continues from the state the per-client path's global RNG would have, and ``end_fit``
sees the state that path would leave, so a client half cannot tell the two paths apart
(up to float rounding of the training itself).

Whatever the cohort path cannot serve runs on the per-client path: injected failures,
clients without training data, a client half that overrides ``fit``
(:meth:`ClientMethod.batchable`), a model with a layer that has no batched form
(:func:`fedprune.core.cohort.cohort_support`). :func:`cohort_refusal` says why, once,
before a round is dispatched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedprune.core.codec import Payload, decode_payload
from fedprune.core.cohort import CohortMember, auto_chunk, cohort_support, train_cohort
from fedprune.data.federation import Federation
from fedprune.methods.base import ClientMethod, FitJob, task_seed

log = logging.getLogger(__name__)

Result = tuple[int, bytes | None, str | None]
"""``(cid, encoded reply or None, reason of a failure or None)``."""

Guarded = Callable[[ClientMethod, Federation, int, str, bytes], tuple[bytes | None, str | None]]
"""Runs one item on the per-client path; a failure becomes ``(None, reason)``."""

EncodeReply = Callable[[ClientMethod, Payload, Payload], bytes]
"""Encodes a client's reply ``(client, received payload, reply)`` exactly as the
per-client path does."""


def resolve_device(name: str) -> torch.device:
    """``engine.device`` as a torch device (``auto``: cuda, else mps, else cpu).

    Raises
    ------
    RuntimeError
        The named device is not available here.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device=cuda but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("engine.device=mps but torch sees no MPS device")
    return torch.device(name)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def cohort_refusal(client: ClientMethod, buf: bytes) -> str | None:
    """Why the cohort path cannot serve this client half and model (``None``: it can).

    ``buf`` is one of the round's encoded ``fit`` payloads (its architecture is the
    round's).
    """
    if not type(client).batchable():
        return f"the client half {type(client).__name__} overrides fit"
    try:
        model = client.model_for(decode_payload(buf))
    except Exception as exc:  # the per-client path reports it per client
        return f"the payload does not build a model ({_reason(exc)})"
    return cohort_support(model)


@dataclass
class _Prepared:
    cid: int
    job: FitJob
    member: CohortMember


def run_cohort(
    client: ClientMethod,
    fed: Federation,
    items: list[tuple[int, str, bytes]],
    guarded: Guarded,
    encode: EncodeReply,
    *,
    chunk: int = 0,
    device: torch.device | str = "cpu",
) -> list[Result]:
    """Run ``(cid, task, encoded payload)`` items; ``fit`` ones batched.

    ``guarded`` runs one item on the per-client path (failures become a reason),
    ``encode`` encodes a reply as that path does. The caller has checked
    :func:`cohort_refusal`.
    """
    results: dict[int, tuple[bytes | None, str | None]] = {}
    prepared: list[_Prepared] = []
    for cid, task, buf in items:
        data = fed.clients[cid]
        if task != "fit" or data.num_train == 0:  # FAIL_TASK included
            results[cid] = guarded(client, fed, cid, task, buf)
            continue
        try:
            payload = decode_payload(buf)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(task_seed(payload, cid))
                job = client.begin_fit(payload, data)
                rng = torch.get_rng_state()  # where dropout draws from in train_local
            state = {k: v.detach().clone() for k, v in job.model.state_dict().items()}
            member = CohortMember(data.x_train, data.y_train, state, job.masks, job.generator, rng)
            prepared.append(_Prepared(cid, job, member))
        except Exception as exc:  # drops only this client, as on the per-client path
            results[cid] = None, _reason(exc)

    # one cohort per architecture and settings (a round normally has exactly one)
    groups: dict[tuple[object, ...], list[_Prepared]] = {}
    for p in prepared:
        shapes = tuple((k, tuple(v.shape)) for k, v in p.member.state.items())
        groups.setdefault((p.job.settings, shapes), []).append(p)
    for group in groups.values():
        model = group[0].job.model
        size = chunk
        if size <= 0:  # automatic: cache-sized chunks on a CPU, everything on a GPU
            size = len(group)
            if torch.device(device).type == "cpu":
                shape = tuple(group[0].member.x.shape[1:])
                size = auto_chunk(model, shape, group[0].job.settings.batch_size)
        for start in range(0, len(group), size):
            part = group[start : start + size]
            try:
                trained = train_cohort(
                    model, [p.member for p in part], part[0].job.settings, device=device
                )
            except Exception as exc:
                log.warning(
                    "cohort of %d clients failed (%s); training them one by one",
                    len(part),
                    _reason(exc),
                )
                for p in part:
                    results[p.cid] = guarded(client, fed, p.cid, "fit", _encoded(items, p.cid))
                continue
            for p, res in zip(part, trained, strict=True):
                try:
                    job = p.job
                    job.model = client.model_for(job.payload)
                    job.model.load_state_dict(res.state)
                    with torch.random.fork_rng(devices=[]):
                        torch.set_rng_state(res.rng_state)
                        reply = client.end_fit(job, res.stats)
                    results[p.cid] = encode(client, job.payload, reply), None
                except Exception as exc:
                    results[p.cid] = None, _reason(exc)
    return [(cid, *results[cid]) for cid, _, _ in items]


def _encoded(items: list[tuple[int, str, bytes]], cid: int) -> bytes:
    return next(buf for c, _, buf in items if c == cid)


def split(items: list[tuple[int, str, bytes]], parts: int) -> list[list[tuple[int, str, bytes]]]:
    """Contiguous sub-cohorts of nearly equal size, one per worker (no empty one)."""
    parts = max(1, min(parts, len(items)))
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out
