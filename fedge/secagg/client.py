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
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from fedge.secagg.crypto import (
    KEY_BYTES,
    decrypt_share,
    encrypt_share,
    expand_mask,
    generate_private_key,
    pairwise_mask,
    public_key,
    seed_commitment,
    validate_public_key,
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
from fedge.secagg.params import SecAggParams
from fedge.secagg.shamir import SHARE_BYTES, share_is_valid, split

_DONE = len(STAGES)


@dataclass(frozen=True)
class ClientState:
    """What a client must remember between stages (secrets included: keep it local)."""

    node_id: int
    params: SecAggParams
    next_stage: int  # index into STAGES of the next accepted message; _DONE at the end
    enc_private: bytes  # X25519 key for share encryption
    mask_private: bytes  # X25519 key for pairwise masks (secret-shared)
    seed: bytes  # self-mask seed b (secret-shared)
    peers: tuple[int, ...] = ()  # live neighbours announced at SHARE_KEYS, self included
    peer_enc_keys: tuple[bytes, ...] = ()
    peer_mask_keys: tuple[bytes, ...] = ()
    held: tuple[int, ...] = ()  # nodes whose shares this client holds, self included
    held_seed_shares: tuple[bytes, ...] = ()
    held_key_shares: tuple[bytes, ...] = ()

    def to_dict(self) -> StateDict:
        """Flat dict of ConfigRecord-compatible values (e.g. for Flower's context.state)."""
        state: StateDict = {
            "node_id": self.node_id,
            "next_stage": self.next_stage,
            "enc_private": self.enc_private,
            "mask_private": self.mask_private,
            "seed": self.seed,
            "peers": list(self.peers),
            "peer_enc_keys": list(self.peer_enc_keys),
            "peer_mask_keys": list(self.peer_mask_keys),
            "held": list(self.held),
            "held_seed_shares": list(self.held_seed_shares),
            "held_key_shares": list(self.held_key_shares),
        }
        state.update(self.params.to_payload())
        return state

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> ClientState:
        """Inverse of `to_dict`; ProtocolError if the stored state is corrupt."""
        peers = read_ids(raw, "peers")
        held = read_ids(raw, "held")
        return cls(
            node_id=read_int(raw, "node_id"),
            params=SecAggParams.from_payload(raw),
            next_stage=read_int(raw, "next_stage", 1, _DONE),
            enc_private=read_bytes(raw, "enc_private", KEY_BYTES),
            mask_private=read_bytes(raw, "mask_private", KEY_BYTES),
            seed=read_bytes(raw, "seed", KEY_BYTES),
            peers=tuple(peers),
            peer_enc_keys=tuple(read_bytes_list(raw, "peer_enc_keys", len(peers), KEY_BYTES)),
            peer_mask_keys=tuple(read_bytes_list(raw, "peer_mask_keys", len(peers), KEY_BYTES)),
            held=tuple(held),
            held_seed_shares=tuple(
                read_bytes_list(raw, "held_seed_shares", len(held), SHARE_BYTES)
            ),
            held_key_shares=tuple(read_bytes_list(raw, "held_key_shares", len(held), SHARE_BYTES)),
        )


def client_setup(node_id: int, payload: Mapping[str, object]) -> tuple[ClientState, Payload]:
    """Validate the round parameters, create fresh keys and the self-mask seed.

    Reply: pk_enc, pk_mask (32 bytes each), seed_commitment (32 bytes).
    """
    expect_stage(payload, Stage.SETUP)
    if read_int(payload, "node_id") != node_id:
        raise ProtocolError(f"setup message addressed to another node, not {node_id}")
    params = SecAggParams.from_payload(payload)
    if node_id not in params.participants:
        raise ProtocolError(f"node {node_id} is not among the participants")
    state = ClientState(
        node_id=node_id,
        params=params,
        next_stage=STAGES.index(Stage.SHARE_KEYS),
        enc_private=generate_private_key(),
        mask_private=generate_private_key(),
        seed=os.urandom(KEY_BYTES),
    )
    reply: Payload = {
        STAGE_KEY: Stage.SETUP.value,
        "pk_enc": public_key(state.enc_private),
        "pk_mask": public_key(state.mask_private),
        "seed_commitment": seed_commitment(state.seed, node_id, params.round_seed),
    }
    return state, reply


def client_share_keys(
    state: ClientState, payload: Mapping[str, object]
) -> tuple[ClientState, Payload]:
    """Secret-share the self-mask seed and mask key among the live neighbours.

    Payload: neighbours (ids, self included), pk_enc and pk_mask (aligned).
    Reply: receivers (ids) and ciphertexts (aligned), one per neighbour but self.
    """
    _expect(state, payload, Stage.SHARE_KEYS)
    me, params = state.node_id, state.params
    peers = read_ids(payload, "neighbours")
    enc_keys = read_bytes_list(payload, "pk_enc", len(peers), KEY_BYTES)
    mask_keys = read_bytes_list(payload, "pk_mask", len(peers), KEY_BYTES)
    if me not in peers or not set(peers) <= set(params.neighbours(me)):
        raise ProtocolError(f"neighbours {peers} are not a neighbourhood of node {me}")
    mine = peers.index(me)
    if (enc_keys[mine], mask_keys[mine]) != (
        public_key(state.enc_private),
        public_key(state.mask_private),
    ):
        raise ProtocolError("the server altered this node's own public keys")
    if len(peers) < params.threshold:
        raise SecAggAbort(f"only {len(peers)} live neighbours, threshold {params.threshold}")
    for key in enc_keys + mask_keys:
        validate_public_key(key)
    xs = [params.x_coordinate(peer) for peer in peers]
    seed_shares = split(state.seed, xs, params.threshold)
    key_shares = split(state.mask_private, xs, params.threshold)
    receivers = [peer for peer in peers if peer != me]
    ciphertexts = [
        encrypt_share(
            state.enc_private,
            enc_keys[i],
            me,
            peer,
            params.round_seed,
            seed_shares[i] + key_shares[i],
        )
        for i, peer in enumerate(peers)
        if peer != me
    ]
    state = replace(
        state,
        next_stage=STAGES.index(Stage.MASKED_INPUT),
        peers=tuple(peers),
        peer_enc_keys=tuple(enc_keys),
        peer_mask_keys=tuple(mask_keys),
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


def client_masked_input(
    state: ClientState,
    payload: Mapping[str, object],
    update: NDArray[np.floating],
    weight: int,
) -> tuple[ClientState, Payload]:
    """Decrypt the received shares and upload the masked, quantized weight·update.

    `update` is the flattened, clipped Δ (vector_length floats); `weight` is
    n_k, capped at max_weight. Payload: senders (ids) and ciphertexts (aligned).
    Reply: rejected (senders whose ciphertext failed authentication: the server
    drops them, so no mask is shared with them) and masked (uint32 array of
    vector_length + 1 entries).
    """
    _expect(state, payload, Stage.MASKED_INPUT)
    me, params = state.node_id, state.params
    if update.shape != (params.vector_length,):
        raise ValueError(f"update must have shape ({params.vector_length},), got {update.shape}")
    encoded = params.quantizer.encode(update, weight)
    senders = read_ids(payload, "senders")
    ciphertexts = read_bytes_list(payload, "ciphertexts", len(senders))
    index = {peer: i for i, peer in enumerate(state.peers) if peer != me}
    if not set(senders) <= index.keys():
        raise ProtocolError(f"senders {senders} are not live neighbours of node {me}")
    accepted: dict[int, tuple[bytes, bytes]] = {}
    for sender, ciphertext in zip(senders, ciphertexts, strict=True):
        shares = _open_shares(state, state.peer_enc_keys[index[sender]], sender, ciphertext)
        if shares is not None:
            accepted[sender] = shares
    if 1 + len(accepted) < params.threshold:
        raise SecAggAbort(
            f"only {1 + len(accepted)} share holders left, threshold {params.threshold}"
        )
    length = params.vector_length + 1
    masked = encoded + expand_mask(state.seed, length)
    for sender in accepted:  # no mask with rejected senders: the server drops them
        masked += pairwise_mask(
            state.mask_private,
            state.peer_mask_keys[index[sender]],
            me,
            sender,
            params.round_seed,
            length,
        )
    state = replace(
        state,
        next_stage=STAGES.index(Stage.UNMASK),
        held=state.held + tuple(accepted),
        held_seed_shares=state.held_seed_shares + tuple(seed for seed, _ in accepted.values()),
        held_key_shares=state.held_key_shares + tuple(key for _, key in accepted.values()),
    )
    rejected = [sender for sender in senders if sender not in accepted]
    reply: Payload = {STAGE_KEY: Stage.MASKED_INPUT.value, "rejected": rejected, "masked": masked}
    return state, reply


def client_unmask(state: ClientState, payload: Mapping[str, object]) -> tuple[ClientState, Payload]:
    """Reveal seed shares of survivors or key shares of dropped nodes, never both.

    Payload: survivors and dropped (ids, disjoint, among the nodes whose shares
    this client holds). Reply: seed_shares and key_shares, aligned with them.
    Answers once per round: the returned state refuses any further request.
    """
    _expect(state, payload, Stage.UNMASK)
    me = state.node_id
    survivors = read_ids(payload, "survivors")
    dropped = read_ids(payload, "dropped")
    both = set(survivors) & set(dropped)
    if both:
        raise ProtocolError(f"refusing to reveal both share kinds for nodes {sorted(both)}")
    if me in dropped:
        raise ProtocolError(f"node {me} is alive; refusing to reveal its mask key")
    index = {node: i for i, node in enumerate(state.held)}
    unknown = set(survivors + dropped) - index.keys()
    if unknown:
        raise ProtocolError(f"this node holds no shares of nodes {sorted(unknown)}")
    reply: Payload = {
        STAGE_KEY: Stage.UNMASK.value,
        "seed_shares": [state.held_seed_shares[index[node]] for node in survivors],
        "key_shares": [state.held_key_shares[index[node]] for node in dropped],
    }
    return replace(state, next_stage=_DONE), reply


def _open_shares(
    state: ClientState, peer_enc_key: bytes, sender: int, ciphertext: bytes
) -> tuple[bytes, bytes] | None:
    """The (seed share, key share) pair from `sender`, or None if it is not authentic."""
    try:
        plaintext = decrypt_share(
            state.enc_private,
            peer_enc_key,
            sender,
            state.node_id,
            state.params.round_seed,
            ciphertext,
        )
    except ProtocolError:
        return None
    seed_share, key_share = plaintext[:SHARE_BYTES], plaintext[SHARE_BYTES:]
    if share_is_valid(seed_share) and share_is_valid(key_share):
        return seed_share, key_share
    return None


def _expect(state: ClientState, payload: Mapping[str, object], stage: Stage) -> None:
    if state.next_stage != STAGES.index(stage):
        expected = "nothing" if state.next_stage == _DONE else STAGES[state.next_stage].value
        raise ProtocolError(f"got a {stage.value} message while expecting {expected}")
    expect_stage(payload, stage)
