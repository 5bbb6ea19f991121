"""One-run privacy auditing (Steinke, Nasr & Jagielski 2023)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedge.privacy.accountant import PrivacyLedger
from fedge.privacy.audit import (
    audit_p_value,
    audit_scores,
    epsilon_lower_bound,
    run_canary_audit,
)

DELTA = 1e-5


def _ledger_epsilon(noise_multiplier: float, rounds: int) -> float:
    ledger = PrivacyLedger(DELTA)
    for _ in range(rounds):
        ledger.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
    return ledger.epsilon()


def test_random_guesses_give_no_evidence() -> None:
    bounds = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        result = audit_scores(rng.standard_normal(1000), included, num_guesses=400, delta=DELTA)
        bounds.append(result.epsilon_lower_bound)
    # At beta = 0.05 a positive bound should occur about once in 20 null audits.
    assert sum(b > 0 for b in bounds) <= 3
    assert max(bounds) < 0.3


@pytest.mark.parametrize(("canaries", "minimum"), [(1000, 5.0), (10_000, 7.0)])
def test_perfect_guesses_give_large_bound(canaries: int, minimum: float) -> None:
    """Guessing on 80% leaves room for the ~50% included to vary; all guesses correct."""
    rng = np.random.default_rng(0)
    included = rng.random(canaries) < 0.5
    scores = included + 0.01 * rng.standard_normal(canaries)
    guesses = canaries * 4 // 5
    result = audit_scores(scores, included, num_guesses=guesses, delta=DELTA)
    assert result.num_correct == result.num_guesses == guesses
    assert result.epsilon_lower_bound > minimum


def test_bound_is_monotone_in_correct_guesses() -> None:
    bounds = [
        epsilon_lower_bound(num_canaries=1000, num_guesses=200, num_correct=v, delta=DELTA)
        for v in range(201)
    ]
    assert np.all(np.diff(bounds) >= -1e-9)
    assert bounds[100] == 0.0
    assert bounds[200] > bounds[150] > 0


def test_p_value_without_delta_is_the_binomial_tail() -> None:
    assert audit_p_value(
        num_canaries=50, num_guesses=10, num_correct=10, epsilon=0.0, delta=0.0
    ) == pytest.approx(2.0**-10)
    q = np.exp(1.0) / (1 + np.exp(1.0))
    assert audit_p_value(
        num_canaries=50, num_guesses=30, num_correct=25, epsilon=1.0, delta=0.0
    ) == pytest.approx(stats.binom.sf(24, 30, q))
    with_delta = audit_p_value(
        num_canaries=50, num_guesses=30, num_correct=25, epsilon=1.0, delta=1e-3
    )
    assert with_delta > stats.binom.sf(24, 30, q)


@pytest.mark.parametrize("rounds", [1, 4])
def test_audit_of_central_dp_stays_below_accountant(rounds: int) -> None:
    result = run_canary_audit(
        num_canaries=1000,
        noise_multiplier=2.0,
        clip_norm=0.5,
        rounds=rounds,
        num_guesses=100,
        delta=DELTA,
        rng=np.random.default_rng(rounds),
    )
    assert 0 < result.epsilon_lower_bound <= _ledger_epsilon(2.0, rounds)


def test_audit_catches_noise_ten_times_too_small() -> None:
    claimed = _ledger_epsilon(2.0, rounds=1)
    result = run_canary_audit(
        num_canaries=1000,
        noise_multiplier=0.2,
        clip_norm=0.5,
        rounds=1,
        num_guesses=200,
        delta=DELTA,
        rng=np.random.default_rng(0),
    )
    assert result.epsilon_lower_bound > claimed


def test_audit_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="equal-length"):
        audit_scores(np.zeros(4), np.zeros(3, bool), num_guesses=2, delta=DELTA)
    with pytest.raises(ValueError, match="num_guesses <= num_canaries"):
        audit_scores(np.zeros(4), np.zeros(4, bool), num_guesses=5, delta=DELTA)
    with pytest.raises(ValueError, match="num_correct <= num_guesses"):
        epsilon_lower_bound(num_canaries=10, num_guesses=5, num_correct=6, delta=DELTA)
