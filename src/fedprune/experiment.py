"""One run: config -> data -> model -> method -> engine -> run directory."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fedprune import rundir
from fedprune.checkpoint import (
    Checkpoint,
    CheckpointError,
    fault_point,
    load_checkpoint,
    save_checkpoint,
)
from fedprune.config import RunConfig, load_config
from fedprune.core.accounting import ModelStatsCounter
from fedprune.data import build_federation, load_dataset, plot_label_distribution
from fedprune.data.federation import Federation
from fedprune.engines.common import (
    SETUP_KEY,
    CheckpointFn,
    Engine,
    ProgressCallback,
    Resume,
    RoundCallback,
    RoundRecord,
)
from fedprune.engines.inprocess import InProcessEngine
from fedprune.errors import RoundFailedError, UserInputError
from fedprune.methods.base import ClientMethod, ModelSpec, ServerMethod
from fedprune.methods.registry import get_method


@dataclass
class RunResult:
    """What :func:`run_experiment` returns."""

    run_dir: Path
    summary: dict[str, Any]
    records: list[RoundRecord]
    model: torch.nn.Module


def load_federation(cfg: RunConfig) -> Federation:
    """Load the configured data set and split it among the clients."""
    bundle = load_dataset(cfg.data.dataset, cfg.data.data_dir or None)
    return build_federation(
        bundle,
        cfg.data.partition,
        cfg.data.num_clients,
        seed=cfg.seed,
        alpha=cfg.data.alpha,
        classes_per_client=cfg.data.classes_per_client,
        local_test_fraction=cfg.data.local_test_fraction,
        min_size=cfg.data.min_size,
    )


def model_spec(cfg: RunConfig, fed: Federation) -> ModelSpec:
    """The initial architecture for this config and data set."""
    return ModelSpec(cfg.model.name, fed.input_shape, fed.num_classes, cfg.model.hidden or None)


def check_method(cfg: RunConfig, fed: Federation) -> None:
    """Raise the UserInputError a run of ``cfg`` on ``fed`` would stop with at its start
    (a model that does not fit the data, a method that cannot serve the model or the
    config): constructing the server half is where methods check their combination."""
    spec = model_spec(cfg, fed)
    get_method(cfg.method).server(cfg, spec, spec.build(seed=cfg.seed))


def partition_fingerprint(fed: Federation) -> str:
    """SHA-256 of every client's training indices (equal iff the partitions are equal)."""
    h = hashlib.sha256()
    for idx in fed.train_indices:
        h.update(len(idx).to_bytes(8, "little"))
        h.update(idx.astype("<i8").tobytes())
    return h.hexdigest()[:16]


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and values (equal iff the weights are equal)."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _evaluated(
    records: list[RoundRecord], key: Literal["test_accuracy", "average_test_accuracy"]
) -> list[float]:
    """``key`` of the evaluated rounds (None or absent in the others)."""
    return [a for r in records if (a := r.get(key)) is not None]


def _average_summary(records: list[RoundRecord]) -> dict[str, Any]:
    """``final_average_accuracy``/``best_average_accuracy`` of the moving average of the
    global models (``federation.average_decay``); nothing when it was off."""
    accs = _evaluated(records, "average_test_accuracy")
    if not accs:
        return {}
    return {"final_average_accuracy": accs[-1], "best_average_accuracy": max(accs)}


def summarize(
    cfg: RunConfig,
    records: list[RoundRecord],
    dense: dict[str, Any],
    wall_s: float,
) -> dict[str, Any]:
    """The ``summary.json`` content from the per-round records."""
    last = records[-1]
    accs = _evaluated(records, "test_accuracy")
    up, down = last["cum_bytes_up"], last["cum_bytes_down"]
    dup, ddown = last["cum_dense_bytes_up"], last["cum_dense_bytes_down"]
    return {
        "method": cfg.method,
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "partition": cfg.data.partition,
        "num_clients": cfg.data.num_clients,
        "clients_per_round": cfg.clients_per_round(),
        "seed": cfg.seed,
        "rounds": len(records),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        **_average_summary(records),
        "final_loss": last.get("test_loss"),
        "final_sparsity": last["sparsity"],
        "dense_params": dense["params"],
        "final_params": last["params"],
        "final_nonzero_params": last["nonzero_params"],
        "dense_flops": dense["flops"],
        "final_flops": last["flops"],
        "final_effective_flops": last["effective_flops"],
        "total_bytes_up": up,
        "total_bytes_down": down,
        "dense_bytes_up": dup,
        "dense_bytes_down": ddown,
        "communication_reduction": (dup + ddown) / (up + down) if up + down else None,
        "partition_sha": dense.get("partition_sha"),
        "init_sha": dense.get("init_sha"),
        "wall_s": wall_s,
        "time_split_s": {
            k[len("time_") : -len("_s")]: v for k, v in last.items() if k.startswith("time_")
        },
    }


@dataclass
class PreparedRun:
    """Everything an engine needs, built by :func:`prepare_run`."""

    cfg: RunConfig
    fed: Federation
    spec: ModelSpec
    server: ServerMethod
    client_factory: Callable[[], ClientMethod]
    dense: dict[str, Any]
    run_dir: Path
    t0: float
    tensorboard: Any = None

    def fingerprints(self) -> dict[str, str]:
        """What a checkpoint must agree with to be resumed in this run: the method, the
        ``config.toml`` text, the data partition and the initial weights."""
        text = (self.run_dir / rundir.CONFIG).read_bytes()
        return {
            "method": self.cfg.method,
            "config_sha": hashlib.sha256(text).hexdigest()[:16],
            "partition_sha": str(self.dense["partition_sha"]),
            "init_sha": str(self.dense["init_sha"]),
        }

    def checkpointer(self) -> CheckpointFn | None:
        """The engine's per-round checkpoint callback (None with ``engine.checkpoint`` off).

        Round 0 is a setup checkpoint (:class:`~fedprune.engines.common.Resume`); the
        fault point ``setup-checkpoint@N`` kills the process right after the N-th setup
        checkpoint this process wrote.
        """
        if not self.cfg.engine.checkpoint:
            return None
        prints = self.fingerprints()
        setup_saves = [0]

        def _save(rnd: int, records: list[RoundRecord], engine: dict[str, Any]) -> int:
            if rnd > 0:
                fault_point("after-metrics", rnd)
            state = self.server.checkpoint_state()
            size = save_checkpoint(self.run_dir, Checkpoint(rnd, state, engine, records, prints))
            if rnd == 0:
                setup_saves[0] += 1
                fault_point("setup-checkpoint", setup_saves[0])
            return size

        return _save

    def on_round(self, then: RoundCallback | None = None) -> RoundCallback:
        """A round callback that appends to ``metrics.jsonl``, then calls ``then``."""

        def _on_round(rec: RoundRecord) -> None:
            rundir.append_metrics(self.run_dir, rec)
            if self.tensorboard is not None:
                self.tensorboard(rec)
            if then is not None:
                then(rec)

        return _on_round


def prepare_run(
    cfg: RunConfig,
    *,
    fed: Federation | None = None,
    on_start: Callable[[Path, Federation], None] | None = None,
    run_dir: Path | None = None,
) -> PreparedRun:
    """Load data, build the model and the method's halves, create the run directory
    (or use ``run_dir``, an existing one, when resuming)."""
    t0 = time.perf_counter()
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    if fed is None:
        fed = load_federation(cfg)
    spec = model_spec(cfg, fed)
    model = spec.build(seed=cfg.seed)
    info = get_method(cfg.method)
    dense_stats = ModelStatsCounter(fed.input_shape)(model)
    dense = {
        "params": dense_stats.params,
        "flops": dense_stats.flops,
        "partition_sha": partition_fingerprint(fed),
        "init_sha": state_fingerprint(model.state_dict()),
    }
    server = info.server(cfg, spec, model)  # methods check their combination here
    if run_dir is None:
        run_dir = rundir.make_run_dir(cfg)
    plot_label_distribution(fed, run_dir / "label_distribution.png")
    if on_start is not None:
        on_start(run_dir, fed)
    factory = functools.partial(info.client, cfg, spec)
    run = PreparedRun(cfg, fed, spec, server, factory, dense, run_dir, t0)
    if cfg.engine.tensorboard:
        from fedprune.tblog import TensorBoardLogger

        run.tensorboard = TensorBoardLogger(run_dir / "tensorboard")
    return run


def finish_run(run: PreparedRun, records: list[RoundRecord]) -> RunResult:
    """Write ``summary.json``, the final model and the plots; return the result."""
    from fedprune.plots import plot_run  # matplotlib: imported only when plotting

    cfg, spec, server = run.cfg, run.spec, run.server
    if run.tensorboard is not None:
        run.tensorboard.close()
    wall = time.perf_counter() - run.t0
    summary = summarize(cfg, records, run.dense, wall)
    rundir.write_json(run.run_dir / rundir.SUMMARY, summary)
    rundir.save_model(
        run.run_dir,
        server.model,
        {
            "model": spec.name,
            "input_shape": list(spec.input_shape),
            "num_classes": spec.num_classes,
            "hidden": spec.hidden,
            "history": getattr(server, "history", []),
        },
    )
    average = server.average_model()
    if average is not None:  # same architecture as model.safetensors
        rundir.save_weights(run.run_dir / rundir.AVERAGE_WEIGHTS, average)
    plot_run(records, run.run_dir, f"{cfg.method} on {cfg.data.dataset} ({cfg.model.name})")
    return RunResult(run.run_dir, summary, records, server.model)


def make_engine(run: PreparedRun) -> Engine:
    """The configured engine for a prepared run."""
    if run.cfg.engine.name == "flower":
        # optional dependency; each Ray actor loads its own federation with this module's
        # loader (the engine never imports fedprune.experiment)
        from fedprune.engines.flower import FactoryClientBuilder, FlowerSimulationEngine

        build_client = FactoryClientBuilder(load_federation, run.client_factory)
        return FlowerSimulationEngine(run.cfg, run.fed, run.server, build_client)
    return InProcessEngine(run.cfg, run.fed, run.server, run.client_factory)


def _execute(
    run: PreparedRun,
    on_round: RoundCallback | None,
    resume: Resume | None = None,
    on_progress: ProgressCallback | None = None,
) -> RunResult:
    engine = make_engine(run)
    try:
        records = engine.run(
            run.on_round(on_round),
            resume=resume,
            checkpoint=run.checkpointer(),
            on_progress=on_progress,
        )
    except RoundFailedError as exc:
        if run.cfg.engine.checkpoint:
            hint = f"; continue with: fedprune run --resume {run.run_dir}"
            raise RoundFailedError(f"{exc}{hint}") from None
        raise
    return finish_run(run, records)


def run_experiment(
    cfg: RunConfig,
    *,
    fed: Federation | None = None,
    on_round: RoundCallback | None = None,
    on_start: Callable[[Path, Federation], None] | None = None,
    on_progress: ProgressCallback | None = None,
) -> RunResult:
    """Run one federated experiment and write its run directory.

    Parameters
    ----------
    cfg
        A validated configuration.
    fed
        An already-built federation (``compare`` shares one between methods); loaded
        from ``cfg`` when omitted.
    on_round
        Called with each round's metrics record as soon as it exists.
    on_start
        Called once the run directory exists and the data are loaded.
    on_progress
        Called with the progress lines of a long setup phase (AutoFLIP's exploration:
        one line per group of explorers done, with the time left).
    """
    return _execute(prepare_run(cfg, fed=fed, on_start=on_start), on_round, None, on_progress)


def resume_config(run_dir: Path) -> RunConfig:
    """The configuration of the run in ``run_dir``, for resuming it.

    Raises
    ------
    UserInputError
        Not a run directory, or a finished run (nothing to resume).
    """
    if not (run_dir / rundir.CONFIG).is_file():
        raise UserInputError(
            f"{str(run_dir)!r} is not a run directory (no {rundir.CONFIG}): nothing to resume"
        )
    if (run_dir / rundir.SUMMARY).is_file():
        raise UserInputError(
            f"{str(run_dir)!r} is a finished run ({rundir.SUMMARY} exists): nothing to resume"
        )
    return load_config(run_dir / rundir.CONFIG)


def prepare_resume(
    run_dir: Path,
    cfg: RunConfig | None = None,
    *,
    on_start: Callable[[Path, Federation], None] | None = None,
) -> tuple[PreparedRun, Resume | None]:
    """Rebuild the run in ``run_dir`` and restore its checkpoint into the server half.

    Returns the prepared run and where its engine continues (None without a checkpoint:
    the run starts over in the same folder). ``metrics.jsonl`` is rewritten to hold
    exactly the checkpoint's rounds.

    Raises
    ------
    CheckpointError
        The checkpoint is damaged or edited, or does not fit the run directory's
        config, data or initial weights.
    """
    if cfg is None:
        cfg = resume_config(run_dir)
    ckpt = load_checkpoint(run_dir)  # damaged checkpoints are refused before loading data
    run = prepare_run(cfg, on_start=on_start, run_dir=run_dir)
    resume = None
    if ckpt is not None:
        _check_fingerprints(run_dir, ckpt, run.fingerprints())
        if len(ckpt.records) != ckpt.round or ckpt.round > cfg.federation.rounds:
            raise CheckpointError(
                f"the checkpoint in {str(run_dir)!r} holds {len(ckpt.records)} records for "
                f"round {ckpt.round} of {cfg.federation.rounds}"
            )
        if ckpt.round == 0 and not ckpt.engine.get(SETUP_KEY):
            raise CheckpointError(
                f"the checkpoint in {str(run_dir)!r} holds round 0 but is no setup checkpoint"
            )
        try:
            run.server.restore_state(ckpt.server)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(
                f"the checkpoint in {str(run_dir)!r} does not fit: {exc}"
            ) from None
        resume = Resume(ckpt.round, ckpt.records, ckpt.engine)
        done = ckpt.records[-1].get("wall_s") if ckpt.records else ckpt.engine.get("wall_s")
        run.t0 -= float(done or 0.0)
    rundir.write_metrics(run_dir, ckpt.records if ckpt is not None else [])
    return run, resume


def resume_experiment(
    run_dir: str | Path,
    *,
    cfg: RunConfig | None = None,
    on_round: RoundCallback | None = None,
    on_start: Callable[[Path, Federation], None] | None = None,
    on_resume: Callable[[int], None] | None = None,
    on_progress: ProgressCallback | None = None,
) -> RunResult:
    """Continue the run in ``run_dir`` from its checkpoint; the result is the one an
    uninterrupted run would have given (timings apart).

    Without a checkpoint yet (killed in round 1) the run starts over in the same folder.
    A checkpoint written during the setup phase (round 0) continues the setup where it
    was (AutoFLIP: with the explorers not yet done).

    Parameters
    ----------
    run_dir
        The run directory of an unfinished run.
    cfg
        Its configuration (default: read with :func:`resume_config`).
    on_round, on_start
        As for :func:`run_experiment` (``on_round`` sees only the new rounds).
    on_resume
        Called with the round the checkpoint holds (0 without a checkpoint, or with a
        setup checkpoint).
    on_progress
        As for :func:`run_experiment`.

    Raises
    ------
    CheckpointError
        See :func:`prepare_resume`.
    """
    run, resume = prepare_resume(Path(run_dir), cfg, on_start=on_start)
    if on_resume is not None:
        on_resume(resume.round if resume is not None else 0)
    return _execute(run, on_round, resume, on_progress)


def _check_fingerprints(path: Path, ckpt: Checkpoint, now: dict[str, str]) -> None:
    problems = {
        "method": "the method differs from the checkpoint's",
        "config_sha": f"{rundir.CONFIG} was edited after the checkpoint was written",
        "partition_sha": "the data partition differs from the checkpoint's (other data files?)",
        "init_sha": "the initial weights differ from the checkpoint's (another model version?)",
    }
    for key, problem in problems.items():
        if ckpt.fingerprints.get(key) != now[key]:
            raise CheckpointError(f"cannot resume {str(path)!r}: {problem}")
