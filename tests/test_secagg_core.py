"""End-to-end SecAgg+ rounds in-process: correctness, dropouts, aborts, tampering."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from fedge.secagg import (
    AggregateResult,
    ClientState,
    Payload,
    ProtocolError,
    RoundKeys,
    SecAggAbort,
    SecAggServer,
    Stage,
    StoredState,
    client_consistency,
    client_masked_input,
    client_setup,
    client_share_keys,
    client_unmask,
    load_state,
    upload_bytes_per_client,
)
from fedge.secagg.client import STATE_FIELD
from fedge.secagg.crypto import Masker, sign_survivors

Tamper = Callable[[Stage, dict[int, Payload]], None]
Transport = Callable[[Mapping[str, object]], Mapping[str, object]]
QUICK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Round:
    """One in-process round; `vanish` and `tamper` play dropouts and attackers."""

    server: SecAggServer
    updates: dict[int, NDArray[np.float64]]
    weights: dict[int, int]
    vanish: Mapping[Stage, set[int]] = field(default_factory=dict)
    tamper: Tamper | None = None
    transport: Transport = lambda message: message  # every message and saved state
    states: dict[int, StoredState] = field(default_factory=dict)
    replies: dict[Stage, dict[int, Payload]] = field(default_factory=dict)
    # what each client got at each stage: (state before the call, payload)
    inbox: dict[Stage, dict[int, tuple[StoredState | None, Mapping[str, object]]]] = field(
        default_factory=dict
    )

    def run(self) -> AggregateResult:
        server = self.server
        payloads = server.setup_payloads()
        payloads = server.receive_public_keys(self._answer(Stage.SETUP, payloads))
        payloads = server.receive_encrypted_shares(self._answer(Stage.SHARE_KEYS, payloads))
        payloads = server.receive_masked_inputs(self._answer(Stage.MASKED_INPUT, payloads))
        payloads = server.receive_signatures(self._answer(Stage.CONSISTENCY, payloads))
        return server.receive_unmask_shares(self._answer(Stage.UNMASK, payloads))

    def expected_sum(self, included: tuple[int, ...]) -> NDArray[np.float64]:
        params = self.server.params
        total = np.zeros(params.vector_length)
        for node in included:
            weight = min(self.weights[node], params.max_weight)
            total += weight * np.clip(self.updates[node], -params.clip_range, params.clip_range)
        return total

    def check(self, result: AggregateResult, included: set[int]) -> None:
        """The result is exactly the weighted sum over `included`, within the bound."""
        params = self.server.params
        assert set(result.included) == included
        assert result.total_weight == sum(min(self.weights[i], params.max_weight) for i in included)
        error = np.abs(result.weighted_sum - self.expected_sum(result.included))
        assert error.max() <= params.quantizer.error_bound

    def _answer(
        self, stage: Stage, payloads: dict[int, Payload]
    ) -> dict[int, Mapping[str, object]]:
        replies: dict[int, Payload] = {}
        self.inbox[stage] = {}
        for node, sent in payloads.items():
            if node not in self.vanish.get(stage, set()):
                state, payload = self.states.get(node), self.transport(sent)
                self.inbox[stage][node] = (state, payload)
                self.states[node], replies[node] = self.call_client(stage, node, state, payload)
        if self.tamper is not None:
            self.tamper(stage, replies)
        self.replies[stage] = replies
        return {node: self.transport(reply) for node, reply in replies.items()}

    def call_client(
        self, stage: Stage, node: int, state: StoredState | None, payload: Mapping[str, object]
    ) -> tuple[StoredState, Payload]:
        if stage is Stage.SETUP:
            return client_setup(node, payload)
        assert state is not None
        state = load_state(self.transport(state.to_dict()))  # as in a fresh process
        if stage is Stage.SHARE_KEYS:
            return client_share_keys(state, payload)
        if stage is Stage.MASKED_INPUT:
            stage = client_masked_input(state, payload)
            return stage.state, stage.upload(self.updates[node], self.weights[node])
        if stage is Stage.CONSISTENCY:
            return client_consistency(state, payload)
        return client_unmask(state, payload)


def make_round(
    n: int,
    num_shares: int,
    threshold: int,
    length: int = 50,
    max_weight: int = 100,
    clip_range: float = 1.0,
    seed: int = 0,
) -> Round:
    """Random 64-bit ids (as Flower uses), updates in range, weights up to max_weight."""
    draw = random.Random(seed)
    ids: set[int] = set()
    while len(ids) < n:
        ids.add(draw.getrandbits(64))
    rng = np.random.default_rng(seed)
    server = SecAggServer(
        list(ids), num_shares, threshold, length, clip_range, max_weight, round_seed=os.urandom(32)
    )
    updates = {i: rng.uniform(-clip_range, clip_range, length) for i in ids}
    weights = {i: int(rng.integers(0, max_weight + 1)) for i in ids}
    return Round(server, updates, weights)


@st.composite
def round_shapes(draw: st.DrawFn, complete: bool) -> tuple[int, int, int]:
    """(n, num_shares, threshold): a complete graph, or a sparse ring (odd k < n)."""
    n = draw(st.integers(3, 20) if complete else st.integers(5, 20))
    k = n if complete else draw(st.sampled_from(range(3, n, 2)))
    return n, k, draw(st.integers(k // 2 + 1, k))


# --- correctness under dropouts ------------------------------------------------------


@QUICK
@given(
    shape=round_shapes(complete=True),
    length=st.integers(1, 2000),
    max_weight=st.integers(1, 1000),
    clip_range=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_secure_sum_matches_weighted_sum_under_any_dropout(
    shape: tuple[int, int, int],
    length: int,
    max_weight: int,
    clip_range: float,
    seed: int,
    data: st.DataObject,
) -> None:
    n, k, t = shape
    rnd = make_round(n, k, t, length, max_weight, clip_range, seed)
    ids = list(rnd.server.params.participants)
    gone = data.draw(st.lists(st.sampled_from(ids), unique=True, max_size=n - t))
    split = data.draw(st.integers(0, len(gone)))  # some vanish before sharing keys
    rnd.vanish = {Stage.SHARE_KEYS: set(gone[:split]), Stage.MASKED_INPUT: set(gone[split:])}
    result = rnd.run()
    rnd.check(result, set(ids) - set(gone))
    assert set(result.dropped) == set(gone)
    assert result.unmask_faults == {}


def _sparse_round_succeeds(rnd: Round, survivors: set[int]) -> bool:
    """Bell et al.'s condition: a signature quorum of survivors, t holders per needed secret."""
    params = rnd.server.params
    t = params.threshold

    def holders(node: int) -> int:
        return len(set(params.neighbours(node)) & survivors)

    dropped = set(params.participants) - survivors
    return (
        len(survivors) >= params.signature_quorum
        and all(holders(u) >= t for u in survivors)
        and all(holders(i) == 0 or holders(i) >= t for i in dropped)
    )


@QUICK
@given(shape=round_shapes(complete=False), seed=st.integers(0, 2**32), data=st.data())
def test_sparse_graph_sum_is_right_or_round_aborts(
    shape: tuple[int, int, int], seed: int, data: st.DataObject
) -> None:
    n, k, t = shape
    rnd = make_round(n, k, t, length=30, seed=seed)
    ids = list(rnd.server.params.participants)
    gone = set(data.draw(st.lists(st.sampled_from(ids), unique=True, max_size=n - 1)))
    rnd.vanish = {Stage.MASKED_INPUT: gone}
    if _sparse_round_succeeds(rnd, set(ids) - gone):
        rnd.check(rnd.run(), set(ids) - gone)
    else:
        with pytest.raises(SecAggAbort):
            rnd.run()
        assert Stage.UNMASK not in rnd.inbox  # no share is revealed for a doomed round


def test_early_dropout_prunes_starved_neighbours_and_still_aggregates() -> None:
    rnd = make_round(n=15, num_shares=7, threshold=4)
    ring = rnd.server.params.ring
    gone = {ring[-3], ring[-1], ring[1], ring[3]}  # ring[0] keeps 3 of 7, ring[±2] then too
    rnd.vanish = {Stage.SETUP: gone}
    result = rnd.run()
    pruned = {ring[-2], ring[0], ring[2]}
    assert set(result.dropped) == gone | pruned
    assert all("live neighbours" in result.dropped[node] for node in pruned)
    rnd.check(result, set(ring) - gone - pruned)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(3, 12), stage=st.sampled_from([Stage.MASKED_INPUT, Stage.UNMASK]))
def test_round_aborts_below_threshold(n: int, stage: Stage) -> None:
    t = n // 2 + 1
    rnd = make_round(n, n, t, seed=n)
    rnd.vanish = {stage: set(rnd.server.params.participants[: n - t + 1])}
    with pytest.raises(SecAggAbort, match="threshold"):
        rnd.run()
    with pytest.raises(SecAggAbort, match="already aborted"):
        rnd.server.receive_unmask_shares({})


@pytest.mark.parametrize(("k", "t"), [(9, 6), (5, 4)])
def test_survivor_silent_after_its_upload_still_counts(k: int, t: int) -> None:
    """Gone at the consistency round: its upload is in, so its seed is rebuilt and it is
    summed; it is not asked to unmask (it signed nothing) and is named as a fault."""
    rnd = make_round(n=9, num_shares=k, threshold=t)
    ids = rnd.server.params.participants
    rnd.vanish = {Stage.CONSISTENCY: {ids[2]}}
    result = rnd.run()
    rnd.check(result, set(ids))
    assert ids[2] not in rnd.inbox[Stage.UNMASK]
    assert "no reply" in result.unmask_faults[ids[2]]


def test_weights_above_max_weight_are_capped() -> None:
    rnd = make_round(n=4, num_shares=4, threshold=3, max_weight=10)
    rnd.weights = dict.fromkeys(rnd.weights, 25)
    result = rnd.run()
    assert result.total_weight == 40
    rnd.check(result, set(rnd.server.params.participants))


# --- privacy of the upload ------------------------------------------------------------

CHI2_255_P1E6 = 377.08  # chi-square quantile, 255 dof, p = 1e-6 (scipy.stats.chi2.ppf)


def _top_byte_chi2(vector: NDArray[np.uint32]) -> float:
    counts = np.bincount(vector >> 24, minlength=256)
    expected = vector.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_masked_upload_looks_uniform_and_hides_the_update() -> None:
    rnd = make_round(n=5, num_shares=5, threshold=3, length=2**16, max_weight=10)
    rnd.run()
    params = rnd.server.params
    node = params.participants[0]
    masked = cast(NDArray[np.uint32], rnd.replies[Stage.MASKED_INPUT][node]["masked"])
    plain = params.quantizer.encode(rnd.updates[node], rnd.weights[node])
    assert _top_byte_chi2(plain) > CHI2_255_P1E6  # the test does detect an unmasked upload
    assert _top_byte_chi2(masked) < CHI2_255_P1E6
    assert np.mean(masked == plain) < 0.001
    # Even knowing every pairwise mask (as when the server wrongly thinks the node
    # dropped), the self mask alone still hides the update; removing it reveals it.
    state = rnd.states[node]
    assert isinstance(state, ClientState)
    masked, masker = masked.copy(), Masker(masked.size)
    for peer, seed in zip(state.partners, state.mask_seeds, strict=True):
        masker.add_pair(masked, seed, node, peer, remove=True)
    assert _top_byte_chi2(masked) < CHI2_255_P1E6
    unmasked = masked - masker.expand(state.seed)
    decoded, weight = params.quantizer.decode(unmasked)
    assert weight == rnd.weights[node]
    assert np.abs(decoded - weight * rnd.updates[node]).max() <= params.quantizer.step


def test_upload_size_matches_advertised_bytes() -> None:
    rnd = make_round(n=9, num_shares=5, threshold=3, length=1234)
    rnd.run()
    for node in rnd.server.params.participants:
        sent = 0
        for replies in rnd.replies.values():
            for value in replies[node].values():
                if isinstance(value, np.ndarray):
                    sent += value.nbytes
                elif isinstance(value, bytes):
                    sent += len(value)
                elif isinstance(value, list):
                    sent += sum(len(v) for v in value if isinstance(v, bytes))
        assert sent == upload_bytes_per_client(1234, 5)


# --- tampering drops only the culprit --------------------------------------------------

Mutation = Callable[[Round, Payload], None]


def _flip_ciphertext_byte(rnd: Round, reply: Payload) -> None:
    first, *rest = reply["ciphertexts"]  # type: ignore[misc]
    reply["ciphertexts"] = [bytes([first[0] ^ 1]) + first[1:], *rest]


def _reroute_ciphertexts(rnd: Round, reply: Payload) -> None:
    first, *rest = reply["ciphertexts"]  # type: ignore[misc]
    reply["ciphertexts"] = [*rest, first]


def _duplicate_receiver(rnd: Round, reply: Payload) -> None:
    first, *rest = reply["receivers"]  # type: ignore[misc]
    reply["receivers"] = [first, *rest[:-1], first]


def _skip_last_receiver(rnd: Round, reply: Payload) -> None:
    for key in ("receivers", "ciphertexts"):
        reply[key] = cast(list[Any], reply[key])[:-1]


def _stranger_receiver(rnd: Round, reply: Payload) -> None:
    reply["receivers"] = [12345, *cast(list[int], reply["receivers"])[1:]]


def _replay_share_keys_reply(rnd: Round, reply: Payload) -> None:
    reply.clear()
    reply.update(rnd.replies[Stage.SHARE_KEYS][min(rnd.server.params.participants)])


def _set(key: str, value: object) -> Mutation:
    def mutate(rnd: Round, reply: Payload) -> None:
        reply[key] = value  # type: ignore[assignment]

    return mutate


TAMPERS: dict[str, tuple[Stage, Mutation, str]] = {
    "rerouted ciphertexts": (Stage.SHARE_KEYS, _reroute_ciphertexts, "authentication"),
    "duplicate receiver": (Stage.SHARE_KEYS, _duplicate_receiver, "duplicate"),
    "missing receiver": (Stage.SHARE_KEYS, _skip_last_receiver, "addressed"),
    "stranger receiver": (Stage.SHARE_KEYS, _stranger_receiver, "addressed"),
    "wrong ciphertext size": (Stage.SHARE_KEYS, _set("ciphertexts", [b"x"] * 6), "bytes"),
    "wrong stage": (Stage.MASKED_INPUT, _set("stage", Stage.UNMASK.value), "stage"),
    "replayed reply": (Stage.MASKED_INPUT, _replay_share_keys_reply, "stage"),
    "short vector": (Stage.MASKED_INPUT, _set("masked", np.zeros(5, np.uint32)), "shape"),
    "int64 vector": (Stage.MASKED_INPUT, _set("masked", np.zeros(51, np.int64)), "uint32"),
    "big-endian vector": (Stage.MASKED_INPUT, _set("masked", np.zeros(51, ">u4")), "uint32"),
    "list vector": (Stage.MASKED_INPUT, _set("masked", [0] * 51), "uint32"),
    "bogus rejection": (Stage.MASKED_INPUT, _set("rejected", [12345]), "sent it nothing"),
    "low-order key": (Stage.SETUP, _set("pk_mask", bytes(32)), "low-order"),
    "key as str": (Stage.SETUP, _set("pk_enc", "k" * 32), "bytes"),
    "missing commitment": (Stage.SETUP, lambda rnd, reply: reply.clear(), "missing"),
}


@pytest.mark.parametrize(("stage", "mutate", "reason"), TAMPERS.values(), ids=TAMPERS.keys())
def test_tampered_reply_drops_only_its_sender(stage: Stage, mutate: Mutation, reason: str) -> None:
    rnd = make_round(n=7, num_shares=7, threshold=4)
    culprit = min(rnd.server.params.participants)
    rnd.tamper = lambda s, replies: mutate(rnd, replies[culprit]) if s is stage else None
    result = rnd.run()
    assert list(result.dropped) == [culprit]
    assert reason in result.dropped[culprit]
    rnd.check(result, set(rnd.server.params.participants) - {culprit})


def test_malformed_unmask_reply_is_ignored_and_input_still_counts() -> None:
    rnd = make_round(n=6, num_shares=6, threshold=4)
    culprit = min(rnd.server.params.participants)
    rnd.tamper = lambda s, replies: (
        _set("seed_shares", [])(rnd, replies[culprit]) if s is Stage.UNMASK else None
    )
    result = rnd.run()
    assert list(result.unmask_faults) == [culprit]
    assert result.dropped == {}
    rnd.check(result, set(rnd.server.params.participants))


def _corrupt_first_share(rnd: Round, culprit: int, kind: str) -> None:
    """Make `culprit` send a well-formed but wrong first share of `kind` at UNMASK."""

    def corrupt(stage: Stage, replies: dict[int, Payload]) -> None:
        if stage is Stage.UNMASK:
            first, *rest = replies[culprit][kind]  # type: ignore[misc]
            replies[culprit][kind] = [(int.from_bytes(first, "big") ^ 1).to_bytes(66, "big"), *rest]

    rnd.tamper = corrupt


@pytest.mark.parametrize("kind", ["seed_shares", "key_shares"])
def test_wrong_share_is_named_and_the_round_still_sums_right(kind: str) -> None:
    """With more than t shares, the commitment picks the right ones and names the liar."""
    rnd = make_round(n=6, num_shares=6, threshold=4)
    ids = rnd.server.params.participants
    rnd.vanish = {Stage.MASKED_INPUT: {ids[-1]}}  # so that key shares are requested too
    _corrupt_first_share(rnd, ids[0], kind)
    result = rnd.run()
    assert list(result.unmask_faults) == [ids[0]]
    assert "wrong share" in result.unmask_faults[ids[0]]
    rnd.check(result, set(ids[:-1]))


@pytest.mark.parametrize("kind", ["seed_shares", "key_shares"])
def test_wrong_share_among_only_t_aborts_instead_of_a_wrong_sum(kind: str) -> None:
    rnd = make_round(n=6, num_shares=6, threshold=4)
    ids = rnd.server.params.participants
    rnd.vanish = {Stage.MASKED_INPUT: set(ids[-2:])}  # 4 survivors: exactly t holders
    _corrupt_first_share(rnd, ids[0], kind)
    with pytest.raises(SecAggAbort, match="commitment"):
        rnd.run()


def test_lone_false_accusation_drops_the_pair_not_the_accused_alone() -> None:
    rnd = make_round(n=7, num_shares=7, threshold=4)
    ids = rnd.server.params.participants
    accuser, accused = ids[0], ids[3]
    rnd.tamper = lambda s, replies: (
        _set("rejected", [accused])(rnd, replies[accuser]) if s is Stage.MASKED_INPUT else None
    )
    result = rnd.run()
    assert set(result.dropped) == {accuser, accused}
    assert "reported node" in result.dropped[accuser]
    rnd.check(result, set(ids) - {accuser, accused})


def test_lone_corrupted_ciphertext_drops_the_pair() -> None:
    """One garbled ciphertext: sender or receiver may be lying, so both leave."""
    rnd = make_round(n=7, num_shares=7, threshold=4)
    culprit = min(rnd.server.params.participants)
    rnd.tamper = lambda s, replies: (
        _flip_ciphertext_byte(rnd, replies[culprit]) if s is Stage.SHARE_KEYS else None
    )
    result = rnd.run()
    receiver = cast(list[int], rnd.replies[Stage.SHARE_KEYS][culprit]["receivers"])[0]
    assert set(result.dropped) == {culprit, receiver}
    assert "authentication" in result.dropped[culprit]
    rnd.check(result, set(rnd.server.params.participants) - {culprit, receiver})


@pytest.mark.parametrize(("n", "k", "t"), [(10, 10, 7), (10, 5, 4), (20, 7, 5)])
def test_accusing_everyone_drops_only_the_accuser(n: int, k: int, t: int) -> None:
    rnd = make_round(n=n, num_shares=k, threshold=t, length=20)
    ids = rnd.server.params.participants
    accuser = ids[0]

    def accuse_all(stage: Stage, replies: dict[int, Payload]) -> None:
        if stage is Stage.MASKED_INPUT:
            _, payload = rnd.inbox[Stage.MASKED_INPUT][accuser]
            replies[accuser]["rejected"] = list(cast(list[int], payload["senders"]))

    rnd.tamper = accuse_all
    result = rnd.run()
    assert list(result.dropped) == [accuser]
    assert "disputes" in result.dropped[accuser]
    rnd.check(result, set(ids) - {accuser})


REPLY_KEYS = {
    Stage.SETUP: ["stage", "pk_enc", "pk_mask", "pk_sign", "seed_commitment"],
    Stage.SHARE_KEYS: ["stage", "receivers", "ciphertexts"],
    Stage.MASKED_INPUT: ["stage", "rejected", "masked"],
    Stage.CONSISTENCY: ["stage", "signature"],
    Stage.UNMASK: ["stage", "seed_shares", "key_shares"],
}
DELETE = object()
JUNK = [DELETE, None, "junk", 1.5, -1, 2**64, True, [None], {}, np.zeros(3, np.float32), b"\0" * 7]
FUZZ_CASES = [
    (stage, key, junk) for stage, keys in REPLY_KEYS.items() for key in keys for junk in JUNK
]


@pytest.mark.parametrize(("stage", "key", "junk"), FUZZ_CASES)
def test_fuzzed_reply_field_never_crashes_the_server(stage: Stage, key: str, junk: object) -> None:
    """Junk in any reply field drops the sender (or voids its unmask reply), nothing more."""
    rnd = make_round(n=5, num_shares=5, threshold=3, length=20)
    culprit = min(rnd.server.params.participants)

    def fuzz(s: Stage, replies: dict[int, Payload]) -> None:
        if s is stage:
            assert sorted(replies[culprit]) == sorted(REPLY_KEYS[stage])
            if junk is DELETE:
                del replies[culprit][key]
            else:
                replies[culprit][key] = junk  # type: ignore[assignment]

    rnd.tamper = fuzz
    result = rnd.run()
    survivors = set(rnd.server.params.participants) - {culprit}
    if stage in (Stage.CONSISTENCY, Stage.UNMASK):  # its upload is in: it stays in the sum
        assert culprit in result.unmask_faults
        survivors.add(culprit)
    else:
        assert culprit in result.dropped
    rnd.check(result, survivors)


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("junk", [None, [], "reply", np.zeros(3, np.uint32)])
def test_non_mapping_reply_drops_its_sender(stage: Stage, junk: object) -> None:
    rnd = make_round(n=4, num_shares=4, threshold=3, length=5)
    culprit = min(rnd.server.params.participants)

    def replace(s: Stage, replies: dict[int, Payload]) -> None:
        if s is stage:
            replies[culprit] = junk  # type: ignore[assignment]

    rnd.tamper = replace
    result = rnd.run()
    late = stage in (Stage.CONSISTENCY, Stage.UNMASK)
    faults = result.unmask_faults if late else result.dropped
    assert "mapping" in faults[culprit]


def test_server_methods_must_run_in_order() -> None:
    rnd = make_round(n=3, num_shares=3, threshold=2)
    with pytest.raises(RuntimeError, match="out of order"):
        rnd.server.receive_masked_inputs({})


# --- the client refuses bad server messages ------------------------------------------


@cache
def _recorded_round() -> Round:
    rnd = make_round(n=5, num_shares=5, threshold=3, length=10)
    rnd.run()
    return rnd


Edit = Callable[[Payload, int], None]


def _edit(key: str, new: Callable[[Any, int], object]) -> Edit:
    """An edit that replaces payload[key] by new(old value, receiving node)."""

    def apply(payload: Payload, node: int) -> None:
        payload[key] = new(payload[key], node)  # type: ignore[assignment]

    return apply


def _other_survivor_set(payload: Payload, node: int) -> None:
    survivors = cast(list[int], payload["survivors"])
    payload["survivors"] = [*[p for p in survivors if p != node][:-1], node]


def _drop_self(payload: Payload, node: int) -> None:
    payload["survivors"] = [p for p in cast(list[int], payload["survivors"]) if p != node]


def _only_self_and_one(payload: Payload, node: int) -> None:
    """A set of 2 the node could sign: with t = 3, unmasking for it would expose a peer."""
    payload["survivors"] = [
        node,
        next(p for p in cast(list[int], payload["survivors"]) if p != node),
    ]


def _signatures_short_of_quorum(payload: Payload, node: int) -> None:
    for key in ("signers", "signatures"):
        payload[key] = cast(list[Any], payload[key])[:2]  # quorum 3 of 5


def _forged_signatures(payload: Payload, node: int) -> None:
    payload["signatures"] = [
        s[:-1] + bytes([s[-1] ^ 1]) for s in cast(list[bytes], payload["signatures"])
    ]


def _one_signer_many_times(payload: Payload, node: int) -> None:
    signers = cast(list[int], payload["signers"])
    payload["signers"] = [signers[0]] * len(signers)


def _low_order_peer_key(payload: Payload, node: int) -> None:
    peers = cast(list[int], payload["neighbours"])
    keys = cast(list[bytes], payload["pk_enc"])
    payload["pk_enc"] = [
        key if peer == node else bytes(32) for peer, key in zip(peers, keys, strict=True)
    ]


def _share_to_few(payload: Payload, node: int) -> None:
    """Announce only the node itself and one peer: 2 < threshold 3."""
    peers = cast(list[int], payload["neighbours"])
    keep = sorted({peers.index(node), next(i for i, p in enumerate(peers) if p != node)})
    for key in ("neighbours", "pk_enc", "pk_mask"):
        payload[key] = [cast(list[Any], payload[key])[i] for i in keep]


BAD_SERVER_MESSAGES: dict[str, tuple[Stage, Edit, type[Exception], str]] = {
    "wrong stage": (
        Stage.SETUP,
        _edit("stage", lambda v, n: "secagg_unmask"),
        ProtocolError,
        "stage",
    ),
    "for another node": (
        Stage.SETUP,
        _edit("node_id", lambda v, n: n + 1),
        ProtocolError,
        "addressed",
    ),
    "not a participant": (
        Stage.SHARE_KEYS,
        _edit("participants", lambda v, n: sorted(p ^ 1 if p == n else p for p in v)),
        ProtocolError,
        "not among",
    ),
    "threshold too low": (
        Stage.SHARE_KEYS,
        _edit("threshold", lambda v, n: 1),
        ProtocolError,
        "threshold",
    ),
    "overflowing weights": (
        Stage.SHARE_KEYS,
        _edit("max_weight", lambda v, n: 10**7),
        ProtocolError,
        "max_weight",
    ),
    "short round seed": (
        Stage.SETUP,
        _edit("round_seed", lambda v, n: b"seed"),
        ProtocolError,
        "round_seed",
    ),
    "keys made for another round": (
        Stage.SHARE_KEYS,
        _edit("round_seed", lambda v, n: bytes(32)),
        ProtocolError,
        "round seed differs",
    ),
    "stranger neighbour": (
        Stage.SHARE_KEYS,
        _edit("neighbours", lambda v, n: [p if p == n else p ^ 1 for p in v]),
        ProtocolError,
        "neighbourhood",
    ),
    "own key replaced": (
        Stage.SHARE_KEYS,
        _edit("pk_mask", lambda v, n: v[::-1]),
        ProtocolError,
        "altered",
    ),
    "own verification key replaced": (
        Stage.SHARE_KEYS,
        _edit("pk_sign", lambda v, n: [key[::-1] for key in v]),
        ProtocolError,
        "verification key",
    ),
    "stranger verifier": (
        Stage.SHARE_KEYS,
        _edit("verifiers", lambda v, n: [p if p == n else p ^ 1 for p in v]),
        ProtocolError,
        "not participants",
    ),
    "low-order peer key": (Stage.SHARE_KEYS, _low_order_peer_key, ProtocolError, "low-order"),
    "misaligned keys": (
        Stage.SHARE_KEYS,
        _edit("pk_enc", lambda v, n: v[:-1]),
        ProtocolError,
        "entries",
    ),
    "too few neighbours": (Stage.SHARE_KEYS, _share_to_few, SecAggAbort, "threshold"),
    "self as sender": (
        Stage.MASKED_INPUT,
        _edit("senders", lambda v, n: [n, *v[1:]]),
        ProtocolError,
        "live",
    ),
    "missing ciphertext": (
        Stage.MASKED_INPUT,
        _edit("ciphertexts", lambda v, n: v[:-1]),
        ProtocolError,
        "entries",
    ),
    "set without the node": (Stage.CONSISTENCY, _drop_self, ProtocolError, "alive"),
    "stranger survivor": (
        Stage.CONSISTENCY,
        _edit("survivors", lambda v, n: [*v, 7]),
        ProtocolError,
        "not participants",
    ),
    "too few held survivors": (Stage.CONSISTENCY, _only_self_and_one, SecAggAbort, "threshold"),
    "another set than signed": (Stage.UNMASK, _other_survivor_set, ProtocolError, "signed"),
    "signatures short of quorum": (
        Stage.UNMASK,
        _signatures_short_of_quorum,
        ProtocolError,
        "valid survivor-set signatures",
    ),
    "forged signatures": (Stage.UNMASK, _forged_signatures, ProtocolError, "valid"),
    "one signer counted twice": (Stage.UNMASK, _one_signer_many_times, ProtocolError, "duplicate"),
    "misaligned signatures": (
        Stage.UNMASK,
        _edit("signatures", lambda v, n: v[:-1]),
        ProtocolError,
        "entries",
    ),
}


@pytest.mark.parametrize(
    ("stage", "edit", "error", "match"),
    BAD_SERVER_MESSAGES.values(),
    ids=BAD_SERVER_MESSAGES.keys(),
)
def test_client_rejects_malformed_server_message(
    stage: Stage, edit: Edit, error: type[Exception], match: str
) -> None:
    rnd = _recorded_round()
    node = rnd.server.params.participants[0]
    state, genuine = rnd.inbox[stage][node]
    rnd.call_client(stage, node, state, dict(genuine))  # the genuine message is accepted
    payload = dict(genuine)
    edit(payload, node)
    with pytest.raises(error, match=match):
        rnd.call_client(stage, node, state, payload)


@pytest.mark.parametrize("stage", list(Stage)[1:])
def test_client_rejects_replayed_or_reordered_messages(stage: Stage) -> None:
    rnd = _recorded_round()
    node = rnd.server.params.participants[0]
    _, payload = rnd.inbox[stage][node]
    with pytest.raises(ProtocolError, match="expecting"):
        rnd.call_client(stage, node, rnd.states[node], dict(payload))  # state is past it


@pytest.mark.parametrize(("corrupted", "aborts"), [(1, False), (3, True)])
def test_client_reports_unauthentic_shares_and_aborts_when_too_few_remain(
    corrupted: int, aborts: bool
) -> None:
    rnd = _recorded_round()  # 5 nodes, threshold 3: each node gets 4 ciphertexts
    node = rnd.server.params.participants[0]
    state, payload = rnd.inbox[Stage.MASKED_INPUT][node]
    ciphertexts = cast(list[bytes], payload["ciphertexts"])
    bad = [c[:-1] + bytes([c[-1] ^ 1]) for c in ciphertexts[:corrupted]]
    tampered = {**payload, "ciphertexts": bad + ciphertexts[corrupted:]}
    if aborts:
        with pytest.raises(SecAggAbort, match="threshold"):
            rnd.call_client(Stage.MASKED_INPUT, node, state, tampered)
    else:
        _, reply = rnd.call_client(Stage.MASKED_INPUT, node, state, tampered)
        assert reply["rejected"] == cast(list[int], payload["senders"])[:corrupted]


def _signed_by_everyone(rnd: Round, survivors: list[int]) -> Payload:
    """An unmask request for `survivors` carrying every participant's valid signature."""
    ids = rnd.server.params.participants
    rs = rnd.server.params.round_seed
    keys = {node: cast(ClientState, rnd.states[node]).sign_private for node in ids}
    return {
        "stage": Stage.UNMASK.value,
        "survivors": survivors,
        "signers": list(ids),
        "signatures": [sign_survivors(keys[node], rs, survivors) for node in ids],
    }


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_client_reveals_one_share_kind_per_node_and_only_for_the_set_it_signed(
    data: st.DataObject,
) -> None:
    """Whatever survivor set a server announces, a holder reveals the seed share of the
    held survivors and the key share of the other held nodes, never both for one node."""
    rnd = _recorded_round()
    ids = rnd.server.params.participants
    node = ids[0]
    state, _ = rnd.inbox[Stage.CONSISTENCY][node]
    assert isinstance(state, ClientState)
    others = data.draw(st.lists(st.sampled_from(ids[1:]), unique=True))
    survivors = sorted({node, *others})
    request: Payload = {"stage": Stage.CONSISTENCY.value, "survivors": survivors}
    if len(set(state.held) & set(survivors)) < state.params.threshold:
        with pytest.raises(SecAggAbort, match="threshold"):
            client_consistency(state, request)
        return
    signed, _ = client_consistency(state, request)
    unmask_request = _signed_by_everyone(rnd, survivors)
    new_state, reply = client_unmask(signed, unmask_request)
    shares = dict(
        zip(
            state.held, zip(state.held_seed_shares, state.held_key_shares, strict=True), strict=True
        )
    )
    held = sorted(state.held)
    assert reply["seed_shares"] == [shares[p][0] for p in held if p in survivors]
    assert reply["key_shares"] == [shares[p][1] for p in held if p not in survivors]
    with pytest.raises(ProtocolError, match="expecting nothing"):
        client_unmask(new_state, unmask_request)
    other = _signed_by_everyone(rnd, sorted(set(ids) - {ids[-1]} if ids[-1] in survivors else ids))
    with pytest.raises(ProtocolError, match="signed"):
        client_unmask(signed, other)  # a second, differently signed set is refused


def _recorded_states() -> list[StoredState]:
    """Every state a client of the recorded round saved, from setup to done."""
    rnd = _recorded_round()
    kept = [state for inbox in rnd.inbox.values() for state, _ in inbox.values() if state]
    return kept + list(rnd.states.values())


def test_stored_state_round_trips_as_one_bytes_entry() -> None:
    for state in _recorded_states():
        stored = state.to_dict()
        assert list(stored) == [STATE_FIELD] and isinstance(stored[STATE_FIELD], bytes)
        assert load_state(stored) == state


def _stored(state: StoredState) -> bytes:
    return cast(bytes, state.to_dict()[STATE_FIELD])


def test_corrupt_stored_state_is_rejected() -> None:
    state = _recorded_states()[-1]
    assert isinstance(state, ClientState)
    keys = _recorded_states()[0]
    assert isinstance(keys, RoundKeys)
    blob, node = _stored(state), state.node_id
    bad_params = replace(state.params)
    object.__setattr__(bad_params, "threshold", 1)  # below num_shares / 2: never accepted
    corrupt = {
        "not bytes": "text",
        "other version": blob.replace(b"state/2", b"state/1", 1),
        "truncated": blob[:-1],
        "trailing": blob + b"\0",
        "stage 0": _stored(replace(state, next_stage=0)),
        "stage past done": _stored(replace(state, next_stage=state.next_stage + 1)),
        "stranger node": _stored(replace(state, node_id=node ^ 1)),
        "duplicate holders": _stored(replace(state, held=(node, node, *state.held[2:]))),
        "bad params": _stored(replace(state, params=bad_params)),
        "keys truncated": _stored(keys)[:-1],
        "keys trailing": _stored(keys) + b"\0",
        "keys other version": _stored(keys).replace(b"keys/2", b"keys/1", 1),
    }
    for name, value in corrupt.items():
        with pytest.raises(ProtocolError):
            load_state({STATE_FIELD: value})
            pytest.fail(name)
    with pytest.raises(ProtocolError, match="missing"):
        load_state({})


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_damaged_stored_state_is_refused_or_well_formed(data: st.DataObject) -> None:
    """A cut is always refused; a flipped byte either is, or yields a valid state."""
    states = _recorded_states()
    blob = _stored(data.draw(st.sampled_from(states)))
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(ProtocolError):
        load_state({STATE_FIELD: blob[:cut]})
    flipped = bytearray(blob)
    flipped[cut] ^= data.draw(st.integers(1, 255))
    try:
        state = load_state({STATE_FIELD: bytes(flipped)})
    except ProtocolError:
        return
    assert load_state(state.to_dict()) == state


def _through_flower(message: Mapping[str, object]) -> Mapping[str, object]:
    """Carry a message as Flower would: ConfigRecord (+ ArrayRecord), protobuf and back."""
    records = pytest.importorskip("flwr.app")
    serde = pytest.importorskip("flwr.common.serde")
    config = records.ConfigRecord({k: v for k, v in message.items() if k != "masked"})
    config = serde.config_record_from_proto(serde.config_record_to_proto(config))
    if "masked" not in message:
        return config  # a Mapping, not a dict: the core must accept that too
    arrays = records.ArrayRecord({"masked": records.Array(message["masked"])})
    arrays = serde.array_record_from_proto(serde.array_record_to_proto(arrays))
    return {**config, "masked": arrays["masked"].numpy()}


def test_round_survives_flower_records_and_wire_format() -> None:
    rnd = make_round(n=7, num_shares=5, threshold=3, length=300)
    ids = rnd.server.params.participants
    rnd.vanish = {Stage.MASKED_INPUT: {ids[0]}}
    rnd.transport = _through_flower
    rnd.check(rnd.run(), set(ids[1:]))
