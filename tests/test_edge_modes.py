"""Deployed edge nodes (node config edge=true) in every privacy mode: work or refuse clearly.

A deployed edge node is one whose *node config* says edge=true; the run config may not
mention it (edge-clients = 0). Central DP works: the edge node's clipped head update goes
through the same clip check and noise. SecAgg+, distributed DP (which needs SecAgg+) and
local DP are refused, by the run config wherever the server expects edge nodes, and
otherwise by the edge node on its first message, with one message that names the fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from fedge.client_app import app as client_app
from fedge.client_app.protocol import EDGE_NODE_KEY
from fedge.config import EDGE_MODE_REFUSAL, ConfigError, FedgeConfig
from fedge.edge.head import HEAD_BIAS, HEAD_WEIGHT
from fedge.models import build_model, state_to_numpy
from fedge.records import NamedArrays, from_array_record, to_array_record
from fedge.secagg.messages import Stage
from fedge.server_app.app import build_strategy
from fedge.server_app.privacy import ServerPrivacy
from fedge.server_app.strategy import FedgeAvg
from fedge.simulation import NodeGrid
from fedge.task import dataset_for, model_spec_for

TORCH_NODE, EDGE_NODE, SECOND_TORCH_NODE = 101, 102, 103
BASE = {"local-epochs": 1, "min-train-nodes": 1, "min-available-nodes": 2, "seed": 5}
SIGMA = 1e-5  # central noise small enough to see each client's share of the mean


class DeployedGrid(NodeGrid):
    """Delivers each message to fedge's ClientApp as a deployed SuperNode would run it:
    after a round trip through Flower's wire format, with an exception turned into an
    error reply (as Flower's ClientApp runtime does). Node 102 is edge=true."""

    def __init__(
        self, run_config: dict[str, Any], nodes: tuple[int, ...], edge_nodes: tuple[int, ...]
    ) -> None:
        super().__init__(nodes)
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={
                    "partition-id": i,
                    "num-partitions": len(nodes),
                    **({EDGE_NODE_KEY: True} if node in edge_nodes else {}),
                },
                state=RecordDict(),
                run_config=run_config,
            )
            for i, node in enumerate(self.node_ids)
        }
        self.replies: dict[int, Message] = {}

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            received = message_from_proto(message_to_proto(message))
            try:
                reply = client_app(received, self.contexts[node])
            except Exception as error:  # as flwr 1.41's run_clientapp words it
                reason = f"{type(error)}:<'{error}'>"
                reply = Message(Error(code=2, reason=reason), reply_to=received)
            self.replies[node] = reply
            replies.append(message_from_proto(message_to_proto(reply)))
        return replies


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages carry the ServerApp task's identity (Flower sets it at runtime)."""
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def one_round(  # type: ignore[no-untyped-def]
    overrides: dict[str, Any],
    edge_nodes: tuple[int, ...] = (EDGE_NODE,),
    nodes: tuple[int, ...] = (TORCH_NODE, EDGE_NODE),
):
    """One training round of fedge's own strategy over the deployed grid."""
    config = FedgeConfig.from_run_config({**BASE, **overrides})
    bundle = dataset_for(config)
    spec = model_spec_for(config, bundle)
    torch.manual_seed(0)
    arrays = state_to_numpy(build_model(spec))
    strategy: FedgeAvg = build_strategy(config, spec, bundle, ServerPrivacy(config))
    grid = DeployedGrid(config.to_run_config(), nodes, edge_nodes)
    messages = strategy.configure_train(1, to_array_record(arrays), ConfigRecord(), grid)
    new, _ = strategy.aggregate_train(1, grid.send_and_receive(messages, timeout=60))
    return arrays, new, strategy, grid


def _update(grid: DeployedGrid, node: int) -> NamedArrays:
    return from_array_record(grid.replies[node].content.array_records["arrays"])


def test_central_dp_round_takes_the_edge_nodes_clipped_head_update() -> None:
    overrides = {"dp-mode": "central", "dp-noise-multiplier": SIGMA, "edge-backbone": "fp32"}
    arrays, new, strategy, grid = one_round(overrides)
    assert strategy.report.num_replies == 2 and not strategy.report.rejected
    edge = _update(grid, EDGE_NODE)
    assert set(edge) == {HEAD_WEIGHT, HEAD_BIAS}
    assert np.sqrt(sum(float(np.sum(v**2)) for v in edge.values())) <= 1.0 + 1e-5  # clipped
    torch_update = _update(grid, TORCH_NODE)
    noise_bound = 6 * SIGMA * 1.0 / 2  # 6 standard deviations of the noise in the mean
    assert new is not None
    for name in (HEAD_WEIGHT, HEAD_BIAS):
        got = new[name].numpy().astype(np.float64) - arrays[name]
        want = (torch_update[name] + edge[name]) / 2  # equal weights over the 2 sampled
        assert np.abs(got - want).max() <= noise_bound + 1e-6
    # ...and the edge node's share is far larger than the noise: the head moved because of it
    assert max(np.abs(edge[n] / 2).max() for n in edge) > 20 * noise_bound


def test_central_dp_with_only_edge_updates_still_noises_the_backbone() -> None:
    overrides = {"dp-mode": "central", "dp-noise-multiplier": SIGMA, "edge-backbone": "fp32"}
    arrays, new, strategy, _ = one_round(overrides, edge_nodes=(TORCH_NODE, EDGE_NODE))
    assert strategy.report.num_replies == 2 and new is not None
    # No client sent a backbone update, yet its arrays carry noise like every other one:
    # otherwise an unchanged backbone would reveal that no torch client took part.
    assert not np.array_equal(new["features.0.weight"].numpy(), arrays["features.0.weight"])


@pytest.mark.parametrize(
    "overrides",
    [
        {"secagg": True},
        {"secagg": True, "dp-mode": "distributed"},
        {"local-dp": True},
    ],
    ids=["secagg", "distributed-dp", "local-dp"],
)
@pytest.mark.parametrize("edge", [{"edge-backbone": "int8"}, {"edge-clients": 1}])
def test_run_config_that_expects_edge_nodes_refuses_secagg_and_local_dp(
    overrides: dict[str, Any], edge: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as refused:
        FedgeConfig.from_run_config({**BASE, **overrides, **edge})
    assert str(refused.value) == EDGE_MODE_REFUSAL


@pytest.mark.parametrize(
    "overrides",
    [{"secagg": True}, {"secagg": True, "dp-mode": "distributed"}],
    ids=["secagg", "distributed-dp"],
)
def test_edge_node_refuses_its_first_secagg_message_and_the_round_goes_on(
    overrides: dict[str, Any],
) -> None:
    """The run config did not expect edge nodes; one joined anyway."""
    _, new, strategy, grid = one_round(overrides, nodes=(TORCH_NODE, EDGE_NODE, SECOND_TORCH_NODE))
    refusal = grid.replies[EDGE_NODE]
    assert refusal.metadata.message_type == f"train.{Stage.SETUP.value}"  # SecAgg+'s first
    assert refusal.has_error() and EDGE_MODE_REFUSAL in refusal.error.reason
    assert EDGE_MODE_REFUSAL in strategy.report.rejected[EDGE_NODE]  # logged whole, recorded
    assert strategy.report.num_replies == 2 and new is not None  # the torch nodes' round


def test_edge_node_refuses_local_dp_with_the_fix() -> None:
    """local-dp without edge-backbone: the edge node's train reply is the refusal."""
    _, _, strategy, grid = one_round({"local-dp": True, "local-dp-max-epsilon": 0.0})
    reply = grid.replies[EDGE_NODE]
    assert reply.metadata.message_type == MessageType.TRAIN
    assert reply.has_error() and EDGE_MODE_REFUSAL in reply.error.reason
    assert EDGE_MODE_REFUSAL in strategy.report.rejected[EDGE_NODE]
