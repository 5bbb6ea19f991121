"""The reply gate: why a training reply cannot be aggregated, or None if it can.

A client may send anything Flower's wire format carries, so nothing in a reply
is decoded or used before it is checked, in this order: record layout and the
reply's tag (what it carries, for which round and global model: a stale or
mismatched one is refused; no tag means Flower's convention, full weights), metrics
(types and ranges, with `num-examples` capped by a public limit), array names,
then every Array's stype, dtype, shape and byte length against the global model
(`fedge.records.checked_arrays`), and only then the values (finite). A compressed
update (the tag's `encoding`, which must be the run's `update-compression`) is
checked the same way against the layout the model's size implies, then its scales
and indices, and only then decoded (`fedge.compression`). Full weights
become Δw = w − w_global here, so every later rule (clip check, influence bounds)
sees an update whatever the client's convention. Any failure is a reason string,
never an exception, so one client cannot end a round.
Which nodes may reply at all is the strategy's business (it knows the round).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedge.client_app.protocol import (
    CARRIES_KEY,
    CARRIES_PARTIAL,
    CARRIES_UPDATE,
    DECLINED_KEY,
    DIGEST_CHARS,
    DIGEST_KEY,
    ENCODING_KEY,
    LOCAL_EPSILON_KEY,
    LOSS_KEY,
    TAG_ROUND_KEY,
    UNCLIPPED_KEY,
    UPDATE_INFO_KEY,
    VAL_ACCURACY_KEY,
    VAL_LOSS_KEY,
    WEIGHT_KEY,
    model_digest,
)
from fedge.compression import Encoding, decode, problem, rotation_seed
from fedge.records import NamedArrays, RejectedArray, checked_arrays, unflatten, untrusted_repr

DEFAULT_MAX_NUM_EXAMPLES = 1000

CARRIES_WEIGHTS = "weights"
"""What an untagged reply carries (Flower's convention); never sent as a tag value."""
TAG_FIELDS = (CARRIES_KEY, TAG_ROUND_KEY, DIGEST_KEY)
HEX = frozenset("0123456789abcdef")


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


def reply_carries(
    content: RecordDict, server_round: int, digest: str
) -> tuple[str | None, str | None]:
    """(what the reply carries, None), or (None, why its tag is refused).

    A tagged reply must answer `server_round` and the model whose `model_digest`
    is `digest`; an untagged one carries CARRIES_WEIGHTS. Only the tag's types and
    sizes are read before they are checked.
    """
    tag = content.config_records.get(UPDATE_INFO_KEY)
    if tag is None:
        return CARRIES_WEIGHTS, None
    fields = TAG_FIELDS + ((ENCODING_KEY,) if ENCODING_KEY in tag else ())
    if len(tag) != len(fields) or any(field not in tag for field in fields):
        shown = sorted(map(untrusted_repr, list(tag)[:4]))
        return None, (
            f"'{UPDATE_INFO_KEY}' must hold exactly {list(TAG_FIELDS)} "
            f"(and optionally '{ENCODING_KEY}'), got {shown}"
        )
    carries, answered, claimed = (tag[field] for field in TAG_FIELDS)
    if not isinstance(carries, str) or carries not in (CARRIES_UPDATE, CARRIES_PARTIAL):
        return None, (
            f"'{CARRIES_KEY}' must be {CARRIES_UPDATE!r} or {CARRIES_PARTIAL!r}, "
            f"got {untrusted_repr(carries)}"
        )
    if not _is_int(answered):
        return None, f"'{TAG_ROUND_KEY}' must be an integer, got {untrusted_repr(answered)}"
    if not (isinstance(claimed, str) and len(claimed) == DIGEST_CHARS and set(claimed) <= HEX):
        return None, (
            f"'{DIGEST_KEY}' must be {DIGEST_CHARS} hex digits, got {untrusted_repr(claimed)}"
        )
    if answered != server_round:
        return None, f"stale: it answers round {answered}, this is round {server_round}"
    if claimed != digest:
        return None, (
            f"it answers another global model (digest {claimed[:8]}…, "
            f"this round's is {digest[:8]}…)"
        )
    return carries, None


def masked_upload_reason(content: RecordDict, server_round: int, digest: str) -> str | None:
    """Why a SecAgg+ masked upload does not answer this round's model as an update, or None.

    Its masked vector is checked by the protocol; this is the tag alone. Only fedge's
    ClientApp can take part (the masked vector is its own), so untagged means refused.
    """
    carries, reason = reply_carries(content, server_round, digest)
    if carries == CARRIES_WEIGHTS:
        return "untagged reply: under SecAgg+ only fedge's ClientApp takes part"
    if carries is not None and carries != CARRIES_UPDATE:
        return f"a masked upload must carry {CARRIES_UPDATE!r}, not {carries!r}"
    if carries is not None and declared_encoding(content) != "none":
        return "a masked upload is SecAgg+'s own encoding; its tag must name no other"
    return reason


def declared_encoding(content: RecordDict) -> object:
    """The tag's `encoding` ("none" if it names none); read only after `reply_carries`."""
    tag = content.config_records.get(UPDATE_INFO_KEY)
    return "none" if tag is None else tag.get(ENCODING_KEY, "none")


def _layout(
    reply: Message, server_round: int, digest: str
) -> tuple[MetricRecord | None, str | None, str | None]:
    """(its MetricRecord, what it carries, None) or (None, None, why)."""
    content = reply.content
    if len(content.metric_records) != 1:
        return None, None, f"expected one MetricRecord, got {len(content.metric_records)}"
    others = [name for name in content.config_records if name != UPDATE_INFO_KEY]
    if others:
        return None, None, f"unexpected ConfigRecords {sorted(map(untrusted_repr, others))[:3]}"
    carries, reason = reply_carries(content, server_round, digest)
    if carries is None:
        return None, None, reason
    return next(iter(content.metric_records.values())), carries, None


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


def checked_encoded(
    record: ArrayRecord, reference: NamedArrays, encoding: Encoding, seed: int
) -> tuple[NamedArrays | None, str | None]:
    """(the decoded update, None) if `record` is exactly `encoding`'s layout for the
    model's size and its scales and indices are sound, else (None, why).

    Every encoded Array is checked before any is read, so a crafted reply costs
    at most the model's size in decoding; `seed` is the round's `rotation_seed`.
    """
    size = sum(value.size for value in reference.values())
    # Zero-stride views: the dtypes and shapes `checked_arrays` wants, without allocating.
    like = {
        name: np.broadcast_to(np.zeros((), dtype), shape)
        for name, (dtype, shape) in encoding.layout(size).items()
    }
    try:
        parts = checked_arrays(record, like)
    except RejectedArray as why:
        return None, f"{encoding.scheme} encoding: {why}"
    reason = problem(parts, encoding, size)
    if reason is not None:
        return None, f"{encoding.scheme} encoding: {reason}"
    with np.errstate(over="ignore"):  # a value beyond float32 becomes Inf, refused below
        update = {
            name: value.astype(reference[name].dtype)
            for name, value in unflatten(decode(parts, encoding, size, seed), reference).items()
        }
    for name, value in update.items():
        if not np.isfinite(value).all():
            return None, f"array {name!r} decodes to NaN or Inf"
    return update, None


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


def as_update(
    weights: NamedArrays, reference: NamedArrays
) -> tuple[NamedArrays | None, str | None]:
    """(Δw = w − w_global, None) for full trained weights, or (None, why)."""
    with np.errstate(over="ignore"):  # an overflow is refused below, not warned about
        update = {name: value - reference[name] for name, value in weights.items()}
    for name, value in update.items():
        if not np.isfinite(value).all():
            return None, f"array {name!r} minus the global model overflows"
    return update, None


def client_error(reply: Message) -> str:
    """An error reply's reason as logged and recorded (shortened: it is untrusted)."""
    return f"client error: {untrusted_repr(reply.error.reason, 400)}"


def check_reply(
    reply: Message,
    reference: NamedArrays,
    *,
    server_round: int,
    digest: str | None = None,
    max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
    partial_names: frozenset[str] | None = None,
    encoding: Encoding | None = None,
) -> tuple[CheckedReply | None, str | None]:
    """(the checked reply, None) if it can be used against `reference`, else (None, why).

    `reference` is the global model sent for `server_round`; `digest` its
    `model_digest` (computed if not given). `partial_names`: the arrays edge clients
    train, or None when the run has no edge clients (then no partial update is
    accepted). `encoding`: the run's `update-compression` (None: float32), which
    full updates must use; partial updates and untagged weights are float32.
    An untagged reply's weights become an update. A declined reply
    (local privacy budget spent) carries no arrays and comes back with update None.
    """
    if reply.has_error():
        return None, client_error(reply)
    digest = model_digest(reference) if digest is None else digest
    metric_record, carries, reason = _layout(reply, server_round, digest)
    if metric_record is None:
        return None, reason
    metrics, reason = checked_metrics(metric_record, max_num_examples)
    if reason is not None:
        return None, reason
    partial = carries == CARRIES_PARTIAL
    records = list(reply.content.array_records.values())
    if metrics.get(DECLINED_KEY) == 1:
        if records or partial:
            return None, "a declined reply must carry no update"
        return CheckedReply(None, metrics), None
    if len(records) != 1:
        return None, f"expected one ArrayRecord, got {len(records)}"
    expected = encoding.scheme if encoding is not None and carries == CARRIES_UPDATE else "none"
    declared = declared_encoding(reply.content)
    if declared != expected:
        return None, (
            f"arrays encoded as {untrusted_repr(declared)}, this run expects {expected!r} "
            "here (update-compression)"
        )
    if encoding is not None and expected != "none":
        seed = rotation_seed(server_round, digest)
        update, reason = checked_encoded(records[0], reference, encoding, seed)
    else:
        update, reason = checked_update(records[0], reference, partial, partial_names)
    if update is not None and carries == CARRIES_WEIGHTS:
        update, reason = as_update(update, reference)
    return (None, reason) if update is None else (CheckedReply(update, metrics), None)


def rejection_reason(reply: Message, reference: NamedArrays, **rules: object) -> str | None:
    """Why `reply` cannot be aggregated against `reference` (the global model), or None."""
    return check_reply(reply, reference, **rules)[1]  # type: ignore[arg-type]
