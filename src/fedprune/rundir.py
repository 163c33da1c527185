"""The run directory: what a run leaves behind, and how it is read back.

Layout::

    RUN_DIR/
      config.toml        the fully resolved configuration
      metrics.jsonl      one JSON object per round (appended as rounds finish)
      checkpoint.safetensors  the state after the last finished round (see
                         fedprune.checkpoint; what ``fedprune run --resume`` reads)
      summary.json       totals and finals (written at the end)
      model.safetensors  final global weights (no pickle)
      model_average.safetensors  with ``federation.average_decay``: the moving average
                         of the global models, same architecture as the final model
      architecture.json  what is needed to rebuild the model: zoo name, input shape,
                         classes, per-tensor shapes, structured-pruning history
      accuracy.png, accuracy_vs_mb.png, label_distribution.png
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedprune.config import RunConfig, check_name, config_to_toml
from fedprune.errors import UserInputError, elide

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.toml"
WEIGHTS = "model.safetensors"
AVERAGE_WEIGHTS = "model_average.safetensors"
ARCH = "architecture.json"


def _clean(value: Any) -> Any:
    """JSON-safe values: NaN/inf become null, tensors and numpy scalars become numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    return value


def make_run_dir(cfg: RunConfig) -> Path:
    """Create a fresh run directory under ``cfg.out`` and write ``config.toml``."""
    base = Path(cfg.out)
    name = cfg.name or re.sub(
        r"[^A-Za-z0-9._+=@,-]",
        "_",
        f"{cfg.method}_{cfg.data.dataset}_{cfg.model.name}_{datetime.now():%Y%m%d-%H%M%S}",
    )
    check_name("name", name, allow_empty=False)
    path = base / name
    suffix = 1
    while path.exists():
        suffix += 1
        path = base / f"{name}-{suffix}"
    if path.resolve().parent != base.resolve():  # pragma: no cover - check_name forbids it
        raise UserInputError(f"run directory {elide(repr(name), 60)} would lie outside --out")
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise UserInputError(
            f"cannot create run directory {elide(repr(str(path)), 100)}: {exc.strerror}"
        ) from None
    (path / CONFIG).write_text(config_to_toml(cfg), encoding="utf-8")
    return path


def append_metrics(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Append one round's record to ``metrics.jsonl`` (flushed, so a crash keeps it)."""
    with open(run_dir / METRICS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(_clean(record), sort_keys=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_metrics(run_dir: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` with ``records`` atomically (what a resume starts from)."""
    path = run_dir / METRICS
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(_clean(r), sort_keys=False) + "\n" for r in records)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_weights(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Save a model's state dict as safetensors (no pickle); returns what was saved."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def save_model(run_dir: Path, model: torch.nn.Module, architecture: dict[str, Any]) -> None:
    """Save weights as safetensors and the architecture as JSON."""
    state = save_weights(run_dir / WEIGHTS, model)
    arch = dict(architecture)
    arch["shapes"] = {k: list(v.shape) for k, v in state.items()}
    write_json(run_dir / ARCH, arch)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-round records of a run directory."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        # The file's name leads: a long folder path is elided in the middle of the line.
        raise UserInputError(f"{METRICS} not found in {str(path.parent)!r}: not a run directory?")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserInputError(f"{str(path)!r} line {i} is not valid JSON") from None
    return out


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a missing or malformed file is a one-line user error
    that says what the folder was expected to be (``what``)."""
    if not path.is_file():
        # The file's name leads: a long folder path is elided in the middle of the line.
        raise UserInputError(f"{path.name} not found in {str(path.parent)!r}: is it {what}?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserInputError(f"{str(path)!r} is not valid JSON") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{str(path)!r} does not hold a JSON object")
    return data


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The ``summary.json`` of a finished run."""
    return read_json_object(Path(run_dir) / SUMMARY, "a finished run")


def load_weights(run_dir: str | Path, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """The final weights of a run, or another weights file of it such as
    :data:`AVERAGE_WEIGHTS` (safetensors: no code is executed when loading)."""
    path = Path(run_dir) / name
    if not path.is_file():
        if name == AVERAGE_WEIGHTS:
            raise UserInputError(
                f"{str(path)!r} not found: the run kept no moving average of its global "
                "models (federation.average_decay = 0)"
            )
        raise UserInputError(f"{str(path)!r} not found")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise UserInputError(f"{str(path)!r} is not a valid safetensors file: {exc}") from None
