"""Building blocks of SecAgg+: Shamir sharing, crypto wrappers, quantization, graph."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.secagg import ProtocolError, Quantizer, SecAggParams, SecAggServer
from fedge.secagg import quantization_error_bound as error_bound
from fedge.secagg.crypto import (
    KeyPair,
    KeystreamBlocks,
    Masker,
    decrypt_share,
    digest,
    encrypt_share,
    new_signing_key,
    public_key,
    seed_commitment,
    sign_survivors,
    survivors_signed,
    verification_key,
)
from fedge.secagg.quantize import ENCODE_BLOCK
from fedge.secagg.shamir import PRIME, SHARE_BYTES, combine, share_at, split

FAST = settings(max_examples=60, deadline=None)
MAX_PRODUCT = (2**31 - 1) >> 9  # largest safe num_clients * max_weight (8 bits + headroom)

# --- Shamir ----------------------------------------------------------------------------


@FAST
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(1, 25), data=st.data())
def test_any_threshold_shares_recover_the_secret_and_fewer_do_not(
    secret: bytes, n: int, data: st.DataObject
) -> None:
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    shares = dict(zip(xs, split(secret, xs, t), strict=True))
    chosen = data.draw(st.permutations(xs))
    assert combine({x: shares[x] for x in chosen[:t]}, 32) == secret
    if t > 1:
        # t - 1 shares interpolate to an unrelated field element, usually too large
        with contextlib.suppress(ValueError):
            assert combine({x: shares[x] for x in chosen[: t - 1]}, 32) != secret


@FAST
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(2, 12), data=st.data())
def test_t_right_shares_predict_every_other_share(
    secret: bytes, n: int, data: st.DataObject
) -> None:
    """What the server uses to name a wrong share: t right ones give all the others."""
    t = data.draw(st.integers(1, n - 1))
    xs = list(range(1, n + 1))
    shares = dict(zip(xs, split(secret, xs, t), strict=True))
    good = {x: shares[x] for x in xs[:t]}
    for x in xs[t:]:
        assert share_at(good, x) == shares[x]
        wrong = (int.from_bytes(shares[x], "big") ^ 1).to_bytes(SHARE_BYTES, "big")
        assert share_at(good, x) != wrong
        # and a wrong share among t always moves the secret (its Lagrange weight is not 0)
        with contextlib.suppress(ValueError):
            assert combine({**dict(list(good.items())[1:]), x: wrong}, 32) != secret


def test_shamir_field_is_prime_and_shares_are_fixed_size() -> None:
    assert all(pow(base, PRIME - 1, PRIME) == 1 for base in (2, 3, 5, 7))
    assert {len(s) for s in split(os.urandom(32), [1, 2, 3], 2)} == {SHARE_BYTES}


@pytest.mark.parametrize(
    ("xs", "threshold"), [([1, 1, 2], 2), ([0, 1, 2], 2), ([1, 2], 3), ([1, 2], 0)]
)
def test_split_rejects_bad_coordinates_and_thresholds(xs: list[int], threshold: int) -> None:
    with pytest.raises(ValueError):
        split(b"secret", xs, threshold)


@pytest.mark.parametrize(
    "share", [PRIME.to_bytes(SHARE_BYTES, "big"), b"\x00" * (SHARE_BYTES - 1), b""]
)
def test_combine_rejects_malformed_shares(share: bytes) -> None:
    good = split(b"k" * 32, [1, 2], 2)
    with pytest.raises(ValueError):
        combine({1: good[0], 2: share}, 32)


# --- crypto ----------------------------------------------------------------------------

SEED = b"r" * 32


def test_key_pair_round_trips_and_generates_fresh_keys() -> None:
    a, b = KeyPair(), KeyPair()
    assert a.private != b.private and a.public != b.public
    assert KeyPair(a.private).public == public_key(a.private) == a.public


def test_pair_keys_agree_and_separate_purpose_pair_and_round() -> None:
    a, b, c = KeyPair(), KeyPair(), KeyPair()
    key = a.share_key(b.public, 1, 2, SEED)
    assert key == b.share_key(a.public, 2, 1, SEED)  # both sides, either order
    others = {
        a.mask_seed(b.public, 1, 2, SEED),
        a.share_key(b.public, 1, 3, SEED),
        a.share_key(c.public, 1, 2, SEED),
        a.share_key(b.public, 1, 2, b"s" * 32),
    }
    assert key not in others and len(others) == 4


def test_share_ciphertext_binds_sender_receiver_round_and_content() -> None:
    a, b, c = KeyPair(), KeyPair(), KeyPair()
    key = a.share_key(b.public, 1, 2, SEED)
    ciphertext = encrypt_share(key, 1, 2, SEED, b"shares")
    assert decrypt_share(b.share_key(a.public, 2, 1, SEED), 1, 2, SEED, ciphertext) == b"shares"
    flipped = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
    attempts = [
        (key, 2, 1, SEED, ciphertext),  # direction swapped (reflected to its sender)
        (key, 1, 3, SEED, ciphertext),  # rerouted to another receiver id
        (c.share_key(a.public, 1, 2, SEED), 1, 2, SEED, ciphertext),  # another receiver's key
        (key, 1, 2, b"s" * 32, ciphertext),  # replayed in another round
        (key, 1, 2, SEED, flipped),
        (key, 1, 2, SEED, ciphertext[:20]),
    ]
    for attempt in attempts:
        with pytest.raises(ProtocolError):
            decrypt_share(*attempt)


def test_pairwise_masks_cancel_and_are_not_trivial() -> None:
    a, b = KeyPair(), KeyPair()
    seed = a.mask_seed(b.public, 5, 9, SEED)
    assert seed == b.mask_seed(a.public, 9, 5, SEED)
    masker = Masker(1000)
    total, from_a = np.zeros(1000, np.uint32), np.zeros(1000, np.uint32)
    masker.add_pair(from_a, seed, 5, 9)
    masker.add_pair(total, seed, 5, 9)
    masker.add_pair(total, seed, 9, 5)
    assert not np.any(total)
    assert np.count_nonzero(from_a) > 990
    masker.add_pair(from_a, seed, 5, 9, remove=True)  # the server strips a partner's mask
    assert not np.any(from_a)
    masker.add_pair(from_a, a.mask_seed(b.public, 5, 9, b"s" * 32), 5, 9)
    assert np.count_nonzero(from_a == masker.expand(seed)) < 10


def test_mask_expansion_is_a_deterministic_prefix_stream() -> None:
    masker = Masker(1000)
    long = masker.expand(SEED).copy()
    assert long.dtype == np.uint32 and long.shape == (1000,)
    assert not masker.expand(SEED).flags.writeable
    assert np.array_equal(long[:7], Masker(7).expand(SEED))
    assert np.count_nonzero(masker.expand(b"s" * 32) == long) < 10
    assert np.array_equal(masker.expand(SEED), long)  # the reused buffer keeps no state
    vector = np.arange(1000, dtype=np.uint32)
    masker.add(vector, SEED)
    masker.add(vector, SEED, subtract=True)
    assert np.array_equal(vector, np.arange(1000))
    with pytest.raises(ValueError):
        masker.expand(b"short")


def test_keystream_blocks_continue_one_stream() -> None:
    blocks = KeystreamBlocks(SEED, 300)
    read = [blocks.next(count).copy() for count in (300, 1, 299, 100)]
    assert np.array_equal(np.concatenate(read), Masker(700).expand(SEED))
    with pytest.raises(ValueError):
        KeystreamBlocks(b"short", 10)


@pytest.mark.parametrize("key", [bytes(32), b"\x01" + bytes(31), bytes(31), b""])
def test_public_keys_without_a_shared_secret_are_rejected(key: bytes) -> None:
    pair = KeyPair()
    for use in (pair.check, lambda k: pair.share_key(k, 1, 2, SEED)):
        with pytest.raises(ProtocolError):
            use(key)


def test_commitment_and_digest_separate_their_inputs() -> None:
    base = seed_commitment(SEED, 1, SEED)
    assert len({base, seed_commitment(b"s" * 32, 1, SEED), seed_commitment(SEED, 2, SEED)}) == 3
    assert base != seed_commitment(SEED, 1, b"s" * 32)
    assert digest(b"ab", b"c") != digest(b"a", b"bc")


def test_survivor_signature_binds_key_round_and_exact_set() -> None:
    private, public = new_signing_key()
    assert verification_key(private) == public
    other_private, other_public = new_signing_key()
    survivors = [5, 3, 9]
    signature = sign_survivors(private, SEED, survivors)
    assert survivors_signed(public, signature, SEED, survivors)
    assert survivors_signed(public, signature, SEED, [3, 5, 9])  # a set: order is not signed
    assert not survivors_signed(other_public, signature, SEED, survivors)
    assert not survivors_signed(public, signature, b"s" * 32, survivors)
    assert not survivors_signed(public, signature, SEED, [3, 5])
    assert not survivors_signed(public, signature, SEED, [3, 5, 9, 11])
    assert not survivors_signed(
        public, signature[:-1] + bytes([signature[-1] ^ 1]), SEED, survivors
    )
    assert not survivors_signed(public, b"short", SEED, survivors)
    assert not survivors_signed(b"not a key", signature, SEED, survivors)
    assert sign_survivors(other_private, SEED, survivors) != signature


# --- quantization ----------------------------------------------------------------------


@st.composite
def quantizers(draw: st.DrawFn) -> Quantizer:
    n = draw(st.integers(1, 200))
    max_weight = draw(st.integers(1, min(10**4, MAX_PRODUCT // n)))
    return Quantizer(draw(st.floats(1e-4, 1e4)), max_weight, n)


@FAST
@given(quantizer=quantizers(), length=st.integers(1, 300), data=st.data())
def test_sum_of_encodings_decodes_within_the_bound(
    quantizer: Quantizer, length: int, data: st.DataObject
) -> None:
    m = data.draw(st.integers(1, min(quantizer.num_clients, 30)))
    r, w = quantizer.clip_range, quantizer.max_weight
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    updates = rng.uniform(-r, r, (m, length))
    weights = rng.integers(0, w + 1, m)
    total = np.zeros(length + 1, np.uint32)
    for update, weight in zip(updates, weights, strict=True):
        total += quantizer.encode(update, int(weight))
    decoded, total_weight = quantizer.decode(total)
    assert total_weight == weights.sum()
    expected = (weights[:, None] * updates).sum(axis=0)
    assert np.abs(decoded - expected).max() <= error_bound(quantizer.num_clients, w, r)


@FAST
@given(quantizer=quantizers(), sign=st.sampled_from([-1.0, 1.0]))
def test_all_clients_at_full_scale_do_not_wrap_around(quantizer: Quantizer, sign: float) -> None:
    n, r, w = quantizer.num_clients, quantizer.clip_range, quantizer.max_weight
    one = quantizer.encode(np.full(3, sign * r), w)
    total = one * np.uint32(n)  # n identical uploads, summed mod 2^32
    decoded, total_weight = quantizer.decode(total)
    assert total_weight == n * w
    assert np.abs(decoded - sign * n * w * r).max() <= quantizer.error_bound


@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_stochastic_rounding_is_unbiased(fraction: float) -> None:
    quantizer = Quantizer(clip_range=1.0, max_weight=1, num_clients=1000)
    value = (7 + fraction) * quantizer.step
    levels = quantizer.encode(np.full(40_000, value), 1)[:-1].view(np.int32)
    assert set(np.unique(levels)) == {7, 8}
    assert abs(levels.mean() - (7 + fraction)) < 5 * 0.5 / np.sqrt(levels.size)


def test_encoding_in_blocks_draws_fresh_randomness_per_block() -> None:
    """Over several encode blocks (and a ragged last one) rounding stays unbiased
    and within one step, and no block repeats another's rounding pattern."""
    quantizer = Quantizer(clip_range=1.0, max_weight=1, num_clients=1000)
    length = 3 * ENCODE_BLOCK + 123
    values = np.random.default_rng(3).uniform(-1, 1, length)
    levels = quantizer.encode(values, 1)[:-1].view(np.int32)
    exact = values / quantizer.step
    assert np.all(np.abs(levels - exact) < 1)
    assert abs(np.mean(levels - exact)) < 5 * 0.5 / np.sqrt(length)
    ups = quantizer.encode(np.full(length, 7.5 * quantizer.step), 1)[:-1] == 8
    first, second = ups[:ENCODE_BLOCK], ups[ENCODE_BLOCK : 2 * ENCODE_BLOCK]
    assert 0.4 < np.mean(first == second) < 0.6


def test_an_empty_update_encodes_only_its_weight() -> None:
    encoded = Quantizer(clip_range=1.0, max_weight=10, num_clients=10).encode(np.zeros(0), 3)
    assert encoded.tolist() == [3]


def test_values_beyond_the_range_are_clipped() -> None:
    quantizer = Quantizer(clip_range=2.0, max_weight=3, num_clients=10)
    decoded, weight = quantizer.decode(quantizer.encode(np.array([-50.0, 0.5, 50.0]), 3))
    assert weight == 3
    assert np.allclose(decoded, [-6.0, 1.5, 6.0], atol=quantizer.step)


@pytest.mark.parametrize(
    ("update", "weight"),
    [([np.nan], 1), ([[1.0]], 1), ([1.0], -1), ([1.0], True), ([1.0], 1.5)],
)
def test_encode_rejects_bad_inputs(update: list[float], weight: int) -> None:
    with pytest.raises(ValueError):
        Quantizer(1.0, 10, 10).encode(np.array(update), weight)


def test_unsafe_weight_and_client_counts_are_refused_with_a_clear_message() -> None:
    Quantizer(1.0, max_weight=MAX_PRODUCT // 1000, num_clients=1000)  # on the boundary
    with pytest.raises(ValueError, match=r"max_weight.*fewer clients"):
        Quantizer(1.0, max_weight=MAX_PRODUCT // 1000 + 1, num_clients=1000)
    with pytest.raises(ValueError, match="num_clients=1000 x max_weight=10000"):
        SecAggServer(range(1000), 5, 3, 10, 1.0, max_weight=10_000, round_seed=SEED)
    for clip_range in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="clip_range"):
            Quantizer(clip_range, 1, 1)


# --- parameters and neighbour graph ----------------------------------------------------


@FAST
@given(n=st.integers(2, 40), data=st.data())
def test_neighbourhoods_are_symmetric_and_of_size_num_shares(n: int, data: st.DataObject) -> None:
    k = data.draw(st.sampled_from([n, *range(3, n, 2)]))
    ids = data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    params = SecAggParams(tuple(sorted(ids)), k, k // 2 + 1, 1, 1.0, 1, os.urandom(16))
    for node in ids:
        group = params.neighbours(node)
        assert len(group) == k and node in group and list(group) == sorted(group)
        assert all(node in params.neighbours(peer) for peer in group)
    assert SecAggParams.from_payload(params.to_payload()).neighbours(ids[0]) == params.neighbours(
        ids[0]
    )


def test_graph_depends_on_the_round_seed_only() -> None:
    def graph(seed: bytes, order: list[int]) -> list[tuple[int, ...]]:
        server = SecAggServer(order, 5, 3, 1, 1.0, 1, seed)
        return [server.params.neighbours(node) for node in range(30)]

    ids = list(range(30))
    assert graph(SEED, ids) == graph(SEED, ids[::-1])
    assert graph(SEED, ids) != graph(b"s" * 32, ids)


@pytest.mark.parametrize(
    ("participants", "num_shares", "threshold", "seed", "match"),
    [
        ((1, 2, 3, 4, 5), 4, 3, SEED, "odd"),
        ((1, 2, 3), 5, 3, SEED, "odd"),
        ((1, 2, 3, 4, 5), 5, 2, SEED, "threshold"),
        ((1, 2, 3, 4, 5), 3, 4, SEED, "threshold"),
        ((2, 1, 3), 3, 2, SEED, "sorted"),
        ((1, 1, 3), 3, 2, SEED, "distinct"),
        ((1,), 1, 1, SEED, "at least 2"),
        ((1, 2, 3), 3, 2, b"short", "round_seed"),
    ],
)
def test_invalid_round_parameters_are_refused(
    participants: tuple[int, ...], num_shares: int, threshold: int, seed: bytes, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        SecAggParams(participants, num_shares, threshold, 10, 1.0, 1, seed)


def test_server_refuses_duplicate_participants() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        SecAggServer([1, 2, 2, 3], 3, 2, 10, 1.0, 1, SEED)
