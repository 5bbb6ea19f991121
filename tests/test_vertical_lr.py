"""Hetero LR under Paillier: learns like centralized LR, leaks no plaintext, refuses bad peers."""

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedge.vertical.errors import VerticalError
from fedge.vertical.hetero_lr import (
    Guest,
    Host,
    Settings,
    loss_from_pad,
    pack,
    public_key_bytes,
    unpack,
)

SETTINGS = Settings(key_bits=512, lr=0.3, l2=0.01, min_batch=16)  # small key: protocol tests


def _parties(rows: int = 120):
    x, y = load_breast_cancer(return_X_y=True)
    x, y = x[:rows], y[:rows]
    guest, host = Guest(x[:, :4], y, SETTINGS), Host(x[:, 4:10], SETTINGS)
    guest.meet(public_key_bytes(host.public), 6)
    host.meet(public_key_bytes(guest.public), 4)
    return x[:, :10], y, guest, host


def _batch(guest: Guest, host: Host, batch: list[int], wire: list[dict]) -> float:
    to_guest = host.logits(batch)
    to_host, pad = guest.residuals(batch, to_guest)
    to_guest_2, loss_pair = host.gradients(to_host)
    to_host_2 = guest.unmask(to_guest_2)
    host.apply(to_host_2)
    wire += [to_guest, to_host, to_guest_2, to_host_2]
    return loss_from_pad(loss_pair, pad, public_key_bytes(host.public))


def test_learns_like_centralized_lr_and_loss_falls() -> None:
    x, y, guest, host = _parties()
    rng = np.random.default_rng(0)
    wire: list[dict] = []
    losses = []
    for _ in range(3):
        order = rng.permutation(len(y))
        losses.append(
            np.mean(
                [
                    _batch(guest, host, order[k : k + 40].tolist(), wire)
                    for k in range(0, len(y), 40)
                ]
            )
        )
    assert losses[-1] < losses[0] - 0.05
    score = guest.scores(x[:, :4]) + guest.bias + host.scores(x[:, 4:])
    xs = (x - x.mean(0)) / x.std(0)
    central = LogisticRegression(C=1 / (0.01 * len(y)), max_iter=1000).fit(xs, y)
    assert roc_auc_score(y, score) > roc_auc_score(y, central.decision_function(xs)) - 0.02


def test_messages_carry_no_plaintext_of_the_other_side() -> None:
    x, y, guest, host = _parties(60)
    wire: list[dict] = []
    _batch(guest, host, list(range(40)), wire)
    secrets_ = [np.float64(v).tobytes() for v in np.concatenate([x[:40].ravel(), y[:40]])]
    blob = b"".join(v for message in wire for v in message.values())
    assert not any(s in blob for s in secrets_ if s != np.float64(0).tobytes())
    # What the host decrypts for the guest is padded uniformly mod n: far from any
    # small (or small negative) fixed-point gradient encoding.
    n = host.public.n
    for c in unpack({"c": wire[1]["g-c"], "e": wire[1]["g-e"]}, host.public, 5):
        value = host._private.raw_decrypt(c.ciphertext())
        assert n >> 40 < value < n - (n >> 40)
    # The host's first message is ciphertext only under its own key: the guest cannot
    # decrypt it, and the guest's padded gradient is not the gradient.
    assert set(wire[0]) == {"u-c", "u-e", "u2-c", "u2-e"}
    assert set(wire[1]) == {"e-c", "e-e", "g-c", "g-e", "loss-c", "loss-e"}


def test_weak_peer_key_refused() -> None:
    _, _, guest, _ = _parties(40)
    weak = Host(np.ones((40, 2)) * np.arange(40)[:, None], Settings(key_bits=256, min_batch=16))
    with pytest.raises(VerticalError, match="vertical-key-bits=512"):
        guest.meet(public_key_bytes(weak.public), 2)


def test_malformed_ciphertexts_refused() -> None:
    _, _, guest, host = _parties(40)
    good = host.logits(list(range(20)))
    forged = dict(good)
    forged["u-c"] = b"\xff" * len(good["u-c"])  # >= n^2
    with pytest.raises(VerticalError, match="not a valid Paillier ciphertext"):
        guest.residuals(list(range(20)), forged)
    forged = dict(good, **{"u-e": bytes([100]) * 20})
    with pytest.raises(VerticalError, match="exponent"):
        guest.residuals(list(range(20)), forged)
    with pytest.raises(VerticalError, match="where 21 were due"):
        guest.residuals(list(range(21)), good)
    with pytest.raises(VerticalError, match="lacks bytes"):
        unpack({}, guest.public, 1)
    assert len(unpack(pack([guest.public.encrypt(1.0)]), guest.public, 1)) == 1


@pytest.mark.parametrize("batch", [list(range(5)), [0] * 20, list(range(30, 50))])
def test_bad_batches_refused(batch: list[int]) -> None:
    _, _, _, host = _parties(40)
    with pytest.raises(VerticalError, match="batch"):
        host.logits(batch)


def test_labels_must_be_binary() -> None:
    with pytest.raises(VerticalError, match="0/1"):
        Guest(np.ones((20, 2)), np.arange(20), SETTINGS)
