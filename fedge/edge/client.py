"""Edge ClientApp backend: trains only the classifier head, without torch.

The server sends the current global backbone as ONNX bytes with every message, so an
edge node's features match the global model's. Training updates just `head.weight` and
`head.bias` with numpy, and the reply is a *partial* update that fedge's strategy averages,
name by name, with the full-model updates of torch clients. Its tag says so, and
names the round and global model it answers.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedge.client_app.local_data import local_data, local_seed
from fedge.client_app.privatize import privatize_update
from fedge.client_app.protocol import (
    CARRIES_PARTIAL,
    REPLY_KEY,
    UPDATE_INFO_KEY,
    VAL_ACCURACY_KEY,
    VAL_LOSS_KEY,
    WEIGHT_KEY,
    reported_examples,
    update_tag,
)
from fedge.config import FedgeConfig
from fedge.edge.broadcast import BACKBONE_KEY
from fedge.edge.head import HEAD_BIAS, HEAD_WEIGHT, HeadLearner, extract_features
from fedge.edge.runtime import EdgeModel
from fedge.records import NamedArrays, from_array_record, to_array_record


def _backbone(config: ConfigRecord) -> EdgeModel:
    payload = config.get(BACKBONE_KEY)
    if not isinstance(payload, bytes):
        raise ValueError(
            f"the server sent no backbone ('{BACKBONE_KEY}' in the message config); edge "
            "clients need fedge's strategy with run-config edge-backbone='fp32' or 'int8' "
            "(or edge-clients > 0 in simulation)"
        )
    return EdgeModel.from_bytes(payload, name="the server's backbone")


def _global_head(msg: Message) -> NamedArrays:
    """Only the head of the global model: the backbone arrives as ONNX instead."""
    record = msg.content.array_records["arrays"]
    return {name: record[name].numpy() for name in (HEAD_WEIGHT, HEAD_BIAS) if name in record}


def train(msg: Message, context: Context, config: FedgeConfig) -> Message:
    """Local head epochs on backbone features; replies with Δ = new − global for the head."""
    train_config = msg.content.config_records["config"]
    if train_config.get(REPLY_KEY) != "update":
        raise ValueError(
            "edge clients reply with head-only updates, which only fedge's strategy can "
            "aggregate; this strategy asked for full weights (a stock Flower strategy?): "
            "use fedge's ServerApp or set edge-clients = 0"
        )
    if config.local_dp:
        # Training without DP-SGD would silently break the run's privacy promise.
        raise ValueError("edge clients cannot train with local-dp yet; set edge-clients = 0")
    data = local_data(config, context)
    global_head = _global_head(msg)
    learner = HeadLearner.from_arrays(global_head)
    features = extract_features(_backbone(train_config), data.x_train)
    server_round = int(train_config.get("server-round", 0))
    stats = learner.train(
        features,
        data.y_train,
        epochs=config.local_epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        # Same per-client, per-round seed as the torch clients.
        seed=local_seed(config, data.partition_id, server_round),
    )
    update, privacy_metrics = privatize_update(
        {
            name: (value - global_head[name]).astype(global_head[name].dtype, copy=False)
            for name, value in learner.weights().items()
        },
        train_config,
    )
    weight = reported_examples(len(data.y_train), train_config)
    metrics = MetricRecord({"train-loss": stats["loss_after"], WEIGHT_KEY: weight})
    metrics.update(privacy_metrics)
    content = RecordDict(
        {
            "arrays": to_array_record(update),
            "metrics": metrics,
            UPDATE_INFO_KEY: update_tag(
                train_config,
                from_array_record(msg.content.array_records["arrays"]),
                CARRIES_PARTIAL,
            ),
        }
    )
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context, config: FedgeConfig) -> Message:
    """The global head on the global backbone's features of this node's validation split."""
    data = local_data(config, context)
    if len(data.y_val) == 0:
        loss = accuracy = float("nan")  # as the torch clients report an empty split
    else:
        learner = HeadLearner.from_arrays(_global_head(msg))
        features = extract_features(_backbone(msg.content.config_records["config"]), data.x_val)
        loss = learner.loss(features, data.y_val)
        accuracy = float(np.mean(learner.predict(features) == data.y_val))
    metrics = MetricRecord(
        {VAL_LOSS_KEY: loss, VAL_ACCURACY_KEY: accuracy, WEIGHT_KEY: len(data.y_val)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
