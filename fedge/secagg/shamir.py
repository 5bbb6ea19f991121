"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

The Mersenne prime 2^521 - 1 exceeds every 32-byte secret, so one field element
carries a whole secret and a share is a single fixed-size integer. Share holders
are identified by their x-coordinate (a distinct non-zero integer).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)
MAX_SECRET_BYTES = 65  # 520 bits always fit below PRIME


def split(secret: bytes, xs: Sequence[int], threshold: int) -> list[bytes]:
    """Share `secret` so that any `threshold` of the returned shares (one per x) recover it."""
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"secret of {len(secret)} bytes exceeds {MAX_SECRET_BYTES}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("x-coordinates must be distinct and in [1, PRIME)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [_evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in xs]


def combine(points: Mapping[int, bytes], secret_bytes: int) -> bytes:
    """Interpolate the shares `{x: share}` at zero and return the secret.

    Exactly the polynomial's degree + 1 points (the threshold) are needed; fewer
    give an unrelated field element, which callers detect with a commitment.
    Raises ValueError when a share is malformed or the result cannot be a secret
    of `secret_bytes` bytes.
    """
    if not points:
        raise ValueError("no shares to combine")
    secret = _interpolate(points, 0)
    if secret.bit_length() > 8 * secret_bytes:
        raise ValueError("shares do not interpolate to a secret of the expected size")
    return secret.to_bytes(secret_bytes, "big")


def share_at(points: Mapping[int, bytes], x: int) -> bytes:
    """The share at `x` of the polynomial through `points` (to check another holder's share).

    With `threshold` correct points this is the share an honest holder at `x`
    has; any other value is a wrong share.
    """
    if not points or not 0 < x < PRIME:
        raise ValueError("need shares and an x-coordinate in [1, PRIME)")
    return _interpolate(points, x).to_bytes(SHARE_BYTES, "big")


def share_is_valid(share: bytes) -> bool:
    """Whether `share` encodes a field element (so parsers can reject it early)."""
    return len(share) == SHARE_BYTES and int.from_bytes(share, "big") < PRIME


def _interpolate(points: Mapping[int, bytes], x: int) -> int:
    """Lagrange interpolation of the shares `{x_j: share}` at `x`."""
    ys = {xj: _decode(share) for xj, share in points.items()}
    if any(not 0 < xj < PRIME for xj in ys):
        raise ValueError("x-coordinates must be in [1, PRIME)")
    value = 0
    for xj, yj in ys.items():
        numerator, denominator = 1, 1
        for xm in ys:
            if xm != xj:
                numerator = numerator * (xm - x) % PRIME
                denominator = denominator * (xm - xj) % PRIME
        value = (value + yj * numerator * pow(denominator, -1, PRIME)) % PRIME
    return value


def _decode(share: bytes) -> int:
    if not share_is_valid(share):
        raise ValueError("malformed share")
    return int.from_bytes(share, "big")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result
