"""Sampling at scale: under SecAgg+ the *sampled* nodes, not the connected ones, form the graph.

Adversary: a curious server. If the SecAgg+ graph spanned every connected node, a
node the server did not sample would hold shares of (and be named beside) the
sampled clients' secrets, and a round's threshold and quorum would be counted over
nodes that never upload. Here 50 nodes are connected and 10 sampled per round;
every SecAgg+ message goes to a sampled node only, and every id list it carries
(participants, neighbours, verifiers, senders, survivors, signers, the nested
next-round setup too) names sampled nodes only. The sum is the sampled clients'.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity
from grids import node_contexts

from fedge.client_app import app as client_app
from fedge.client_app import secure_client
from fedge.client_app.protocol import WEIGHT_KEY
from fedge.records import SECAGG_PAYLOAD_KEY, NamedArrays, from_array_record, to_array_record
from fedge.secagg import Stage
from fedge.secagg.messages import NEXT_ROUND_PREFIX
from fedge.server_app.secure_round import SecAggSettings
from fedge.server_app.strategy import FedgeAvg
from fedge.simulation import NodeGrid

CONNECTED = tuple(range(2001, 2051))  # 50 nodes online
SAMPLED = 10  # fraction-train 0.2
ID_FIELDS = ("participants", "neighbours", "verifiers", "senders", "survivors", "signers")
SHAPES = {"fc.weight": (3, 4), "fc.bias": (3,)}
GLOBAL: NamedArrays = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}


def _update(node: int) -> NamedArrays:
    rng = np.random.default_rng(node)
    return {n: (rng.normal(size=s) * 0.05).astype(np.float32) for n, s in SHAPES.items()}


def _weight(node: int) -> int:
    return node - 2000  # 1..50: a different weight per node


class RecordingGrid(NodeGrid):
    """Delivers each message (over Flower's wire format) to fedge's ClientApp for its node,
    and records, per message, its destination and the node ids its SecAgg+ payload names."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.contexts = node_contexts(nodes)
        super().__init__(self.contexts)
        self.log: list[tuple[str, int, set[int] | None]] = []  # (message type, dst, ids named)
        self.graphs: list[set[int]] = []  # every `participants` list sent, as a set
        self.payload_keys: list[set[str]] = []  # the SecAgg+ payload keys of every message

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.log.append((message.metadata.message_type, node, named_ids(message)))
            self.graphs += participant_lists(message)
            payload = message.content.config_records.get(SECAGG_PAYLOAD_KEY, ConfigRecord())
            self.payload_keys.append(set(payload))
            received = message_from_proto(message_to_proto(message))
            replies.append(message_from_proto(message_to_proto(self.handle(received, node))))
        return replies

    def handle(self, message: Message, node: int) -> Message:
        """The masked-input stage gets a known update instead of local training."""
        context: Context = self.contexts[node]
        if message.metadata.message_type == f"train.{Stage.MASKED_INPUT.value}":
            metrics = MetricRecord({WEIGHT_KEY: _weight(node)})
            return secure_client.masked_input(message, context, lambda: (_update(node), metrics))
        return client_app(message, context)


def named_ids(message: Message) -> set[int] | None:
    """Every node id in the message's SecAgg+ payload, nested next-round fields included
    (None: the message carries no SecAgg+ payload)."""
    payload = message.content.config_records.get(SECAGG_PAYLOAD_KEY)
    if payload is None:
        return None
    ids: set[int] = set()
    for key, value in payload.items():
        if key.removeprefix(NEXT_ROUND_PREFIX) in ID_FIELDS:
            ids.update(int(node) for node in value)  # type: ignore[union-attr]
    return ids


def participant_lists(message: Message) -> list[set[int]]:
    """The SecAgg+ graph's vertex sets this message announces (own and next round's)."""
    payload = message.content.config_records.get(SECAGG_PAYLOAD_KEY, ConfigRecord())
    keys = ("participants", NEXT_ROUND_PREFIX + "participants")
    return [{int(n) for n in payload[key]} for key in keys if key in payload]  # type: ignore[union-attr]


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages carry the ServerApp task's identity (Flower sets it at runtime)."""
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize("num_shares", [0, 5], ids=["complete-graph", "5-neighbours"])
def test_secagg_graph_is_the_sampled_set_not_the_connected_set(num_shares: int) -> None:
    grid = RecordingGrid(CONNECTED)
    strategy = FedgeAvg(
        secagg=SecAggSettings(num_shares, 0, max_weight=100, clip_norm=1.0, timeout=60),
        fraction_train=SAMPLED / len(CONNECTED),
        fraction_evaluate=0.0,
        min_train_nodes=2,
        min_available_nodes=len(CONNECTED),
    )
    samples = []
    for server_round in (1, 2):  # round 2 samples anew: round 1's pre-shared keys do not fit
        start, graph_start = len(grid.log), len(grid.graphs)
        messages = strategy.configure_train(
            server_round, to_array_record(GLOBAL), ConfigRecord(), grid
        )
        sampled = {message.metadata.dst_node_id for message in messages}
        arrays, _ = strategy.aggregate_train(
            server_round, grid.send_and_receive(messages, timeout=60)
        )
        samples.append(sampled)

        assert len(sampled) == SAMPLED and sampled < set(CONNECTED)
        secure = [(kind, dst, ids) for kind, dst, ids in grid.log[start:] if ids is not None]
        stages = {kind for kind, _, _ in secure}
        assert stages >= {f"train.{stage.value}" for stage in Stage}
        for kind, dst, ids in secure:
            assert dst in sampled, (kind, dst)
            assert ids <= sampled, (kind, sorted(ids - sampled))
        # the graph's vertex set is the whole sample, not a part of it
        graphs = grid.graphs[graph_start:]
        assert graphs and all(ids == sampled for ids in graphs)
        assert strategy.report.num_replies == SAMPLED and strategy.report.aggregated
        assert arrays is not None
        got = from_array_record(arrays)
        total = sum(_weight(k) for k in sampled)
        for name in SHAPES:
            want = sum(_weight(k) * _update(k)[name].astype(np.float64) for k in sampled) / total
            np.testing.assert_allclose(got[name], want, atol=1e-3)
    assert samples[0] != samples[1]


@pytest.mark.usefixtures("serverapp_identity")
def test_keys_are_shared_a_round_ahead_only_without_sampling() -> None:
    """Keys shared ahead fit only a next round with the same clients: with sampling they
    would be wasted work (found by benchmarks/scale.py: key sharing ran twice a round)."""

    def ahead(fraction: float, nodes: tuple[int, ...]) -> int:
        grid = RecordingGrid(nodes)
        strategy = FedgeAvg(
            secagg=SecAggSettings(0, 0, max_weight=100, clip_norm=1.0, timeout=60),
            fraction_train=fraction,
            fraction_evaluate=0.0,
            min_train_nodes=2,
            min_available_nodes=len(nodes),
        )
        messages = strategy.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), grid)
        strategy.aggregate_train(1, grid.send_and_receive(messages, timeout=60))
        assert strategy.report.aggregated
        return sum(NEXT_ROUND_PREFIX + "participants" in keys for keys in grid.payload_keys)

    assert ahead(1.0, CONNECTED[:6]) > 0  # the next round's setup rides on this one
    assert ahead(SAMPLED / len(CONNECTED), CONNECTED) == 0
