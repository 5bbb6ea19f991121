"""Types and argument checks shared by the privacy modules."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Update = Mapping[str, np.ndarray]


def float_arrays(update: Update) -> dict[str, np.ndarray]:
    """The update's arrays, refusing non-float ones.

    Clipping or noising an integer buffer would silently leave it unprotected,
    so such an update is a caller error rather than something to pass through.
    """
    arrays = {name: np.asarray(value) for name, value in update.items()}
    rejected = [n for n, a in arrays.items() if not np.issubdtype(a.dtype, np.floating)]
    if rejected:
        raise TypeError(f"DP needs floating-point arrays; not floating: {rejected}")
    return arrays


def check_noise_multiplier(noise_multiplier: float) -> None:
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
