"""Optional TensorBoard logging of each round's metrics (``engine.tensorboard = true``).

Writes scalars under ``RUN_DIR/tensorboard`` (view with ``tensorboard --logdir runs``):
accuracy and loss, sparsity, non-zero parameters, effective FLOPs, bytes per round and
cumulative MB. Needs the ``tensorboard`` package; asking for it without the package is a
one-line configuration error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedprune.errors import ConfigError

SCALARS = {
    "test_accuracy": "accuracy/test",
    "local_test_accuracy": "accuracy/local_test",
    "average_test_accuracy": "accuracy/average_test",
    "test_loss": "loss/test",
    "train_loss": "loss/train",
    "sparsity": "model/sparsity",
    "nonzero_params": "model/nonzero_params",
    "params": "model/params",
    "effective_flops": "model/effective_flops",
    "bytes_up": "traffic/bytes_up",
    "bytes_down": "traffic/bytes_down",
    "clients": "round/clients",
    "round_s": "round/seconds",
}


class TensorBoardLogger:
    """Writes one set of scalars per round record."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "engine.tensorboard needs the tensorboard package: pip install tensorboard"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, rec: Mapping[str, Any]) -> None:
        step = int(rec["round"])
        for key, tag in SCALARS.items():
            value = rec.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(tag, float(value), step)
        for key, value in (rec.get("method_metrics") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"method/{key}", float(value), step)
        mb = (rec.get("cum_bytes_up", 0) + rec.get("cum_bytes_down", 0)) / 1e6
        self.writer.add_scalar("traffic/cumulative_mb", mb, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
