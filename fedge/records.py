"""Conversions between named numpy arrays and Flower records (torch-free)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

NamedArrays = dict[str, np.ndarray]


def to_array_record(arrays: NamedArrays) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> NamedArrays:
    return {name: array.numpy() for name, array in record.items()}
