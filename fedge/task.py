"""What a run trains on, derived from its config the same way on server and clients."""

from __future__ import annotations

from fedge.config import ConfigError, FedgeConfig, resolve_path
from fedge.data import (
    BUILTIN_DATASETS,
    DatasetBundle,
    TableColumns,
    load_dataset,
    partition_indices,
)
from fedge.data.partition import PartitionPlanError
from fedge.models.spec import ModelSpec, spec_for_data


def dataset_for(config: FedgeConfig) -> DatasetBundle:
    """The run's dataset; folder paths resolve like every other run-config path."""
    name = config.dataset
    if name not in BUILTIN_DATASETS and not name.startswith("hf:"):
        name = str(resolve_path(name))
    columns = TableColumns.parse(config.label_column, config.id_column, config.feature_columns)
    return load_dataset(name, config.test_fraction, config.seed, columns)


def model_spec_for(config: FedgeConfig, bundle: DatasetBundle) -> ModelSpec:
    return spec_for_data(config.model, bundle.input_shape, bundle.num_classes)


def check_data_plan(config: FedgeConfig, bundle: DatasetBundle, num_partitions: int) -> None:
    """Refuse, before any round, a plan that leaves some client without data.

    The clients run the same deterministic partitioning, so a plan that fails here
    would fail on every one of them in every round.
    """
    try:
        partition_indices(
            bundle.y_train,
            config.partitioner,
            num_partitions,
            config.seed,
            config.dirichlet_alpha,
            config.classes_per_client,
        )
    except PartitionPlanError as error:
        raise ConfigError(str(error)) from None
