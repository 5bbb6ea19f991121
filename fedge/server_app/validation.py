"""The reply gate: why a training reply cannot be aggregated, or None if it can.

A client may send anything Flower's wire format carries, so nothing in a reply
is decoded or used before it is checked, in this order: record layout, metrics
(types and ranges, with `num-examples` capped by a public limit), array names,
then every Array's stype, dtype, shape and byte length against the global model
(`fedge.records.checked_arrays`), and only then the values (finite). Any failure
is a reason string, never an exception, so one client cannot end a round.
Which nodes may reply at all is the strategy's business (it knows the round).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedge.client_app.protocol import (
    DECLINED_KEY,
    LOCAL_EPSILON_KEY,
    LOSS_KEY,
    PARTIAL_KEY,
    UNCLIPPED_KEY,
    UPDATE_INFO_KEY,
    VAL_ACCURACY_KEY,
    VAL_LOSS_KEY,
    WEIGHT_KEY,
)
from fedge.records import NamedArrays, RejectedArray, checked_arrays, untrusted_repr

DEFAULT_MAX_NUM_EXAMPLES = 1000


@dataclass(frozen=True)
class CheckedReply:
    """What survives the gate: the decoded update (None if the node declined) and
    its metrics, reduced to the known keys, each within its range."""

    update: NamedArrays | None
    metrics: MetricRecord


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> float | None:
    """`value` as a finite float, or None; huge ints, bools, lists and strings are None."""
    if not (_is_int(value) or isinstance(value, float)):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _non_negative(value: object) -> float | None:
    number = _finite(value)
    return number if number is not None and number >= 0 else None


def _flag(value: object) -> int | None:
    return value if _is_int(value) and value in (0, 1) else None  # type: ignore[return-value]


OPTIONAL_METRICS: dict[str, tuple[Callable[[object], float | int | None], str]] = {
    LOSS_KEY: (_finite, "a finite number"),
    UNCLIPPED_KEY: (_flag, "0 or 1"),
    DECLINED_KEY: (_flag, "0 or 1"),
    LOCAL_EPSILON_KEY: (_non_negative, "a finite number >= 0"),
}
"""Reply metrics fedge reads: each parser returns the clean value, or None if it is out
of range. Any other key is ignored, never aggregated."""


def _fraction(value: object) -> float | None:
    number = _finite(value)
    return number if number is not None and 0 <= number <= 1 else None


EVALUATION_METRICS: dict[str, tuple[Callable[[object], float | None], str]] = {
    VAL_LOSS_KEY: (_non_negative, "a finite number >= 0"),
    VAL_ACCURACY_KEY: (_fraction, "a number in [0, 1]"),
}
"""The metrics an evaluate reply must carry; any other key is ignored."""


def checked_metrics(
    metrics: MetricRecord, max_num_examples: int
) -> tuple[MetricRecord, str | None]:
    """(the known metrics, clean, None) if all are in range, else (empty, why)."""
    weight = metrics.get(WEIGHT_KEY)
    if not (_is_int(weight) and 1 <= weight <= max_num_examples):  # type: ignore[operator]
        return MetricRecord(), (
            f"'{WEIGHT_KEY}' must be an integer in [1, {max_num_examples}] "
            f"(max-num-examples), got {untrusted_repr(weight)}"
        )
    kept = MetricRecord({WEIGHT_KEY: weight})  # type: ignore[dict-item]
    for key, (parse, accepted) in OPTIONAL_METRICS.items():
        if key not in metrics:
            continue
        clean = parse(metrics[key])
        if clean is None:
            return MetricRecord(), f"'{key}' must be {accepted}, got {untrusted_repr(metrics[key])}"
        kept[key] = clean
    return kept, None


def _layout(reply: Message) -> tuple[MetricRecord | None, bool, str | None]:
    """(its MetricRecord, whether it claims a partial update, None) or (None, False, why)."""
    content = reply.content
    if len(content.metric_records) != 1:
        return None, False, f"expected one MetricRecord, got {len(content.metric_records)}"
    configs = dict(content.config_records)
    info = configs.pop(UPDATE_INFO_KEY, None)
    if configs:
        return None, False, f"unexpected ConfigRecords {sorted(map(untrusted_repr, configs))[:3]}"
    if info is not None and (len(info) != 1 or info.get(PARTIAL_KEY) is not True):
        return None, False, f"'{UPDATE_INFO_KEY}' must be {{{PARTIAL_KEY!r}: True}}"
    return next(iter(content.metric_records.values())), info is not None, None


def _names_reason(
    names: set[str], reference: NamedArrays, partial: bool, partial_names: frozenset[str] | None
) -> str | None:
    """Why an update with these array names cannot be aggregated, or None."""
    if not names:
        return "the update holds no arrays"
    unknown = sorted(names - set(reference))
    if unknown:
        shown = ", ".join(untrusted_repr(name) for name in unknown[:3])
        return f"unknown arrays {shown}{', …' if len(unknown) > 3 else ''}"
    if partial and partial_names is None:
        return "a partial update, but this run has no edge clients (no backbone is broadcast)"
    if partial and names != partial_names:
        return f"a partial update must hold exactly {sorted(partial_names or ())}"
    missing = sorted(set(reference) - names)
    if missing and not partial:
        return f"missing arrays {missing[:3]}{'…' if len(missing) > 3 else ''}"
    return None


def checked_update(
    record: ArrayRecord,
    reference: NamedArrays,
    partial: bool = False,
    partial_names: frozenset[str] | None = None,
) -> tuple[NamedArrays | None, str | None]:
    """(the decoded update, None) if `record` passes every check, else (None, why)."""
    names = set(record)
    reason = _names_reason(names, reference, partial, partial_names)
    if reason is not None:
        return None, reason
    try:
        arrays = checked_arrays(record, {name: reference[name] for name in names})
    except RejectedArray as why:
        return None, str(why)
    for name, value in arrays.items():
        if not np.isfinite(value).all():
            return None, f"array {name!r} contains NaN or Inf"
    return arrays, None


def checked_evaluation(reply: Message, max_num_examples: int) -> tuple[MetricRecord | None, str]:
    """(the evaluate reply's known metrics, clean, "") or (None, why not).

    The weight is capped at `max_num_examples` (honest clients do not cap
    validation counts); a reply with an empty split (weight 0) carries nothing.
    """
    if reply.has_error():
        return None, client_error(reply)
    records = list(reply.content.metric_records.values())
    if len(records) != 1:
        return None, f"{len(records)} MetricRecords, expected one"
    metrics = records[0]
    weight = metrics.get(WEIGHT_KEY)
    if not (_is_int(weight) and weight >= 0):  # type: ignore[operator]
        return None, f"'{WEIGHT_KEY}' must be an integer >= 0, got {untrusted_repr(weight)}"
    if weight == 0:
        return None, "an empty validation split"
    kept = MetricRecord({WEIGHT_KEY: min(weight, max_num_examples)})  # type: ignore[dict-item]
    for key, (parse, accepted) in EVALUATION_METRICS.items():
        clean = parse(metrics.get(key))
        if clean is None:
            return None, f"'{key}' must be {accepted}, got {untrusted_repr(metrics.get(key))}"
        kept[key] = clean
    return kept, ""


def client_error(reply: Message) -> str:
    """An error reply's reason as logged and recorded (shortened: it is untrusted)."""
    return f"client error: {untrusted_repr(reply.error.reason, 400)}"


def check_reply(
    reply: Message,
    reference: NamedArrays,
    *,
    max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
    partial_names: frozenset[str] | None = None,
) -> tuple[CheckedReply | None, str | None]:
    """(the checked reply, None) if it can be used against `reference`, else (None, why).

    `partial_names`: the arrays edge clients train, or None when the run has no
    edge clients (then no partial update is accepted). A declined reply (local
    privacy budget spent) carries no arrays and comes back with update None.
    """
    if reply.has_error():
        return None, client_error(reply)
    metric_record, partial, reason = _layout(reply)
    if metric_record is None:
        return None, reason
    metrics, reason = checked_metrics(metric_record, max_num_examples)
    if reason is not None:
        return None, reason
    records = list(reply.content.array_records.values())
    if metrics.get(DECLINED_KEY) == 1:
        if records or partial:
            return None, "a declined reply must carry no update"
        return CheckedReply(None, metrics), None
    if len(records) != 1:
        return None, f"expected one ArrayRecord, got {len(records)}"
    update, reason = checked_update(records[0], reference, partial, partial_names)
    return (None, reason) if update is None else (CheckedReply(update, metrics), None)


def rejection_reason(reply: Message, reference: NamedArrays, **rules: object) -> str | None:
    """Why `reply` cannot be aggregated against `reference` (the global model), or None."""
    return check_reply(reply, reference, **rules)[1]  # type: ignore[arg-type]
