"""Public round parameters and the neighbour graph every party derives from them.

The graph is a ring over the participants in a pseudo-random order fixed by the
public round seed; each node's neighbourhood is the `num_shares` consecutive
ring positions centred on it, itself included (so it has num_shares - 1
pairwise masks and keeps one of the num_shares shares of its own secrets).
A ring window is symmetric, so "j masks with i" always implies "i masks with
j". num_shares must therefore be odd, unless it equals the number of
participants (complete graph). The threshold t must exceed num_shares / 2, so
that no t holders can be found for both kinds of shares of the same client
when each holder reveals only one kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from fedge.secagg.crypto import digest, node_bytes
from fedge.secagg.errors import ProtocolError
from fedge.secagg.messages import (
    MAX_NODE_ID,
    StateDict,
    read_bytes,
    read_float,
    read_ids,
    read_int,
)
from fedge.secagg.quantize import Quantizer

MIN_ROUND_SEED_BYTES = 16


@dataclass(frozen=True)
class SecAggParams:
    """Everything public about a round; construction validates it as a whole."""

    participants: tuple[int, ...]
    num_shares: int
    threshold: int
    vector_length: int
    clip_range: float
    max_weight: int
    round_seed: bytes

    def __post_init__(self) -> None:
        ids, n = self.participants, len(self.participants)
        if list(ids) != sorted(set(ids)) or any(not 0 <= i <= MAX_NODE_ID for i in ids):
            raise ValueError("participants must be distinct unsigned 64-bit ids, sorted")
        if n < 2:
            raise ValueError(f"secure aggregation needs at least 2 participants, got {n}")
        if not 2 <= self.num_shares <= n or (self.num_shares % 2 == 0 and self.num_shares != n):
            raise ValueError(
                f"num_shares={self.num_shares} must be odd and in [3, {n}], or equal "
                f"the number of participants ({n})"
            )
        if not self.num_shares // 2 < self.threshold <= self.num_shares:
            raise ValueError(
                f"threshold={self.threshold} must be in ({self.num_shares}/2, "
                f"{self.num_shares}] so no one can collect both shares of a client"
            )
        if self.vector_length < 1:
            raise ValueError(f"vector_length must be positive, got {self.vector_length}")
        if len(self.round_seed) < MIN_ROUND_SEED_BYTES:
            raise ValueError(f"round_seed must have at least {MIN_ROUND_SEED_BYTES} bytes")
        _ = self.quantizer  # refuse overflow-prone settings now, not mid-round

    @cached_property
    def quantizer(self) -> Quantizer:
        return Quantizer(self.clip_range, self.max_weight, len(self.participants))

    @cached_property
    def ring(self) -> tuple[int, ...]:
        """Participants in ring order, a pseudo-random permutation fixed by the round seed."""
        return tuple(
            sorted(
                self.participants, key=lambda i: digest(b"graph", self.round_seed, node_bytes(i))
            )
        )

    @cached_property
    def _ring_position(self) -> dict[int, int]:
        return {node: position for position, node in enumerate(self.ring)}

    @cached_property
    def _x_coordinates(self) -> dict[int, int]:
        return {node: index + 1 for index, node in enumerate(self.participants)}

    def neighbours(self, node: int) -> tuple[int, ...]:
        """Sorted ids of `node`'s share holders and mask partners, `node` included."""
        n = len(self.participants)
        if self.num_shares == n:
            return self.participants
        position, half = self._ring_position[node], self.num_shares // 2
        return tuple(sorted(self.ring[(position + d) % n] for d in range(-half, half + 1)))

    @cached_property
    def signature_quorum(self) -> int:
        """Signatures on one survivor set a holder needs before it reveals any share.

        A strict majority of the participants (and at least t), counted over all
        participants rather than one neighbourhood: any two sets that reach it
        share a signer, and an honest client signs once per round, so every
        honest holder unmasks against the same survivor set unless at least
        2·quorum − n signers collude with the server. A neighbourhood quorum
        would not give that in a sparse graph, where two holders' neighbourhoods
        can be disjoint.
        """
        return max(self.threshold, len(self.participants) // 2 + 1)

    def holder(self, x: int) -> int:
        """The node whose shares sit at Shamir x-coordinate `x` (inverse of x_coordinate)."""
        return self.participants[x - 1]

    def x_coordinate(self, node: int) -> int:
        """Shamir x-coordinate of the shares `node` holds (its 1-based rank)."""
        return self._x_coordinates[node]

    def to_payload(self) -> StateDict:
        return {
            "participants": list(self.participants),
            "num_shares": self.num_shares,
            "threshold": self.threshold,
            "vector_length": self.vector_length,
            "clip_range": self.clip_range,
            "max_weight": self.max_weight,
            "round_seed": self.round_seed,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, object]) -> SecAggParams:
        """Parse and validate parameters received from a peer (ProtocolError if unsafe)."""
        return cls.untrusted(
            "refusing round parameters",
            tuple(read_ids(payload, "participants")),
            *(read_int(payload, key) for key in ("num_shares", "threshold", "vector_length")),
            read_float(payload, "clip_range"),
            read_int(payload, "max_weight"),
            read_bytes(payload, "round_seed"),
        )

    @classmethod
    def untrusted(cls, context: str, *fields: object) -> SecAggParams:
        """Build from values read off a peer or storage: invalid ones raise ProtocolError."""
        try:
            return cls(*fields)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ProtocolError(f"{context}: {exc}") from exc
