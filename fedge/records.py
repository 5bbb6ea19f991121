"""Conversions between named numpy arrays and Flower records (torch-free).

Arrays a peer sent are untrusted: `checked_arrays` and `checked_numpy` decode
one only after its stype, declared dtype and shape, npy header and byte length
all match what the receiver expects. `from_array_record` is for arrays this
process trusts (its own, or the server's on a client).
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType
from numpy.lib import format as npy

from fedge.secagg.messages import Payload

NamedArrays = dict[str, np.ndarray]

SECAGG_PAYLOAD_KEY = "secagg"
MASKED_KEY = "masked"
"""A SecAgg payload travels as a ConfigRecord plus, for the upload, an ArrayRecord."""

NPY_HEADER_LIMIT = 1024
"""Bytes of an untrusted npy payload its header is parsed from (np.save writes 128
for fedge's arrays); a longer header is refused unread."""


class RejectedArray(ValueError):
    """An untrusted Array that failed a check before decoding; the message says which."""


def untrusted_repr(value: object, limit: int = 40) -> str:
    """A peer-chosen value for a log line or rejection reason, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def to_array_record(arrays: NamedArrays) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> NamedArrays:
    """Decode arrays this process trusts; a peer's arrays go through `checked_arrays`."""
    return {name: array.numpy() for name, array in record.items()}


def _npy_header(data: bytes) -> tuple[object, object, object, int]:
    """(shape, fortran_order, dtype, offset of the data) from at most NPY_HEADER_LIMIT bytes."""
    stream = io.BytesIO(data[:NPY_HEADER_LIMIT])
    try:
        version = npy.read_magic(stream)
        read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
        if read is None:
            raise RejectedArray(f"npy format version {version} is not accepted")
        shape, fortran_order, dtype = read(stream, max_header_size=NPY_HEADER_LIMIT)
    except RejectedArray:
        raise
    except Exception as error:  # numpy's parser raises several types on hostile headers
        raise RejectedArray(f"no valid npy header ({type(error).__name__})") from None
    return shape, fortran_order, dtype, stream.tell()


def _data_offset(array: object, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """Where the values start in `array.data`, if `array` is exactly a `dtype` array of `shape`."""
    if not isinstance(array, Array):
        raise RejectedArray(f"not an Array but {type(array).__name__}")
    if array.stype != SType.NUMPY:
        raise RejectedArray(f"stype {untrusted_repr(array.stype)}, expected {SType.NUMPY!r}")
    if array.dtype != dtype.name:
        raise RejectedArray(f"declared dtype {untrusted_repr(array.dtype)}, expected {dtype.name}")
    declared = array.shape
    if not isinstance(declared, (tuple, list)) or tuple(declared) != shape:
        raise RejectedArray(f"declared shape {untrusted_repr(declared)}, expected {shape}")
    if not isinstance(array.data, bytes):
        raise RejectedArray(f"data is {type(array.data).__name__}, not bytes")
    header_shape, fortran_order, header_dtype, offset = _npy_header(array.data)
    if header_dtype != dtype:
        raise RejectedArray(f"npy dtype {untrusted_repr(header_dtype)}, expected {dtype.name}")
    if header_shape != shape:
        raise RejectedArray(f"npy shape {untrusted_repr(header_shape)}, expected {shape}")
    if fortran_order is not False:
        raise RejectedArray("npy data in Fortran order, expected C order")
    size = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(array.data) != size:
        raise RejectedArray(f"{len(array.data)} bytes, expected {size} for {dtype.name}{shape}")
    return offset


def _decode(array: Array, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> np.ndarray:
    """The values of an Array `_data_offset` accepted: a writable copy, never via pickle."""
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(array.data, dtype=dtype, count=count, offset=offset).reshape(shape).copy()


def checked_numpy(array: object, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """An untrusted Array decoded only if it is exactly a `dtype` array of `shape`.

    Raises `RejectedArray` (naming the failed check) before any byte of the values
    is read; `dtype` must be a native, non-object dtype the caller chose.
    """
    offset = _data_offset(array, dtype, shape)
    return _decode(array, dtype, shape, offset)  # type: ignore[arg-type]


def checked_arrays(record: ArrayRecord, like: NamedArrays) -> NamedArrays:
    """The arrays of an untrusted `record` named, typed and shaped exactly as `like`.

    Every Array is checked before any is decoded, so a reply with one bad array
    costs no decoding at all. Raises `RejectedArray`.
    """
    if set(record) != set(like):
        raise RejectedArray(
            f"arrays {sorted(map(untrusted_repr, record))[:3]} differ from {sorted(like)[:3]}"
        )
    offsets = {}
    for name, reference in like.items():
        try:
            offsets[name] = _data_offset(record[name], reference.dtype, reference.shape)
        except RejectedArray as why:
            raise RejectedArray(f"array {name!r}: {why}") from None
    return {
        name: _decode(record[name], like[name].dtype, like[name].shape, offset)
        for name, offset in offsets.items()
    }


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


def records_to_payload(
    content: RecordDict, masked_length: int | None = None
) -> Mapping[str, object]:
    """The payload a peer sent; never raises, whatever `content` holds.

    Its ConfigRecord fields are left to the protocol's strict readers
    (fedge.secagg.messages). The masked vector is decoded only where one is due
    (`masked_length` given) and only if it is a uint32 vector of exactly that
    length; otherwise the field holds the reason, which the strict reader then
    reports as the node's drop reason.
    """
    payload: dict[str, object] = dict(content.config_records.get(SECAGG_PAYLOAD_KEY, {}))
    masked = content.array_records.get(MASKED_KEY)
    if masked_length is not None and masked is not None and MASKED_KEY in masked:
        try:
            payload[MASKED_KEY] = checked_numpy(
                masked[MASKED_KEY], np.dtype(np.uint32), (masked_length,)
            )
        except RejectedArray as why:
            payload[MASKED_KEY] = str(why)
    return payload
