"""A Grid that sees replies as soon as they exist.

Flower's grids poll for replies at a fixed interval: 0.1 s in simulation, 3 s over
the SuperLink's HTTP API. A fedge round is two to five exchanges (SecAgg+ adds
three), and each one can lose a whole interval waiting for replies that are already
there. `ResponsiveGrid` wraps such a Grid and polls with exponential backoff instead:
fast replies are seen within milliseconds, slow ones cost at most one pull per
`max_interval`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid


class ResponsiveGrid(Grid):
    """Delegates to `grid`; only `send_and_receive`'s waiting differs."""

    def __init__(
        self,
        grid: Grid,
        first_interval: float = 0.005,
        max_interval: float = 1.0,
        growth: float = 1.5,
    ) -> None:
        if not 0 < first_interval <= max_interval or growth < 1:
            raise ValueError(
                "ResponsiveGrid needs 0 < first_interval <= max_interval and growth >= 1"
            )
        self.grid = grid
        self.first_interval = first_interval
        self.max_interval = max_interval
        self.growth = growth

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every message has its reply or `timeout` runs out."""
        pending = {message_id for message_id in self.push_messages(messages) if message_id}
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        interval = self.first_interval
        while pending:
            received = list(self.pull_messages(pending))
            replies.extend(received)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in received)
            if not pending:
                break
            pause = interval
            if deadline is not None:
                pause = min(pause, deadline - time.monotonic())
                if pause <= 0:
                    break
            time.sleep(pause)
            interval = min(interval * self.growth, self.max_interval)
        return replies


def responsive(grid: Grid) -> Grid:
    """`grid` wrapped in a ResponsiveGrid if it is one of Flower's fixed-interval grids.

    Any other Grid (a test double, a custom transport) keeps its own
    `send_and_receive`, which a wrapper would bypass.
    """
    if isinstance(grid, InMemoryGrid):  # a pull is a read of in-process state: cheap
        return ResponsiveGrid(grid, max_interval=0.02)
    if isinstance(grid, HttpGrid):  # a pull is an HTTPS request to the SuperLink
        return ResponsiveGrid(grid)
    return grid


def destinations(messages: Iterable[Message]) -> dict[str, int]:
    """Message id → destination node, for the messages a Grid has pushed (and so given ids)."""
    return {
        message.metadata.message_id: message.metadata.dst_node_id
        for message in messages
        if message.metadata.message_id
    }


def replying_node(reply: Message, sent: Mapping[str, int]) -> int:
    """The node a reply answers for.

    Error replies the SuperLink writes for a node it could not reach carry the
    SuperLink's own id as source; the message they answer names the real node.
    """
    return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
