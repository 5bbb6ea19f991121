"""Client partitions of the training pool, made by flwr-datasets partitioners."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

PARTITIONERS = ("iid", "dirichlet", "pathological")


def make_partitioner(
    kind: str,
    num_partitions: int,
    seed: int,
    dirichlet_alpha: float,
    classes_per_client: int,
) -> Partitioner:
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=dirichlet_alpha,
            min_partition_size=2,
            self_balancing=True,
            seed=seed,
        )
    if kind == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="deterministic",
            seed=seed,
        )
    raise ValueError(f"unknown partitioner {kind!r}; choose one of {list(PARTITIONERS)}")


def partition_indices(
    labels: np.ndarray,
    kind: str,
    num_partitions: int,
    seed: int,
    dirichlet_alpha: float = 0.5,
    classes_per_client: int = 2,
) -> list[np.ndarray]:
    """Row indices of `labels` for every partition (disjoint; iid/dirichlet cover all)."""
    return list(
        _cached_partition_indices(
            np.asarray(labels, dtype=np.int64).tobytes(),
            kind,
            num_partitions,
            seed,
            dirichlet_alpha,
            classes_per_client,
        )
    )


@lru_cache(maxsize=8)
def _cached_partition_indices(
    label_bytes: bytes,
    kind: str,
    num_partitions: int,
    seed: int,
    dirichlet_alpha: float,
    classes_per_client: int,
) -> tuple[np.ndarray, ...]:
    """Partitioning once per process: every simulated client asks for the same split."""
    labels = np.frombuffer(label_bytes, dtype=np.int64)
    partitioner = make_partitioner(kind, num_partitions, seed, dirichlet_alpha, classes_per_client)
    # Shuffled first (as FederatedDataset does), or the IID partitioner's contiguous
    # chunks of a label-sorted source would each hold one class.
    order = np.random.default_rng(seed).permutation(len(labels))
    partitioner.dataset = Dataset.from_dict(
        {"label": labels[order].tolist(), "row": order.tolist()}
    )
    return tuple(
        np.asarray(partitioner.load_partition(pid)["row"], dtype=np.int64)
        for pid in range(num_partitions)
    )
