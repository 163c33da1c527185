"""A Flower ``Grid`` wrapper that pulls replies more often than Flower's own."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

__all__ = ["PollingGrid"]


class PollingGrid(Grid):
    """A grid that pulls replies every ``interval`` seconds; all else is delegated.

    Flower 1.41's deployment grid sleeps 3 s between two pulls, which adds 1.5 s on
    average to every exchange; on loopback or a LAN a client round trip takes a few
    seconds, so the wait is a large share of a round.
    """

    def __init__(self, grid: Grid, interval: float) -> None:
        self.grid = grid
        self.interval = interval

    def set_run(self, run: Any) -> None:
        """Delegated."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """Delegated."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegated (deprecated in Flower)."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull every ``interval`` s until all replies or ``timeout``."""
        pending = {i for i in self.grid.push_messages(list(messages)) if i}
        end = None if timeout is None else time.monotonic() + timeout
        out: list[Message] = []
        while pending:
            replies = list(self.grid.pull_messages(pending))
            out.extend(replies)
            pending -= {m.metadata.reply_to_message_id for m in replies}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.interval)
        return out
