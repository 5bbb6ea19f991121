"""Clip (and, for distributed DP, noise) an update before it leaves the node.

Torch-free, so the torch and the edge ClientApps share it.
"""

from __future__ import annotations

from flwr.app import ConfigRecord

from fedge.client_app.protocol import (
    CLIP_KEY,
    MIN_CLIENTS_KEY,
    NOISE_MULTIPLIER_KEY,
    UNCLIPPED_KEY,
)
from fedge.privacy.clipping import clip_update
from fedge.privacy.noise import add_distributed_noise
from fedge.records import NamedArrays


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
