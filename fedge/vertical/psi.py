"""Row alignment by ECDH private set intersection (OpenMined PSI, P-256), run both ways.

Each party is a PSI server for the other's request and a PSI client for its own, so
both learn the intersection (as their own IDs) and, beyond it, only the other's set
size. IDs leave a party only hashed to the curve and blinded by its secret key.
Every peer message is size-checked before it is parsed, and its points are checked
for shape, duplicates and replays of our own points before the library touches them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import private_set_intersection.python as psi

from fedge.vertical.errors import VerticalError

POINT_BYTES = 33
"""A compressed P-256 point: 0x02/0x03 then the 32-byte x coordinate."""

_ELEMENT_OVERHEAD = 3  # protobuf tag + length byte per point; 3 bounds both
_MESSAGE_OVERHEAD = 16  # outer tags, lengths and the reveal flag


@dataclass(frozen=True)
class Offer:
    """A party's first PSI message: its blinded set twice (as server and as client)."""

    setup: bytes
    request: bytes


def check_ids(ids: Sequence[str], *, max_ids: int) -> list[str]:
    """Refuse an ID column PSI cannot align: empty, too long, duplicated or not text."""
    if not ids:
        raise VerticalError("the ID column is empty: give each row an ID")
    if len(ids) > max_ids:
        raise VerticalError(
            f"{len(ids)} IDs exceed vertical-max-ids={max_ids}: raise it or send fewer rows"
        )
    clean = [str(i) for i in ids]
    if len(set(clean)) != len(clean):
        first = next(i for n, i in enumerate(clean) if i in clean[:n])
        raise VerticalError(
            f"duplicate ID {first!r} in the ID column: each row needs its own ID "
            "(deduplicate the file before joining)"
        )
    return clean


def _max_bytes(max_ids: int) -> int:
    return max_ids * (POINT_BYTES + _ELEMENT_OVERHEAD) + _MESSAGE_OVERHEAD


def _parse(cls: type, blob: bytes, what: str, max_ids: int) -> Any:
    """Size-check, then parse one protobuf from a peer."""
    if not isinstance(blob, bytes):
        raise VerticalError(f"the peer's PSI {what} is not bytes")
    if len(blob) > _max_bytes(max_ids):
        raise VerticalError(
            f"the peer's PSI {what} ({len(blob)} bytes) is larger than vertical-max-ids="
            f"{max_ids} allows: raise vertical-max-ids if the peer really has more rows"
        )
    message = cls()
    try:
        message.ParseFromString(blob)
    except Exception as err:  # protobuf's DecodeError; nothing else is parsed here
        raise VerticalError(f"the peer's PSI {what} is not a valid PSI message") from err
    return message


def _check_points(points: Sequence[bytes], what: str, max_ids: int, ours: set[bytes]) -> None:
    """Shape, count, uniqueness and no replay of the points we sent."""
    if len(points) > max_ids:
        raise VerticalError(f"the peer's PSI {what} has {len(points)} points > vertical-max-ids")
    for point in points:
        if len(point) != POINT_BYTES or point[0] not in (2, 3):
            raise VerticalError(f"the peer's PSI {what} holds a malformed curve point")
    if len(set(points)) != len(points):
        raise VerticalError(f"the peer's PSI {what} repeats a point (duplicate IDs?)")
    if ours.intersection(points):
        raise VerticalError(f"the peer's PSI {what} replays points we sent: refused")


class PsiParty:
    """One party's side of a two-way PSI; fresh keys per run, used for one intersection."""

    def __init__(
        self, ids: Sequence[str], *, max_ids: int, state: dict[str, bytes] | None = None
    ) -> None:
        """Fresh keys, or (given `state`) the keys and messages this party saved."""
        self.ids = check_ids(ids, max_ids=max_ids)
        self.max_ids = max_ids
        self._peer_setup = None
        self._sent: set[bytes] = set()
        if state is None:
            self._server = psi.server.CreateWithNewKey(True)
            self._client = psi.client.CreateWithNewKey(True)
            return
        self._server = psi.server.CreateFromKey(state["server-key"], True)
        self._client = psi.client.CreateFromKey(state["client-key"], True)
        self._remember(
            psi.ServerSetup.FromString(state["setup"]), psi.Request.FromString(state["request"])
        )
        if state.get("peer-setup"):
            self._peer_setup = psi.ServerSetup.FromString(state["peer-setup"])

    def state(self) -> dict[str, bytes]:
        """Keys and messages to resume from (this party's secrets: never sent)."""
        offer = self._offer
        return {
            "server-key": self._server.GetPrivateKeyBytes(),
            "client-key": self._client.GetPrivateKeyBytes(),
            "setup": offer.setup,
            "request": offer.request,
            "peer-setup": self._peer_setup.SerializeToString() if self._peer_setup else b"",
        }

    def _remember(self, setup: Any, request: Any) -> None:
        self._offer = Offer(setup.SerializeToString(), request.SerializeToString())
        self._request_size = len(request.encrypted_elements)
        self._sent = set(setup.raw.encrypted_elements) | set(request.encrypted_elements)

    def offer(self) -> Offer:
        """Our IDs blinded with our server key (setup) and our client key (request)."""
        setup = self._server.CreateSetupMessage(0.0, 1, self.ids, psi.DataStructure.RAW)
        self._remember(setup, self._client.CreateRequest(self.ids))
        return self._offer

    def answer(self, peer: Offer) -> bytes:
        """Check the peer's offer, keep its setup, and blind its request with our key."""
        if not self._sent:
            raise VerticalError("PSI answer before offer: call offer() first")
        setup = _parse(psi.ServerSetup, peer.setup, "setup", self.max_ids)
        request = _parse(psi.Request, peer.request, "request", self.max_ids)
        if not setup.HasField("raw") or not request.reveal_intersection:
            raise VerticalError("the peer's PSI offer is not a raw, revealing PSI: refused")
        _check_points(setup.raw.encrypted_elements, "setup", self.max_ids, self._sent)
        _check_points(request.encrypted_elements, "request", self.max_ids, self._sent)
        if len(setup.raw.encrypted_elements) != len(request.encrypted_elements):
            raise VerticalError("the peer's PSI setup and request differ in size: refused")
        self._peer_setup = setup
        return self._server.ProcessRequest(request).SerializeToString()

    def intersect(self, peer_answer: bytes) -> list[str]:
        """Our IDs the peer also holds, sorted (so both parties order rows alike)."""
        if self._peer_setup is None:
            raise VerticalError("PSI intersect before answer: call answer() first")
        response = _parse(psi.Response, peer_answer, "answer", self.max_ids)
        points = list(response.encrypted_elements)
        if len(points) != self._request_size:
            raise VerticalError("the peer's PSI answer does not match our request: refused")
        _check_points(points, "answer", self.max_ids, self._sent)
        try:
            found = self._client.GetIntersection(self._peer_setup, response)
        except Exception as err:  # the library's own point decoding failed
            raise VerticalError("the peer's PSI answer holds points off the curve") from err
        return sorted(self.ids[i] for i in found)
