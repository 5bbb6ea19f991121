"""The federated privacy ledger against Opacus's own RDP accountant."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fedge.privacy.accountant import PrivacyLedger

DELTA = 1e-5
SIGMAS = [0.7, 1.0, 1.5]
RATES = [0.05, 0.2, 1.0]


def _opacus_epsilon(steps: list[tuple[float, float]], delta: float) -> float:
    accountant = RDPAccountant()
    for sigma, q in steps:
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta)


def _ledger(steps: list[tuple[float, float]], delta: float = DELTA) -> PrivacyLedger:
    ledger = PrivacyLedger(delta)
    for sigma, q in steps:
        ledger.step(noise_multiplier=sigma, sample_rate=q)
    return ledger


@pytest.mark.parametrize(
    "steps",
    [
        [(1.0, 0.2)] * 30,
        [(0.7, 1.0)] * 5,
        # Per-round sigma changes, e.g. realized distributed noise, with repeats.
        [(1.0, 0.2), (1.5, 0.2), (1.0, 0.2), (1.0, 0.05), (0.7, 0.05), (0.7, 0.05)],
    ],
)
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_epsilon_equals_opacus(steps: list[tuple[float, float]], delta: float) -> None:
    ledger = _ledger(steps, delta)
    assert ledger.epsilon() == _opacus_epsilon(steps, delta)
    assert ledger.epsilon(1e-2) == _opacus_epsilon(steps, 1e-2)


def test_history_records_every_round() -> None:
    steps = [(1.0, 0.2), (1.5, 0.05), (1.0, 0.2)]
    ledger = PrivacyLedger(DELTA)
    ledger.step(noise_multiplier=1.0, sample_rate=0.2, server_round=3)
    ledger.step(noise_multiplier=1.5, sample_rate=0.05)
    ledger.step(noise_multiplier=1.0, sample_rate=0.2, server_round=7)

    history = ledger.history
    assert [r.server_round for r in history] == [3, 4, 7]
    assert [(r.noise_multiplier, r.sample_rate) for r in history] == steps
    for i, record in enumerate(history, start=1):
        assert record.epsilon == _opacus_epsilon(steps[:i], DELTA)
    assert history[-1].epsilon == ledger.epsilon()
    with pytest.raises(ValueError, match="not after"):
        ledger.step(noise_multiplier=1.0, sample_rate=0.2, server_round=7)


@settings(max_examples=40, deadline=None)
@given(
    budget=st.floats(0.5, 15.0),
    proposals=st.lists(
        st.tuples(st.sampled_from(SIGMAS), st.sampled_from(RATES)), min_size=1, max_size=12
    ),
)
def test_would_exceed_is_never_wrong(budget: float, proposals: list[tuple[float, float]]) -> None:
    ledger = PrivacyLedger(DELTA)
    for sigma, q in proposals:
        refuse = ledger.would_exceed(max_epsilon=budget, noise_multiplier=sigma, sample_rate=q)
        trial = PrivacyLedger.from_dict(ledger.to_dict())
        trial.step(noise_multiplier=sigma, sample_rate=q)
        assert refuse == (trial.epsilon() > budget)
        if not refuse:
            ledger.step(noise_multiplier=sigma, sample_rate=q)
            assert ledger.epsilon() <= budget
    assert ledger.epsilon() <= budget


def test_would_exceed_does_not_spend() -> None:
    ledger = _ledger([(1.0, 0.2)] * 3)
    before = ledger.epsilon()
    assert ledger.would_exceed(max_epsilon=before, noise_multiplier=1.0, sample_rate=0.2)
    assert not ledger.would_exceed(max_epsilon=before + 10, noise_multiplier=1.0, sample_rate=0.2)
    assert ledger.epsilon() == before
    assert len(ledger.history) == 3


def test_restore_gives_identical_epsilon_and_continues() -> None:
    steps = [(1.0, 0.2), (1.5, 0.2), (0.7, 0.05), (0.7, 0.05)]
    original = _ledger(steps)
    restored = PrivacyLedger.from_dict(json.loads(json.dumps(original.to_dict())))
    assert restored.epsilon() == original.epsilon()
    assert restored.history == original.history
    assert restored.delta == original.delta

    for ledger in (original, restored):
        ledger.step(noise_multiplier=1.0, sample_rate=0.2)
    assert restored.epsilon() == original.epsilon() == _opacus_epsilon([*steps, (1.0, 0.2)], DELTA)


def test_noiseless_round_is_infinite_and_survives_json() -> None:
    ledger = _ledger([(1.0, 0.2), (0.0, 0.2)])
    assert math.isinf(ledger.epsilon())
    assert math.isinf(PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict()))).epsilon())


def test_restore_rejects_tampered_or_unknown_state() -> None:
    state = _ledger([(1.0, 0.2), (1.0, 0.2)]).to_dict()
    state["rounds"][1]["noise_multiplier"] = 5.0
    with pytest.raises(ValueError, match="inconsistent"):
        PrivacyLedger.from_dict(state)
    with pytest.raises(ValueError, match="version"):
        PrivacyLedger.from_dict({**state, "version": 99})


@pytest.mark.parametrize(("sigma", "q"), [(-1.0, 0.1), (1.0, 1.5), (1.0, -0.1), (math.nan, 0.1)])
def test_ledger_rejects_invalid_steps(sigma: float, q: float) -> None:
    ledger = PrivacyLedger(DELTA)
    with pytest.raises(ValueError, match=r"noise_multiplier|sample_rate"):
        ledger.step(noise_multiplier=sigma, sample_rate=q)
    with pytest.raises(ValueError, match=r"noise_multiplier|sample_rate"):
        ledger.would_exceed(max_epsilon=1.0, noise_multiplier=sigma, sample_rate=q)
    assert ledger.history == []


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5])
def test_ledger_rejects_invalid_delta(delta: float) -> None:
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(delta)
