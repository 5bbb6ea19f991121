"""Conversions between named numpy arrays and Flower records (torch-free)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedge.secagg.messages import Payload

NamedArrays = dict[str, np.ndarray]

SECAGG_PAYLOAD_KEY = "secagg"
MASKED_KEY = "masked"
"""A SecAgg payload travels as a ConfigRecord plus, for the upload, an ArrayRecord."""


def to_array_record(arrays: NamedArrays) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> NamedArrays:
    return {name: array.numpy() for name, array in record.items()}


def flatten(arrays: NamedArrays, names: list[str]) -> np.ndarray:
    """One float64 vector of the named arrays, in `names` order (SecAgg's wire order)."""
    return np.concatenate([np.ravel(arrays[name]).astype(np.float64) for name in names])


def unflatten(vector: np.ndarray, like: NamedArrays) -> NamedArrays:
    """Split a flat vector back into arrays shaped like `like` (same name order)."""
    out: NamedArrays = {}
    offset = 0
    for name, reference in like.items():
        out[name] = vector[offset : offset + reference.size].reshape(reference.shape)
        offset += reference.size
    if offset != vector.size:
        raise ValueError(f"vector has {vector.size} values, the arrays hold {offset}")
    return out


def payload_to_records(payload: Payload) -> dict[str, ConfigRecord | ArrayRecord]:
    """Split a payload into its ConfigRecord part and, if present, the masked vector."""
    config = {k: v for k, v in payload.items() if not isinstance(v, np.ndarray)}
    records: dict[str, ConfigRecord | ArrayRecord] = {SECAGG_PAYLOAD_KEY: ConfigRecord(config)}
    masked = payload.get(MASKED_KEY)
    if isinstance(masked, np.ndarray):
        records[MASKED_KEY] = ArrayRecord({MASKED_KEY: Array(masked)})
    return records


def records_to_payload(content: RecordDict) -> Mapping[str, object]:
    """The payload a peer sent; malformed content surfaces as a ProtocolError later."""
    payload: dict[str, object] = dict(content.config_records.get(SECAGG_PAYLOAD_KEY, {}))
    masked = content.array_records.get(MASKED_KEY)
    if masked is not None and MASKED_KEY in masked:
        payload[MASKED_KEY] = masked[MASKED_KEY].numpy()
    return payload
