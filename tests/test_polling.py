"""ResponsiveGrid's waiting, and replies booked against the node they answer for."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Message
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from test_strategy import GLOBAL, NODES, delta, reply

from fedge.records import to_array_record
from fedge.server_app import polling
from fedge.server_app.polling import ResponsiveGrid, destinations, replying_node, responsive
from fedge.server_app.strategy import FedgeAvg
from fedge.simulation import NodeGrid


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class QueueGrid(NodeGrid):
    """Gives pushed messages ids as Flower's grids do; a node's reply shows up at the
    pull numbered `ready_after[node]` (never if absent)."""

    def __init__(self, node_ids: Iterable[int], ready_after: dict[int, int]) -> None:
        super().__init__(node_ids)
        self.ready_after = ready_after
        self.pulls = 0
        self.pushed: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.pushed[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        replies = []
        for message_id in message_ids:
            message = self.pushed[message_id]
            if self.ready_after.get(message.metadata.dst_node_id, 10**9) <= self.pulls:
                replies.append(Message(message.content, reply_to=message))
        return replies


def instructions(grid: NodeGrid) -> list[Message]:
    return list(FedgeAvg().configure_train(1, to_array_record(GLOBAL), ConfigRecord(), grid))


def test_responsive_grid_pulls_until_every_reply_is_in_with_growing_pauses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(polling.time, "sleep", pauses.append)
    inner = QueueGrid(NODES, {11: 1, 22: 4, 33: 9})
    grid = ResponsiveGrid(inner, first_interval=0.01, max_interval=0.05, growth=2.0)
    replies = list(grid.send_and_receive(instructions(inner)))
    assert sorted(r.metadata.src_node_id for r in replies) == sorted(NODES)
    assert inner.pulls == 9
    assert pauses == pytest.approx([0.01, 0.02, 0.04] + [0.05] * 5)


def test_responsive_grid_returns_what_arrived_when_the_timeout_runs_out() -> None:
    inner = QueueGrid(NODES, {11: 1})
    grid = ResponsiveGrid(inner, first_interval=0.001, max_interval=0.01)
    replies = list(grid.send_and_receive(instructions(inner), timeout=0.05))
    assert [r.metadata.src_node_id for r in replies] == [11]
    assert inner.pulls >= 2


def test_responsive_grid_with_zero_timeout_still_pulls_once() -> None:
    inner = QueueGrid(NODES, dict.fromkeys(NODES, 1))
    replies = list(ResponsiveGrid(inner).send_and_receive(instructions(inner), timeout=0))
    assert len(replies) == len(NODES)


def test_responsive_grid_rejects_nonsense_intervals() -> None:
    with pytest.raises(ValueError, match="first_interval"):
        ResponsiveGrid(NodeGrid(NODES), first_interval=2.0, max_interval=1.0)


def test_superlink_error_reply_is_booked_against_the_unreachable_node() -> None:
    """The SuperLink answers for a vanished node with its own id (1) as the source."""
    inner = QueueGrid(NODES, {})
    strategy = FedgeAvg(min_train_nodes=1)
    messages = list(strategy.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), inner))
    inner.push_messages(messages)
    by_node = {m.metadata.dst_node_id: m for m in messages}
    unreachable = create_message_error_unavailable_res_message(by_node[22].metadata, "node_unavail")
    assert unreachable.metadata.src_node_id != 22
    assert replying_node(unreachable, destinations(messages)) == 22
    # Honest replies answer the pushed messages themselves (the gate drops any other).
    answered = {
        node: Message(reply(node, delta(node)).content, reply_to=by_node[node]) for node in (11, 33)
    }
    replies = [answered[11], unreachable, answered[33]]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert list(strategy.report.rejected) == [22]


def test_configure_train_samples_nodes_that_join_while_it_waits() -> None:
    """Flower sizes its sample before waiting for min-available-nodes; fedge waits first."""

    class JoiningGrid(NodeGrid):
        def __init__(self) -> None:
            super().__init__(NODES)
            self.calls = 0

        def get_node_ids(self) -> list[int]:
            self.calls += 1
            return list(NODES[:2]) if self.calls == 1 else list(NODES)

    strategy = FedgeAvg(min_available_nodes=3)
    messages = strategy.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), JoiningGrid())
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(NODES)


def test_only_flowers_fixed_interval_grids_are_wrapped() -> None:
    """A custom Grid keeps its own send_and_receive; Flower's in-memory one gets backoff."""
    custom = NodeGrid(NODES)
    assert responsive(custom) is custom
    flowers = InMemoryGrid.__new__(InMemoryGrid)  # isinstance is all that is looked at
    wrapped = responsive(flowers)
    assert isinstance(wrapped, ResponsiveGrid) and wrapped.grid is flowers
    assert wrapped.max_interval <= 0.05  # in-process pulls are cheap: stay quick
