"""Why a training reply cannot be aggregated, or None if it can.

One bad client must never poison the global model: every reply is checked
against the global model's names, shapes and dtypes before it is used.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message

from fedge.client_app.protocol import PARTIAL_KEY, UPDATE_INFO_KEY, WEIGHT_KEY
from fedge.records import NamedArrays, from_array_record


def check_reply(reply: Message, reference: NamedArrays) -> tuple[NamedArrays | None, str | None]:
    """(the decoded update, None) if the reply can be aggregated, else (None, why).

    Decoding happens once here, so callers reuse the arrays instead of decoding again.
    """
    if reply.has_error():
        return None, f"client error: {reply.error.reason}"
    content = reply.content
    if len(content.array_records) != 1:
        return None, f"expected one ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return None, f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(WEIGHT_KEY)
    if weight is None:
        return None, f"missing '{WEIGHT_KEY}' in metrics"
    if isinstance(weight, list) or not np.isfinite(weight) or weight <= 0:
        return None, f"'{WEIGHT_KEY}' must be a positive number, got {weight!r}"
    arrays = from_array_record(next(iter(content.array_records.values())))
    reason = arrays_rejection_reason(arrays, reference, partial=is_partial(reply))
    return (None, reason) if reason else (arrays, None)


def rejection_reason(reply: Message, reference: NamedArrays) -> str | None:
    """Why `reply` cannot be aggregated against `reference` (the global model), or None."""
    return check_reply(reply, reference)[1]


def is_partial(reply: Message) -> bool:
    info = reply.content.config_records.get(UPDATE_INFO_KEY)
    return bool(info is not None and info.get(PARTIAL_KEY) is True)


def arrays_rejection_reason(
    arrays: NamedArrays, reference: NamedArrays, partial: bool = False
) -> str | None:
    if not arrays:
        return "the update holds no arrays"
    missing = sorted(set(reference) - set(arrays))
    if missing and not partial:
        return f"missing arrays {missing[:3]}{'…' if len(missing) > 3 else ''}"
    unknown = sorted(set(arrays) - set(reference))
    if unknown:
        return f"unknown arrays {unknown[:3]}{'…' if len(unknown) > 3 else ''}"
    for name, value in arrays.items():
        expected = reference[name]
        if value.shape != expected.shape:
            return f"array {name!r} has shape {value.shape}, expected {expected.shape}"
        if value.dtype != expected.dtype:
            return f"array {name!r} has dtype {value.dtype}, expected {expected.dtype}"
        if not np.isfinite(value).all():
            return f"array {name!r} contains NaN or Inf"
    return None
