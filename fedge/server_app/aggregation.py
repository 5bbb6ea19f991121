"""Weighted mean of client updates, applied as w + η·Σ(n_k/n)Δ_k (with momentum)."""

from __future__ import annotations

import numpy as np

from fedge.records import NamedArrays


def weighted_mean(updates: list[NamedArrays], weights: list[float]) -> NamedArrays:
    """Σ (n_k/n) Δ_k for every array name, over the updates that carry that name.

    Full-model updates (torch clients) and head-only updates (edge clients)
    therefore mix in one round: n counts only the examples behind each array.
    Accumulated in float64 so summation order barely matters.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    if any(weight <= 0 for weight in weights):
        raise ValueError("every weight must be positive")
    sums: dict[str, np.ndarray] = {}
    totals: dict[str, float] = {}
    for update, weight in zip(updates, weights, strict=True):
        for name, value in update.items():
            if name not in sums:
                sums[name] = np.zeros(value.shape, dtype=np.float64)
                totals[name] = 0.0
            sums[name] += value.astype(np.float64) * weight
            totals[name] += weight
    return {name: total / totals[name] for name, total in sums.items()}


def summed(updates: list[NamedArrays]) -> NamedArrays:
    """Σ Δ_k per array name in float64 (equal weights: what DP noise is calibrated to)."""
    total: NamedArrays = {}
    for update in updates:
        for name, value in update.items():
            total[name] = total.get(name, 0.0) + value.astype(np.float64)
    return total


def apply_update(
    global_arrays: NamedArrays,
    mean_update: NamedArrays,
    server_lr: float,
    server_momentum: float,
    velocity: NamedArrays | None,
) -> tuple[NamedArrays, NamedArrays | None]:
    """New global weights (original dtypes) and the new momentum buffer (None if unused)."""
    if server_momentum > 0:
        previous = velocity or {}
        velocity = dict(previous)
        for name, step in mean_update.items():
            velocity[name] = server_momentum * previous.get(name, 0.0) + step
        step_of = velocity
    else:
        step_of = mean_update
    updated = {
        name: (value.astype(np.float64) + server_lr * step_of[name]).astype(value.dtype)
        if name in mean_update
        else value
        for name, value in global_arrays.items()
    }
    return updated, velocity if server_momentum > 0 else None
