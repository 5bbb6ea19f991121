"""What a run trains on, derived from its config the same way on server and clients."""

from __future__ import annotations

from fedge.config import FedgeConfig, resolve_path
from fedge.data import BUILTIN_DATASETS, DatasetBundle, TableColumns, load_dataset
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
