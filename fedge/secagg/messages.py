"""Stage names, payload types, wire sizes and strict readers for untrusted fields.

Payloads are plain dicts whose values Flower's ConfigRecord accepts, except the
masked vector (a uint32 array meant for an ArrayRecord). Every field taken
from a peer goes through a reader here, so a wrong type, size or duplicate
surfaces as ProtocolError and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from fedge.secagg.crypto import CIPHERTEXT_OVERHEAD, DIGEST_BYTES, KEY_BYTES, SIGNATURE_BYTES
from fedge.secagg.errors import ProtocolError
from fedge.secagg.shamir import SHARE_BYTES


class Stage(StrEnum):
    """Protocol stages in order; values are valid Flower action names."""

    SETUP = "secagg_setup"
    SHARE_KEYS = "secagg_share_keys"
    MASKED_INPUT = "secagg_masked_input"
    CONSISTENCY = "secagg_consistency"
    UNMASK = "secagg_unmask"


STAGES = tuple(Stage)
STAGE_KEY = "stage"
# A message may carry a stage payload of the next round (see `nest`), its
# fields renamed with this prefix.
NEXT_ROUND_PREFIX = "next_round_"
MAX_NODE_ID = 2**64 - 1
# One ciphertext carries the receiver's share of the sender's self-mask seed
# followed by its share of the sender's mask private key.
SHARE_PLAINTEXT_BYTES = 2 * SHARE_BYTES
CIPHERTEXT_BYTES = SHARE_PLAINTEXT_BYTES + CIPHERTEXT_OVERHEAD

StateValue = int | float | bytes | list[int] | list[bytes]
StateDict = dict[str, StateValue]  # what a ConfigRecord stores as-is
Payload = dict[str, StateValue | str | NDArray[np.uint32]]


def upload_bytes_per_client(vector_length: int, num_shares: int) -> int:
    """Payload bytes one client uploads in a round without dropouts.

    Counts keys, commitment, ciphertexts, the masked vector (4 bytes per
    parameter plus the weight entry), the survivor-set signature and the
    unmask shares; ids and stage labels are left out. Only the vector term
    grows with the model.
    """
    return (
        3 * KEY_BYTES
        + DIGEST_BYTES
        + (num_shares - 1) * CIPHERTEXT_BYTES
        + 4 * (vector_length + 1)
        + SIGNATURE_BYTES
        + num_shares * SHARE_BYTES
    )


def nest(payload: Mapping[str, object]) -> Payload:
    """`payload` renamed to ride inside a message of the current round."""
    return {NEXT_ROUND_PREFIX + key: value for key, value in payload.items()}  # type: ignore[misc]


def unnest(payload: Mapping[str, object]) -> tuple[Payload, Payload | None]:
    """Split a payload into its own fields and the nested next-round payload (or None)."""
    own: Payload = {}
    nested: Payload = {}
    for key, value in payload.items():
        if key.startswith(NEXT_ROUND_PREFIX):
            nested[key.removeprefix(NEXT_ROUND_PREFIX)] = value  # type: ignore[assignment]
        else:
            own[key] = value  # type: ignore[assignment]
    return own, nested or None


def expect_stage(payload: Mapping[str, object], stage: Stage) -> None:
    """Refuse a message meant for another stage (replayed or out of order)."""
    got = _field(payload, STAGE_KEY)
    if not isinstance(got, str) or got != stage.value:
        raise ProtocolError(f"expected stage {stage.value!r}, got {_describe(got)}")


def read_int(payload: Mapping[str, object], key: str, low: int = 0, high: int = MAX_NODE_ID) -> int:
    return _as_int(_field(payload, key), key, low, high)


def read_float(payload: Mapping[str, object], key: str) -> float:
    value = _field(payload, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"{key!r} must be a finite float, got {_describe(value)}")
    return float(value)


def read_bytes(payload: Mapping[str, object], key: str, size: int | None = None) -> bytes:
    return _as_bytes(_field(payload, key), key, size)


def read_ids(payload: Mapping[str, object], key: str) -> list[int]:
    """A list of distinct node ids."""
    ids = [_as_int(value, key, 0, MAX_NODE_ID) for value in _list(payload, key)]
    if len(set(ids)) != len(ids):
        raise ProtocolError(f"{key!r} contains duplicate ids")
    return ids


def read_bytes_list(
    payload: Mapping[str, object], key: str, count: int, size: int | None = None
) -> list[bytes]:
    """A list of exactly `count` byte strings, each of `size` bytes when given."""
    values = _list(payload, key)
    if len(values) != count:
        raise ProtocolError(f"{key!r} must have {count} entries, got {len(values)}")
    return [_as_bytes(value, key, size) for value in values]


def read_uint32_array(payload: Mapping[str, object], key: str, length: int) -> NDArray[np.uint32]:
    value = _field(payload, key)
    if not isinstance(value, np.ndarray) or value.dtype != np.dtype(np.uint32):
        raise ProtocolError(f"{key!r} must be a native uint32 array, got {_describe(value)}")
    if value.shape != (length,):
        raise ProtocolError(f"{key!r} must have shape ({length},), got {value.shape}")
    return value


def _field(payload: Mapping[str, object], key: str) -> object:
    if not isinstance(payload, Mapping):
        raise ProtocolError(f"payload must be a mapping, got {type(payload).__name__}")
    if key not in payload:
        raise ProtocolError(f"missing field {key!r}")
    return payload[key]


def _as_int(value: object, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"{key!r} must hold ints in [{low}, {high}], got {_describe(value)}")
    return value


def _as_bytes(value: object, key: str, size: int | None) -> bytes:
    if not isinstance(value, bytes) or (size is not None and len(value) != size):
        raise ProtocolError(f"{key!r} must hold {size or 'some'} bytes, got {_describe(value)}")
    return value


def _list(payload: Mapping[str, object], key: str) -> list[object]:
    value = _field(payload, key)
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(f"{key!r} must be a list, got {_describe(value)}")
    return list(value)


def _describe(value: object) -> str:
    """Short description of an untrusted value, safe to keep in a drop reason."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} ({len(text)} chars as repr)"
