"""Flower's own minimal PyTorch app: FedAvg of a 2-hidden-layer MLP (Message API).

What a Flower user writes for a small model: a ClientApp that loads the received
weights, trains on the node's partition and replies with the new weights, and a
ServerApp that runs Flower's ``FedAvg`` strategy. Node ``i`` (``partition-id`` in its
node config) reads ``x<i>.npy``/``y<i>.npy`` from ``data-dir``; the ServerApp evaluates
on ``x_test.npy``/``y_test.npy`` after every round and writes the round times to
``times-file`` (JSON). ``poll-interval`` is the seconds between two pulls for replies
(Flower's deployment grid waits 3 s; the benchmark uses fedprune's 0.5 s for both).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn


def make_model(in_features: int = 64, classes: int = 10, hidden: int = 128) -> nn.Module:
    """Flatten -> 128 ReLU -> 128 ReLU -> classes."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def _arrays(folder: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.load(Path(folder) / f"x{name}.npy"))
    y = torch.from_numpy(np.load(Path(folder) / f"y{name}.npy"))
    return x, y


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD epochs on this node's partition; reply with the weights."""
    cfg = context.run_config
    pid = int(context.node_config["partition-id"])
    torch.set_num_threads(1)
    x, y = _arrays(str(cfg["data-dir"]), str(pid))
    model = make_model(in_features=x[0].numel())
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())  # type: ignore[union-attr]
    opt = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]))
    gen = torch.Generator().manual_seed(int(cfg["seed"]) * 1000 + pid)
    batch = int(cfg["batch-size"])
    model.train()
    for _ in range(int(cfg["local-epochs"])):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(y)}),
        }
    )
    return Message(content, reply_to=msg)


class _PollingGrid(Grid):
    """Flower's grid, pulling replies every ``interval`` seconds instead of 3."""

    def __init__(self, grid: Grid, interval: float) -> None:
        self.grid, self.interval = grid, interval

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        waiting = {i for i in self.grid.push_messages(list(messages)) if i}
        end = time.monotonic() + (timeout or 3600.0)
        got: list[Message] = []
        while waiting and time.monotonic() < end:
            replies = list(self.grid.pull_messages(waiting))
            got += replies
            waiting -= {m.metadata.reply_to_message_id for m in replies}
            if waiting:
                time.sleep(self.interval)
        return got


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg for ``num-rounds`` rounds over ``num-nodes`` nodes; round times to a file."""
    cfg = context.run_config
    nodes = int(cfg["num-nodes"])
    x_test, y_test = _arrays(str(cfg["data-dir"]), "_test")
    torch.manual_seed(int(cfg["seed"]))
    model = make_model(in_features=x_test[0].numel())
    stamps: list[float] = []
    accuracy: list[float] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            acc = float((model(x_test).argmax(1) == y_test).float().mean())
        stamps.append(time.perf_counter())
        accuracy.append(acc)
        return MetricRecord({"accuracy": acc})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=nodes,
        min_available_nodes=nodes,
    )
    poll = float(cfg["poll-interval"])
    strategy.start(
        grid=_PollingGrid(grid, poll) if poll != 3.0 else grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["num-rounds"]),
        evaluate_fn=evaluate,
    )
    if cfg["times-file"]:
        rounds = [b - a for a, b in itertools.pairwise(stamps)]
        Path(str(cfg["times-file"])).write_text(
            json.dumps({"round_s": rounds, "accuracy": accuracy[1:]}), encoding="utf-8"
        )
