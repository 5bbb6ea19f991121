"""Test doubles for the network: Grids that know their nodes without a SuperLink.

The strategy, the protocol and the ClientApps under test run for real; only
message delivery is replaced.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Context, RecordDict
from flwr.serverapp import Grid


class NodeGrid(Grid):
    """Knows its node ids; every transport method is left to subclasses."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def set_run(self, run):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def node_contexts(
    node_ids: Iterable[int], run_config: dict[str, Any] | None = None
) -> dict[int, Context]:
    """One Context per node, partition i of len(node_ids), as Flower's simulation sets them."""
    ids = list(node_ids)
    return {
        node: Context(
            run_id=1,
            node_id=node,
            node_config={"partition-id": i, "num-partitions": len(ids)},
            state=RecordDict(),
            run_config=dict(run_config or {}),
        )
        for i, node in enumerate(ids)
    }
