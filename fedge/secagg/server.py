"""Server side of SecAgg+: a stage-by-stage state machine over untrusted replies.

Each `receive_*` method takes the replies of one stage (clients that did not
answer are simply absent), drops every client whose reply is missing or
malformed (recording why in `dropped`), and returns the payload for each
remaining client. It raises SecAggAbort, and never yields a result, once
fewer than `threshold` clients remain or a needed secret cannot be rebuilt
from at least `threshold` verified shares.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import combinations
from typing import NamedTuple, NoReturn, TypeVar

import numpy as np
from numpy.typing import NDArray

from fedge.secagg.crypto import (
    DIGEST_BYTES,
    KEY_BYTES,
    SIGNATURE_BYTES,
    KeyPair,
    Masker,
    public_key,
    seed_commitment,
    survivors_signed,
)
from fedge.secagg.errors import ProtocolError, SecAggAbort
from fedge.secagg.messages import (
    CIPHERTEXT_BYTES,
    STAGE_KEY,
    Payload,
    Stage,
    expect_stage,
    read_bytes,
    read_bytes_list,
    read_ids,
    read_uint32_array,
)
from fedge.secagg.params import SecAggParams
from fedge.secagg.shamir import SHARE_BYTES, combine, share_at, share_is_valid

T = TypeVar("T")
Replies = Mapping[int, Mapping[str, object]]
_STEPS = (
    "setup_payloads",
    "receive_public_keys",
    "receive_encrypted_shares",
    "receive_masked_inputs",
    "receive_signatures",
    "receive_unmask_shares",
)
# Reconstruction tries per secret (t-subsets of the received shares) before the
# server gives up on finding one that matches the commitment: bounds the work
# a crowd of lying holders can cause.
MAX_RECONSTRUCTION_TRIES = 512


class PublicKeys(NamedTuple):
    """A client's public keys and seed commitment for one round."""

    pk_enc: bytes
    pk_mask: bytes
    pk_sign: bytes
    seed_commitment: bytes


@dataclass(frozen=True)
class AggregateResult:
    """Outcome of a completed round; no individual update is ever part of it."""

    weighted_sum: NDArray[np.float64]  # Σ n_k·Δ_k over `included`, dequantized
    total_weight: int  # Σ n_k over `included` (after capping at max_weight)
    included: tuple[int, ...]
    dropped: dict[int, str]  # participants left out of the sum, with the reason
    # included clients whose unmask reply was unusable or carried a wrong share
    unmask_faults: dict[int, str]

    @property
    def num_clients(self) -> int:
        return len(self.included)


class SecAggServer:
    """Drives one round; call the methods in order, once each.

    `round_seed` must be fresh random bytes each round (e.g. os.urandom(32)): it
    fixes the neighbour graph and salts every derived key. Replies are keyed by
    node id; `dropped` and `active` show the state between stages.
    """

    def __init__(
        self,
        participants: Sequence[int],
        num_shares: int,
        threshold: int,
        vector_length: int,
        clip_range: float,
        max_weight: int,
        round_seed: bytes,
    ) -> None:
        if len(set(participants)) != len(participants):
            raise ValueError("participants contains duplicate ids")
        self.params = SecAggParams(
            tuple(sorted(participants)),
            num_shares,
            threshold,
            vector_length,
            clip_range,
            max_weight,
            round_seed,
        )
        self._step = 0
        self._abort_reason: str | None = None
        self._active = set(self.params.participants)
        self._dropped: dict[int, str] = {}
        self._keys: dict[int, PublicKeys] = {}
        self._announced: dict[int, tuple[int, ...]] = {}  # live neighbours sent at SHARE_KEYS
        self._ciphertexts: dict[tuple[int, int], bytes] = {}  # (sender, receiver)
        self._senders: dict[int, tuple[int, ...]] = {}  # ciphertexts routed to each node
        self._partners: dict[int, frozenset[int]] = {}  # peers each survivor masked with
        self._total: NDArray[np.uint32] = np.zeros(vector_length + 1, np.uint32)  # Σ uploads
        self._survivors: list[int] = []  # the set every holder signs and unmasks for
        self._signatures: dict[int, bytes] = {}  # valid survivor-set signatures
        self._faults: dict[int, str] = {}  # survivors that misbehaved after uploading
        self._requests: dict[int, tuple[list[int], list[int]]] = {}  # (survivors, dropped)
        self._needed_keys: list[int] = []  # dropped nodes whose pairwise masks remain

    @property
    def dropped(self) -> dict[int, str]:
        """Participants excluded so far, with the reason."""
        return dict(self._dropped)

    @property
    def active(self) -> tuple[int, ...]:
        return tuple(sorted(self._active))

    def setup_payloads(self) -> dict[int, Payload]:
        """The round seed for every participant (Stage.SETUP)."""
        self._begin("setup_payloads")
        rs = self.params.round_seed
        return {
            node: {STAGE_KEY: Stage.SETUP.value, "node_id": node, "round_seed": rs}
            for node in self.params.participants
        }

    def receive_public_keys(self, replies: Replies) -> dict[int, Payload]:
        """Store keys and commitments; send each client the parameters and its neighbours' keys."""
        self._begin("receive_public_keys")
        parse = partial(self._parse_keys, KeyPair())  # one throwaway key checks them all
        for node, keys in self._collect(replies, Stage.SETUP, parse):
            self._keys[node] = keys
        self._prune(Stage.SETUP)
        base: Payload = {
            **self.params.to_payload(),
            "verifiers": list(self.active),
            "pk_sign": [self._keys[node].pk_sign for node in self.active],
        }
        payloads: dict[int, Payload] = {}
        for node in self.active:
            peers = self._live_neighbours(node)
            self._announced[node] = peers
            payloads[node] = {
                **base,
                STAGE_KEY: Stage.SHARE_KEYS.value,
                "neighbours": list(peers),
                "pk_enc": [self._keys[peer].pk_enc for peer in peers],
                "pk_mask": [self._keys[peer].pk_mask for peer in peers],
            }
        return payloads

    def receive_encrypted_shares(self, replies: Replies) -> dict[int, Payload]:
        """Route each ciphertext to its receiver; that fixes everyone's mask partners."""
        self._begin("receive_encrypted_shares")
        for sender, by_receiver in self._collect(replies, Stage.SHARE_KEYS, self._parse_shares):
            for receiver, ciphertext in by_receiver.items():
                self._ciphertexts[sender, receiver] = ciphertext
        self._prune(Stage.SHARE_KEYS)
        payloads: dict[int, Payload] = {}
        for node in self.active:
            senders = tuple(peer for peer in self._live_neighbours(node) if peer != node)
            self._senders[node] = senders
            payloads[node] = {
                STAGE_KEY: Stage.MASKED_INPUT.value,
                "senders": list(senders),
                "ciphertexts": [self._ciphertexts[sender, node] for sender in senders],
            }
        return payloads

    def receive_masked_inputs(self, replies: Replies) -> dict[int, Payload]:
        """Keep the uploads, settle share disputes; ask the survivors to sign who survived."""
        self._begin("receive_masked_inputs")
        collected = self._collect(replies, Stage.MASKED_INPUT, self._parse_masked)
        disputes = []
        for reporter, (_, rejected) in collected:
            self._partners[reporter] = frozenset(self._senders[reporter]) - rejected
            disputes += [(reporter, sender) for sender in rejected]
        self._settle(disputes)
        self._require_quorum(Stage.MASKED_INPUT)
        survivors = self.active
        for node, (vector, _) in collected:
            if node in self._active:
                self._total += vector  # only the running sum is kept, never an upload

        def holds(holder: int, owner: int) -> bool:
            """Partners hold each other's shares (and masked with each other)."""
            return holder == owner or owner in self._partners[holder]

        self._needed_keys = sorted(
            {peer for node in survivors for peer in self._partners[node]} - self._active
        )
        quorum = self.params.signature_quorum
        if len(survivors) < quorum:
            self._abort(f"only {len(survivors)} survivors, below the signature quorum {quorum}")
        for owners, what in ((survivors, "self-mask seed"), (self._needed_keys, "mask key")):
            for owner in owners:
                holders = sum(holds(holder, owner) for holder in survivors)
                if holders < self.params.threshold:
                    self._abort(
                        f"only {holders} surviving holders of node {owner}'s {what} shares, "
                        f"threshold {self.params.threshold}"
                    )
        self._survivors = list(survivors)
        for holder in survivors:
            held = sorted({holder} | self._partners[holder])
            self._requests[holder] = (
                [owner for owner in held if owner in self._active],
                [owner for owner in held if owner not in self._active],
            )
        return {
            node: {STAGE_KEY: Stage.CONSISTENCY.value, "survivors": self._survivors}
            for node in survivors
        }

    def receive_signatures(self, replies: Replies) -> dict[int, Payload]:
        """Gather the survivors' signatures of the survivor set; send them with the unmask request.

        A survivor that does not sign stays in the sum (its upload is in), but
        is not asked to unmask; fewer valid signatures than the quorum abort.
        """
        self._begin("receive_signatures")
        for node, signature in self._collect(
            replies, Stage.CONSISTENCY, self._parse_signature, self._faults
        ):
            self._signatures[node] = signature
        quorum = self.params.signature_quorum
        if len(self._signatures) < quorum:
            self._abort(f"only {len(self._signatures)} survivors signed, quorum {quorum}")
        request: Payload = {
            STAGE_KEY: Stage.UNMASK.value,
            "survivors": self._survivors,
            "signers": list(self._signatures),
            "signatures": list(self._signatures.values()),
        }
        return {node: dict(request) for node in self._signatures}

    def receive_unmask_shares(self, replies: Replies) -> AggregateResult:
        """Rebuild and verify the needed secrets, strip every mask and decode the sum.

        Each secret is rebuilt from the first t-subset of its shares that matches
        the public commitment; every other share is then checked against that
        polynomial, and the holder of a wrong one is named in `unmask_faults`.
        """
        self._begin("receive_unmask_shares")
        faults = self._faults
        signers = {node: self._requests[node] for node in self._signatures}
        collected = self._collect(replies, Stage.UNMASK, self._parse_unmask, faults, signers)
        if len(collected) < self.params.threshold:
            self._abort(f"only {len(collected)} unmask replies, threshold {self.params.threshold}")
        seed_points: dict[int, dict[int, bytes]] = {node: {} for node in self._active}
        key_points: dict[int, dict[int, bytes]] = {node: {} for node in self._needed_keys}
        for holder, (seed_shares, key_shares) in collected:
            x = self.params.x_coordinate(holder)
            survivors, dropped = self._requests[holder]
            for owner, share in zip(survivors, seed_shares, strict=True):
                seed_points[owner][x] = share
            for owner, share in zip(dropped, key_shares, strict=True):
                key_points[owner][x] = share
        rs, total = self.params.round_seed, self._total
        masker = Masker(total.size)
        for node in self.active:
            commit = partial(seed_commitment, node=node, round_seed=rs)
            seed = self._recover(
                seed_points[node], node, "self-mask seed", commit, self._keys[node].seed_commitment
            )
            masker.add(total, seed, subtract=True)
        for dropped_node in self._needed_keys:
            key = self._recover(
                key_points[dropped_node],
                dropped_node,
                "mask key",
                public_key,
                self._keys[dropped_node].pk_mask,
            )
            dropped_pair = KeyPair(key)
            for node in self.active:
                if dropped_node in self._partners[node]:
                    pair_seed = dropped_pair.mask_seed(
                        self._keys[node].pk_mask, node, dropped_node, rs
                    )
                    masker.add_pair(total, pair_seed, node, dropped_node, remove=True)
        weighted_sum, total_weight = self.params.quantizer.decode(total)
        return AggregateResult(weighted_sum, total_weight, self.active, self.dropped, dict(faults))

    def _settle(self, disputes: list[tuple[int, int]]) -> None:
        """Drop clients so that no "shares from Y failed authentication" report stands.

        A report means the reporter or the accused cheats; the server cannot
        tell which. A node in two or more standing disputes goes first (most
        first): that is the one cheater who accuses, or is accused by, many. A
        dispute left on its own drops both ends, so a false report never
        removes the accused alone, and costs the accuser its own place.
        """
        live = self._active
        pairs = {frozenset(pair): pair for pair in disputes if set(pair) <= live}
        stage = Stage.MASKED_INPUT.value
        while pairs:
            count = Counter(node for pair in pairs for node in pair)
            node, disputed = max(count.items(), key=lambda item: (item[1], -item[0]))
            if disputed < 2:
                break
            self._drop(node, f"{stage}: in {disputed} share-authentication disputes")
            pairs = {key: pair for key, pair in pairs.items() if node not in key}
        for reporter, accused in pairs.values():
            self._drop(
                accused,
                f"{stage}: node {reporter} reported its shares failed authentication "
                "(a lone dispute drops both nodes)",
            )
            self._drop(
                reporter,
                f"{stage}: reported node {accused}'s shares failed authentication "
                "(a lone dispute drops both nodes)",
            )

    def _parse_keys(self, probe: KeyPair, node: int, reply: Mapping[str, object]) -> PublicKeys:
        expect_stage(reply, Stage.SETUP)
        enc = read_bytes(reply, "pk_enc", KEY_BYTES)
        mask = read_bytes(reply, "pk_mask", KEY_BYTES)
        probe.check(enc)
        probe.check(mask)
        sign = read_bytes(reply, "pk_sign", KEY_BYTES)
        return PublicKeys(enc, mask, sign, read_bytes(reply, "seed_commitment", DIGEST_BYTES))

    def _parse_shares(self, node: int, reply: Mapping[str, object]) -> dict[int, bytes]:
        expect_stage(reply, Stage.SHARE_KEYS)
        receivers = read_ids(reply, "receivers")
        ciphertexts = read_bytes_list(reply, "ciphertexts", len(receivers), CIPHERTEXT_BYTES)
        expected = set(self._announced[node]) - {node}
        if set(receivers) != expected:
            raise ProtocolError(
                f"shares addressed to {sorted(receivers)}, not to {sorted(expected)}"
            )
        return dict(zip(receivers, ciphertexts, strict=True))

    def _parse_masked(
        self, node: int, reply: Mapping[str, object]
    ) -> tuple[NDArray[np.uint32], frozenset[int]]:
        expect_stage(reply, Stage.MASKED_INPUT)
        vector = read_uint32_array(reply, "masked", self.params.vector_length + 1)
        rejected = frozenset(read_ids(reply, "rejected"))
        if not rejected <= set(self._senders[node]):
            raise ProtocolError(f"rejected {sorted(rejected)} includes nodes that sent it nothing")
        return vector, rejected

    def _parse_signature(self, node: int, reply: Mapping[str, object]) -> bytes:
        expect_stage(reply, Stage.CONSISTENCY)
        signature = read_bytes(reply, "signature", SIGNATURE_BYTES)
        rs, key = self.params.round_seed, self._keys[node].pk_sign
        if not survivors_signed(key, signature, rs, self._survivors):
            raise ProtocolError("the signature does not verify for this survivor set")
        return signature

    def _parse_unmask(
        self, node: int, reply: Mapping[str, object]
    ) -> tuple[list[bytes], list[bytes]]:
        expect_stage(reply, Stage.UNMASK)
        survivors, dropped = self._requests[node]
        seed_shares = read_bytes_list(reply, "seed_shares", len(survivors), SHARE_BYTES)
        key_shares = read_bytes_list(reply, "key_shares", len(dropped), SHARE_BYTES)
        if not all(map(share_is_valid, seed_shares + key_shares)):
            raise ProtocolError("a share lies outside the field")
        return seed_shares, key_shares

    def _collect(
        self,
        replies: Replies,
        stage: Stage,
        parse: Callable[[int, Mapping[str, object]], T],
        faults: dict[int, str] | None = None,
        nodes: Iterable[int] | None = None,
    ) -> list[tuple[int, T]]:
        """Parse the replies of `nodes` (default: the active clients).

        Failures go to `faults` when given, else drop their sender.
        """
        parsed: list[tuple[int, T]] = []
        for node in self.active if nodes is None else nodes:
            try:
                if node not in replies:
                    raise ProtocolError("no reply")
                parsed.append((node, parse(node, replies[node])))
            except ProtocolError as exc:
                if faults is None:
                    self._drop(node, f"{stage.value}: {exc}")
                else:
                    faults[node] = f"{stage.value}: {exc}"
        return parsed

    def _recover(
        self,
        points: dict[int, bytes],
        node: int,
        what: str,
        derive: Callable[[bytes], bytes],
        expected: bytes,
    ) -> bytes:
        """The secret of the first t-subset of `points` whose image under `derive` is `expected`.

        A wrong share changes the interpolated secret (its Lagrange weight is
        never zero), so a matching subset holds only right shares; every other
        share is checked against that polynomial and a wrong one's holder goes
        to the faults. Aborts if no subset matches within the try budget.
        """
        t = self.params.threshold
        if len(points) < t:
            self._abort(f"only {len(points)} shares of node {node}'s {what}, threshold {t}")
        for subset in _subsets(sorted(points), t):
            good = {x: points[x] for x in subset}
            try:
                secret = combine(good, KEY_BYTES)
            except ValueError:
                continue
            if derive(secret) != expected:
                continue
            for x in points.keys() - good.keys():
                if share_at(good, x) != points[x]:
                    reason = f"{Stage.UNMASK.value}: wrong share of node {node}'s {what}"
                    self._faults[self.params.holder(x)] = reason
            return secret
        self._abort(
            f"no {t} of the {len(points)} shares of node {node}'s {what} match its commitment: "
            "holders sent wrong shares"
        )

    def _live_neighbours(self, node: int) -> tuple[int, ...]:
        return tuple(peer for peer in self.params.neighbours(node) if peer in self._active)

    def _prune(self, stage: Stage) -> None:
        """Drop clients whose live neighbourhood fell below t, until none does.

        Their secrets could not reach t holders, so they could not be unmasked.
        """
        t = self.params.threshold
        while weak := [n for n in self.active if len(self._live_neighbours(n)) < t]:
            for node in weak:
                self._drop(node, f"{stage.value}: fewer than {t} live neighbours")
        self._require_quorum(stage)

    def _require_quorum(self, stage: Stage) -> None:
        if len(self._active) < self.params.threshold:
            self._abort(
                f"only {len(self._active)} clients left after {stage.value}, "
                f"threshold {self.params.threshold}"
            )

    def _drop(self, node: int, reason: str) -> None:
        if node in self._active:
            self._active.remove(node)
            self._dropped[node] = reason

    def _abort(self, reason: str) -> NoReturn:
        self._abort_reason = reason
        raise SecAggAbort(reason)

    def _begin(self, step: str) -> None:
        if self._abort_reason is not None:
            raise SecAggAbort(f"round already aborted: {self._abort_reason}")
        expected = _STEPS[self._step] if self._step < len(_STEPS) else "nothing (round over)"
        if step != expected:
            raise RuntimeError(f"{step} called out of order; expected {expected}")
        self._step += 1


def _subsets(xs: list[int], t: int) -> Iterator[tuple[int, ...]]:
    """t-subsets of `xs`, those that leave out the fewest of its first points first.

    With e wrong shares the first t + e points hold a right t-subset, reached
    after at most C(t + e, e) tries; MAX_RECONSTRUCTION_TRIES caps the total.
    """
    tries = 0
    for extra in range(len(xs) - t + 1):
        prefix = xs[: t + extra]
        # Subsets without the prefix's last point were tried with a shorter prefix.
        for left_out in combinations(prefix[:-1], extra):
            if tries == MAX_RECONSTRUCTION_TRIES:
                return
            tries += 1
            yield tuple(x for x in prefix if x not in left_out)
