"""Test doubles for the network: node contexts and instruction messages.

The strategy, the protocol and the ClientApps under test run for real; only
message delivery is replaced.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.app.metadata import Metadata


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


def instruction(node_id: int, message_type: str = MessageType.TRAIN) -> Message:
    """The message a node would have received (what the SuperLink stores): reply to it."""
    metadata = Metadata(
        run_id=7,
        message_id=f"instruction-{node_id}",
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(RecordDict(), metadata=metadata)
