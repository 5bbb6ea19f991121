"""Data: built-in offline sets, local folders, Hugging Face ids, and partitioning."""

from fedge.data.bundle import DatasetBundle
from fedge.data.loading import BUILTIN_DATASETS, client_split, load_dataset
from fedge.data.partition import PARTITIONERS, partition_indices

__all__ = [
    "BUILTIN_DATASETS",
    "PARTITIONERS",
    "DatasetBundle",
    "client_split",
    "load_dataset",
    "partition_indices",
]
