"""The client side of SecAgg+: one handler per protocol stage.

Between stages the protocol state lives in `context.state`, since in a
deployment every message may run in a fresh ClientApp process. A training
message may also carry the next round's SETUP and an unmask request its
SHARE_KEYS (see fedge.server_app.secure_round): the next round's keys wait
under their own key until its SHARE_KEYS arrives. A failure in the nested
part only leaves that reply out, so the node misses the pipelining, not the
current round.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from fedge.client_app.protocol import UPDATE_INFO_KEY, WEIGHT_KEY, update_tag
from fedge.records import (
    NamedArrays,
    flatten,
    from_array_record,
    payload_to_records,
    records_to_payload,
)
from fedge.secagg import (
    ProtocolError,
    SecAggAbort,
    StoredState,
    client_consistency,
    client_masked_input,
    client_setup,
    client_share_keys,
    client_unmask,
    load_state,
)
from fedge.secagg.messages import STAGE_KEY, Payload, nest, unnest

STATE_KEY = "secagg-state"
NEXT_STATE_KEY = "secagg-next-round-keys"
# Keystream (about 1.5 ms of ChaCha20 here) that repays a second thread: the
# thread costs the training about 1 ms in GIL hand-offs (measured with 100k
# parameters and 5 masks, 2 MB of keystream, where it made rounds slower).
BACKGROUND_MASK_BYTES = 8 << 20

LocalUpdate = Callable[[], tuple[NamedArrays | None, MetricRecord]]


def _stored_state(context: Context, key: str = STATE_KEY) -> StoredState:
    stored = context.state.config_records.get(key)
    if stored is None:
        raise RuntimeError("SecAgg message arrived before this node's setup stage")
    return load_state(dict(stored))


def _store(context: Context, state: StoredState, key: str = STATE_KEY) -> None:
    context.state[key] = ConfigRecord(state.to_dict())


def _reply(msg: Message, payload: Payload) -> Message:
    return Message(content=RecordDict(payload_to_records(payload)), reply_to=msg)


def _next_round(
    context: Context,
    nested: Payload | None,
    stage: Callable[[Payload], tuple[StoredState, Payload]],
    key: str,
) -> Payload:
    """Run the nested next-round `stage`, store its state under `key`; return its
    reply to nest, or nothing if there was no such stage or it failed."""
    if nested is None:
        return {}
    try:
        state, reply = stage(nested)
    except (ProtocolError, SecAggAbort, RuntimeError) as error:
        log(WARNING, "SecAgg: skipping the next round's %s: %s", nested.get(STAGE_KEY), error)
        return {}
    _store(context, state, key)
    return nest(reply)


def setup(msg: Message, context: Context) -> Message:
    state, payload = client_setup(context.node_id, records_to_payload(msg.content))
    _store(context, state)
    return _reply(msg, payload)


def share_keys(msg: Message, context: Context) -> Message:
    state, payload = client_share_keys(_stored_state(context), records_to_payload(msg.content))
    _store(context, state)
    return _reply(msg, payload)


def masked_input(msg: Message, context: Context, local_update: LocalUpdate) -> Message:
    """Train, then upload weight·Δ quantized and masked; a declined node uploads zeros.

    Large masks are expanded on another thread while the node trains: the
    mask does not depend on the update, and on a device with a spare core
    that hides most of the protocol's work. If asked, also make (and
    advertise) fresh keys for the next round. The reply is tagged as an update
    of the round and model it answers.
    """
    global_arrays = from_array_record(msg.content.array_records["arrays"])
    tag = update_tag(msg.content.config_records["config"], global_arrays)
    names = list(global_arrays)
    received, nested = unnest(records_to_payload(msg.content))
    next_reply = _next_round(
        context, nested, lambda payload: client_setup(context.node_id, payload), NEXT_STATE_KEY
    )
    stage = client_masked_input(_stored_state(context), received)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="secagg-mask") as pool:
        mask = pool.submit(stage.mask) if stage.mask_bytes >= BACKGROUND_MASK_BYTES else None
        update, metrics = local_update()
        if update is None:
            vector, weight = np.zeros(sum(a.size for a in global_arrays.values())), 0
        else:
            vector, weight = flatten(update, names), int(metrics[WEIGHT_KEY])
        payload = stage.upload(vector, weight, None if mask is None else mask.result())
    _store(context, stage.state)
    reply = _reply(msg, {**payload, **next_reply})
    reply.content[UPDATE_INFO_KEY] = tag
    return reply


def consistency(msg: Message, context: Context) -> Message:
    """Sign the announced survivor set (once per round) if unmasking for it is safe."""
    state, payload = client_consistency(_stored_state(context), records_to_payload(msg.content))
    _store(context, state)
    return _reply(msg, payload)


def unmask(msg: Message, context: Context) -> Message:
    """Answer the unmask request; then, if asked, share the next round's keys."""
    received, nested = unnest(records_to_payload(msg.content))
    state, payload = client_unmask(_stored_state(context), received)
    _store(context, state)
    next_reply = _next_round(
        context,
        nested,
        lambda payload: client_share_keys(_stored_state(context, NEXT_STATE_KEY), payload),
        STATE_KEY,
    )
    return _reply(msg, {**payload, **next_reply})
