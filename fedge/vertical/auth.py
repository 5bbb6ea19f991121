"""End-to-end signatures between guest and host (Ed25519 from `cryptography`).

The coordinator relays every party-to-party message. With each party holding its own
signing key and the peer's public key (exchanged out of band, like TLS certificates),
a party signs what it sends the peer, bound to the run, its role and a message counter,
so the coordinator can neither forge, alter, replay nor reorder it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedge.vertical.errors import VerticalError


def _digest(run: int, sender: str, stage: str, seq: int, payload: Mapping[str, object]) -> bytes:
    """A canonical hash of (run, sender role, its stage, counter, payload)."""
    h = hashlib.sha256(f"fedge-vertical/{run}/{sender}/{stage}/{seq}".encode())
    for key in sorted(payload):
        value = payload[key]
        if isinstance(value, bytes):
            raw = b"b" + value
        elif isinstance(value, str | int) and not isinstance(value, bool):
            raw = f"{type(value).__name__}:{value}".encode()
        else:
            raise VerticalError(f"cannot sign {key!r} of type {type(value).__name__}")
        for part in (key.encode(), raw):
            h.update(len(part).to_bytes(8, "big") + part)
    return h.digest()


class PeerLink:
    """This party's signing key and the peer's pinned public key for one run."""

    def __init__(self, own: Path, peer: Path, run: int) -> None:
        try:
            own_key = serialization.load_pem_private_key(own.read_bytes(), password=None)
            peer_key = serialization.load_pem_public_key(peer.read_bytes())
        except (OSError, ValueError) as err:
            raise VerticalError(f"cannot load sign-key/peer-key ({err}): give PEM files") from err
        if not isinstance(own_key, Ed25519PrivateKey) or not isinstance(peer_key, Ed25519PublicKey):
            raise VerticalError("sign-key and peer-key must be Ed25519 keys (PEM)")
        self.own, self.peer, self.run = own_key, peer_key, run

    def sign(self, sender: str, stage: str, seq: int, payload: Mapping[str, object]) -> bytes:
        return self.own.sign(_digest(self.run, sender, stage, seq, payload))

    def verify(
        self, sender: str, stage: str, seq: int, payload: Mapping[str, object], sig: object
    ) -> None:
        """Refuse a payload the peer did not sign as message `seq` of this run."""
        if not isinstance(sig, bytes):
            raise VerticalError(
                "the peer's message is unsigned: give both parties sign-key and peer-key"
            )
        try:
            self.peer.verify(sig, _digest(self.run, sender, stage, seq, payload))
        except InvalidSignature as err:
            raise VerticalError(
                f"the {sender}'s message #{seq} fails its signature: altered, forged, "
                "replayed or reordered on the way (by the coordinator?); refused"
            ) from err


def write_keypair(private_path: Path, public_path: Path) -> None:
    """A fresh Ed25519 pair as PEM files (give the public one to the peer)."""
    key = Ed25519PrivateKey.generate()
    private_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
