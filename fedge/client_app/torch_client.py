"""PyTorch training and evaluation on this node's partition."""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedge.client_app.local_data import LocalData, local_data
from fedge.client_app.protocol import REPLY_KEY
from fedge.config import FedgeConfig
from fedge.models import build_model, load_numpy_state, state_to_numpy
from fedge.models.training import evaluate as evaluate_model
from fedge.models.training import make_loader, train_epochs
from fedge.records import NamedArrays, from_array_record, to_array_record


def _make_optimizer(config: FedgeConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


def train_locally(
    config: FedgeConfig, data: LocalData, global_arrays: NamedArrays, server_round: int
) -> tuple[NamedArrays, float]:
    """Local epochs from the global weights; returns the new weights and last-epoch loss."""
    seed = config.seed * 1_000_003 + data.partition_id * 1009 + server_round
    torch.manual_seed(seed)
    model = build_model(data.spec)
    load_numpy_state(model, global_arrays)
    loader = make_loader(data.x_train, data.y_train, config.batch_size, shuffle=True, seed=seed)
    loss = train_epochs(
        model, loader, _make_optimizer(config, model), config.local_epochs, config.proximal_mu
    )
    return state_to_numpy(model), loss


def train(msg: Message, context: Context, config: FedgeConfig) -> Message:
    data = local_data(config, context)
    global_arrays = from_array_record(msg.content.array_records["arrays"])
    train_config = msg.content.config_records["config"]
    new_arrays, loss = train_locally(
        config, data, global_arrays, int(train_config.get("server-round", 0))
    )
    if train_config.get(REPLY_KEY) == "update":
        new_arrays = {k: new_arrays[k] - global_arrays[k] for k in new_arrays}
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(data.y_train)})
    content = RecordDict({"arrays": to_array_record(new_arrays), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context, config: FedgeConfig) -> Message:
    data = local_data(config, context)
    model = build_model(data.spec)
    load_numpy_state(model, from_array_record(msg.content.array_records["arrays"]))
    loss, accuracy = evaluate_model(model, data.x_val, data.y_val)
    metrics = MetricRecord(
        {"val-loss": loss, "val-accuracy": accuracy, "num-examples": len(data.y_val)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
