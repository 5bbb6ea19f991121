"""Keys the ServerApp and ClientApps agree on (torch-free, shared by edge clients)."""

import hashlib
from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord

from fedge.compression import Encoding

REPLY_KEY = "fedge-reply"
"""Train-config key: 'update' asks for Δw (fedge's strategy); absent means full
weights, so fedge's ClientApp also serves Flower's stock strategies."""

EDGE_NODE_KEY = "edge"
"""Node-config flag (`--node-config "edge=true"`): this SuperNode runs the
torch-free edge learner instead of PyTorch training."""

LOCAL_DATA_KEY = "local-data"
"""Node-config path (edge nodes): this node's own IDX folder, CSV or .npz, read with
numpy alone and used whole, so the node needs no partitioner (`fedge[edge]`)."""

CLIP_KEY = "dp-clip"
"""Train-config key: the L2 norm clients clip their update to (DP modes)."""

NOISE_MULTIPLIER_KEY = "dp-noise-multiplier"
MIN_CLIENTS_KEY = "dp-min-clients"
"""Train-config keys (distributed DP): each client adds N(0, σ²C²/m_min) itself."""

UNCLIPPED_KEY = "dp-unclipped"
"""Reply metric: 1 if the update norm was within the clip norm (adaptive clipping)."""

LOCAL_EPSILON_KEY = "local-epsilon"
DECLINED_KEY = "declined"
"""Reply metrics (local DP-SGD): the node's ε so far; 1 if it declined to train."""

WEIGHT_KEY = "num-examples"
"""Reply metric: the examples behind an update (its aggregation weight)."""

MAX_EXAMPLES_KEY = "max-num-examples"
"""Train-config key: the public cap on `num-examples`. Honest clients report
min(n, cap); the server rejects a reply above it (plain and SecAgg alike)."""

LOSS_KEY = "train-loss"
"""Reply metric: the mean local training loss."""

VAL_LOSS_KEY = "val-loss"
VAL_ACCURACY_KEY = "val-accuracy"
"""Evaluate-reply metrics: the global model on the node's validation split (NaN if empty)."""
ROUND_KEY = "server-round"
"""Train-config key (set by Flower's strategies): the round a message belongs to."""

UPDATE_INFO_KEY = "update-info"
"""Reply ConfigRecord, the tag on every reply fedge's ClientApps send to fedge's
strategy: what it carries and which round's global model it answers. A reply
without it follows Flower's convention (full trained weights), which the server
converts to Δw against the round's model, so stock Flower ClientApps can join."""

CARRIES_KEY = "carries"
CARRIES_UPDATE = "update"
CARRIES_PARTIAL = "partial-update"
"""Tag field and its values: Δw for every array, or for only some arrays (an edge
client's classifier head; the others are left to the clients that sent them)."""

COMPRESSION_KEY = "update-compression"
TOPK_FRACTION_KEY = "topk-fraction"
ROTATION_KEY = "update-rotation"
"""Train-config keys: how the server asks clients to encode their update
(`fedge.compression.Encoding`); absent means float32 arrays."""

ENCODING_KEY = "encoding"
"""Optional tag field: the `update-compression` scheme the reply's arrays are
encoded with; absent means float32 arrays, one per model array."""

TAG_ROUND_KEY = "round"
DIGEST_KEY = "model-digest"
DIGEST_CHARS = 32
"""Tag fields: the round and `model_digest` of the global model the reply answers."""


def model_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """BLAKE2b-128 (hex) of a model's names, dtypes, shapes and values.

    Clients digest the arrays they received, the server once per round the
    arrays it sent: a reply computed against another model does not match.
    """
    digest = hashlib.blake2b(digest_size=DIGEST_CHARS // 2)
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name!r}:{value.dtype.str}:{value.shape};".encode())
        digest.update(memoryview(value).cast("B"))
    return digest.hexdigest()


def update_tag(
    train_config: Mapping[str, object],
    global_arrays: Mapping[str, np.ndarray],
    carries: str = CARRIES_UPDATE,
    encoding: str = "none",
) -> ConfigRecord:
    """The UPDATE_INFO_KEY record for a reply to a train message with this config and model."""
    server_round = train_config.get(ROUND_KEY)
    if not isinstance(server_round, int) or isinstance(server_round, bool):
        raise ValueError(f"the train message has no integer '{ROUND_KEY}' to answer")
    tag = ConfigRecord(
        {
            CARRIES_KEY: carries,
            TAG_ROUND_KEY: server_round,
            DIGEST_KEY: model_digest(global_arrays),
        }
    )
    if encoding != "none":
        tag[ENCODING_KEY] = encoding
    return tag


def encoding_config(encoding: Encoding) -> dict[str, str | float | bool]:
    """The train-config entries that ask clients for `encoding`."""
    return {
        COMPRESSION_KEY: encoding.scheme,
        ROTATION_KEY: encoding.rotation,
        TOPK_FRACTION_KEY: encoding.topk_fraction,
    }


def requested_encoding(train_config: Mapping[str, object]) -> Encoding | None:
    """The encoding the server asks for, or None (float32 arrays); raises ValueError
    on values no fedge server sends."""
    scheme = train_config.get(COMPRESSION_KEY, "none")
    if scheme == "none":
        return None
    return Encoding(
        str(scheme),
        bool(train_config.get(ROTATION_KEY, False)),
        float(train_config.get(TOPK_FRACTION_KEY, 0.01)),  # type: ignore[arg-type]
    )


def reported_examples(num_examples: int, train_config: Mapping[str, object]) -> int:
    """The weight a client reports: its example count, capped as the server asks.

    A config without a valid cap (a stock Flower strategy) leaves the count as is.
    """
    cap = train_config.get(MAX_EXAMPLES_KEY)
    if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1:
        return min(num_examples, cap)
    return num_examples


ROLE_KEY = "role"
"""Node-config key (vertical runs): 'guest' holds the labels, 'host' does not. Without
it a simulated node takes partition 0 → guest, 1 → host."""

SCORE_DATA_KEY = "score-data"
"""Node-config path (vertical runs): this party's CSV of new rows to score jointly after
training (same columns as its `local-data`; the guest's scores land in its output folder)."""

SIGN_KEY = "sign-key"
PEER_KEY = "peer-key"
"""Node-config paths (vertical runs): this party's Ed25519 private key and the peer's
public key (PEM, exchanged out of band); with them, party-to-party messages are signed."""

VERTICAL_KEY = "vertical"
VERTICAL_STAGE_KEY = "vertical-stage"
"""Vertical messages: one ConfigRecord named `vertical`, its stage under `vertical-stage`."""
