"""Client side of SecAgg+: one pure function per stage plus a serializable state.

Each stage function takes the state returned by the previous one and the
server's payload, validates the payload strictly (ProtocolError on anything
malformed, SecAggAbort when the neighbourhood falls below the threshold) and
returns the new state and the reply. The state must be saved after every
call: it is what makes a replayed or reordered server message fail, and what
stops a second unmask request from revealing more shares.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.secagg.crypto import (
    KEY_BYTES,
    SIGNATURE_BYTES,
    KeyPair,
    Masker,
    decrypt_share,
    encrypt_share,
    new_signing_key,
    seed_commitment,
    sign_survivors,
    survivors_signed,
    verification_key,
)
from fedge.secagg.errors import ProtocolError, SecAggAbort
from fedge.secagg.messages import (
    STAGE_KEY,
    STAGES,
    Payload,
    Stage,
    StateDict,
    expect_stage,
    read_bytes,
    read_bytes_list,
    read_ids,
    read_int,
)
from fedge.secagg.params import MIN_ROUND_SEED_BYTES, SecAggParams
from fedge.secagg.shamir import SHARE_BYTES, share_is_valid, split

_DONE = len(STAGES)
STATE_FIELD = "state"
# Stored-state format: this tag (name and version), then big-endian fixed-width
# fields; each id list carries a 32-bit count, and the byte strings aligned
# with it follow as one block.
_STATE_TAG = b"fedge-secagg-state/2"
_KEYS_TAG = b"fedge-secagg-keys/2"
_STATE_HEAD = struct.Struct(">QBQQQdQ")  # node_id, next_stage, then the numeric params
_NODE = struct.Struct(">Q")
_COUNT = struct.Struct(">I")


@dataclass(frozen=True)
class RoundKeys:
    """A client's fresh secrets for one round, committed to before the round starts.

    Only the round seed is known at SETUP (which may travel a round ahead, see
    fedge.server_app.secure_round); the participants arrive with SHARE_KEYS.
    """

    node_id: int
    round_seed: bytes
    enc_private: bytes  # X25519 key for share encryption
    mask_private: bytes  # X25519 key for pairwise masks (secret-shared)
    seed: bytes  # self-mask seed b (secret-shared)
    sign_private: bytes  # Ed25519 key that signs this round's survivor set

    def to_dict(self) -> StateDict:
        """The keys as one bytes entry, like `ClientState.to_dict`."""
        blob = b"".join(
            [
                _KEYS_TAG,
                _NODE.pack(self.node_id),
                _COUNT.pack(len(self.round_seed)),
                self.round_seed,
                self.enc_private,
                self.mask_private,
                self.seed,
                self.sign_private,
            ]
        )
        return {STATE_FIELD: blob}

    @classmethod
    def _read(cls, reader: _Reader) -> RoundKeys:
        (node_id,) = reader.unpack(_NODE)
        round_seed = reader.take(reader.count())
        keys = cls(node_id, round_seed, *reader.blocks(4, KEY_BYTES))
        reader.finish()
        return keys


@dataclass(frozen=True)
class ClientState:
    """What a client must remember between stages (secrets included: keep it local)."""

    node_id: int
    params: SecAggParams
    next_stage: int  # index into STAGES of the next accepted message; _DONE at the end
    enc_private: bytes  # X25519 key for share encryption
    mask_private: bytes  # X25519 key for pairwise masks (secret-shared)
    seed: bytes  # self-mask seed b (secret-shared)
    sign_private: bytes  # Ed25519 key that signs this round's survivor set
    partners: tuple[int, ...] = ()  # live neighbours but self, announced at SHARE_KEYS
    share_keys: tuple[bytes, ...] = ()  # per partner: key of the shares exchanged with it
    mask_seeds: tuple[bytes, ...] = ()  # per partner: seed of the pairwise mask
    held: tuple[int, ...] = ()  # nodes whose shares this client holds, self included
    held_seed_shares: tuple[bytes, ...] = ()
    held_key_shares: tuple[bytes, ...] = ()
    verifiers: tuple[int, ...] = ()  # participants whose verification keys came at SHARE_KEYS
    verify_keys: tuple[bytes, ...] = ()  # their Ed25519 public keys, aligned
    signed: tuple[int, ...] = ()  # the survivor set this client signed (sorted), once

    def to_dict(self) -> StateDict:
        """The state as one bytes entry (e.g. for Flower's context.state).

        One compact value, not a field per item: a ConfigRecord checks every
        list element on each write, which cost more than a stage's own work.
        """
        params = self.params
        head = _STATE_HEAD.pack(
            self.node_id,
            self.next_stage,
            params.num_shares,
            params.threshold,
            params.vector_length,
            params.clip_range,
            params.max_weight,
        )
        blob = b"".join(
            [
                _STATE_TAG,
                head,
                _COUNT.pack(len(params.round_seed)),
                params.round_seed,
                _pack_ids(params.participants),
                self.enc_private,
                self.mask_private,
                self.seed,
                self.sign_private,
                _pack_ids(self.partners),
                *self.share_keys,
                *self.mask_seeds,
                _pack_ids(self.held),
                *self.held_seed_shares,
                *self.held_key_shares,
                _pack_ids(self.verifiers),
                *self.verify_keys,
                _pack_ids(self.signed),
            ]
        )
        return {STATE_FIELD: blob}

    @classmethod
    def _read(cls, reader: _Reader) -> ClientState:
        head = reader.unpack(_STATE_HEAD)
        node_id, next_stage, numeric_params = head[0], head[1], head[2:]
        round_seed = reader.take(reader.count())
        participants = reader.ids()
        params = SecAggParams.untrusted(
            "stored state has invalid parameters", participants, *numeric_params, round_seed
        )
        if not 1 <= next_stage <= _DONE or node_id not in participants:
            raise ProtocolError("stored state has an invalid stage or node id")
        secrets = reader.blocks(4, KEY_BYTES)
        partners = reader.ids()
        share_keys = reader.blocks(len(partners), KEY_BYTES)
        mask_seeds = reader.blocks(len(partners), KEY_BYTES)
        held = reader.ids()
        held_seed_shares = reader.blocks(len(held), SHARE_BYTES)
        held_key_shares = reader.blocks(len(held), SHARE_BYTES)
        verifiers = reader.ids()
        verify_keys = reader.blocks(len(verifiers), KEY_BYTES)
        signed = reader.ids()
        reader.finish()
        return cls(
            node_id,
            params,
            next_stage,
            *secrets,
            partners,
            share_keys,
            mask_seeds,
            held,
            held_seed_shares,
            held_key_shares,
            verifiers,
            verify_keys,
            signed,
        )


StoredState = RoundKeys | ClientState


def load_state(raw: Mapping[str, object]) -> StoredState:
    """Inverse of either `to_dict`; ProtocolError if the stored state is corrupt."""
    reader = _Reader(read_bytes(raw, STATE_FIELD))
    for tag, kind in ((_STATE_TAG, ClientState), (_KEYS_TAG, RoundKeys)):
        if reader.peek(len(tag)) == tag:
            reader.take(len(tag))
            return kind._read(reader)
    raise ProtocolError("stored state has an unknown format or version")


class _Reader:
    """Strict cursor over a stored state: truncated or trailing data is a ProtocolError."""

    def __init__(self, blob: bytes) -> None:
        self._blob = blob
        self._offset = 0

    def take(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._blob):
            raise ProtocolError("stored state is truncated")
        chunk = self._blob[self._offset : end]
        self._offset = end
        return chunk

    def peek(self, size: int) -> bytes:
        return self._blob[self._offset : self._offset + size]

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))

    def count(self) -> int:
        return int(self.unpack(_COUNT)[0])

    def ids(self) -> tuple[int, ...]:
        """A counted list of distinct node ids."""
        count = self.count()
        ids = struct.unpack(f">{count}Q", self.take(8 * count))
        if len(set(ids)) != count:
            raise ProtocolError("stored state has duplicate node ids")
        return ids

    def blocks(self, count: int, size: int) -> tuple[bytes, ...]:
        data = self.take(count * size)
        return tuple(data[i : i + size] for i in range(0, count * size, size))

    def finish(self) -> None:
        if self._offset != len(self._blob):
            raise ProtocolError("stored state has trailing bytes")


def _pack_ids(ids: tuple[int, ...]) -> bytes:
    return _COUNT.pack(len(ids)) + struct.pack(f">{len(ids)}Q", *ids)


def client_setup(node_id: int, payload: Mapping[str, object]) -> tuple[RoundKeys, Payload]:
    """Create fresh keys and a self-mask seed for the round seed in `payload`.

    Payload: node_id, round_seed. Reply: pk_enc, pk_mask, pk_sign (32 bytes
    each), seed_commitment (32 bytes).
    """
    expect_stage(payload, Stage.SETUP)
    if read_int(payload, "node_id") != node_id:
        raise ProtocolError(f"setup message addressed to another node, not {node_id}")
    round_seed = read_bytes(payload, "round_seed")
    if len(round_seed) < MIN_ROUND_SEED_BYTES:
        raise ProtocolError(f"round_seed must have at least {MIN_ROUND_SEED_BYTES} bytes")
    enc, mask = KeyPair(), KeyPair()
    sign_private, sign_public = new_signing_key()
    keys = RoundKeys(
        node_id, round_seed, enc.private, mask.private, os.urandom(KEY_BYTES), sign_private
    )
    reply: Payload = {
        STAGE_KEY: Stage.SETUP.value,
        "pk_enc": enc.public,
        "pk_mask": mask.public,
        "pk_sign": sign_public,
        "seed_commitment": seed_commitment(keys.seed, node_id, round_seed),
    }
    return keys, reply


def client_share_keys(
    stored: StoredState, payload: Mapping[str, object]
) -> tuple[ClientState, Payload]:
    """Validate the round parameters; secret-share the seed and mask key among neighbours.

    Payload: the round parameters (see SecAggParams.to_payload), neighbours (ids,
    self included), pk_enc and pk_mask (aligned); verifiers (the participants
    that sent keys) and pk_sign (aligned). Reply: receivers (ids) and
    ciphertexts (aligned), one per neighbour but self.
    """
    keys = _expect(stored, payload, Stage.SHARE_KEYS)
    assert isinstance(keys, RoundKeys)
    me, params = keys.node_id, SecAggParams.from_payload(payload)
    if params.round_seed != keys.round_seed:
        raise ProtocolError("the round seed differs from the one this node's keys commit to")
    if me not in params.participants:
        raise ProtocolError(f"node {me} is not among the participants")
    verifiers = read_ids(payload, "verifiers")
    verify_keys = read_bytes_list(payload, "pk_sign", len(verifiers), KEY_BYTES)
    if not set(verifiers) <= set(params.participants):
        raise ProtocolError("verification keys of nodes that are not participants")
    own_key = verification_key(keys.sign_private)
    if me not in verifiers or verify_keys[verifiers.index(me)] != own_key:
        raise ProtocolError("the server altered or left out this node's own verification key")
    state = ClientState(
        me,
        params,
        STAGES.index(Stage.SHARE_KEYS),
        keys.enc_private,
        keys.mask_private,
        keys.seed,
        keys.sign_private,
        verifiers=tuple(verifiers),
        verify_keys=tuple(verify_keys),
    )
    peers = read_ids(payload, "neighbours")
    enc_keys = read_bytes_list(payload, "pk_enc", len(peers), KEY_BYTES)
    mask_keys = read_bytes_list(payload, "pk_mask", len(peers), KEY_BYTES)
    if me not in peers or not set(peers) <= set(params.neighbours(me)):
        raise ProtocolError(f"neighbours {peers} are not a neighbourhood of node {me}")
    mine = peers.index(me)
    enc, mask = KeyPair(state.enc_private), KeyPair(state.mask_private)
    if (enc_keys[mine], mask_keys[mine]) != (enc.public, mask.public):
        raise ProtocolError("the server altered this node's own public keys")
    if len(peers) < params.threshold:
        raise SecAggAbort(f"only {len(peers)} live neighbours, threshold {params.threshold}")
    rs = params.round_seed
    others = [i for i, peer in enumerate(peers) if peer != me]
    # Both pair keys are derived now, once: that also refuses a low-order peer
    # key before any share leaves this node.
    share_keys = tuple(enc.share_key(enc_keys[i], me, peers[i], rs) for i in others)
    mask_seeds = tuple(mask.mask_seed(mask_keys[i], me, peers[i], rs) for i in others)
    xs = [params.x_coordinate(peer) for peer in peers]
    seed_shares = split(state.seed, xs, params.threshold)
    key_shares = split(state.mask_private, xs, params.threshold)
    receivers = [peers[i] for i in others]
    ciphertexts = [
        encrypt_share(key, me, peers[i], rs, seed_shares[i] + key_shares[i])
        for key, i in zip(share_keys, others, strict=True)
    ]
    state = replace(
        state,
        next_stage=STAGES.index(Stage.MASKED_INPUT),
        partners=tuple(receivers),
        share_keys=share_keys,
        mask_seeds=mask_seeds,
        held=(me,),
        held_seed_shares=(seed_shares[mine],),
        held_key_shares=(key_shares[mine],),
    )
    reply: Payload = {
        STAGE_KEY: Stage.SHARE_KEYS.value,
        "receivers": receivers,
        "ciphertexts": ciphertexts,
    }
    return state, reply


@dataclass(frozen=True)
class MaskedInput:
    """The MASKED_INPUT stage once the received shares are opened.

    The mask does not depend on the update, so a client can expand it (`mask`,
    most of the stage's work; the cipher releases the GIL) while it trains,
    then `upload` adds it to the encoded update.
    """

    state: ClientState  # to store once the upload is sent
    accepted: tuple[int, ...]  # senders whose shares opened: this client masks with them
    rejected: tuple[int, ...]  # senders whose ciphertext failed: the server drops them

    @property
    def mask_bytes(self) -> int:
        """Keystream that `mask` expands: one vector per mask."""
        return 4 * (self.state.params.vector_length + 1) * (1 + len(self.accepted))

    def mask(self) -> NDArray[np.uint32]:
        """The self mask plus the pairwise masks with every accepted sender."""
        state = self.state
        total = np.zeros(state.params.vector_length + 1, dtype=np.uint32)
        masker = Masker(total.size)
        masker.add(total, state.seed)
        seeds = dict(zip(state.partners, state.mask_seeds, strict=True))
        for sender in self.accepted:
            masker.add_pair(total, seeds[sender], state.node_id, sender)
        return total

    def upload(
        self, update: NDArray[np.floating], weight: int, mask: NDArray[np.uint32] | None = None
    ) -> Payload:
        """The reply: weight·update quantized, plus `mask` (this stage's `mask()`).

        `update` is the flattened, clipped Δ (vector_length floats); `weight`
        is n_k, capped at max_weight. The plain encoding never leaves this call.
        """
        params = self.state.params
        if update.shape != (length := params.vector_length,):
            raise ValueError(f"update must have shape ({length},), got {update.shape}")
        masked = params.quantizer.encode(update, weight)
        masked += self.mask() if mask is None else mask
        return {
            STAGE_KEY: Stage.MASKED_INPUT.value,
            "rejected": list(self.rejected),
            "masked": masked,
        }


def client_masked_input(stored: StoredState, payload: Mapping[str, object]) -> MaskedInput:
    """Open the received shares; the upload follows from the returned stage.

    Payload: senders (ids) and ciphertexts (aligned). SecAggAbort if fewer
    share holders than the threshold are left: known before any training.
    """
    state = _expect(stored, payload, Stage.MASKED_INPUT)
    assert isinstance(state, ClientState)
    senders = read_ids(payload, "senders")
    ciphertexts = read_bytes_list(payload, "ciphertexts", len(senders))
    index = {peer: i for i, peer in enumerate(state.partners)}
    if not set(senders) <= index.keys():
        raise ProtocolError(f"senders {senders} are not live neighbours of node {state.node_id}")
    accepted: dict[int, tuple[bytes, bytes]] = {}
    for sender, ciphertext in zip(senders, ciphertexts, strict=True):
        shares = _open_shares(state, state.share_keys[index[sender]], sender, ciphertext)
        if shares is not None:
            accepted[sender] = shares
    if 1 + len(accepted) < state.params.threshold:
        raise SecAggAbort(
            f"only {1 + len(accepted)} share holders left, threshold {state.params.threshold}"
        )
    state = replace(
        state,
        next_stage=STAGES.index(Stage.CONSISTENCY),
        held=state.held + tuple(accepted),
        held_seed_shares=state.held_seed_shares + tuple(seed for seed, _ in accepted.values()),
        held_key_shares=state.held_key_shares + tuple(key for _, key in accepted.values()),
    )
    rejected = tuple(sender for sender in senders if sender not in accepted)
    return MaskedInput(state, tuple(accepted), rejected)


def client_consistency(
    stored: StoredState, payload: Mapping[str, object]
) -> tuple[ClientState, Payload]:
    """Sign the announced survivor set, once, if this node could safely unmask for it.

    Payload: survivors (the ids whose masked input the server kept). Reply:
    signature (64 bytes). Refuses (ProtocolError) a set without this node or
    with strangers, and (SecAggAbort) one that leaves fewer than t of the
    nodes whose shares it holds, itself included: revealing for such a set
    could expose a lone survivor.
    """
    state = _expect(stored, payload, Stage.CONSISTENCY)
    assert isinstance(state, ClientState)
    survivors = sorted(read_ids(payload, "survivors"))
    _check_survivors(state, survivors)
    signature = sign_survivors(state.sign_private, state.params.round_seed, survivors)
    state = replace(state, next_stage=STAGES.index(Stage.UNMASK), signed=tuple(survivors))
    return state, {STAGE_KEY: Stage.CONSISTENCY.value, "signature": signature}


def client_unmask(
    stored: StoredState, payload: Mapping[str, object]
) -> tuple[ClientState, Payload]:
    """Reveal seed shares of survivors and key shares of the rest, never both for one node.

    Payload: survivors (the set this node signed), signers (ids) and
    signatures (aligned). Nothing is revealed unless at least the signature
    quorum of distinct participants signed this very set (see
    SecAggParams.signature_quorum). Which nodes count as dropped is derived
    here, as the holders' shares minus the survivors, not taken from the
    server. Reply: seed_shares for the held survivors and key_shares for the
    other held nodes, each in ascending id order. Answers once per round: the
    returned state refuses any further request.
    """
    state = _expect(stored, payload, Stage.UNMASK)
    assert isinstance(state, ClientState)
    survivors = sorted(read_ids(payload, "survivors"))
    if tuple(survivors) != state.signed:
        raise ProtocolError("refusing to unmask for another survivor set than the one signed")
    signers = read_ids(payload, "signers")
    signatures = read_bytes_list(payload, "signatures", len(signers), SIGNATURE_BYTES)
    keys = dict(zip(state.verifiers, state.verify_keys, strict=True))
    rs, members = state.params.round_seed, set(survivors)
    valid = 0
    quorum = state.params.signature_quorum
    for signer, signature in zip(signers, signatures, strict=True):
        if valid == quorum:
            break
        if signer in members and signer in keys:
            valid += survivors_signed(keys[signer], signature, rs, survivors)
    if valid < quorum:
        raise ProtocolError(
            f"only {valid} valid survivor-set signatures, need {quorum}; revealing nothing"
        )
    alive, gone = _split_held(state, survivors)
    pairs = zip(state.held_seed_shares, state.held_key_shares, strict=True)
    shares = dict(zip(state.held, pairs, strict=True))
    reply: Payload = {
        STAGE_KEY: Stage.UNMASK.value,
        "seed_shares": [shares[node][0] for node in alive],
        "key_shares": [shares[node][1] for node in gone],
    }
    return replace(state, next_stage=_DONE), reply


def _check_survivors(state: ClientState, survivors: list[int]) -> None:
    """Refuse a survivor set this node cannot safely unmask for (see client_consistency)."""
    if state.node_id not in survivors:
        raise ProtocolError(f"node {state.node_id} is alive; refusing a set without it")
    if not set(survivors) <= set(state.params.participants):
        raise ProtocolError("the survivor set names nodes that are not participants")
    alive, _ = _split_held(state, survivors)
    t = state.params.threshold
    if len(alive) < t:
        raise SecAggAbort(
            f"only {len(alive)} of the nodes whose shares this node holds survive, threshold {t}"
        )


def _split_held(state: ClientState, survivors: list[int]) -> tuple[list[int], list[int]]:
    """The held nodes in `survivors` and the others (dropped), each in ascending order."""
    members = set(survivors)
    held = sorted(state.held)
    return [n for n in held if n in members], [n for n in held if n not in members]


def _open_shares(
    state: ClientState, share_key: bytes, sender: int, ciphertext: bytes
) -> tuple[bytes, bytes] | None:
    """The (seed share, key share) pair from `sender`, or None if it is not authentic."""
    try:
        plaintext = decrypt_share(
            share_key, sender, state.node_id, state.params.round_seed, ciphertext
        )
    except ProtocolError:
        return None
    seed_share, key_share = plaintext[:SHARE_BYTES], plaintext[SHARE_BYTES:]
    if share_is_valid(seed_share) and share_is_valid(key_share):
        return seed_share, key_share
    return None


def _expect(stored: StoredState, payload: Mapping[str, object], stage: Stage) -> StoredState:
    """`stored` if it awaits a `stage` message and `payload` is one, else ProtocolError."""
    awaited = STAGES.index(Stage.SHARE_KEYS) if isinstance(stored, RoundKeys) else stored.next_stage
    if awaited != STAGES.index(stage):
        expected = "nothing" if awaited == _DONE else STAGES[awaited].value
        raise ProtocolError(f"got a {stage.value} message while expecting {expected}")
    expect_stage(payload, stage)
    return stored
