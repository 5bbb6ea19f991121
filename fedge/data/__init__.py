"""Data: built-in offline sets, local folders and files, Hugging Face ids, and partitioning."""

from fedge.data.bundle import DatasetBundle
from fedge.data.loading import BUILTIN_DATASETS, client_split, load_dataset
from fedge.data.partition import PARTITIONERS, partition_indices
from fedge.data.tabular import TableColumns

__all__ = [
    "BUILTIN_DATASETS",
    "PARTITIONERS",
    "DatasetBundle",
    "TableColumns",
    "client_split",
    "load_dataset",
    "partition_indices",
]
