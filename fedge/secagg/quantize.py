"""Stochastic fixed-point encoding of weighted updates into Z_{2^32}.

A client with weight n_k <= W and update Δ (|Δ_i| <= R after clipping) encodes
x = n_k·Δ as signed integer levels in [-A, A], A = floor((2^31 - 1) / (2N)), with
step s = W·R / A, stored mod 2^32. Any sum of at most N such vectors lies in
[-N·A, N·A], half of int32, and decodes exactly, so no dropout pattern can
overflow. The other half is headroom against a malicious client, which may
upload any uint32 levels: a decoded coordinate beyond N·A (`honest_limit`)
proves that the sum wrapped or that a level was out of range, and the server
refuses it (fedge.server_app.robust.SecureBounds). Rounding is stochastic
(unbiased to within 2^-32), with CSPRNG uniforms, so each client's error is
below one step and the decoded sum of m <= N clients is off by less than m·s
per coordinate: `quantization_error_bound` is N·s.

n_k itself travels exactly as one extra entry; N·W < 2^32 follows from the
resolution rule below. A configuration is refused when a weight-1 update would
get fewer than 2^MIN_RESOLUTION_BITS levels on each side of zero, i.e. when
s > R / 2^MIN_RESOLUTION_BITS, which happens once N·W exceeds about 2^22.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from numbers import Integral

import numpy as np
from numpy.typing import NDArray

from fedge.secagg.crypto import KEY_BYTES, KeystreamBlocks

MIN_RESOLUTION_BITS = 8
ENCODE_BLOCK = 1 << 16  # values per block: 1 MiB of float64 temporaries, within L2
_MAX_SUM = 2**31 - 1
HEADROOM_BITS = 1  # honest sums use 2^-HEADROOM_BITS of the int32 range


@dataclass(frozen=True)
class Quantizer:
    """Encoding shared by all clients of a round; construction refuses unsafe settings."""

    clip_range: float
    max_weight: int
    num_clients: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be a positive finite float, got {self.clip_range}")
        if self.max_weight < 1 or self.num_clients < 1:
            raise ValueError("max_weight and num_clients must be at least 1")
        if self.max_level < self.max_weight << MIN_RESOLUTION_BITS:
            raise ValueError(
                f"num_clients={self.num_clients} x max_weight={self.max_weight} is too "
                "large for 32-bit secure aggregation: the sum could not be kept below "
                f"2^{31 - HEADROOM_BITS} with a step finer than "
                f"clip_range/2^{MIN_RESOLUTION_BITS} for a weight-1 client "
                "(num_clients*max_weight must be at most "
                f"{_MAX_SUM >> (MIN_RESOLUTION_BITS + HEADROOM_BITS)}). Lower max_weight "
                "(cap or rescale the example counts n_k) or aggregate fewer clients per round."
            )

    @property
    def max_level(self) -> int:
        """A: largest |level| one client may contribute."""
        return _MAX_SUM // (self.num_clients << HEADROOM_BITS)

    @property
    def step(self) -> float:
        """s: value of one level of n_k·Δ."""
        return self.max_weight * self.clip_range / self.max_level

    @property
    def honest_limit(self) -> float:
        """Largest |coordinate| of a decoded sum of at most N in-range encodings."""
        return self.num_clients * self.max_level * self.step

    @property
    def error_bound(self) -> float:
        """Per-coordinate bound on |decoded sum - Σ n_k·Δ_k| for up to N clients."""
        return self.num_clients * self.step

    def encode(self, update: NDArray[np.floating], weight: int) -> NDArray[np.uint32]:
        """Levels of weight·clip(update) followed by the weight, as uint32 (len + 1).

        Weights above max_weight are capped to it: the cap is what bounds the sum.
        """
        if update.ndim != 1 or not np.all(np.isfinite(update)):
            raise ValueError("update must be a 1-D array of finite floats")
        if isinstance(weight, bool) or not isinstance(weight, Integral) or weight < 0:
            raise ValueError(f"weight must be a non-negative integer, got {weight!r}")
        capped = min(int(weight), self.max_weight)
        scale, limit = capped / self.step, float(self.max_level)
        encoded = np.empty(update.size + 1, dtype=np.uint32)
        levels_out = encoded[:-1].view(np.int32)  # two's complement = mod 2^32
        # Block by block, so that the float64 temporaries stay in cache: at
        # model size that halves the time of whole-vector passes.
        block = max(1, min(ENCODE_BLOCK, update.size))  # an empty update encodes its weight
        uniforms = KeystreamBlocks(os.urandom(KEY_BYTES), block)
        scaled_block, levels_block = np.empty(block), np.empty(block)
        for start in range(0, update.size, block):
            stop = min(start + block, update.size)
            scaled, levels = scaled_block[: stop - start], levels_block[: stop - start]
            np.clip(
                update[start:stop], -self.clip_range, self.clip_range, out=scaled, dtype=np.float64
            )
            scaled *= scale
            np.floor(scaled, out=levels)
            scaled -= levels  # the fractional part f: round up with this probability,
            scaled *= 2.0**32  # as u < f·2^32 does for CSPRNG uniforms u (to within 2^-32)
            levels += uniforms.next(stop - start) < scaled
            np.clip(levels, -limit, limit, out=levels)
            # integral and within int32, so the cast is exact
            np.copyto(levels_out[start:stop], levels, casting="unsafe")
        encoded[-1] = capped
        return encoded

    def decode(self, total: NDArray[np.uint32]) -> tuple[NDArray[np.float64], int]:
        """Σ n_k·Δ_k and Σ n_k from the (unmasked) sum of encodings."""
        weighted_sum = total[:-1].view(np.int32).astype(np.float64) * self.step
        return weighted_sum, int(total[-1])


def quantization_error_bound(num_clients: int, max_weight: int, clip_range: float) -> float:
    """Worst-case per-coordinate error of the decoded Σ n_k·Δ_k (inputs within range)."""
    return Quantizer(clip_range, max_weight, num_clients).error_bound
