"""Every cryptographic primitive of the protocol, built only from `cryptography`.

Keeping key derivation, labels and nonces in one module makes domain
separation auditable: each derived key binds a purpose label, the round seed
(as HKDF salt) and the node ids it belongs to.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from fedge.secagg.errors import ProtocolError

KEY_BYTES = 32
DIGEST_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
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


def generate_private_key() -> bytes:
    """A fresh X25519 private key; one per purpose and round, never reused."""
    return X25519PrivateKey.generate().private_bytes_raw()


def public_key(private: bytes) -> bytes:
    """The X25519 public key of `private` (also used to verify a rebuilt key)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def validate_public_key(public: bytes) -> None:
    """Reject keys that cannot yield a shared secret (wrong size, low order).

    A trial exchange with a throwaway key is the only check `cryptography`
    exposes; doing it early lets the server drop the sender before anyone
    else has to use the key.
    """
    _exchange(generate_private_key(), public)


def seed_commitment(seed: bytes, node: int, round_seed: bytes) -> bytes:
    """Binding commitment to a self-mask seed, so the server can tell a wrong
    reconstruction (a lying share holder) from a right one."""
    return digest(_LABEL + b"seed-commitment", round_seed, node_bytes(node), seed)


def encrypt_share(
    private: bytes,
    peer_public: bytes,
    sender: int,
    receiver: int,
    round_seed: bytes,
    plaintext: bytes,
) -> bytes:
    """Encrypt shares from `sender` to `receiver` (nonce || ChaCha20-Poly1305).

    The associated data names sender, receiver and round, so the server cannot
    reroute or replay a ciphertext without the receiver noticing.
    """
    key = _pair_key(private, peer_public, sender, receiver, round_seed, b"share-key")
    nonce = os.urandom(NONCE_BYTES)
    ad = _share_ad(sender, receiver, round_seed)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def decrypt_share(
    private: bytes,
    peer_public: bytes,
    sender: int,
    receiver: int,
    round_seed: bytes,
    ciphertext: bytes,
) -> bytes:
    """Inverse of `encrypt_share`; raises ProtocolError if authentication fails."""
    if len(ciphertext) < CIPHERTEXT_OVERHEAD:
        raise ProtocolError(f"ciphertext from node {sender} is too short")
    key = _pair_key(private, peer_public, sender, receiver, round_seed, b"share-key")
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, _share_ad(sender, receiver, round_seed))
    except InvalidTag as exc:
        raise ProtocolError(f"ciphertext from node {sender} failed authentication") from exc


def keystream(key: bytes, num_bytes: int) -> bytes:
    """`num_bytes` of ChaCha20 keystream under the 256-bit `key`.

    Each key keys exactly one stream, so the all-zero nonce is safe.
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"keystream key must be {KEY_BYTES} bytes")
    return (
        Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(num_bytes))
    )


def expand_mask(seed: bytes, length: int) -> NDArray[np.uint32]:
    """The mask of a 256-bit `seed`: its keystream read as `length` uint32s (read-only)."""
    return np.frombuffer(keystream(seed, 4 * length), dtype="<u4").astype(np.uint32, copy=False)


def pairwise_mask(
    private: bytes,
    peer_public: bytes,
    node: int,
    peer: int,
    round_seed: bytes,
    length: int,
) -> NDArray[np.uint32]:
    """What `node` adds for the pair {node, peer}: +PRG if node < peer, else -PRG.

    The seed is symmetric in the pair, so the two contributions cancel in the
    sum, and the server can recompute either side once it has rebuilt the
    private mask key of a dropped client.
    """
    seed = _pair_key(private, peer_public, node, peer, round_seed, b"pair-mask")
    mask = expand_mask(seed, length)
    return mask if node < peer else np.negative(mask)


def _pair_key(
    private: bytes, peer_public: bytes, a: int, b: int, round_seed: bytes, purpose: bytes
) -> bytes:
    low, high = sorted((a, b))
    info = _LABEL + purpose + node_bytes(low) + node_bytes(high)
    shared = _exchange(private, peer_public)
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=round_seed, info=info).derive(shared)


def _share_ad(sender: int, receiver: int, round_seed: bytes) -> bytes:
    return digest(_LABEL + b"share-ad", round_seed, node_bytes(sender), node_bytes(receiver))


def _exchange(private: bytes, peer_public: bytes) -> bytes:
    if len(peer_public) != KEY_BYTES:
        raise ProtocolError(f"public key must be {KEY_BYTES} bytes")
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        return X25519PrivateKey.from_private_bytes(private).exchange(peer)
    except ValueError as exc:
        raise ProtocolError("public key yields no shared secret (low-order point)") from exc
