"""Party-to-party signatures: altered, replayed, reordered or unsigned payloads are refused."""

from pathlib import Path

import pytest

from fedge.vertical.auth import PeerLink, write_keypair
from fedge.vertical.errors import VerticalError


def _links(tmp_path: Path, run: int = 1) -> tuple[PeerLink, PeerLink]:
    for name in ("g", "h"):
        write_keypair(tmp_path / f"{name}.key", tmp_path / f"{name}.pub")
    guest = PeerLink(tmp_path / "g.key", tmp_path / "h.pub", run)
    host = PeerLink(tmp_path / "h.key", tmp_path / "g.pub", run)
    return guest, host


def test_signed_payload_verifies_and_any_change_is_refused(tmp_path: Path) -> None:
    guest, host = _links(tmp_path)
    payload = {"u-c": b"\x01\x02", "u-e": b"\x00", "features": 20}
    sig = host.sign("host", "logits", 3, payload)
    guest.verify("host", "logits", 3, payload, sig)
    for args in (
        ("host", "logits", 3, {**payload, "u-c": b"\x01\x03"}),  # altered
        ("host", "logits", 2, payload),  # replayed / reordered
        ("host", "score-logits", 3, payload),  # moved to another stage
        ("guest", "logits", 3, payload),  # claimed by the other role
        ("host", "logits", 3, {**payload, "features": "20"}),  # same text, other type
    ):
        with pytest.raises(VerticalError, match="fails its signature"):
            guest.verify(*args, sig)
    with pytest.raises(VerticalError, match="unsigned"):
        guest.verify("host", "logits", 3, payload, None)


def test_a_signature_from_another_run_is_refused(tmp_path: Path) -> None:
    guest, host = _links(tmp_path, run=1)
    later = PeerLink(tmp_path / "g.key", tmp_path / "h.pub", 2)
    sig = host.sign("host", "logits", 1, {"u-c": b""})
    guest.verify("host", "logits", 1, {"u-c": b""}, sig)
    with pytest.raises(VerticalError, match="fails its signature"):
        later.verify("host", "logits", 1, {"u-c": b""}, sig)


def test_bad_key_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(VerticalError, match="PEM"):
        PeerLink(tmp_path / "junk.pem", tmp_path / "junk.pem", 1)
