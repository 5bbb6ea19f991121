"""This node's share of the data, chosen by its node config."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Context

from fedge.config import ConfigError, FedgeConfig
from fedge.data import client_split
from fedge.models.spec import ModelSpec
from fedge.task import dataset_for, model_spec_for


@dataclass(frozen=True)
class LocalData:
    partition_id: int
    spec: ModelSpec
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def _node_int(context: Context, key: str) -> int:
    value = context.node_config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"node config needs an integer {key!r} (got {value!r}); start the SuperNode "
            'with --node-config "partition-id=0 num-partitions=10"'
        )
    return value


def local_data(config: FedgeConfig, context: Context) -> LocalData:
    partition_id = _node_int(context, "partition-id")
    num_partitions = _node_int(context, "num-partitions")
    bundle = dataset_for(config)
    x_train, y_train, x_val, y_val = client_split(
        bundle,
        partition_id,
        num_partitions,
        config.partitioner,
        config.seed,
        config.val_fraction,
        config.dirichlet_alpha,
        config.classes_per_client,
    )
    return LocalData(partition_id, model_spec_for(config, bundle), x_train, y_train, x_val, y_val)


def local_seed(config: FedgeConfig, partition_id: int, server_round: int) -> int:
    """Distinct per node and round, reproducible from the run's seed."""
    return config.seed * 1_000_003 + partition_id * 1009 + server_round
