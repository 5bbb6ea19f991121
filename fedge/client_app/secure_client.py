"""The client side of SecAgg+: one handler per protocol stage.

Between stages the protocol state lives in `context.state`, since in a
deployment every message may run in a fresh ClientApp process.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedge.client_app.protocol import WEIGHT_KEY
from fedge.records import (
    NamedArrays,
    flatten,
    from_array_record,
    payload_to_records,
    records_to_payload,
)
from fedge.secagg import (
    StoredState,
    client_masked_input,
    client_setup,
    client_share_keys,
    client_unmask,
    load_state,
)
from fedge.secagg.messages import Payload

STATE_KEY = "secagg-state"

LocalUpdate = Callable[[], tuple[NamedArrays | None, MetricRecord]]


def _stored_state(context: Context) -> StoredState:
    stored = context.state.config_records.get(STATE_KEY)
    if stored is None:
        raise RuntimeError("SecAgg message arrived before this node's setup stage")
    return load_state(dict(stored))


def _reply(msg: Message, context: Context, state: StoredState, payload: Payload) -> Message:
    context.state[STATE_KEY] = ConfigRecord(state.to_dict())
    return Message(content=RecordDict(payload_to_records(payload)), reply_to=msg)


def setup(msg: Message, context: Context) -> Message:
    state, payload = client_setup(context.node_id, records_to_payload(msg.content))
    return _reply(msg, context, state, payload)


def share_keys(msg: Message, context: Context) -> Message:
    state, payload = client_share_keys(_stored_state(context), records_to_payload(msg.content))
    return _reply(msg, context, state, payload)


def masked_input(msg: Message, context: Context, local_update: LocalUpdate) -> Message:
    """Train, then upload weight·Δ quantized and masked; a declined node uploads zeros."""
    names = list(msg.content.array_records["arrays"].keys())
    update, metrics = local_update()
    if update is None:
        global_arrays = from_array_record(msg.content.array_records["arrays"])
        vector, weight = np.zeros(sum(a.size for a in global_arrays.values())), 0
    else:
        vector, weight = flatten(update, names), int(metrics[WEIGHT_KEY])
    state, payload = client_masked_input(
        _stored_state(context), records_to_payload(msg.content), vector, weight
    )
    return _reply(msg, context, state, payload)


def unmask(msg: Message, context: Context) -> Message:
    state, payload = client_unmask(_stored_state(context), records_to_payload(msg.content))
    return _reply(msg, context, state, payload)
