"""Every cryptographic primitive of the protocol, built only from `cryptography`.

Keeping key derivation, labels and nonces in one module makes domain
separation auditable: each derived key binds a purpose label, the round seed
(as HKDF salt) and the node ids it belongs to.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from fedge.secagg.errors import ProtocolError

KEY_BYTES = 32
DIGEST_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SIGNATURE_BYTES = 64
CIPHERTEXT_OVERHEAD = NONCE_BYTES + TAG_BYTES
_LABEL = b"fedge-secagg/v1/"


def node_bytes(node: int) -> bytes:
    """Fixed-width encoding of a node id (Flower ids are unsigned 64-bit)."""
    return node.to_bytes(8, "big")


def digest(*parts: bytes) -> bytes:
    """SHA-256 over length-prefixed parts, so different splits never collide."""
    hasher = hashes.Hash(hashes.SHA256())
    for part in parts:
        hasher.update(len(part).to_bytes(8, "big") + part)
    return hasher.finalize()


class KeyPair:
    """A parsed X25519 private key, for one stage's exchanges with all its peers.

    Parsing or generating a key costs about two exchanges, so a stage parses
    each of its keys once. Keep instances local to the stage that made them.
    """

    def __init__(self, private: bytes | None = None) -> None:
        """Parse `private`, or generate a fresh key (one per purpose and round) if None."""
        self._key = (
            X25519PrivateKey.generate()
            if private is None
            else X25519PrivateKey.from_private_bytes(private)
        )

    @property
    def private(self) -> bytes:
        return self._key.private_bytes_raw()

    @property
    def public(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def check(self, peer_public: bytes) -> None:
        """Reject keys that cannot yield a shared secret (wrong size, low order).

        A trial exchange is the only check `cryptography` exposes; doing it early
        lets the server drop the sender before anyone else has to use the key.
        """
        self._exchange(peer_public)

    def share_key(self, peer_public: bytes, node: int, peer: int, round_seed: bytes) -> bytes:
        """The pair's ChaCha20-Poly1305 key for shares, the same in both directions."""
        return self._pair_key(peer_public, node, peer, round_seed, b"share-key")

    def mask_seed(self, peer_public: bytes, node: int, peer: int, round_seed: bytes) -> bytes:
        """The pair's mask seed (see `Masker.add_pair`), the same from both sides.

        The server recomputes it once it has rebuilt a dropped client's private key.
        """
        return self._pair_key(peer_public, node, peer, round_seed, b"pair-mask")

    def _pair_key(
        self, peer_public: bytes, a: int, b: int, round_seed: bytes, purpose: bytes
    ) -> bytes:
        low, high = sorted((a, b))
        info = _LABEL + purpose + node_bytes(low) + node_bytes(high)
        shared = self._exchange(peer_public)
        return HKDF(hashes.SHA256(), KEY_BYTES, salt=round_seed, info=info).derive(shared)

    def _exchange(self, peer_public: bytes) -> bytes:
        if len(peer_public) != KEY_BYTES:
            raise ProtocolError(f"public key must be {KEY_BYTES} bytes")
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:
            raise ProtocolError("public key yields no shared secret (low-order point)") from exc


def public_key(private: bytes) -> bytes:
    """The X25519 public key of `private` (used to verify a rebuilt key)."""
    return KeyPair(private).public


def seed_commitment(seed: bytes, node: int, round_seed: bytes) -> bytes:
    """Binding commitment to a self-mask seed, so the server can tell a wrong
    reconstruction (a lying share holder) from a right one."""
    return digest(_LABEL + b"seed-commitment", round_seed, node_bytes(node), seed)


def new_signing_key() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key for one round's consistency check: (private, public)."""
    key = Ed25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def verification_key(private: bytes) -> bytes:
    """The Ed25519 public key of a signing key from `new_signing_key`."""
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def sign_survivors(private: bytes, round_seed: bytes, survivors: Sequence[int]) -> bytes:
    """Sign the survivor set of one round (sorted ids), for the consistency check."""
    key = Ed25519PrivateKey.from_private_bytes(private)
    return key.sign(_survivors_message(round_seed, survivors))


def survivors_signed(
    public: bytes, signature: bytes, round_seed: bytes, survivors: Sequence[int]
) -> bool:
    """Whether `signature` is `public`'s signature of exactly this survivor set and round."""
    try:
        key = Ed25519PublicKey.from_public_bytes(public)
        key.verify(signature, _survivors_message(round_seed, survivors))
    except (InvalidSignature, ValueError):
        return False
    return True


def _survivors_message(round_seed: bytes, survivors: Sequence[int]) -> bytes:
    """What a client signs: label, stage, round seed and the sorted ids, length-prefixed."""
    ids = b"".join(node_bytes(node) for node in sorted(survivors))
    return digest(_LABEL + b"consistency/survivors", round_seed, ids)


def encrypt_share(
    key: bytes, sender: int, receiver: int, round_seed: bytes, plaintext: bytes
) -> bytes:
    """Encrypt shares from `sender` to `receiver` under their `KeyPair.share_key`.

    Output: nonce || ChaCha20-Poly1305. The associated data names sender,
    receiver and round, so the server cannot reroute or replay a ciphertext
    (not even back to its sender) without the receiver noticing.
    """
    nonce = os.urandom(NONCE_BYTES)
    ad = _share_ad(sender, receiver, round_seed)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def decrypt_share(
    key: bytes, sender: int, receiver: int, round_seed: bytes, ciphertext: bytes
) -> bytes:
    """Inverse of `encrypt_share`; raises ProtocolError if authentication fails."""
    if len(ciphertext) < CIPHERTEXT_OVERHEAD:
        raise ProtocolError(f"ciphertext from node {sender} is too short")
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, _share_ad(sender, receiver, round_seed))
    except InvalidTag as exc:
        raise ProtocolError(f"ciphertext from node {sender} failed authentication") from exc


def _keystream(key: bytes) -> CipherContext:
    """The ChaCha20 keystream under the 256-bit `key` (encrypting zeros reads it).

    Each key keys exactly one stream, so the all-zero nonce is safe.
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"keystream key must be {KEY_BYTES} bytes")
    return Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()


class KeystreamBlocks:
    """Consecutive blocks of one keystream as uint32s, through one reused buffer.

    For consumers that work block by block: a block small enough to stay in
    cache saves a round trip through memory per pass over the data.
    """

    def __init__(self, key: bytes, block_values: int) -> None:
        self._stream = _keystream(key)
        self._zeros = memoryview(bytes(4 * block_values))
        self._buffer = bytearray(4 * block_values)
        self._values = np.frombuffer(self._buffer, dtype="<u4")

    def next(self, count: int) -> NDArray[np.uint32]:
        """The next `count` values (at most block_values); the next call overwrites them."""
        self._stream.update_into(self._zeros[: 4 * count], self._buffer)
        return self._values[:count]


class Masker:
    """Adds PRG masks to vectors of one length, through one reused keystream buffer.

    At model size a fresh buffer per mask costs about as much in page faults as
    the cipher itself, so a stage expands all its masks through one instance.
    """

    def __init__(self, length: int) -> None:
        self._zeros = bytes(4 * length)
        self._buffer = bytearray(4 * length)

    def expand(self, seed: bytes) -> NDArray[np.uint32]:
        """The mask of a 256-bit `seed`: its ChaCha20 keystream read as uint32s.

        A read-only view that the next call overwrites. Each seed keys exactly
        one stream, so the all-zero nonce is safe.
        """
        _keystream(seed).update_into(self._zeros, self._buffer)
        mask = np.frombuffer(self._buffer, dtype="<u4").astype(np.uint32, copy=False)
        mask.flags.writeable = False
        return mask

    def add(self, vector: NDArray[np.uint32], seed: bytes, subtract: bool = False) -> None:
        """Add (or subtract) the mask of `seed` to `vector` in place, mod 2^32."""
        if subtract:
            vector -= self.expand(seed)
        else:
            vector += self.expand(seed)

    def add_pair(
        self, vector: NDArray[np.uint32], seed: bytes, node: int, peer: int, remove: bool = False
    ) -> None:
        """Add what `node` contributes for the pair {node, peer}, or with `remove` take it out.

        That is +PRG(seed) if node < peer, else -PRG(seed), so the two sides
        cancel in the sum; the server removes a survivor's contribution for a
        dropped partner.
        """
        self.add(vector, seed, subtract=(node < peer) == remove)


def _share_ad(sender: int, receiver: int, round_seed: bytes) -> bytes:
    return digest(_LABEL + b"share-ad", round_seed, node_bytes(sender), node_bytes(receiver))
