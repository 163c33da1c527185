"""The two halves of a federated method, and what an engine gives them.

A method is a :class:`ServerMethod` and a :class:`ClientMethod`. Neither imports an
engine: the server half says what each sampled client receives and turns the replies
into the next global model; the client half turns what it received plus its local data
into a reply. Messages are :class:`~fedprune.core.codec.Payload` records (named tensors,
a JSON config, numeric metrics); engines encode them with the codec, count the bytes
and move them: the in-process engine by calling the halves directly, the Flower engine
inside Flower ``Message`` objects.

The default halves implement FedAvg (and FedAvgM) with optional mask enforcement, so a
pruning method usually overrides only :meth:`ServerMethod.after_aggregate` (server-side
pruning) or :meth:`ClientMethod.after_train` (client-side pruning).

Mask transport
--------------
``config["mask"]`` tells the client which mask to enforce during local training:

``"none"``
    Dense training (FedAvg).
``"nonzero"``
    The non-zero pattern of the received prunable tensors (no mask bytes on the wire;
    FedSparsify's convention: the zeros of the global model are the mask).
``"explicit"``
    Boolean tensors named ``"mask/<param>"`` travel in ``arrays``.

Architecture transport
----------------------
A server half that shrinks the model (structured pruning) keeps its pruning history in
``self.history`` (JSON entries, see :mod:`fedprune.core.structured`). When it is not empty
it travels as ``config["arch"]``; the client builds the initial architecture and replays
the history on it (once per distinct history) before loading the received weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from fedprune.config import RunConfig
from fedprune.core.aggregation import (
    ModelAverage,
    ServerMomentum,
    coordinate_median,
    trimmed_mean,
    weighted_average,
)
from fedprune.core.codec import Payload
from fedprune.core.masks import Masks, apply_masks, masks_from_nonzero, prunable_names
from fedprune.core.sampling import derive_seed
from fedprune.core.training import TrainSettings, TrainStats, train_local
from fedprune.core.validation import ValidationPolicy, check_reply
from fedprune.models import build_model

if TYPE_CHECKING:
    from fedprune.data.federation import ClientData

MASK_PREFIX = "mask/"
_GLOBAL_RNG_STREAM = 0x6D0B
"""Seed stream of torch's global RNG inside a client task (see ClientMethod.run_task)."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything a client needs to build the (initial) model architecture."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    hidden: int | None = None

    def build(self, seed: int | None = None) -> nn.Module:
        """A fresh model of this architecture."""
        return build_model(
            self.name, self.input_shape, self.num_classes, hidden=self.hidden, seed=seed
        )

    def rebuild(self, history: list[dict[str, Any]]) -> nn.Module:
        """The architecture after a structured-pruning ``history``: a fresh build with the
        history replayed (its weights are to be loaded). The build is seeded, so it
        consumes nothing of the global random state that dropout draws from.

        Raises
        ------
        ValueError
            A history that does not fit this architecture.
        """
        model = self.build(seed=0)
        if not history:
            return model
        from fedprune.core.structured import example_input, replay

        return replay(model, history, example_input(self.input_shape))


@dataclass
class FitJob:
    """One client's local training as :meth:`ClientMethod.begin_fit` prepared it."""

    payload: Payload
    data: ClientData
    model: nn.Module
    """The client half's model, holding the received weights."""
    masks: Masks | None
    settings: TrainSettings
    generator: torch.Generator
    """The client's batch-order generator (not yet drawn from)."""


@dataclass
class ClientReply:
    """A decoded reply from one client."""

    cid: int
    payload: Payload

    @property
    def num_examples(self) -> int:
        """The sample count the client reported (its aggregation weight)."""
        return int(self.payload.metrics.get("num_examples", 0))


class FederatedIO(Protocol):
    """What an engine offers a server half for exchanges outside the round loop.

    Setup phases (SNIP's saliency from one client, AutoFLIP's exploration) send tasks to
    clients through :meth:`exchange`; the engine encodes the payloads and counts their
    bytes like any round's.
    """

    num_clients: int

    def exchange(self, task: str, payloads: Mapping[int, Payload]) -> list[ClientReply]:
        """Send ``payloads[cid]`` with ``task`` to each client and return the replies."""
        ...


PROGRESS_LOGGER = "fedprune.progress"
"""Logger on which a client half may report progress inside a long task (INFO): silent
in library use unless a handler is attached; ``fedprune run`` prints the records of its
own process (so the in-process engine's main-process clients, not forked workers or
Flower nodes)."""


class SetupIO:
    """What an engine hands :meth:`ServerMethod.setup`: its :class:`FederatedIO` plus
    three services for a long setup phase.

    - :attr:`parallel`: how many clients the engine runs at once (0: every client sent in
      one exchange). A setup that splits its work into exchanges of at most this many
      clients keeps the engine's parallelism and can report and checkpoint in between.
    - :meth:`progress`: one line for the user (``fedprune run`` prints it; library use
      sees it only through the ``on_progress`` callback of ``run_experiment``).
    - :meth:`checkpoint`: write a *setup checkpoint* now: the server half's
      :meth:`~ServerMethod.checkpoint_state` and the engine's counters (bytes, time,
      the clients' references), atomically, like a round's checkpoint. The server half's
      ``checkpoint_attrs`` must then hold the setup's progress: ``fedprune run --resume``
      restores them into a fresh server half and calls :meth:`~ServerMethod.setup` again
      (:attr:`resumed` is true), which must skip the work already done. Without
      checkpoints (``engine.checkpoint = false``, or a plain ``FederatedIO``) it does
      nothing.

    :meth:`of` wraps a plain ``FederatedIO`` (a test's fake) with the defaults: all clients
    at once, no progress, no checkpoints.
    """

    def __init__(
        self,
        io: FederatedIO,
        *,
        parallel: int = 0,
        on_progress: Callable[[str], None] | None = None,
        on_checkpoint: Callable[[], None] | None = None,
        resumed: bool = False,
    ) -> None:
        self.io = io
        self.num_clients = io.num_clients
        self.parallel = max(0, int(parallel))
        self.resumed = resumed
        self._on_progress = on_progress
        self._on_checkpoint = on_checkpoint

    @classmethod
    def of(cls, io: FederatedIO) -> SetupIO:
        """``io`` itself when it is a SetupIO, else ``io`` wrapped with the defaults."""
        return io if isinstance(io, SetupIO) else cls(io)

    def exchange(self, task: str, payloads: Mapping[int, Payload]) -> list[ClientReply]:
        """The engine's :meth:`FederatedIO.exchange` (bytes counted as always)."""
        return self.io.exchange(task, payloads)

    def group_size(self, todo: int) -> int:
        """Clients per exchange for ``todo`` clients: :attr:`parallel`, or all of them."""
        return max(1, min(todo, self.parallel) if self.parallel else todo)

    def progress(self, text: str) -> None:
        """Hand one progress line to the run's ``on_progress`` callback (if any)."""
        if self._on_progress is not None:
            self._on_progress(text)

    def checkpoint(self) -> None:
        """Write a setup checkpoint now (see the class docstring); no-op without one."""
        if self._on_checkpoint is not None:
            self._on_checkpoint()


def config_number(config: Mapping[str, Any], key: str, default: float) -> float:
    """A numeric entry of a payload's config (the default when absent)."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"config[{key!r}] must be a number, got {value!r}")
    return float(value)


def config_int(config: Mapping[str, Any], key: str, default: int) -> int:
    """An integer entry of a payload's config, exactly (63-bit seeds must not pass through
    a float, which keeps only 53 bits)."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"config[{key!r}] must be an integer, got {value!r}")
    return value


def client_generator(payload: Payload, cid: int) -> torch.Generator:
    """The seeded generator of client ``cid`` for this round's batches:
    ``derive_seed(config["seed"], cid)``, with the round seed from the server."""
    return torch.Generator().manual_seed(derive_seed(config_int(payload.config, "seed", 0), cid))


def task_seed(payload: Payload, cid: int) -> int:
    """The seed of torch's global RNG while client ``cid`` handles ``payload``
    (:meth:`ClientMethod.run_task`; dropout draws from it)."""
    return derive_seed(config_int(payload.config, "seed", 0), cid, _GLOBAL_RNG_STREAM)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class ServerMethod:
    """Server half of a method. The default is FedAvg (FedAvgM when configured).

    Parameters
    ----------
    cfg
        The run's configuration.
    spec
        The initial architecture.
    model
        The initial global model (already seeded); the server owns it from now on.
    """

    name: ClassVar[str] = "fedavg"
    mask_mode: ClassVar[str] = "none"

    def __init__(self, cfg: RunConfig, spec: ModelSpec, model: nn.Module) -> None:
        self.cfg = cfg
        self.spec = spec
        self.model = model
        self.masks: Masks | None = None
        self.history: list[dict[str, Any]] = []
        """Structured-pruning history of ``model`` (empty: the initial architecture)."""
        self._reports: dict[str, float] = {}
        self.momentum = (
            ServerMomentum(cfg.federation.server_momentum)
            if cfg.federation.aggregation == "fedavgm"
            else None
        )
        self.average = (
            ModelAverage(cfg.federation.average_decay) if cfg.federation.average_decay else None
        )
        """Moving average of the global models (``federation.average_decay``; None: off)."""

    # -- the metrics channel ----------------------------------------------------------
    def report(self, **metrics: float) -> None:
        """Hand figures to the current round's record (``method_metrics``).

        For figures a method produces outside ``after_aggregate``: during ``setup``
        (they go into round 1's record), in ``configure_fit`` or in ``aggregate``. A later
        report of the same name in the same round wins. The channel is emptied into
        each round's record by :meth:`aggregate_fit`, so it is always empty at a
        checkpoint.
        """
        self._reports.update(metrics)

    def take_reports(self) -> dict[str, float]:
        """The figures reported since the last call (and forget them)."""
        out, self._reports = self._reports, {}
        return out

    # -- hooks an engine calls -------------------------------------------------------
    def setup(self, io: FederatedIO) -> None:
        """Optional phase before round 1 (default: nothing).

        Engines pass a :class:`SetupIO` (``SetupIO.of(io)`` also accepts a plain
        ``FederatedIO``): a long setup reports progress and writes setup checkpoints
        through it, and is called again on a fresh, restored server half when a run
        killed during setup is resumed."""

    def round_config(self, rnd: int) -> dict[str, Any]:
        """Per-round settings for the clients (learning rate with decay, seed, mask mode)."""
        t = self.cfg.train
        config: dict[str, Any] = {
            "task": "fit",
            "round": rnd,
            "lr": t.lr * t.lr_decay ** (rnd - 1),
            "seed": derive_seed(self.cfg.seed, rnd),
            "mask": self.mask_mode,
        }
        if self.history:
            config["arch"] = self.history
        return config

    def configure_fit(self, rnd: int, cids: list[int]) -> dict[int, Payload]:
        """What each sampled client receives. Default: the same global model for all."""
        arrays = state_of(self.model)
        if self.mask_mode == "explicit" and self.masks is not None:
            arrays.update({MASK_PREFIX + k: v for k, v in self.masks.items()})
        payload = Payload(arrays=arrays, config=self.round_config(rnd))
        return dict.fromkeys(cids, payload)

    def aggregate_fit(
        self,
        rnd: int,
        replies: list[ClientReply],
        rejections: dict[int, str] | None = None,
    ) -> dict[str, Any]:
        """Validate the replies, aggregate the sound ones into the new global model.

        Returns extra metrics for the round's record: the method's own, plus
        ``rejected`` (count) and ``rejections`` (``{cid: reason}``) when any reply
        failed :func:`~fedprune.core.validation.validate_reply`. An engine that already
        split the replies with :meth:`validate` (to count accepted replies toward
        ``federation.min_clients``) passes the sound ones and its ``rejections``.
        """
        if rejections is None:
            sound, rejections = self.validate(replies)
        else:
            sound = replies
        metrics: dict[str, Any] = {"rejected": len(rejections)}
        if rejections:
            metrics["rejections"] = rejections
        if not sound:
            metrics.update(self.take_reports())
            return metrics
        new_state = self.aggregate(rnd, sound)
        self.model.load_state_dict(new_state)
        if self.masks is not None:
            apply_masks(self.model, self.masks)
        after = self.after_aggregate(rnd, sound)
        metrics.update(self.take_reports())  # setup, configure_fit, aggregate: this round's
        metrics.update(after)
        if self.momentum is not None and self.masks is not None:
            self.momentum.mask_velocity(self.masks)
        if self.average is not None:
            self.average.update(self.model.state_dict(), self.masks)
            metrics["average_rounds"] = self.average.rounds
        return metrics

    def average_model(self) -> nn.Module | None:
        """A copy of the global model holding the moving average of the global models
        (``federation.average_decay``), or None when it is off or still empty."""
        if self.average is None or not self.average.state:
            return None
        model = copy.deepcopy(self.model)
        try:
            model.load_state_dict(self.average.state)
        except RuntimeError:  # the architecture changed since the last round's update
            return None
        return model

    def validation_policy(self) -> ValidationPolicy:
        """The bounds replies must satisfy (from the ``validation`` config section)."""
        v = self.cfg.validation
        return ValidationPolicy(
            max_update_norm=v.max_update_norm,
            max_examples=v.max_examples or 2**31 - 1,
            check_mask=v.check_mask,
        )

    def validate(self, replies: list[ClientReply]) -> tuple[list[ClientReply], dict[int, str]]:
        """Split replies into sound ones and ``{cid: reason}`` for the rejected ones."""
        state = self.model.state_dict()
        policy = self.validation_policy()
        sound: list[ClientReply] = []
        rejections: dict[int, str] = {}
        for r in replies:
            reason = check_reply(r.payload, state, self.masks, policy)
            if reason is None:
                sound.append(r)
            else:
                rejections[r.cid] = reason
        return sound, rejections

    # -- pieces subclasses override --------------------------------------------------
    def aggregate(self, rnd: int, replies: list[ClientReply]) -> dict[str, torch.Tensor]:
        """FedAvg of the replies (or the configured robust rule), then server momentum."""
        keys = list(self.model.state_dict().keys())
        states = [{k: r.payload.arrays[k] for k in keys} for r in replies]
        rule = self.cfg.federation.aggregation
        if rule == "median":
            avg = coordinate_median(states)
        elif rule == "trimmed_mean":
            avg = trimmed_mean(states, self.cfg.federation.trim_fraction)
        else:
            avg = weighted_average(states, [r.num_examples for r in replies])
        if self.momentum is None:
            return avg
        return self.momentum.step(state_of(self.model), avg)

    def after_aggregate(self, rnd: int, replies: list[ClientReply]) -> dict[str, float]:
        """Hook after the new global model is set (server-side pruning goes here)."""
        return {}

    # -- checkpoints -------------------------------------------------------------------
    checkpoint_attrs: ClassVar[tuple[str, ...]] = ("masks", "history")
    """Attributes saved in checkpoints besides the model and the momentum. Each class
    lists only its own; :meth:`checkpoint_state` collects them along the class hierarchy.
    Values must be state trees (see :mod:`fedprune.checkpoint`): ``None``, numbers,
    strings, tensors, and lists, tuples and dicts of those. Everything else a server half
    holds must follow from the config (schedules, scopes) or be a cache."""

    def _checkpoint_names(self) -> list[str]:
        names: list[str] = []
        for cls in reversed(type(self).__mro__):
            for name in vars(cls).get("checkpoint_attrs", ()):
                if name not in names:
                    names.append(name)
        return names

    def checkpoint_state(self) -> dict[str, Any]:
        """The state that, restored into a freshly built server half, continues the run."""
        state: dict[str, Any] = {"model": state_of(self.model)}
        if self.momentum is not None:
            state["momentum"] = self.momentum.state_dict()
        if self.average is not None:
            state["average"] = self.average.state_dict()
        for name in self._checkpoint_names():
            state[name] = getattr(self, name)
        return state

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state` on a server half built from the same config.

        A non-empty structured-pruning history is replayed on the initial architecture
        before the weights are loaded, exactly as clients rebuild the model.

        Raises
        ------
        ValueError
            An attribute is missing, or the weights do not fit the architecture.
        """
        missing = [n for n in ("model", *self._checkpoint_names()) if n not in state]
        if missing:
            raise ValueError(f"the saved server state lacks {', '.join(missing)}")
        for name in self._checkpoint_names():
            setattr(self, name, state[name])
        if self.history:
            self.model = self.spec.rebuild(self.history)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            first = (str(exc).splitlines()[1:2] or [str(exc)])[0].strip()
            raise ValueError(f"the saved weights do not fit the model: {first}") from None
        if self.momentum is not None:
            self.momentum.load_state_dict(state.get("momentum", {}))
        if self.average is not None:
            self.average.load_state_dict(state.get("average", {}))


class ClientMethod:
    """Client half of a method. The default trains (masked if asked) and returns weights.

    Parameters
    ----------
    cfg
        The run's configuration (the same file the server read).
    spec
        The initial architecture.
    """

    def __init__(self, cfg: RunConfig, spec: ModelSpec) -> None:
        self.cfg = cfg
        self.spec = spec
        self._model: nn.Module | None = None
        self._arch_key = ""

    def model_for(self, payload: Payload) -> nn.Module:
        """A model holding the received weights.

        Built once and reused; rebuilt (initial architecture + replay of the received
        ``config["arch"]`` history) whenever the history differs from the cached model's.
        """
        raw = payload.config.get("arch") or []
        if not isinstance(raw, list):
            raise ValueError("payload config 'arch' must be a list of history entries")
        arch: list[dict[str, Any]] = raw
        key = ""
        if arch:
            from fedprune.core.structured import history_key

            key = history_key(arch)
        if self._model is None or key != self._arch_key:
            # a fresh client (e.g. after a resume) must train exactly like a warm one
            self._model, self._arch_key = self.spec.rebuild(arch), key
        model = self._model
        weights = {k: v for k, v in payload.arrays.items() if not k.startswith(MASK_PREFIX)}
        model.load_state_dict(weights)
        return model

    def masks_for(self, model: nn.Module, payload: Payload) -> Masks | None:
        """The mask to enforce during local training, as the payload asks."""
        mode = payload.config.get("mask", "none")
        if mode == "nonzero":
            names = prunable_names(model, self.cfg.pruning.scope)
            return masks_from_nonzero(payload.arrays, names)
        if mode == "explicit":
            return {
                k[len(MASK_PREFIX) :]: v.bool()
                for k, v in payload.arrays.items()
                if k.startswith(MASK_PREFIX)
            }
        return None

    def settings(self, payload: Payload) -> TrainSettings:
        """Local hyper-parameters for this round."""
        t = self.cfg.train
        return TrainSettings.from_config(t, lr=config_number(payload.config, "lr", t.lr))

    def run_task(self, task: str, payload: Payload, data: ClientData) -> Payload:
        """What engines call: :meth:`handle` with torch's global RNG seeded for this
        (round seed, client) and restored afterwards.

        Batch order has its own generator; the global RNG drives what models draw
        themselves (dropout). Seeding it per task makes that independent of which process
        runs the client, of the tasks it ran before, and of a resume.
        """
        seed = task_seed(payload, data.cid)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.handle(task, payload, data)

    def handle(self, task: str, payload: Payload, data: ClientData) -> Payload:
        """Dispatch a task received from the server."""
        if task == "fit":
            return self.fit(payload, data)
        raise ValueError(f"{type(self).__name__} cannot handle task {task!r}")

    cohort_fit: ClassVar[bool | None] = None
    """Whether an engine may train this half's ``fit`` tasks batched with other clients'
    (the in-process engine's cohort path): it then calls :meth:`begin_fit`, trains every
    client's :class:`FitJob` at once, loads each client's trained weights into
    ``job.model`` and calls :meth:`end_fit`. ``None`` (the default) means: exactly when
    the class does not override :meth:`fit` (a :meth:`handle` override must route
    ``"fit"`` to :meth:`fit`)."""

    @classmethod
    def batchable(cls) -> bool:
        """Whether ``fit`` tasks of this half may take the cohort path (:attr:`cohort_fit`)."""
        if cls.cohort_fit is not None:
            return cls.cohort_fit
        return cls.fit is ClientMethod.fit

    def begin_fit(self, payload: Payload, data: ClientData) -> FitJob:
        """The part of :meth:`fit` before local training: model, mask, settings, batch order."""
        model = self.model_for(payload)
        masks = self.masks_for(model, payload)
        gen = client_generator(payload, data.cid)
        return FitJob(payload, data, model, masks, self.settings(payload), gen)

    def end_fit(self, job: FitJob, stats: TrainStats) -> Payload:
        """The part of :meth:`fit` after local training (``job.model`` holds the trained
        weights): :meth:`after_train`, then the reply."""
        arrays = state_of(job.model)
        extra = self.after_train(job.model, arrays, job.masks, job.payload, stats)
        metrics = {"num_examples": float(stats.num_examples), "train_loss": stats.loss, **extra}
        return Payload(arrays=arrays, metrics=metrics)

    def fit(self, payload: Payload, data: ClientData) -> Payload:
        """Masked local training; reply with the trained weights and metrics.

        :meth:`begin_fit`, ``train_local`` on the job, :meth:`end_fit`.
        """
        job = self.begin_fit(payload, data)
        stats = train_local(
            job.model,
            data.x_train,
            data.y_train,
            job.settings,
            masks=job.masks,
            generator=job.generator,
        )
        return self.end_fit(job, stats)

    def after_train(
        self,
        model: nn.Module,
        arrays: dict[str, torch.Tensor],
        masks: Masks | None,
        payload: Payload,
        stats: TrainStats,
    ) -> dict[str, float]:
        """Hook before replying (client-side pruning edits ``arrays``); extra metrics."""
        return {}
