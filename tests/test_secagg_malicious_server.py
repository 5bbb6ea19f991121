"""A malicious server tries to unmask one chosen client (issue 12, "a server that cannot unmask").

The server here follows the protocol up to the masked uploads (it keeps each
upload, as a server can), then lies: it picks, per client, the survivor set that
client is shown, collects whatever signatures it gets, forwards any of them, and
tries to rebuild the chosen client's self-mask seed and the mask keys of all its
partners from the shares it is sent. It relays the public keys faithfully and
cannot forge an honest client's signature (the stated assumption).

The same attack against holders that reveal without the consistency checks
(`unchecked`, the old behaviour: trust the server's survivor list) recovers the
chosen update to one quantization step, so the attack code is known to work.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations
from typing import cast

import numpy as np
import pytest
from numpy.typing import NDArray
from test_secagg_core import Round, make_round

from fedge.secagg import (
    ClientState,
    Payload,
    ProtocolError,
    SecAggAbort,
    Stage,
    client_consistency,
    client_unmask,
)
from fedge.secagg.crypto import KEY_BYTES, KeyPair, Masker, public_key, seed_commitment
from fedge.secagg.shamir import combine

Views = dict[int, list[int]]  # the survivor set each client is shown
Shares = dict[str, dict[int, dict[int, bytes]]]  # kind -> owner -> {x: share}
Reveal = Callable[[Round, Views], Shares]
SHAPES = {"complete 10": (10, 10, 7), "5-of-10": (10, 5, 4), "7-of-20": (20, 7, 5)}


def upload_honestly(rnd: Round) -> dict[int, NDArray[np.uint32]]:
    """Run the round up to the masked uploads and keep each one, as a server can."""
    server = rnd.server
    payloads = server.receive_public_keys(rnd._answer(Stage.SETUP, server.setup_payloads()))
    payloads = server.receive_encrypted_shares(rnd._answer(Stage.SHARE_KEYS, payloads))
    replies = rnd._answer(Stage.MASKED_INPUT, payloads)
    return {node: cast(NDArray[np.uint32], reply["masked"]) for node, reply in replies.items()}


def _held(state: ClientState, view: list[int]) -> tuple[list[int], list[int]]:
    held = sorted(state.held)
    return [n for n in held if n in view], [n for n in held if n not in view]


def _record(
    shares: Shares, rnd: Round, holder: int, reply: Payload, alive: list[int], gone: list[int]
) -> None:
    x = rnd.server.params.x_coordinate(holder)
    for kind, owners in (("seed_shares", alive), ("key_shares", gone)):
        for owner, share in zip(owners, cast(list[bytes], reply[kind]), strict=True):
            shares[kind].setdefault(owner, {})[x] = share


def reveal_with_checks(rnd: Round, views: Views) -> Shares:
    """fedge's real clients: sign at CONSISTENCY, check signatures at UNMASK."""
    signatures: dict[int, bytes] = {}
    for node, view in views.items():
        try:
            state, reply = client_consistency(
                rnd.states[node], {"stage": Stage.CONSISTENCY.value, "survivors": view}
            )
        except (ProtocolError, SecAggAbort):
            continue
        rnd.states[node] = state
        signatures[node] = cast(bytes, reply["signature"])
    shares: Shares = {"seed_shares": {}, "key_shares": {}}
    for node in signatures:
        view = views[node]
        # Forward every signature the server holds on exactly this set (and any other, too).
        signers = sorted(signatures, key=lambda s: views[s] != view)
        request: Payload = {
            "stage": Stage.UNMASK.value,
            "survivors": view,
            "signers": signers,
            "signatures": [signatures[s] for s in signers],
        }
        try:
            _, reply = client_unmask(rnd.states[node], request)
        except (ProtocolError, SecAggAbort):
            continue
        _record(shares, rnd, node, reply, *_held(cast(ClientState, rnd.states[node]), view))
    return shares


def reveal_unchecked(rnd: Round, views: Views) -> Shares:
    """Control: holders that trust the server's list, as before the consistency round
    (seed shares of the survivors, key shares of the rest but never their own)."""
    shares: Shares = {"seed_shares": {}, "key_shares": {}}
    for node, view in views.items():
        state = cast(ClientState, rnd.states[node])
        alive, gone = _held(state, view)
        gone = [owner for owner in gone if owner != node]  # it would not reveal its own key
        index = {owner: i for i, owner in enumerate(state.held)}
        reply: Payload = {
            "seed_shares": [state.held_seed_shares[index[o]] for o in alive],
            "key_shares": [state.held_key_shares[index[o]] for o in gone],
        }
        _record(shares, rnd, node, reply, alive, gone)
    return shares


def _rebuild(points: dict[int, bytes], t: int, check: Callable[[bytes], bool]) -> bytes | None:
    for subset in combinations(sorted(points), t):
        try:
            secret = combine({x: points[x] for x in subset}, KEY_BYTES)
        except ValueError:
            continue
        if check(secret):
            return secret
    return None


def unmask_one(
    rnd: Round, uploads: dict[int, NDArray[np.uint32]], shares: Shares, target: int
) -> NDArray[np.float64] | None:
    """The target's weighted update, if the shares give its seed and all its partners' keys."""
    params, setup = rnd.server.params, rnd.replies[Stage.SETUP]
    rs, t = params.round_seed, params.threshold
    commitment = setup[target]["seed_commitment"]
    seed = _rebuild(
        shares["seed_shares"].get(target, {}),
        t,
        lambda s: seed_commitment(s, target, rs) == commitment,
    )
    if seed is None:
        return None
    _, sent = rnd.inbox[Stage.MASKED_INPUT][target]
    rejected = set(cast(list[int], rnd.replies[Stage.MASKED_INPUT][target]["rejected"]))
    partners = [p for p in cast(list[int], sent["senders"]) if p not in rejected]
    vector = uploads[target].copy()
    masker = Masker(vector.size)
    masker.add(vector, seed, subtract=True)
    for partner in partners:
        pk = setup[partner]["pk_mask"]
        key = _rebuild(
            shares["key_shares"].get(partner, {}), t, lambda s, pk=pk: public_key(s) == pk
        )
        if key is None:
            return None
        pair_seed = KeyPair(key).mask_seed(setup[target]["pk_mask"], target, partner, rs)
        masker.add_pair(vector, pair_seed, target, partner, remove=True)
    decoded, _ = params.quantizer.decode(vector)
    return decoded


def told_target_survived_alone(rnd: Round, target: int) -> Views:
    """The issue's attack: every holder hears "the target survived, the others dropped"."""
    return {node: [target] for node in rnd.server.params.participants}


def told_target_and_self_survived(rnd: Round, target: int) -> Views:
    """Each holder hears that only it and the target survived (so it is asked too)."""
    return {node: sorted({target, node}) for node in rnd.server.params.participants}


def told_neighbours_dropped(rnd: Round, target: int) -> Views:
    """One set for all: the target plus everyone outside its neighbourhood."""
    params = rnd.server.params
    view = sorted(set(params.participants) - set(params.neighbours(target)) | {target})
    return dict.fromkeys(params.participants, view)


def split_views_padded_to_quorum(rnd: Round, target: int) -> Views:
    """Each of the target's neighbours hears "you, the target and the outsiders survived";
    the outsiders all get the first neighbour's set, to give it their signatures."""
    params = rnd.server.params
    near = set(params.neighbours(target))
    outsiders = set(params.participants) - near
    views = {node: sorted(outsiders | {target, node}) for node in near}
    first = min(near - {target})
    views.update(dict.fromkeys(outsiders, views[first]))
    return views


ATTACKS = {
    "target survived alone": told_target_survived_alone,
    "target and self survived": told_target_and_self_survived,
    "neighbours dropped": told_neighbours_dropped,
    "split views padded to quorum": split_views_padded_to_quorum,
}
CONTROLLED = ("target survived alone", "target and self survived")


def _attack(shape: str, attack: str, reveal: Reveal) -> tuple[Round, object, int]:
    n, k, t = SHAPES[shape]
    rnd = make_round(n, k, t, length=40, seed=n + k)
    uploads = upload_honestly(rnd)
    target = rnd.server.params.participants[n // 2]
    shares = reveal(rnd, ATTACKS[attack](rnd, target))
    return rnd, unmask_one(rnd, uploads, shares, target), target


@pytest.mark.parametrize("attack", CONTROLLED)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_attack_unmasks_holders_that_trust_the_server(shape: str, attack: str) -> None:
    """Control: without the consistency checks the chosen update comes out."""
    rnd, recovered, target = _attack(shape, attack, reveal_unchecked)
    assert recovered is not None
    params = rnd.server.params
    weight = min(rnd.weights[target], params.max_weight)
    error = np.abs(cast(NDArray[np.float64], recovered) - weight * rnd.updates[target])
    assert error.max() <= params.quantizer.step


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_a_malicious_server_recovers_nothing_of_a_chosen_client(shape: str, attack: str) -> None:
    _, recovered, _ = _attack(shape, attack, reveal_with_checks)
    assert recovered is None


@pytest.mark.parametrize("attack", CONTROLLED)
@pytest.mark.parametrize("shape", SHAPES)
def test_holders_reveal_no_share_at_all_for_a_set_without_quorum(shape: str, attack: str) -> None:
    n, k, t = SHAPES[shape]
    rnd = make_round(n, k, t, length=40, seed=n + k)
    upload_honestly(rnd)
    target = rnd.server.params.participants[n // 2]
    shares = reveal_with_checks(rnd, ATTACKS[attack](rnd, target))
    assert shares == {"seed_shares": {}, "key_shares": {}}


def test_one_sided_masks_from_garbled_shares_do_not_unmask_the_target() -> None:
    """The server garbles the shares some neighbours B send the target, so the target
    masks only with the others A while B still mask with it; then it announces every
    node but A. At the minimal threshold (5 shares, t = 3) unchecked holders give the
    target's seed (B and the target itself) and A's keys: the update comes out. The
    target refuses that set (it holds fewer than t survivors), and B alone are too few.
    """
    rnd = make_round(10, 5, 3, length=40, seed=7)
    params = rnd.server.params
    target = params.participants[5]
    peers = [p for p in params.neighbours(target) if p != target]
    partners, garbled = peers[:2], peers[2:]  # |A| = t - 1 keeps the target uploading
    server = rnd.server
    payloads = server.receive_public_keys(rnd._answer(Stage.SETUP, server.setup_payloads()))
    payloads = server.receive_encrypted_shares(rnd._answer(Stage.SHARE_KEYS, payloads))
    to_target = payloads[target]
    senders = cast(list[int], to_target["senders"])
    to_target["ciphertexts"] = [
        c[:-1] + bytes([c[-1] ^ 1]) if sender in garbled else c
        for sender, c in zip(senders, cast(list[bytes], to_target["ciphertexts"]), strict=True)
    ]
    replies = rnd._answer(Stage.MASKED_INPUT, payloads)
    assert sorted(cast(list[int], replies[target]["rejected"])) == sorted(garbled)
    uploads = {node: cast(NDArray[np.uint32], reply["masked"]) for node, reply in replies.items()}
    views = dict.fromkeys(params.participants, sorted(set(params.participants) - set(partners)))

    control = reveal_unchecked(rnd, views)
    recovered = unmask_one(rnd, uploads, control, target)
    weight = min(rnd.weights[target], params.max_weight)
    assert recovered is not None
    assert np.abs(recovered - weight * rnd.updates[target]).max() <= params.quantizer.step

    shares = reveal_with_checks(rnd, views)
    assert unmask_one(rnd, uploads, shares, target) is None
    assert target not in shares["seed_shares"] or len(shares["seed_shares"][target]) < 3
