"""Client partitions of the training pool, made by flwr-datasets partitioners.

flwr-datasets (and the Hugging Face / pyarrow / pandas stack under it) is imported
only when a pool is partitioned: the lean edge install has none of it, and an edge
node with its own `local-data` never partitions.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from fedge.data.sources import train_extra

if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner

PARTITIONERS = ("iid", "dirichlet", "pathological")
MIN_PARTITION_ROWS = 1  # a client needs one row to train on (validation takes none then)
DIRICHLET_MIN_ROWS = 2  # flwr-datasets redraws a Dirichlet split until each has this many
PLAN_SEARCH_STEPS = 5  # each step partitions the pool once


class PartitionPlanError(ValueError):
    """The pool cannot be split as configured; the message names the fix."""


def make_partitioner(
    kind: str,
    num_partitions: int,
    seed: int,
    dirichlet_alpha: float,
    classes_per_client: int,
) -> Partitioner:
    partitioners = train_extra("flwr_datasets.partitioner", "partitioning a shared dataset")
    if kind == "iid":
        return partitioners.IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return partitioners.DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=dirichlet_alpha,
            min_partition_size=DIRICHLET_MIN_ROWS,
            self_balancing=True,
            seed=seed,
        )
    if kind == "pathological":
        return partitioners.PathologicalPartitioner(
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
    """Row indices of `labels` for every partition (disjoint; iid/dirichlet cover all).

    Raises `PartitionPlanError`, the same on every client, if the pool cannot be
    split so that each partition holds at least MIN_PARTITION_ROWS rows.
    """
    plan = (kind, seed, dirichlet_alpha, classes_per_client)
    label_bytes = np.asarray(labels, dtype=np.int64).tobytes()
    if len(labels) < num_partitions * MIN_PARTITION_ROWS:
        problem = f"{len(labels)} rows < {num_partitions} × {MIN_PARTITION_ROWS}"
        raise PartitionPlanError(_plan_message(label_bytes, num_partitions, plan, problem))
    try:
        parts = list(_cached_partition_indices(label_bytes, num_partitions, *plan))
    except (ValueError, IndexError) as error:
        if kind not in PARTITIONERS:
            raise
        raise PartitionPlanError(
            _plan_message(label_bytes, num_partitions, plan, str(error))
        ) from None
    smallest = min((len(part) for part in parts), default=0)
    if smallest < MIN_PARTITION_ROWS:
        problem = f"a partition would hold {smallest} rows"
        raise PartitionPlanError(_plan_message(label_bytes, num_partitions, plan, problem))
    return parts


def _dirichlet_works(label_bytes: bytes, num_partitions: int, plan: tuple) -> bool:
    """Whether flwr-datasets finds a split (it draws all partitions on the first load)."""
    try:
        _load(_partitioner_on(label_bytes, num_partitions, *plan), 0)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=8)  # every client of a process hits the same failure, every round
def _plan_message(label_bytes: bytes, num_partitions: int, plan: tuple, problem: str) -> str:
    """What failed and what to change, with a client count that works where one is cheap to find."""
    kind, _, alpha, classes = plan
    rows = len(label_bytes) // 8
    least = DIRICHLET_MIN_ROWS if kind == "dirichlet" else MIN_PARTITION_ROWS
    fixes = [f"at most {rows // least} clients"] if kind == "iid" else []
    if kind == "dirichlet":  # no closed form: a few bisection steps find a count that works
        works, fails = 0, num_partitions
        for _ in range(PLAN_SEARCH_STEPS):
            middle = (works + fails) // 2
            works, fails = (
                (middle, fails) if _dirichlet_works(label_bytes, middle, plan) else (works, middle)
            )
        fixes = [f"{works} clients (this split works)"] if works else []
    fixes = fixes or ["fewer clients"]
    fixes += {
        "dirichlet": ["partitioner='iid'", f"a dirichlet-alpha above {alpha}"],
        "pathological": ["partitioner='iid'", f"more than {classes} classes-per-client"],
    }.get(kind, [])
    return (
        f"partitioner={kind!r} cannot give each of {num_partitions} clients at least "
        f"{least} of the {rows} training rows. Fix: {', '.join(fixes)}, "
        f"or a larger dataset ({problem})"
    )


@lru_cache(maxsize=8)
def _cached_partition_indices(
    label_bytes: bytes,
    num_partitions: int,
    kind: str,
    seed: int,
    *options: float,
) -> tuple[np.ndarray, ...]:
    """Partitioning once per process: every simulated client asks for the same split."""
    partitioner = _partitioner_on(label_bytes, num_partitions, kind, seed, *options)
    return tuple(
        np.asarray(_load(partitioner, pid)["row"], dtype=np.int64) for pid in range(num_partitions)
    )


def _load(partitioner: Partitioner, partition_id: int) -> Dataset:
    """One partition; flwr-datasets' warning on each failed Dirichlet draw is left out
    (a draw that never succeeds raises, and that error is what fedge reports)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The specified min_partition_size", UserWarning)
        return partitioner.load_partition(partition_id)


def _partitioner_on(
    label_bytes: bytes, num_partitions: int, kind: str, seed: int, *options: float
) -> Partitioner:
    """A partitioner over the pool's labels, shuffled first (as FederatedDataset does),
    or the IID partitioner's contiguous chunks of a label-sorted source would each
    hold one class."""
    labels = np.frombuffer(label_bytes, dtype=np.int64)
    partitioner = make_partitioner(kind, num_partitions, seed, *options)  # type: ignore[arg-type]
    order = np.random.default_rng(seed).permutation(len(labels))
    partitioner.dataset = train_extra("datasets", "partitioning").Dataset.from_dict(
        {"label": labels[order].tolist(), "row": order.tolist()}
    )
    return partitioner
