"""Gaussian noise for DP aggregation: central (the server adds it) or distributed.

Central DP: the server sums the clipped updates (sensitivity C) and adds
N(0, (sigma * C)^2) per coordinate, then divides by the public expected number of
clients if it wants a mean.

Distributed DP (with secure aggregation, where the server never sees single
updates): each of the m sampled clients clips its own update and adds
N(0, sigma^2 C^2 / m_min). If at least m_min clients survive, the summed noise has
variance >= sigma^2 C^2. The price is over-provisioning: when all m survive the
noise variance is m / m_min times what was needed (std sqrt(m / m_min) times),
which costs accuracy, not privacy. Clients add their noise before the
secure-aggregation quantization (done by the secagg layer, not here).

Noise comes from a `np.random.Generator`; by default one seeded from the OS CSPRNG
so that a run's reproducibility seed cannot be used to predict (and subtract) it.
numpy's samplers are not hardened against floating-point attacks (Mironov 2012).
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from fedge.privacy._common import (
    Update,
    check_noise_multiplier,
    check_positive,
    float_arrays,
)


def secure_rng() -> np.random.Generator:
    """A generator seeded with 128 bits from `secrets`."""
    return np.random.default_rng(secrets.randbits(128))


def _check_scale(noise_multiplier: float, clip_norm: float) -> None:
    check_noise_multiplier(noise_multiplier)
    check_positive("clip_norm", clip_norm)


def _add_gaussian(
    update: Update, stddev: float, rng: np.random.Generator | None
) -> dict[str, np.ndarray]:
    """Noise drawn in float64 and returned in each array's own dtype."""
    rng = secure_rng() if rng is None else rng
    return {
        name: (a.astype(np.float64) + rng.normal(0.0, stddev, size=a.shape)).astype(a.dtype)
        for name, a in float_arrays(update).items()
    }


def add_central_noise(
    summed_update: Update,
    *,
    noise_multiplier: float,
    clip_norm: float,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Add N(0, (noise_multiplier * clip_norm)^2) to every coordinate of a sum."""
    _check_scale(noise_multiplier, clip_norm)
    return _add_gaussian(summed_update, noise_multiplier * clip_norm, rng)


def distributed_noise_stddev(
    *, noise_multiplier: float, clip_norm: float, min_clients: int
) -> float:
    """Per-client noise std so that any `min_clients` of them reach sigma * C."""
    _check_scale(noise_multiplier, clip_norm)
    if min_clients < 1:
        raise ValueError(f"min_clients must be >= 1, got {min_clients}")
    return noise_multiplier * clip_norm / math.sqrt(min_clients)


def add_distributed_noise(
    update: Update,
    *,
    noise_multiplier: float,
    clip_norm: float,
    min_clients: int,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Client side: add this client's share of the noise to its clipped update."""
    stddev = distributed_noise_stddev(
        noise_multiplier=noise_multiplier, clip_norm=clip_norm, min_clients=min_clients
    )
    return _add_gaussian(update, stddev, rng)


def realized_noise_multiplier(
    *, noise_multiplier: float, min_clients: int, num_contributors: int
) -> float:
    """Noise multiplier the summed distributed noise actually has.

    `num_contributors` clients each added std sigma * C / sqrt(min_clients), so the
    sum has sigma * sqrt(num_contributors / min_clients). Tell the accountant this,
    not the target: it is below the target when fewer than `min_clients`
    survived (the round still cost privacy) and above it otherwise.
    """
    if min_clients < 1 or num_contributors < 1:
        raise ValueError(
            f"min_clients and num_contributors must be >= 1, got {min_clients} "
            f"and {num_contributors}"
        )
    check_noise_multiplier(noise_multiplier)
    return noise_multiplier * math.sqrt(num_contributors / min_clients)
