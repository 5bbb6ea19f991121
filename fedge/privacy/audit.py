"""Empirical privacy auditing in one training run (Steinke, Nasr & Jagielski 2023).

m canaries are each included in training independently with probability 1/2.
An auditor, seeing only per-canary scores, guesses "in" or "out" for r of them
and abstains on the rest. Under (epsilon, delta)-DP the number of correct guesses
v is at most as likely to be large as Binomial(r, e^eps / (1 + e^eps)), plus a
term in delta (the paper's theorem for delta > 0). The audit reports the largest
epsilon that the observed v rejects at confidence 1 - beta: a statistically
valid lower bound on the true epsilon, to compare with the accountant's upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import special, stats

from fedge.privacy._common import check_delta
from fedge.privacy.clipping import clip_update
from fedge.privacy.noise import add_central_noise, secure_rng

# Bisection steps for epsilon; enough for ~1e-13 resolution on the bracket used.
_BISECTIONS = 50


@dataclass(frozen=True)
class AuditResult:
    epsilon_lower_bound: float
    num_canaries: int
    num_guesses: int
    num_correct: int


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            "need 0 <= num_correct <= num_guesses <= num_canaries, got "
            f"{num_correct}, {num_guesses}, {num_canaries}"
        )


def audit_p_value(
    *, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float
) -> float:
    """P[>= num_correct correct guesses] if training were (epsilon, delta)-DP.

    The paper's bound: P[Binomial(r, q) >= v] + 2 m delta max_i P[v - i <= B < v] / i
    with q = e^eps / (1 + e^eps), the accuracy of eps-DP randomized response.
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    accuracy = special.expit(epsilon)
    tail = stats.binom.sf(num_correct - 1, num_guesses, accuracy)
    if num_correct == 0 or delta == 0:
        return float(min(1.0, tail))
    # P[B = v-1], P[B = v-2], ..., P[B = 0]; cumulative sums give P[v - i <= B < v].
    below = stats.binom.pmf(np.arange(num_correct - 1, -1, -1), num_guesses, accuracy)
    spread = np.max(np.cumsum(below) / np.arange(1, num_correct + 1))
    return float(min(1.0, tail + 2 * num_canaries * delta * spread))


def epsilon_lower_bound(
    *,
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    delta: float,
    beta: float = 0.05,
) -> float:
    """Largest epsilon whose p-value for the observed guesses is below `beta`.

    0 when even epsilon = 0 is not rejected. The p-value grows with epsilon, so
    bracket by doubling and bisect, as in the paper.
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")

    def rejected(epsilon: float) -> bool:
        p_value = audit_p_value(
            num_canaries=num_canaries,
            num_guesses=num_guesses,
            num_correct=num_correct,
            epsilon=epsilon,
            delta=delta,
        )
        return p_value < beta

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        low, high = high, 2 * high
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        low, high = (middle, high) if rejected(middle) else (low, middle)
    return low


def audit_scores(
    scores: ArrayLike,
    included: ArrayLike,
    *,
    num_guesses: int,
    delta: float,
    beta: float = 0.05,
) -> AuditResult:
    """Audit from membership scores (higher means "more likely included").

    Guesses "in" for the ceil(k/2) highest scores and "out" for the floor(k/2)
    lowest, abstaining on the rest; the guesses depend only on the scores. For
    other guessing rules call `epsilon_lower_bound` directly.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ValueError(
            f"scores and included must be equal-length vectors, got {scores.shape} "
            f"and {included.shape}"
        )
    num_canaries = scores.size
    _check_counts(num_canaries, num_guesses, 0)
    order = np.argsort(scores, kind="stable")
    guessed_in = order[num_canaries - (num_guesses + 1) // 2 :]
    guessed_out = order[: num_guesses // 2]
    num_correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    return AuditResult(
        epsilon_lower_bound=epsilon_lower_bound(
            num_canaries=num_canaries,
            num_guesses=num_guesses,
            num_correct=num_correct,
            delta=delta,
            beta=beta,
        ),
        num_canaries=num_canaries,
        num_guesses=num_guesses,
        num_correct=num_correct,
    )


def run_canary_audit(
    *,
    num_canaries: int,
    noise_multiplier: float,
    clip_norm: float,
    rounds: int,
    num_guesses: int,
    delta: float,
    beta: float = 0.05,
    rng: np.random.Generator | None = None,
) -> AuditResult:
    """White-box audit of central-DP aggregation as this package implements it.

    Canary i is a client whose update points along coordinate i with norm 2C,
    so `clip_update` must shrink it; each canary takes part in every round with
    probability 1/2. The adversary sees each round's noised sum (as anyone given
    the global model does) and scores canary i by coordinate i summed over
    rounds. The bound must stay below the accountant's epsilon for
    (noise_multiplier, sample_rate=1, rounds, delta); exceeding it means the
    clipping or noise is broken.
    """
    check_delta(delta)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    rng = secure_rng() if rng is None else rng
    included = rng.random(num_canaries) < 0.5
    scores = np.zeros(num_canaries)
    for _ in range(rounds):
        total = np.zeros(num_canaries)
        for canary in np.flatnonzero(included):
            update = np.zeros(num_canaries)
            update[canary] = 2 * clip_norm
            clipped, _ = clip_update({"update": update}, clip_norm)
            total += clipped["update"]
        noised = add_central_noise(
            {"sum": total}, noise_multiplier=noise_multiplier, clip_norm=clip_norm, rng=rng
        )
        scores += noised["sum"]
    return audit_scores(scores, included, num_guesses=num_guesses, delta=delta, beta=beta)
