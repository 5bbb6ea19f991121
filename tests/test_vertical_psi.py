"""PSI alignment: exact intersection, no raw IDs on the wire, hostile peers refused."""

import random

import private_set_intersection.python as psi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.vertical.errors import VerticalError
from fedge.vertical.psi import Offer, PsiParty


def _run(a: list[str], b: list[str], max_ids: int = 1000):
    """Both directions of the protocol; returns each side's result and every message."""
    guest, host = PsiParty(a, max_ids=max_ids), PsiParty(b, max_ids=max_ids)
    offer_g, offer_h = guest.offer(), host.offer()
    answer_g, answer_h = guest.answer(offer_h), host.answer(offer_g)
    wire = [offer_g.setup, offer_g.request, offer_h.setup, offer_h.request, answer_g, answer_h]
    return guest.intersect(answer_h), host.intersect(answer_g), wire


@settings(max_examples=15, deadline=None)
@given(
    st.sets(st.integers(0, 300), min_size=1, max_size=60),
    st.sets(st.integers(0, 300), min_size=1, max_size=60),
)
def test_psi_returns_exactly_the_intersection(a: set[int], b: set[int]) -> None:
    ids_a, ids_b = [f"cust-{i:05d}" for i in a], [f"cust-{i:05d}" for i in b]
    random.shuffle(ids_a)
    got_g, got_h, _ = _run(ids_a, ids_b)
    assert got_g == got_h == sorted(set(ids_a) & set(ids_b))


def test_no_raw_id_in_any_message() -> None:
    a = [f"patient-{i:06d}" for i in range(0, 80)]
    b = [f"patient-{i:06d}" for i in range(40, 120)]
    _, _, wire = _run(a, b)
    for message in wire:
        for raw in set(a) | set(b):
            assert raw.encode() not in message


def test_no_overlap_gives_empty_intersection() -> None:
    got_g, got_h, _ = _run(["a", "b"], ["c", "d"])
    assert got_g == got_h == []


@pytest.mark.parametrize(
    ("ids", "match"),
    [([], "empty"), (["x", "y", "x"], "duplicate ID 'x'"), ([str(i) for i in range(11)], "exceed")],
)
def test_bad_id_columns_refused(ids: list[str], match: str) -> None:
    with pytest.raises(VerticalError, match=match):
        PsiParty(ids, max_ids=10)


def _pair():
    guest, host = PsiParty(["1", "2", "3"], max_ids=10), PsiParty(["2", "3", "4"], max_ids=10)
    return guest, host, guest.offer(), host.offer()


def test_malformed_points_refused() -> None:
    guest, _, _, offer_h = _pair()
    bad = bytearray(offer_h.request)
    bad[-33] = 0x07  # an impossible point prefix
    with pytest.raises(VerticalError, match="malformed curve point"):
        guest.answer(Offer(offer_h.setup, bytes(bad)))
    with pytest.raises(VerticalError, match="not a valid PSI message"):
        guest.answer(Offer(b"\xff\xff\xff", offer_h.request))


def test_off_curve_answer_refused() -> None:
    guest, host, offer_g, offer_h = _pair()
    guest.answer(offer_h)
    answer = bytearray(host.answer(offer_g))
    for k in range(32):  # rewrite the last point's x coordinate to a non-point
        answer[-32 + k] = 0xFF
    with pytest.raises(VerticalError):
        guest.intersect(bytes(answer))


def test_replayed_points_refused() -> None:
    guest, _, offer_g, offer_h = _pair()
    with pytest.raises(VerticalError, match="replays points we sent"):
        guest.answer(offer_g)  # our own offer bounced back as the peer's
    guest.answer(offer_h)
    with pytest.raises(VerticalError, match="replays points we sent"):
        bounced = psi.Response()
        bounced.encrypted_elements.extend(
            psi.Request.FromString(offer_g.request).encrypted_elements
        )
        guest.intersect(bounced.SerializeToString())  # our request returned unblinded


def test_duplicate_points_and_huge_lists_refused() -> None:
    guest, _, _, _ = _pair()
    big = PsiParty([str(i) for i in range(50)], max_ids=50).offer()
    with pytest.raises(VerticalError, match="larger than vertical-max-ids"):
        guest.answer(big)
    request = psi.Request.FromString(PsiParty(["9", "8", "7"], max_ids=10).offer().request)
    request.encrypted_elements[2] = request.encrypted_elements[0]
    offer = PsiParty(["9", "8", "7"], max_ids=10).offer()
    with pytest.raises(VerticalError, match="repeats a point"):
        guest.answer(Offer(offer.setup, request.SerializeToString()))
