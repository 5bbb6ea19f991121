"""Bounding each client's contribution: global L2 clipping and adaptive clip norms.

User-level DP needs every client's update to have L2 norm at most C so that
adding or removing one client moves the sum by at most C (the sensitivity the
Gaussian noise is calibrated to).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from fedge.privacy._common import Update, check_positive, float_arrays
from fedge.privacy.noise import secure_rng

logger = logging.getLogger(__name__)

# Scaling to exactly C and rounding back to float32 can land a hair above C, which
# would break the sensitivity bound; aim this much below C instead (see clip_update).
_MIN_MARGIN = 1e-6


def global_norm(update: Update) -> float:
    """L2 norm of all arrays flattened together, accumulated in float64."""
    # A plain sum of squares, not np.linalg.norm: BLAS threads cost far more than
    # the arithmetic for update-sized vectors on a busy small CPU.
    squares = (float(np.sum(np.square(a, dtype=np.float64))) for a in float_arrays(update).values())
    return math.sqrt(sum(squares))


def _rounding_margin(arrays: Mapping[str, np.ndarray]) -> float:
    """Relative shortfall that keeps the clipped norm <= C after rounding.

    Elementwise rounding to dtype moves the norm by at most eps/2 relative; 4*eps
    covers that, and the 1e-6 floor covers float64 error in computing the norm.
    """
    coarsest = max((np.finfo(a.dtype).eps for a in arrays.values()), default=0.0)
    return max(_MIN_MARGIN, 4.0 * float(coarsest))


def clip_update(update: Update, clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale `update` so its global L2 norm is <= `clip_norm`.

    Returns the clipped arrays (same names and dtypes; copies of the input when
    it is already within the bound) and the norm before clipping, which adaptive
    clipping needs. A clipped update's norm lies in [C * (1 - margin), C] with a
    margin of 1e-6 for float32/float64. Non-finite updates raise ValueError: their
    contribution cannot be bounded, so the caller must drop that client.
    """
    check_positive("clip_norm", clip_norm)
    arrays = float_arrays(update)
    norm = global_norm(arrays)
    if not math.isfinite(norm):
        raise ValueError("update contains non-finite values and cannot be clipped")
    if norm <= clip_norm:
        return {name: a.copy() for name, a in arrays.items()}, norm
    scale = clip_norm / norm * (1.0 - _rounding_margin(arrays))
    clipped = {name: (a.astype(np.float64) * scale).astype(a.dtype) for name, a in arrays.items()}
    return clipped, norm


@dataclass(frozen=True)
class AdaptiveClipping:
    """Clip norm that tracks a quantile of client update norms (Andrew et al. 2021).

    Each round every participating client reports whether its update norm was
    <= `clip_norm` (the same test `clip_update` uses). The server noises the
    count with N(0, count_stddev^2) and moves C geometrically towards the
    `target_quantile` of norms: C <- C * exp(-learning_rate * (b - target)), where
    b is the noised fraction of unclipped clients. Immutable; `to_dict` is the
    checkpoint state. The paper suggests count_stddev = expected_clients / 20;
    `default_count_stddev` raises that where the update noise would not exist.
    """

    clip_norm: float
    count_stddev: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2

    def __post_init__(self) -> None:
        check_positive("clip_norm", self.clip_norm)
        if not self.count_stddev >= 0:
            raise ValueError(f"count_stddev must be >= 0, got {self.count_stddev}")
        if not 0 <= self.target_quantile <= 1:
            raise ValueError(f"target_quantile must be in [0, 1], got {self.target_quantile}")
        if not self.learning_rate >= 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")

    @staticmethod
    def default_count_stddev(expected_clients: int, noise_multiplier: float) -> float:
        """expected_clients / 20 (the paper's choice), but at least σ.

        The count must satisfy 2 * count_stddev > σ (see `check_count_stddev`); m / 20
        does not for m <= 20 * σ / 2 (10 clients at σ = 1). At least σ keeps the update's
        own multiplier within 2 / sqrt(3) ≈ 1.15 σ.
        """
        return max(expected_clients / 20, noise_multiplier)

    @staticmethod
    def check_count_stddev(count_stddev: float, noise_multiplier: float) -> None:
        """The count query alone must not spend the round: 2 * count_stddev > σ > 0."""
        if not 2.0 * count_stddev > noise_multiplier > 0:
            raise ValueError(
                f"adaptive clipping needs 0 < noise_multiplier < 2 * count_stddev, got "
                f"noise_multiplier {noise_multiplier} with count_stddev {count_stddev}: "
                f"set dp-count-stddev above {noise_multiplier / 2:g} (or 0 for the default)"
            )

    def update_noise_multiplier(self, noise_multiplier: float) -> float:
        """Noise multiplier for the update sum so the round costs `noise_multiplier`.

        The count query (centred bits, sensitivity 1/2) also spends privacy;
        the pair is a Gaussian mechanism with z^-2 = z_update^-2 + (2 count_stddev)^-2,
        so the accountant is told `noise_multiplier` while the sum uses the larger
        z_update returned here.
        """
        self.check_count_stddev(self.count_stddev, noise_multiplier)
        return (noise_multiplier**-2 - (2.0 * self.count_stddev) ** -2) ** -0.5

    def update(
        self,
        unclipped_count: float,
        num_reports: int,
        *,
        expected_clients: int,
        rng: np.random.Generator | None = None,
    ) -> AdaptiveClipping:
        """The state for the next round, from this round's reports.

        The count is centred (sum of b_i - 1/2, sensitivity 1/2 under adding or
        removing a client) and normalised by the public `expected_clients`, not the
        number of reports, which itself depends on who took part.

        A count outside [0, num_reports] can only come from clients that misreported
        their bit; it is clamped into the range (logged), so the clip norm moves at most
        one step and the round goes on. A non-finite count leaves the clip norm as it is.
        """
        if expected_clients < 1:
            raise ValueError(f"expected_clients must be >= 1, got {expected_clients}")
        if not math.isfinite(unclipped_count):
            logger.warning("ignoring a non-finite unclipped count %r", unclipped_count)
            return self
        if not 0 <= unclipped_count <= num_reports:
            logger.warning(
                "unclipped count %r is outside [0, %s] (a client misreported dp-unclipped); "
                "clamped",
                unclipped_count,
                num_reports,
            )
            unclipped_count = min(max(unclipped_count, 0), num_reports)
        rng = secure_rng() if rng is None else rng
        centred = unclipped_count - num_reports / 2 + rng.normal(0.0, self.count_stddev)
        fraction = min(1.0, max(0.0, centred / expected_clients + 0.5))
        step = -self.learning_rate * (fraction - self.target_quantile)
        return replace(self, clip_norm=self.clip_norm * math.exp(step))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> AdaptiveClipping:
        return cls(**{name: float(state[name]) for name in cls.__dataclass_fields__})
