"""Two-party logistic regression across columns, under Paillier (python-paillier).

The guest holds labels and some columns, the host the other columns; each keeps its
own weights. Each party has its own Paillier key and only ever encrypts what the
other may compute on; gradients come back masked by a one-time pad mod n, so:

- the host sees the guest's residual terms only as ciphertexts under the guest's key,
  and its own gradient (the usual leakage of hetero LR, as in FATE);
- the guest sees the host's logits only as ciphertexts under the host's key, and its
  own gradient;
- the coordinator, which relays everything, holds no key: it sees ciphertexts, masked
  integers and the loss (unmasked with the pad the guest gives it).

The sigmoid and log-loss use FATE's second-order Taylor expansion at 0
(d = z/4 − y/2 for y in {−1, 1}), so one batch costs four messages:
host `logits` → guest `residuals` → host `gradients` → guest `unmask` (→ host applies it).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from phe import EncodedNumber, EncryptedNumber, PaillierPrivateKey, PaillierPublicKey, paillier

from fedge.vertical.errors import VerticalError

MAX_EXPONENT_SPAN = 64
"""phe exponents a peer may send (|e| ≤ 64): a huge one would make us compute n**e."""

Cipher = list[EncryptedNumber]


@dataclass(frozen=True)
class Settings:
    """What both parties must agree on; the coordinator sends it, each party checks it."""

    key_bits: int = 2048
    lr: float = 0.15
    l2: float = 0.01
    min_batch: int = 16


def generate_key(bits: int) -> tuple[PaillierPublicKey, PaillierPrivateKey]:
    """A fresh Paillier key pair for one run."""
    return paillier.generate_paillier_keypair(n_length=bits)


def public_key_bytes(key: PaillierPublicKey) -> bytes:
    return key.n.to_bytes((key.n.bit_length() + 7) // 8, "big")


def peer_public_key(blob: bytes, min_bits: int) -> PaillierPublicKey:
    """The peer's key, refused if shorter than ours (a weak key would expose our data)."""
    if not isinstance(blob, bytes) or len(blob) * 8 > 2 * 8192:
        raise VerticalError("the peer's Paillier key is not bytes of a sane length")
    n = int.from_bytes(blob, "big")
    if n.bit_length() < min_bits or n % 2 == 0:
        raise VerticalError(
            f"the peer's Paillier key has {n.bit_length()} bits < vertical-key-bits={min_bits}: "
            "refused (both parties must run with the same vertical-key-bits)"
        )
    return PaillierPublicKey(n)


def pack(values: Cipher) -> dict[str, bytes]:
    """Ciphertexts as fixed-width big-endian bytes plus their exponents (int8)."""
    if not values:
        return {"c": b"", "e": b""}
    width = (values[0].public_key.nsquare.bit_length() + 7) // 8
    exps = [v.exponent for v in values]
    return {
        "c": b"".join(v.ciphertext(be_secure=False).to_bytes(width, "big") for v in values),
        "e": np.asarray(exps, dtype=np.int8).tobytes(),
    }


def unpack(record: dict[str, bytes], key: PaillierPublicKey, count: int) -> Cipher:
    """Peer ciphertexts, checked (count, range, exponents) before any arithmetic."""
    width = (key.nsquare.bit_length() + 7) // 8
    blob, exps = record.get("c"), record.get("e")
    if not isinstance(blob, bytes) or not isinstance(exps, bytes):
        raise VerticalError("a peer's ciphertext record lacks bytes 'c' and 'e'")
    if len(blob) != count * width or len(exps) != count:
        raise VerticalError(f"a peer sent {len(exps)} ciphertexts where {count} were due")
    exponents = np.frombuffer(exps, dtype=np.int8).astype(int)
    if np.any(np.abs(exponents) > MAX_EXPONENT_SPAN):
        raise VerticalError("a peer's ciphertext has an out-of-range exponent")
    out = []
    for i, exponent in enumerate(exponents):
        c = int.from_bytes(blob[i * width : (i + 1) * width], "big")
        if not 0 < c < key.nsquare or math.gcd(c, key.n) != 1:
            raise VerticalError("a peer's ciphertext is not a valid Paillier ciphertext")
        out.append(EncryptedNumber(key, c, int(exponent)))
    return out


def mask(values: Cipher) -> tuple[Cipher, list[int]]:
    """Add a uniform pad mod n to each ciphertext (in phe's integer encoding)."""
    key = values[0].public_key
    pads = [secrets.randbelow(key.n) for _ in values]
    masked = [v + EncodedNumber(key, r, v.exponent) for v, r in zip(values, pads, strict=True)]
    return masked, pads


def decrypt_masked(values: Cipher, key: PaillierPrivateKey) -> list[tuple[int, int]]:
    """Decrypt padded values to (encoding, exponent) pairs; only the padder can read them."""
    return [(key.raw_decrypt(v.ciphertext(be_secure=False)), v.exponent) for v in values]


def unmask(
    pairs: Sequence[tuple[int, int]],
    pads: Sequence[int],
    exps: Sequence[int],
    key: PaillierPublicKey,
) -> np.ndarray:
    """Remove our pads from the peer's decryption; exponents must be those we sent."""
    if len(pairs) != len(pads) or [int(e) for _, e in pairs] != list(exps):
        raise VerticalError("a peer's unmasked values do not match what we sent")
    out = []
    for (value, exponent), pad in zip(pairs, pads, strict=True):
        if not 0 <= int(value) < key.n:
            raise VerticalError("a peer's decrypted value is out of range")
        out.append(EncodedNumber(key, (int(value) - pad) % key.n, exponent).decode())
    return np.asarray(out, dtype=np.float64)


def check_batch(batch: Sequence[int], rows: int, min_batch: int) -> np.ndarray:
    """A batch a party will compute on: unique in-range rows, no smaller than min_batch.

    A tiny batch would let the other party read single rows out of its gradient.
    """
    idx = np.asarray(batch, dtype=np.int64)
    if idx.ndim != 1 or len(np.unique(idx)) != len(idx):
        raise VerticalError("a batch repeats rows: refused")
    if len(idx) < min(min_batch, rows) or idx.min() < 0 or idx.max() >= rows:
        raise VerticalError(
            f"a batch of {len(idx)} rows (need >= vertical-min-batch={min_batch}, "
            f"rows in [0, {rows})) was refused"
        )
    return idx


class Party:
    """What guest and host share: standardized columns, own weights, own key."""

    _pending: tuple[str, ...] = ()
    """Attributes a step leaves for the next one (saved between Flower messages)."""

    def __init__(
        self, x: np.ndarray, settings: Settings, state: dict[str, object] | None = None
    ) -> None:
        """A fresh party (new key) or, given `state`, the one that saved it."""
        mean, std = x.mean(axis=0), x.std(axis=0)
        self.x = (x - mean) / np.where(std > 0, std, 1.0)
        self.scale = (mean, std)
        self.settings = settings
        self.w = np.zeros(x.shape[1])
        self.bias = 0.0
        self.public, self._private = generate_key(settings.key_bits)
        self.peer: PaillierPublicKey | None = None
        self.peer_features = 0
        for name in self._pending:
            setattr(self, name, [])
        if state is None:
            self.public, self._private = generate_key(settings.key_bits)
        else:
            self.restore(state)

    def state(self) -> dict[str, object]:
        """Everything this party must keep between messages (its own, never sent)."""
        out: dict[str, object] = {
            "p": str(self._private.p),
            "q": str(self._private.q),
            "peer-n": str(self.peer.n if self.peer else 0),
            "peer-features": self.peer_features,
            "w": self.w.tobytes(),
            "bias": self.bias,
        }
        for name in self._pending:
            out[name] = [str(int(v)) for v in getattr(self, name)]
        return out

    def restore(self, state: dict[str, object]) -> None:
        """Take back what `state` saved (the key, weights and any step in flight)."""
        p, q = int(str(state["p"])), int(str(state["q"]))
        self.public = PaillierPublicKey(p * q)
        self._private = PaillierPrivateKey(self.public, p, q)
        peer_n = int(str(state["peer-n"]))
        self.peer = PaillierPublicKey(peer_n) if peer_n else None
        self.peer_features = int(state["peer-features"])  # type: ignore[call-overload]
        self.w = np.frombuffer(state["w"], dtype=np.float64).copy()  # type: ignore[call-overload]
        self.bias = float(state["bias"])  # type: ignore[arg-type]
        for name in self._pending:
            setattr(self, name, [int(v) for v in state.get(name, [])])  # type: ignore[attr-defined]

    def meet(self, peer_key: bytes, peer_features: int) -> None:
        """Take the peer's public key and column count (public metadata of the run)."""
        self.peer = peer_public_key(peer_key, self.settings.key_bits)
        self.peer_features = int(peer_features)

    def _step(self, grad: np.ndarray) -> None:
        self.w -= self.settings.lr * (grad + self.settings.l2 * self.w)

    def export(self, columns: list[str]) -> dict[str, object]:
        """This party's part of the model, for its own disk only: its columns, their
        scaling and its weights (the guest's also carries the intercept)."""
        mean, std = self.scale
        return {
            "columns": columns,
            "mean": mean.tolist(),
            "std": std.tolist(),
            "weights": self.w.tolist(),
            "bias": self.bias,
        }

    def scores(self, x: np.ndarray) -> np.ndarray:
        """This party's share of the logit for raw rows of its columns."""
        mean, std = self.scale
        return ((x - mean) / np.where(std > 0, std, 1.0)) @ self.w


def _gradient(x: np.ndarray, d: Cipher) -> Cipher:
    """X^T [[d]] / m, one homomorphic dot product per column."""
    m = len(d)
    return [sum(float(x[i, j] / m) * d[i] for i in range(m)) for j in range(x.shape[1])]


class Host(Party):
    """Holds columns only; never sees a label or the guest's columns."""

    _pending = ("_pads", "_exps", "_idx")

    def logits(self, batch: Sequence[int]) -> dict[str, bytes]:
        """Step 1: [[u]] and [[u²]] under our key, u = X_h w_h on the batch."""
        idx = check_batch(batch, len(self.x), self.settings.min_batch)
        self._idx = idx.tolist()
        u = self.x[idx] @ self.w
        enc = [self.public.encrypt(float(v)) for v in u]
        enc_sq = [self.public.encrypt(float(v * v)) for v in u]
        return {**_prefix("u", pack(enc)), **_prefix("u2", pack(enc_sq))}

    def gradients(self, reply: dict[str, bytes]) -> tuple[dict[str, bytes], tuple[int, int]]:
        """Step 3: [[d]] = [[e]]_G + u/4 → our padded gradient under the guest's key;
        decrypt the guest's padded gradient and padded loss (ours to decrypt, theirs to read)."""
        if not self._idx:
            raise VerticalError("gradients asked for before logits: refused")
        x = self.x[np.asarray(self._idx)]
        e = unpack(_strip("e", reply), self.peer, len(x))
        d = [ei + float(0.25 * ui) for ei, ui in zip(e, x @ self.w, strict=True)]
        grad, self._pads = mask(_gradient(x, d))
        self._exps = [g.exponent for g in grad]
        guest_grad = unpack(_strip("g", reply), self.public, self.peer_features + 1)
        loss = unpack(_strip("loss", reply), self.public, 1)
        loss_pair = decrypt_masked(loss, self._private)[0]
        out = {
            **_prefix("h", pack(grad)),
            **_pairs("gg", decrypt_masked(guest_grad, self._private), self.public),
        }
        return out, loss_pair

    def score_logits(self, x: np.ndarray) -> dict[str, bytes]:
        """Scoring: [[u]]_H for raw rows of our columns (the guest adds its part)."""
        return _prefix("u", pack([self.public.encrypt(float(v)) for v in self.scores(x)]))

    def score_open(self, reply: dict[str, bytes], count: int) -> dict[str, bytes]:
        """Scoring: decrypt the guest's padded scores; we read score + pad, never the score."""
        padded = unpack(_strip("z", reply), self.public, count)
        return _pairs("zs", decrypt_masked(padded, self._private), self.public)

    def apply(self, reply: dict[str, bytes]) -> None:
        """Step 5: unpad the gradient the guest decrypted for us, and step."""
        self._step(unmask(_read_pairs("hg", reply, self.peer), self._pads, self._exps, self.peer))


class Guest(Party):
    """Holds the labels (0/1) and its columns, plus the intercept."""

    _pending = ("_gpads", "_gexps")

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        settings: Settings,
        state: dict[str, object] | None = None,
    ) -> None:
        super().__init__(x, settings, state)
        labels = np.asarray(y, dtype=np.float64)
        if not np.all(np.isin(labels, (0.0, 1.0))):
            raise VerticalError("the label column must hold 0/1 values for logistic regression")
        self.y = 2.0 * labels - 1.0

    def residuals(
        self, batch: Sequence[int], host: dict[str, bytes]
    ) -> tuple[dict[str, bytes], tuple[int, int]]:
        """Step 2: [[e]]_G for the host; our padded gradient and padded loss under the
        host's key; returns the message and the loss pad (for the coordinator only)."""
        idx = check_batch(batch, len(self.x), self.settings.min_batch)
        m, x, y = len(idx), self.x[idx], self.y[idx]
        u = unpack(_strip("u", host), self.peer, m)
        u2 = unpack(_strip("u2", host), self.peer, m)
        z = x @ self.w + self.bias
        d = [0.25 * ui + float(0.25 * zi - 0.5 * yi) for ui, zi, yi in zip(u, z, y, strict=True)]
        grads = _gradient(np.hstack([x, np.ones((m, 1))]), d)
        loss = sum(
            float(-0.5 * yi + 0.25 * zi) / m * ui + 0.125 / m * u2i
            for ui, u2i, zi, yi in zip(u, u2, z, y, strict=True)
        ) + float(np.mean(math.log(2) - 0.5 * y * z + 0.125 * z * z))
        padded, self._gpads = mask(grads)
        self._gexps = [g.exponent for g in padded]
        (masked_loss,), (loss_pad,) = mask([loss])
        e = [self.public.encrypt(float(0.25 * zi - 0.5 * yi)) for zi, yi in zip(z, y, strict=True)]
        message = {
            **_prefix("e", pack(e)),
            **_prefix("g", pack(padded)),
            **_prefix("loss", pack([masked_loss])),
        }
        return message, (loss_pad, masked_loss.exponent)

    def score_pad(
        self, x: np.ndarray, host: dict[str, bytes]
    ) -> tuple[dict[str, bytes], list[int], list[int]]:
        """Scoring: [[z_g + u + pad]]_H for raw rows of our columns; returns the message,
        the pads and their exponents (ours to keep for `score_finish`)."""
        u = unpack(_strip("u", host), self.peer, len(x))
        z = self.scores(x) + self.bias
        padded, pads = mask([ui + float(zi) for ui, zi in zip(u, z, strict=True)])
        return _prefix("z", pack(padded)), pads, [p.exponent for p in padded]

    def score_finish(self, host: dict[str, bytes], pads: list[int], exps: list[int]) -> np.ndarray:
        """Scoring: the joint logits, unpadded from the host's decryption."""
        return unmask(_read_pairs("zs", host, self.peer), pads, exps, self.peer)

    def unmask(self, host: dict[str, bytes]) -> dict[str, bytes]:
        """Step 4: decrypt the host's padded gradient for it; unpad ours and step."""
        grad = unmask(_read_pairs("gg", host, self.peer), self._gpads, self._gexps, self.peer)
        self._step(grad[:-1])
        self.bias -= self.settings.lr * grad[-1]
        host_grad = unpack(_strip("h", host), self.public, self.peer_features)
        return _pairs("hg", decrypt_masked(host_grad, self._private), self.public)


def loss_from_pad(pair: tuple[int, int], pad: tuple[int, int], host_key: bytes) -> float:
    """The coordinator's view: the batch loss, from the host's padded decryption and the
    guest's pad (neither party alone learns it from the other)."""
    key = PaillierPublicKey(int.from_bytes(host_key, "big"))
    (value, exponent), (r, pad_exponent) = pair, pad
    if exponent != pad_exponent or not 0 <= value < key.n:
        raise VerticalError("the padded loss and its pad disagree: refused")
    return float(EncodedNumber(key, (value - r) % key.n, exponent).decode())


def _prefix(name: str, record: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{name}-{k}": v for k, v in record.items()}


def _strip(name: str, record: dict[str, bytes]) -> dict[str, bytes]:
    return {k: record.get(f"{name}-{k}") for k in ("c", "e")}  # type: ignore[misc]


def _width(key: PaillierPublicKey) -> int:
    return (key.n.bit_length() + 7) // 8


def _pairs(name: str, pairs: list[tuple[int, int]], key: PaillierPublicKey) -> dict[str, bytes]:
    """Padded decryptions (values < n of `key`) as fixed-width bytes and int8 exponents."""
    return {
        f"{name}-v": b"".join(v.to_bytes(_width(key), "big") for v, _ in pairs),
        f"{name}-e": np.asarray([e for _, e in pairs], dtype=np.int8).tobytes(),
    }


def _read_pairs(
    name: str, record: dict[str, bytes], key: PaillierPublicKey
) -> list[tuple[int, int]]:
    blob, exps, width = record.get(f"{name}-v"), record.get(f"{name}-e"), _width(key)
    if not isinstance(blob, bytes) or not isinstance(exps, bytes) or len(blob) != width * len(exps):
        raise VerticalError(f"a peer's '{name}' values are malformed")
    exponents = np.frombuffer(exps, dtype=np.int8).astype(int)
    return [
        (int.from_bytes(blob[i * width : (i + 1) * width], "big"), int(e))
        for i, e in enumerate(exponents)
    ]
