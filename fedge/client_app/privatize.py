"""What leaves the node: the update clipped (and, for distributed DP, noised), then
encoded as the server asks.

Torch-free, so the torch and the edge ClientApps share it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedge.client_app.protocol import (
    CLIP_KEY,
    MIN_CLIENTS_KEY,
    NOISE_MULTIPLIER_KEY,
    ROUND_KEY,
    UNCLIPPED_KEY,
    model_digest,
    requested_encoding,
)
from fedge.compression import decode, encode, rotation_seed
from fedge.privacy.clipping import clip_update
from fedge.privacy.noise import add_distributed_noise
from fedge.records import NamedArrays, flatten, to_array_record

RESIDUAL_KEY = "fedge-topk-residual"
"""context.state entry: what top-k left unsent so far (error feedback). Flower keeps
context.state per node for the whole run, also when each message runs in a fresh
ClientApp process; a restarted SuperNode starts again from zero residual."""


def privatize_update(
    update: NamedArrays, train_config: ConfigRecord
) -> tuple[NamedArrays, dict[str, int]]:
    """Apply what the server's DP mode asks for; returns the update and reply metrics."""
    clip = train_config.get(CLIP_KEY)
    if clip is None:
        return update, {}
    clipped, norm = clip_update(update, float(clip))
    metrics = {UNCLIPPED_KEY: int(norm <= float(clip))}
    noise_multiplier = train_config.get(NOISE_MULTIPLIER_KEY)
    if noise_multiplier is not None:
        clipped = add_distributed_noise(
            clipped,
            noise_multiplier=float(noise_multiplier),
            clip_norm=float(clip),
            min_clients=int(train_config[MIN_CLIENTS_KEY]),
        )
    return clipped, metrics


def _residual(state: RecordDict, size: int) -> np.ndarray:
    """This node's unsent top-k mass, or zeros (first round, or another model's size)."""
    record = state.array_records.get(RESIDUAL_KEY)
    if record is not None and RESIDUAL_KEY in record:
        residual = record[RESIDUAL_KEY].numpy()
        if residual.shape == (size,):
            return residual
    return np.zeros(size)


def encoded_upload(
    update: NamedArrays,
    train_config: Mapping[str, object],
    global_arrays: NamedArrays,
    state: RecordDict,
    node_id: int,
) -> tuple[ArrayRecord, str]:
    """The reply's arrays and the encoding to name in its tag.

    Float32 arrays as they are unless the server asks for `update-compression`;
    then one flat vector (global-model order) encoded so that, decoded, its norm
    stays within the round's clip norm (the server checks the decoded update).
    Top-k adds the residual from `state` first and stores what it did not send.
    """
    encoding = requested_encoding(train_config)
    if encoding is None:
        return to_array_record(update), "none"
    vector = flatten(update, list(global_arrays))
    server_round = int(train_config[ROUND_KEY])  # type: ignore[call-overload]
    seed = rotation_seed(server_round, model_digest(global_arrays))
    if encoding.scheme == "topk":
        vector = vector + _residual(state, vector.size)
    clip = train_config.get(CLIP_KEY)
    parts = encode(
        vector,
        encoding,
        rng=np.random.default_rng([node_id, server_round, seed]),
        seed=seed,
        clip=None if clip is None else float(clip),  # type: ignore[arg-type]
    )
    if encoding.scheme == "topk":
        unsent = vector - decode(parts, encoding, vector.size, seed)
        state[RESIDUAL_KEY] = ArrayRecord({RESIDUAL_KEY: Array(unsent)})
    return to_array_record(parts), encoding.scheme
