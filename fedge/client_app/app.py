"""fedge ClientApp: routes each message to PyTorch training or the torch-free edge learner.

This module imports no torch, so the same ClientApp runs on a Raspberry Pi
SuperNode started with `--node-config "edge=true ..."`.
"""

from __future__ import annotations

from types import ModuleType

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedge.client_app import secure_client
from fedge.client_app.protocol import EDGE_NODE_KEY
from fedge.config import EDGE_MODE_REFUSAL, FedgeConfig
from fedge.secagg.messages import Stage

app = ClientApp()


def is_edge_node(context: Context, config: FedgeConfig) -> bool:
    """Edge if the node says so, or (simulation) its partition is among the last `edge-clients`."""
    if context.node_config.get(EDGE_NODE_KEY) is True:
        return True
    partition = context.node_config.get("partition-id")
    total = context.node_config.get("num-partitions")
    if isinstance(partition, int) and isinstance(total, int):
        return partition >= total - config.edge_clients
    return False


def _backend(context: Context, config: FedgeConfig) -> ModuleType:
    if is_edge_node(context, config):
        from fedge.edge import client as edge_client

        return edge_client
    from fedge.client_app import torch_client

    return torch_client


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = FedgeConfig.from_context(context)
    return _backend(context, config).train(msg, context, config)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = FedgeConfig.from_context(context)
    return _backend(context, config).evaluate(msg, context, config)


def _secure_node(context: Context, config: FedgeConfig) -> None:
    """Edge nodes refuse SecAgg+ at its first stage, so the server hears why at once
    (the run config refuses it too wherever the server expects edge nodes)."""
    if is_edge_node(context, config):
        raise ValueError(EDGE_MODE_REFUSAL)


@app.train(Stage.SETUP.value)
def secagg_setup(msg: Message, context: Context) -> Message:
    _secure_node(context, FedgeConfig.from_context(context))
    return secure_client.setup(msg, context)


@app.train(Stage.SHARE_KEYS.value)
def secagg_share_keys(msg: Message, context: Context) -> Message:
    return secure_client.share_keys(msg, context)


@app.train(Stage.MASKED_INPUT.value)
def secagg_masked_input(msg: Message, context: Context) -> Message:
    config = FedgeConfig.from_context(context)
    _secure_node(context, config)
    from fedge.client_app import torch_client

    return secure_client.masked_input(
        msg, context, lambda: torch_client.local_update(msg, context, config)
    )


@app.train(Stage.CONSISTENCY.value)
def secagg_consistency(msg: Message, context: Context) -> Message:
    return secure_client.consistency(msg, context)


@app.train(Stage.UNMASK.value)
def secagg_unmask(msg: Message, context: Context) -> Message:
    return secure_client.unmask(msg, context)
