"""Bounding one client's influence on the global model.

Without SecAgg the server sees every update, so it bounds each one before
aggregating (`InfluenceBound`): an update's L2 norm is clipped to a multiple of
the round's median update norm and its weight n_k capped at a multiple of the
round's median n_k (by default 1×: on digits that cost honest training nothing
measurable while 2× let an update at the bound cost 4.7 points; see
docs/benchmarks.md, "Bounded client influence"). While fewer than half of the
replies are malicious both
medians lie within the honest range, so a single client moves the weighted
mean by at most `weight share × norm bound`, whatever it sends. Optional robust
aggregators (coordinate-wise trimmed mean or median, unweighted as in Flower's
FedTrimmedAvg) replace the weighted mean.

Under SecAgg+ the server sees only Σ n_k·Δ_k and Σ n_k, so `SecureBounds`
checks the sum instead: the weight total must be one an honest set of
survivors can produce and the sum's norm must not exceed what updates clipped
to C allow (plus quantization error and, distributed DP, the clients' noise).
A sum that fails is not applied. What stays possible is any contribution that
keeps the sum in bounds: a client at the maximum weight steers the mean by its
weight share × C in any direction, and more when honest updates partly cancel
(a ×10 sign flip of a clipped update passed the check on digits), or it makes
every round fail. `fedge.server_app.acceptance` then judges the resulting model
on server-held data; bounding each input needs zero-knowledge range proofs (out
of scope).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from logging import INFO

import numpy as np
from flwr.common.logger import log
from scipy.stats import trim_mean

from fedge.privacy.clipping import clip_update, global_norm
from fedge.records import NamedArrays
from fedge.server_app.aggregation import weighted_mean

AGGREGATORS = ("mean", "trimmed-mean", "median")
NOISE_TAIL = 10.0
"""‖z‖ ≤ σ(√d + t) fails with probability ≤ exp(−t²/2) for z ~ N(0, σ²I_d)
(Laurent & Massart 2000): t = 10 makes a false rejection a 2e-22 event."""


def _stacked(updates: list[NamedArrays]) -> dict[str, np.ndarray]:
    """Per array name, the updates that carry it stacked on axis 0 (float64)."""
    names: dict[str, list[np.ndarray]] = {}
    for update in updates:
        for name, value in update.items():
            names.setdefault(name, []).append(value.astype(np.float64))
    return {name: np.stack(values) for name, values in names.items()}


def trimmed_mean(updates: list[NamedArrays], fraction: float) -> NamedArrays:
    """Coordinate-wise mean after cutting the `fraction` largest and smallest values."""
    return {name: trim_mean(s, fraction, axis=0) for name, s in _stacked(updates).items()}


def coordinate_median(updates: list[NamedArrays]) -> NamedArrays:
    """Coordinate-wise median of the updates."""
    return {name: np.median(s, axis=0) for name, s in _stacked(updates).items()}


@dataclass(frozen=True)
class InfluenceBound:
    """Clip norms and cap weights relative to the round's medians, then aggregate.

    `norm_factor` / `weight_factor` of 0 turn that bound off; `aggregator` is
    one of AGGREGATORS.
    """

    norm_factor: float = 1.0
    weight_factor: float = 1.0
    aggregator: str = "mean"
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")

    def bounds(self, updates: list[NamedArrays]) -> list[float]:
        """Each update's L2 bound: norm_factor × √Σ (median norm of each array it carries)².

        For full updates that is about the median update norm. Taking the median per
        array keeps head-only (edge) updates comparable with full ones, and a client
        cannot move a median by sending arrays no one else sends: validation refuses
        names outside the global model, and each median spans every carrier.
        """
        norms: dict[str, list[float]] = {}
        for update in updates:
            for name, value in update.items():
                norms.setdefault(name, []).append(global_norm({name: value}))
        medians = {name: float(np.median(values)) for name, values in norms.items()}
        return [self.norm_factor * math.sqrt(sum(medians[n] ** 2 for n in u)) for u in updates]

    def bounded_updates(self, updates: list[NamedArrays]) -> list[NamedArrays]:
        """Every update clipped to its bound (see `bounds`)."""
        if self.norm_factor <= 0:
            return updates
        bounded, clipped = [], 0
        for update, bound in zip(updates, self.bounds(updates), strict=True):
            if global_norm(update) <= bound:
                bounded.append(update)
                continue
            clipped += 1
            if bound > 0:
                bounded.append(clip_update(update, bound)[0])
            else:  # most clients sent zeros for these arrays: so may this one
                bounded.append({name: np.zeros_like(value) for name, value in update.items()})
        if clipped:
            log(INFO, "Clipped %s of %s updates to the round's norm bound", clipped, len(updates))
        return bounded

    def bounded_weights(self, weights: list[float]) -> list[float]:
        """Every n_k capped at weight_factor × the median n_k."""
        if self.weight_factor <= 0:
            return weights
        cap = self.weight_factor * float(np.median(weights))
        capped = sum(weight > cap for weight in weights)
        if capped:
            log(INFO, "Capped %s of %s weights at %.4g examples", capped, len(weights), cap)
        return [min(weight, cap) for weight in weights]

    def aggregate(self, updates: list[NamedArrays], weights: list[float]) -> NamedArrays:
        """The round's mean update, with every client's influence bounded."""
        bounded = self.bounded_updates(updates)
        if self.aggregator == "trimmed-mean":
            return trimmed_mean(bounded, self.trim_fraction)
        if self.aggregator == "median":
            return coordinate_median(bounded)
        return weighted_mean(bounded, self.bounded_weights(weights))


@dataclass(frozen=True)
class SecureBounds:
    """What an honest SecAgg+ sum can look like, for one round's encoding.

    Honest clients clip Δ_k to L2 norm `clip_norm`, so ‖Σ n_k·Δ_k‖ ≤ (Σ n_k)·C;
    each client's distributed-DP noise adds ‖z_k‖ ≤ σ(√d + t) (NOISE_TAIL);
    `error_bound` is the quantizer's per-coordinate error on the decoded sum and
    `honest_limit` the largest |coordinate| honest encodings can sum to (beyond
    it the sum wrapped). Under DP every weight is 1 (`equal_weights`).
    """

    clip_norm: float
    max_weight: int
    equal_weights: bool
    error_bound: float
    honest_limit: float
    noise_stddev: float = 0.0

    def problem(self, weighted_sum: np.ndarray, total_weight: int, survivors: int) -> str | None:
        """Why this unmasked sum must not be applied, or None."""
        if self.equal_weights and total_weight != survivors:
            return f"weight total {total_weight} != {survivors} survivors (every weight is 1)"
        high = survivors * self.max_weight
        if not survivors <= total_weight <= high:
            return f"weight total {total_weight} outside [{survivors}, {high}] (survivors × 1..W)"
        largest = float(np.max(np.abs(weighted_sum), initial=0.0))
        if not largest <= self.honest_limit:
            return f"a coordinate ({largest:.4g}) is beyond any honest sum: levels out of range"
        d = weighted_sum.size
        noise = survivors * self.noise_stddev * (math.sqrt(d) + NOISE_TAIL)
        allowed = total_weight * self.clip_norm + self.error_bound * math.sqrt(d) + noise
        norm = global_norm({"sum": weighted_sum})
        if not norm <= allowed:
            return (
                f"sum norm {norm:.4g} exceeds {allowed:.4g}, the most {survivors} updates "
                f"clipped to {self.clip_norm:.4g} can reach"
            )
        return None
