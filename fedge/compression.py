"""Compressed update encodings: numpy only (no torch, no Flower), shared by both sides.

An update travels as one flat vector (the model's arrays in the global model's
order), encoded as a few arrays whose dtypes and shapes follow from the model's
size and the `Encoding` alone, so the server can check every byte count before
it decodes anything:

- `int8` / `int4`: unbiased stochastic rounding to 2·127+1 / 2·7+1 levels with one
  float32 scale per block of `BLOCK` values (int4 packs two values per byte);
  optionally after a randomized Hadamard rotation per block, whose signs come from
  `rotation_seed` (public: the round and the global model's digest), so the server
  inverts it. Expected bytes/param: 1 + 4/BLOCK (int8), 0.5 + 4/BLOCK (int4).
- `topk`: the ⌈fraction·d⌉ largest-magnitude values and their int32 indices
  (8 bytes per kept value); the client keeps what it did not send (error feedback).

With a clip norm the client scales what it encodes so the *decoded* vector's norm
is at most the clip norm: stochastic rounding can lengthen a vector, and the
server's clip check measures the decoded update.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

SCHEMES = ("none", "int8", "int4", "topk")
BLOCK = 256
"""Values per quantization scale and per Hadamard rotation (a power of two; a
constant, not a key: 4/256 = 0.016 bytes/param of scales, and rotation pads at most
BLOCK - 1 values)."""
LEVELS = {"int8": 127, "int4": 7}
INT4_OFFSET = 8
CLIP_MARGIN = 1e-6
"""Relative room left under the clip norm for float32 rounding of scales and values."""

QUANTIZED = "q"
SCALES = "scale"
INDICES = "index"
VALUES = "value"
"""Names of the encoded arrays in a compressed reply's ArrayRecord."""


@dataclass(frozen=True)
class Encoding:
    """How updates are encoded this run (the server's `update-compression` keys)."""

    scheme: str
    rotation: bool = False
    topk_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"update-compression must be one of {list(SCHEMES)}")
        if not 0 < self.topk_fraction <= 1:
            raise ValueError(f"topk-fraction must be in (0, 1], got {self.topk_fraction!r}")
        if self.rotation and self.scheme not in LEVELS:
            raise ValueError("update-rotation=true needs update-compression int8 or int4")

    def kept(self, size: int) -> int:
        """How many values top-k sends of a `size`-value update."""
        return min(size, max(1, math.ceil(self.topk_fraction * size)))

    def layout(self, size: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The exact dtype and shape of every encoded array for a `size`-value update."""
        if self.scheme == "topk":
            kept = (self.kept(size),)
            return {INDICES: (np.dtype(np.int32), kept), VALUES: (np.dtype(np.float32), kept)}
        blocks = -(-size // BLOCK)
        packed = blocks * BLOCK // (2 if self.scheme == "int4" else 1)
        dtype = np.dtype(np.uint8 if self.scheme == "int4" else np.int8)
        return {QUANTIZED: (dtype, (packed,)), SCALES: (np.dtype(np.float32), (blocks,))}


def rotation_seed(server_round: int, digest: str) -> int:
    """The rotation's seed, from values both sides know: the round and the model digest."""
    return int.from_bytes(hashlib.blake2b(f"{server_round}:{digest}".encode()).digest()[:8])


def _signs(seed: int, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=shape)


def _hadamard(blocks: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform of each row (its own inverse)."""
    rows, width = blocks.shape
    out = blocks
    half = 1
    while half < width:
        pairs = out.reshape(rows, -1, 2, half)
        out = np.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), 2)
        half *= 2
    return out.reshape(rows, width) / math.sqrt(width)


def _blocks(vector: np.ndarray) -> np.ndarray:
    padded = np.zeros(-(-vector.size // BLOCK) * BLOCK)
    padded[: vector.size] = vector
    return padded.reshape(-1, BLOCK)


def _within(values: np.ndarray, clip: float | None) -> float:
    """The factor that brings `values` (float64) to norm clip·(1 − margin), or 1."""
    norm = float(np.linalg.norm(values))
    if clip is None or norm <= clip * (1 - CLIP_MARGIN):
        return 1.0
    return clip * (1 - CLIP_MARGIN) / norm


def _quantize(
    vector: np.ndarray, encoding: Encoding, rng: np.random.Generator, seed: int, clip: float | None
) -> dict[str, np.ndarray]:
    levels = LEVELS[encoding.scheme]
    blocks = _blocks(vector)
    if encoding.rotation:
        blocks = _hadamard(blocks * _signs(seed, blocks.shape))
    peak = np.abs(blocks).max(axis=1)
    scales = (peak / levels).astype(np.float32)
    # float32 rounding must not shrink a scale below peak/levels (values would leave the grid)
    scales = np.where(scales.astype(np.float64) * levels < peak, np.nextafter(scales, 1), scales)
    safe = np.where(scales > 0, scales, 1).astype(np.float64)
    scaled = blocks / safe[:, None]
    q = np.clip(np.floor(scaled + rng.random(scaled.shape)), -levels, levels)
    scales = (scales * np.float32(_within(q * scales[:, None], clip))).astype(np.float32)
    if encoding.scheme == "int8":
        return {QUANTIZED: q.astype(np.int8).ravel(), SCALES: scales}
    nibbles = (q.ravel() + INT4_OFFSET).astype(np.uint8)
    return {QUANTIZED: nibbles[0::2] | (nibbles[1::2] << 4), SCALES: scales}


def _top_k(vector: np.ndarray, encoding: Encoding, clip: float | None) -> dict[str, np.ndarray]:
    kept = encoding.kept(vector.size)
    index = np.sort(np.argpartition(np.abs(vector), vector.size - kept)[vector.size - kept :])
    values = vector[index]
    values = (values * _within(values, clip)).astype(np.float32)
    return {INDICES: index.astype(np.int32), VALUES: values}


def encode(
    vector: np.ndarray,
    encoding: Encoding,
    *,
    rng: np.random.Generator,
    seed: int,
    clip: float | None = None,
) -> dict[str, np.ndarray]:
    """`vector` (1-D) encoded; decoded, its norm is at most `clip` (if given).

    `rng` draws the rounding (the client's own); `seed` is `rotation_seed`.
    """
    if encoding.scheme == "topk":
        return _top_k(vector.astype(np.float64), encoding, clip)
    if encoding.scheme in LEVELS:
        return _quantize(vector.astype(np.float64), encoding, rng, seed, clip)
    raise ValueError(f"update-compression={encoding.scheme!r} sends arrays unencoded")


def problem(parts: dict[str, np.ndarray], encoding: Encoding, size: int) -> str | None:
    """Why arrays of the right dtypes and shapes (`Encoding.layout`) still cannot be
    decoded, or None: a scale that is not finite and >= 0, a value that is not
    finite, an index outside [0, size) or not strictly increasing."""
    if encoding.scheme == "topk":
        index = parts[INDICES]
        if index.size and (index[0] < 0 or index[-1] >= size):
            return f"top-k indices must lie in [0, {size})"
        if np.any(np.diff(index) <= 0):
            return "top-k indices must be strictly increasing (no repeats)"
        if not np.isfinite(parts[VALUES]).all():
            return "top-k values contain NaN or Inf"
        return None
    scales = parts[SCALES]
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        return "quantization scales must be finite and >= 0"
    return None


def decode(parts: dict[str, np.ndarray], encoding: Encoding, size: int, seed: int) -> np.ndarray:
    """The float64 vector of `size` values that checked `parts` encode."""
    if encoding.scheme == "topk":
        vector = np.zeros(size)
        vector[parts[INDICES]] = parts[VALUES]
        return vector
    q = parts[QUANTIZED]
    if encoding.scheme == "int4":
        q = np.stack((q & 15, q >> 4), axis=1).ravel().astype(np.int16) - INT4_OFFSET
    blocks = q.astype(np.float64).reshape(-1, BLOCK) * parts[SCALES].astype(np.float64)[:, None]
    if encoding.rotation:
        blocks = _hadamard(blocks) * _signs(seed, blocks.shape)
    return blocks.ravel()[:size]
