"""Turn a `dataset` setting into a held-out split and per-client train/val data."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from fedge.data.bundle import DatasetBundle
from fedge.data.partition import partition_indices
from fedge.data.sources import (
    Pools,
    load_breast_cancer_pool,
    load_digits_pool,
    load_folder_pool,
    load_hf_pool,
)

BUILTIN_DATASETS = {"digits": load_digits_pool, "breast-cancer": load_breast_cancer_pool}


def _pools(name: str) -> Pools:
    if name in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[name]()
    if name.startswith("hf:"):
        return load_hf_pool(name.removeprefix("hf:"))
    folder = Path(name).expanduser()
    if folder.exists():
        return load_folder_pool(folder)
    raise ValueError(
        f"dataset {name!r} is neither a built-in ({', '.join(BUILTIN_DATASETS)}), "
        "an 'hf:<id>' Hugging Face id, nor an existing folder"
    )


def _standardize_tabular(x: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tabular features on wildly different scales are centred with pool statistics.

    Images (4-D) are already in [0, 1] and left alone.
    """
    if x.ndim != 2:
        return x, x_test
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std == 0] = 1.0
    return ((x - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def source_digest(pools: Pools) -> str:
    """sha256 over the pools' dtypes, shapes and bytes, before any split or scaling."""
    digest = hashlib.sha256()
    for array in pools:
        if array is None:
            digest.update(b"none;")
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


@lru_cache(maxsize=4)
def load_dataset(name: str, test_fraction: float = 0.2, seed: int = 0) -> DatasetBundle:
    """Load a dataset by name and set aside its held-out test split.

    A source with its own test split keeps it; otherwise a stratified, seeded
    `test_fraction` of the data is held out. Cached per process, since every
    simulated client of a run asks for the same data.
    """
    pools = _pools(name)
    digest = source_digest(pools)
    x, y, x_test, y_test = pools
    if x_test is None or y_test is None:
        x, x_test, y, y_test = train_test_split(
            x, y, test_size=test_fraction, stratify=y, random_state=seed
        )
    if y.min(initial=0) < 0:
        raise ValueError(f"dataset {name!r} has negative labels; labels must be 0..K-1")
    x, x_test = _standardize_tabular(x, x_test)
    num_classes = int(max(y.max(), y_test.max())) + 1
    for arr in (x, y, x_test, y_test):
        arr.setflags(write=False)
    return DatasetBundle(name, x, y, x_test, y_test, num_classes, digest)


def client_split(
    bundle: DatasetBundle,
    partition_id: int,
    num_partitions: int,
    partitioner: str,
    seed: int,
    val_fraction: float,
    dirichlet_alpha: float,
    classes_per_client: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One client's (x_train, y_train, x_val, y_val) from its partition of the pool."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    rows = partition_indices(
        bundle.y_train, partitioner, num_partitions, seed, dirichlet_alpha, classes_per_client
    )[partition_id]
    rng = np.random.default_rng([seed, partition_id])
    rows = rng.permutation(rows)
    num_val = round(len(rows) * val_fraction) if len(rows) > 1 else 0
    val_rows, train_rows = rows[:num_val], rows[num_val:]
    return (
        bundle.x_train[train_rows],
        bundle.y_train[train_rows],
        bundle.x_train[val_rows],
        bundle.y_train[val_rows],
    )
