"""Ship the final model of a run: ONNX export and onnxruntime latency.

The final model is rebuilt from the run directory without unpickling anything:
``architecture.json`` names the zoo model, its input shape and class count and holds the
structured-pruning history (:mod:`fedprune.core.structured`); the history is replayed on
a freshly built model and ``model.safetensors`` is loaded into it. For a structured run
this is the physically smaller dense network, so the exported graph is smaller too.

ONNX
    :func:`export_onnx` uses torch's default (dynamo) exporter, which needs
    ``onnxscript``, with ``external_data=False`` so that the weights sit inside the one
    ``.onnx`` file. The exported file is checked: onnxruntime's output on a random batch
    must match torch's (absolute difference at most ``1e-4`` plus ``1e-4`` relative).

Latency
    :func:`measure_latency` exports the dense initial architecture (the run's zoo model,
    seeded with the run's seed) and the final model to a temporary folder and times both
    in onnxruntime on the CPU execution provider with one intra-op and one inter-op
    thread, batch 1, full graph optimisation. After ``warmup`` untimed runs of each, the
    two models are timed alternately ``runs`` times each, so that load from other
    processes on the machine affects both alike. Reported: median and 90th percentile in
    milliseconds, and ``speedup = dense median / final median``, written to
    ``summary.json`` under ``latency``.

ExecuTorch
    :func:`export_pte` lowers the final model with ``torch.export`` and the XNNPACK
    partitioner to an ExecuTorch ``.pte`` program and checks its output in ExecuTorch's
    Python runtime. ExecuTorch is an optional dependency, not installed by default: on
    the reference machine (torch 2.13.0+cpu, Python 3.11) ``pip install
    executorch==1.5.1`` resolves without touching torch (it adds about 20 packages,
    among them torchao, coremltools and pandas), and lowering plus running a zoo model
    was verified in a throw-away virtual environment; see ``docs/structured.md``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import tempfile
import time
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedprune import rundir
from fedprune.core.structured import example_input, replay
from fedprune.errors import UserInputError
from fedprune.models import build_model

__all__ = [
    "export_onnx",
    "export_pte",
    "load_final_model",
    "load_initial_model",
    "measure_latency",
    "read_architecture",
]

ONNX_ATOL = 1e-4
ONNX_RTOL = 1e-4


def read_architecture(run_dir: str | Path) -> dict[str, Any]:
    """The ``architecture.json`` of a run, checked for the keys a rebuild needs."""
    path = Path(run_dir) / rundir.ARCH
    if not Path(run_dir).is_dir():
        raise UserInputError(f"{str(run_dir)!r} is not a directory")
    arch = rundir.read_json_object(path, "a finished run")
    missing = [k for k in ("model", "input_shape", "num_classes") if k not in arch]
    if missing:
        raise UserInputError(f"{str(path)!r} lacks {', '.join(missing)}")
    shape = arch["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) for s in shape)):
        raise UserInputError(f"{str(path)!r}: input_shape must be 3 integers, got {shape!r}")
    history = arch.get("history") or []
    if not isinstance(history, list):
        raise UserInputError(f"{str(path)!r}: history must be a list")
    arch["history"] = history
    return arch


def _input_shape(arch: dict[str, Any]) -> tuple[int, int, int]:
    s = arch["input_shape"]
    return (int(s[0]), int(s[1]), int(s[2]))


def _run_seed(run_dir: Path) -> int:
    path = run_dir / rundir.CONFIG
    try:
        seed = tomllib.loads(path.read_text(encoding="utf-8")).get("seed", 0)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return 0
    return int(seed) if isinstance(seed, int) else 0


def load_initial_model(run_dir: str | Path) -> nn.Module:
    """The run's dense initial architecture (seeded as the run was), in eval mode."""
    arch = read_architecture(run_dir)
    model = build_model(
        str(arch["model"]),
        _input_shape(arch),
        int(arch["num_classes"]),
        hidden=arch.get("hidden"),
        seed=_run_seed(Path(run_dir)),
    )
    return model.eval()


WEIGHT_FILES = {"final": rundir.WEIGHTS, "average": rundir.AVERAGE_WEIGHTS}
"""The weights a run saves: its final global model, and the moving average of its global
models (``federation.average_decay > 0``), which has the final model's architecture."""


def _weights_file(weights: str) -> str:
    try:
        return WEIGHT_FILES[weights]
    except KeyError:
        raise UserInputError(
            f"unknown weights {weights!r}: choose {' or '.join(WEIGHT_FILES)}"
        ) from None


def load_final_model(run_dir: str | Path, weights: str = "final") -> nn.Module:
    """The run's final model: zoo build + history replay + saved weights, in eval mode.

    ``weights="average"`` loads the moving average of the global models instead
    (``model_average.safetensors``); it has the final model's architecture.

    Raises
    ------
    UserInputError
        Missing or malformed files, a history that does not fit the model, or weights
        whose names or shapes differ from the rebuilt architecture.
    """
    arch = read_architecture(run_dir)
    shape = _input_shape(arch)
    model = build_model(
        str(arch["model"]), shape, int(arch["num_classes"]), hidden=arch.get("hidden")
    )
    try:
        replay(model, arch["history"], example_input(shape))
    except ValueError as exc:
        raise UserInputError(
            f"cannot replay the pruning history of {str(run_dir)!r}: {exc}"
        ) from None
    state = rundir.load_weights(run_dir, _weights_file(weights))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise UserInputError(
            f"weights of {str(run_dir)!r} do not fit the rebuilt architecture "
            f"(first mismatches: {', '.join(diff[:3])})"
        )
    model.load_state_dict(state)
    return model.eval()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints, deprecation warnings and torchvision notes."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _session(path: Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_export_model(
    model: nn.Module, input_shape: tuple[int, int, int], out_path: Path, *, check: bool = True
) -> Path:
    """Export ``model`` (batch 1) to one self-contained ONNX file and check it in onnxruntime.

    Raises
    ------
    UserInputError
        The ONNX extras are not installed.
    RuntimeError
        onnxruntime's output differs from torch's beyond the tolerance.
    """
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UserInputError(
            f"ONNX export needs the export extras ({exc.name} is missing): "
            "pip install 'fedprune[export]'"
        ) from None
    model = model.eval()
    x = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_exporter():
        torch.onnx.export(model, (x,), str(out_path), dynamo=True, external_data=False)
    if check:
        sess = _session(out_path)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        if got.shape != want.shape or not np.allclose(got, want, atol=ONNX_ATOL, rtol=ONNX_RTOL):
            err = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
            raise RuntimeError(f"onnxruntime output differs from torch (max abs diff {err:.3g})")
    return out_path


def _default_out(run: Path, weights: str, suffix: str) -> Path:
    return run / (("model" if weights == "final" else f"model_{weights}") + suffix)


def export_onnx(
    run_dir: str | Path, out_path: str | Path | None = None, *, weights: str = "final"
) -> Path:
    """Export a run's final model to ONNX (default ``RUN_DIR/model.onnx``); return the path.

    The model is rebuilt from ``architecture.json`` and ``model.safetensors`` (see
    :func:`load_final_model`; ``weights="average"``: the moving average of the global
    models, default file ``model_average.onnx``); the file holds the weights
    (``external_data=False``) and its onnxruntime output is checked against torch.
    """
    run = Path(run_dir)
    model = load_final_model(run, weights)
    shape = _input_shape(read_architecture(run))
    out = Path(out_path) if out_path is not None else _default_out(run, weights, ".onnx")
    return onnx_export_model(model, shape, out)


def export_pte(
    run_dir: str | Path, out_path: str | Path | None = None, *, weights: str = "final"
) -> Path:
    """Export a run's final model to an ExecuTorch program (default ``RUN_DIR/model.pte``;
    ``weights="average"``: the moving average, default ``model_average.pte``).

    ``torch.export`` -> ``to_edge_transform_and_lower`` with the XNNPACK partitioner ->
    ``to_executorch``; the program's output on a random batch-1 input is checked against
    torch in ExecuTorch's Python runtime.

    Raises
    ------
    UserInputError
        ExecuTorch is not installed (``pip install executorch==1.5.1``; it keeps torch
        2.13 as it is).
    RuntimeError
        ExecuTorch's output differs from torch's beyond the tolerance.
    """
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime
    except ImportError:
        raise UserInputError(
            "ExecuTorch export needs the executorch package: pip install executorch==1.5.1"
        ) from None
    run = Path(run_dir)
    model = load_final_model(run, weights)
    shape = _input_shape(read_architecture(run))
    out = Path(out_path) if out_path is not None else _default_out(run, weights, ".pte")
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    with _quiet_exporter():
        program = to_edge_transform_and_lower(
            torch.export.export(model, (x,)), partitioner=[XnnpackPartitioner()]
        ).to_executorch()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(program.buffer)
    method = Runtime.get().load_program(str(out)).load_method("forward")
    got = method.execute([x])[0]
    with torch.no_grad():
        want = model(x)
    if got.shape != want.shape or not torch.allclose(got, want, atol=ONNX_ATOL, rtol=ONNX_RTOL):
        raise RuntimeError("ExecuTorch output differs from torch")
    return out


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def time_sessions(
    sessions: dict[str, Any], input_shape: tuple[int, int, int], runs: int, warmup: int
) -> dict[str, list[float]]:
    """Time onnxruntime sessions alternately on one batch-1 input; milliseconds per run."""
    x = np.random.default_rng(0).standard_normal((1, *input_shape), dtype=np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(1e3 * (time.perf_counter() - t0))
    return times


def measure_latency(
    run_dir: str | Path, runs: int = 200, warmup: int = 20, *, write: bool = True
) -> dict[str, Any]:
    """Time the dense initial model and the final model of a run in onnxruntime.

    One intra-op and one inter-op thread, CPU execution provider, batch 1; ``warmup``
    untimed runs of each model, then ``runs`` timed runs of each, alternating.

    Parameters
    ----------
    run_dir : str or Path
        A finished run directory.
    runs : int, default 200
        Timed runs per model (>= 1).
    warmup : int, default 20
        Untimed runs per model before timing (>= 0).
    write : bool, default True
        Store the result in ``summary.json`` under ``latency`` (atomic write).

    Returns
    -------
    dict
        ``dense`` and ``final`` (each ``median_ms``, ``p90_ms``, ``mean_ms``, ``min_ms``,
        ``params``, ``onnx_bytes``), ``speedup`` (dense median / final median),
        ``latency_ratio`` (its inverse), ``runs``,
        ``warmup``, ``threads``, ``batch_size``, ``runtime``.
    """
    if runs < 1 or warmup < 0:
        raise UserInputError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    run = Path(run_dir)
    summary = rundir.read_summary(run) if write else None
    arch = read_architecture(run)
    shape = _input_shape(arch)
    models = {"dense": load_initial_model(run), "final": load_final_model(run)}
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="fedprune-latency-") as tmp:
        paths = {k: onnx_export_model(m, shape, Path(tmp) / f"{k}.onnx") for k, m in models.items()}
        sessions = {k: _session(p) for k, p in paths.items()}
        times = time_sessions(sessions, shape, runs, warmup)
        sizes = {k: p.stat().st_size for k, p in paths.items()}
    result: dict[str, Any] = {}
    for k, ts in times.items():
        result[k] = {
            "median_ms": statistics.median(ts),
            "p90_ms": _percentile(ts, 90),
            "mean_ms": statistics.fmean(ts),
            "min_ms": min(ts),
            "params": sum(p.numel() for p in models[k].parameters()),
            "onnx_bytes": sizes[k],
        }
    result["speedup"] = result["dense"]["median_ms"] / result["final"]["median_ms"]
    result["latency_ratio"] = result["final"]["median_ms"] / result["dense"]["median_ms"]
    result.update(
        runs=runs,
        warmup=warmup,
        threads=1,
        batch_size=1,
        runtime=f"onnxruntime {ort.__version__} CPUExecutionProvider",
    )
    if summary is not None:
        summary["latency"] = result
        rundir.write_json(run / rundir.SUMMARY, summary)
    return result
