"""Turn a `dataset` setting into a held-out split and per-client train/val data."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedge.data.bundle import DatasetBundle
from fedge.data.partition import partition_indices
from fedge.data.sources import (
    Pools,
    load_breast_cancer_pool,
    load_digits_pool,
    load_folder_pool,
    load_hf_pool,
    train_extra,
)
from fedge.data.tabular import DEFAULT_COLUMNS, TableColumns

BUILTIN_DATASETS = {"digits": load_digits_pool, "breast-cancer": load_breast_cancer_pool}


SCALING = {
    "digits": "pixel values 0..16 divided by 16",
    "breast-cancer": "standardized: (x - mean) / std of the training pool",
}
"""How each built-in's raw values became model inputs (recorded in export.json)."""


def _pools(name: str, columns: TableColumns) -> Pools:
    if name in BUILTIN_DATASETS or name.startswith("hf:"):
        if not columns.is_default:
            raise ValueError(
                f"label-column, id-column and feature-columns apply to CSV / .npz datasets, "
                f"not to {name!r}; leave them at their defaults"
            )
        if name in BUILTIN_DATASETS:
            return BUILTIN_DATASETS[name]()
        return load_hf_pool(name.removeprefix("hf:"))
    folder = Path(name).expanduser()
    if folder.exists():
        return load_folder_pool(folder, columns)
    raise ValueError(
        f"dataset {name!r} is neither a built-in ({', '.join(BUILTIN_DATASETS)}), "
        "an 'hf:<id>' Hugging Face id, nor an existing folder / .csv / .npz file"
    )


def encode_classes(
    name: str, y: np.ndarray, y_test: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    """Labels as indices 0..K-1 into the sorted distinct values of *all* the source's labels.

    The one place classes are decided: every party (server and each client) reads the
    whole source and computes this before any partitioning, so a client whose partition
    lacks a class still agrees on K and on every index. Counted, not max+1: labels 1..3
    give 3 classes; "M"/"B" give classes ("B", "M").
    """
    everything = y if y_test is None else np.concatenate([y, y_test])
    classes = np.unique(everything)
    if len(classes) < 2:
        raise ValueError(
            f"dataset {name!r} has a single class {classes.tolist()}; a classifier needs two "
            "or more (is label-column the target?)"
        )
    encoded = np.searchsorted(classes, y).astype(np.int64)
    encoded_test = None if y_test is None else np.searchsorted(classes, y_test).astype(np.int64)
    return encoded, encoded_test, tuple(str(c) for c in classes.tolist())


def _standardize_tabular(
    x: np.ndarray, x_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Tabular features on wildly different scales are centred with pool statistics.

    Images (4-D) are already in [0, 1] and left alone. Returns the statistics too, so
    the export can tell a device how to prepare raw rows.
    """
    if x.ndim != 2:
        return x, x_test, {}
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std == 0] = 1.0
    scaled = ((x - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)
    return *scaled, {"mean": mean.round(6).tolist(), "std": std.round(6).tolist()}


def input_convention(name: str, x: np.ndarray, statistics: dict[str, Any]) -> dict[str, Any]:
    """What a model input looks like, measured on the training pool (export.json's `input`).

    Images record their value range and ink polarity (from the pool's median pixel: digits
    are light ink on a dark background), so `fedge edge predict` can adapt a photo of
    dark ink on white paper instead of silently misreading it.
    """
    convention: dict[str, Any] = {"shape": [int(d) for d in x.shape[1:]]}
    if x.ndim == 4:
        low, high = float(x.min()), float(x.max())
        dark = float(np.median(x)) < (low + high) / 2
        convention.update(
            kind="image",
            layout="NCHW",
            value_range=[round(low, 4), round(high, 4)],
            polarity="light-on-dark" if dark else "dark-on-light",
            scaling=SCALING.get(name, "pixel values scaled to [0, 1] (bytes divided by 255)"),
        )
    else:
        convention.update(
            kind="tabular",
            scaling=SCALING.get(name, "standardized: (x - mean) / std of the training pool"),
            **statistics,
        )
    return convention


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
def load_dataset(
    name: str,
    test_fraction: float = 0.2,
    seed: int = 0,
    columns: TableColumns = DEFAULT_COLUMNS,
) -> DatasetBundle:
    """Load a dataset by name and set aside its held-out test split.

    A source with its own test split keeps it; otherwise a stratified, seeded
    `test_fraction` of the data is held out. `columns` picks a CSV's target, id and
    features. Cached per process, since every simulated client of a run asks for the
    same data.
    """
    pools = _pools(name, columns)
    digest = source_digest(pools)
    x, y, x_test, y_test = pools
    y, y_test, class_names = encode_classes(name, y, y_test)
    if x_test is None or y_test is None:
        split = train_extra("sklearn.model_selection", "holding out a test split").train_test_split
        x, x_test, y, y_test = split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    x, x_test, statistics = _standardize_tabular(x, x_test)
    for arr in (x, y, x_test, y_test):
        arr.setflags(write=False)
    return DatasetBundle(
        name,
        x,
        y,
        x_test,
        y_test,
        len(class_names),
        digest,
        class_names=class_names,
        input_convention=input_convention(name, x, statistics),
        test_fraction=test_fraction,
        seed=seed,
        columns=columns,
    )


def train_val_rows(
    rows: np.ndarray, val_fraction: float, seed: int | list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """A client's rows shuffled by `seed`, as (train, val); one row is all training."""
    rows = np.random.default_rng(seed).permutation(rows)
    num_val = round(len(rows) * val_fraction) if len(rows) > 1 else 0
    return rows[num_val:], rows[:num_val]


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
    train_rows, val_rows = train_val_rows(rows, val_fraction, [seed, partition_id])
    return (
        bundle.x_train[train_rows],
        bundle.y_train[train_rows],
        bundle.x_train[val_rows],
        bundle.y_train[val_rows],
    )
