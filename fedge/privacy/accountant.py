"""User-level privacy accounting across federated rounds, on Opacus's RDP analysis.

Each round is one step of the sampled Gaussian mechanism: a client is in the
round with probability q = sampled clients / total clients, and the sum of
clipped updates gets noise multiplier sigma (which may change per round, e.g.
the realized multiplier of distributed noise). Opacus's analysis is for Poisson
sampling (as in DP-FedAvg, McMahan et al. 2018); Flower samples a fixed number m
of N clients without replacement, for which q = m / N is a common approximation,
not a proof.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedge.privacy._common import check_delta, check_noise_multiplier
from fedge.privacy._opacus import RDPAccountant, get_noise_multiplier, rdp_analysis

# Opacus's RDPAccountant history: (noise_multiplier, sample_rate, steps) runs.
History = Sequence[tuple[float, float, int]]

_ORDERS = list(RDPAccountant.DEFAULT_ALPHAS)
_STATE_VERSION = 1


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus's RDP curve for one step, cached.

    One curve takes Opacus ~0.1 s; without the cache, per-round epsilons over a
    history whose sigma varies every round would cost O(rounds^2) of those.
    """
    curve = np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_ORDERS
        )
    )
    curve.setflags(write=False)
    return curve


def rdp_epsilon(history: History, delta: float) -> float:
    """Epsilon of an Opacus RDP history, bit-identical to `RDPAccountant.get_epsilon`."""
    check_delta(delta)
    if not history:
        return 0.0
    if any(sigma == 0 and q > 0 and steps > 0 for sigma, q, steps in history):
        return math.inf  # a noiseless release: no (ε, δ) bounds it
    rdp = sum(_rdp_per_step(sigma, q) * steps for sigma, q, steps in history)
    epsilon, _ = rdp_analysis.get_privacy_spent(orders=_ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)


def check_step(noise_multiplier: float, sample_rate: float) -> None:
    check_noise_multiplier(noise_multiplier)
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")


class TargetUnreachable(ValueError):
    """No noise multiplier keeps the planned steps within the target epsilon."""


def noise_multiplier_for(
    target_epsilon: float, *, delta: float, sample_rate: float, steps: int
) -> float:
    """The σ whose ε after `steps` steps at `sample_rate` is at most `target_epsilon`.

    Opacus's bisection (`get_noise_multiplier`, within 0.01 below the target), then
    checked again on this module's `rdp_epsilon`, the number every ledger reports, so
    a σ that would overspend is never returned (fail closed).
    """
    check_delta(delta)
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target_epsilon must be a positive number, got {target_epsilon}")
    if not 0 < sample_rate <= 1 or steps < 1:
        # ε would be 0 for every σ, and Opacus's bisection would not end
        raise ValueError(f"need 0 < sample_rate <= 1 and steps >= 1, got {sample_rate}, {steps}")
    with warnings.catch_warnings():
        # Opacus's advice to widen the RDP orders; fedge's ledger uses the same orders.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        try:
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
            )
        except ValueError as error:
            raise TargetUnreachable(
                f"ε={target_epsilon:g} at δ={delta:g} cannot be met over {steps} steps at "
                f"sampling rate {sample_rate:.4g}, whatever the noise ({error}); raise the "
                "target or δ, or plan fewer rounds (local DP: fewer epochs or larger batches)"
            ) from None
        spent = rdp_epsilon([(float(sigma), float(sample_rate), int(steps))], delta)
    if not spent <= target_epsilon:
        raise TargetUnreachable(f"σ={sigma:.6g} spends ε={spent:.6g} > {target_epsilon:g}")
    return float(sigma)


@dataclass(frozen=True)
class RoundRecord:
    """One accounted round and the cumulative epsilon (at the ledger's delta) after it."""

    server_round: int
    noise_multiplier: float
    sample_rate: float
    epsilon: float


class PrivacyLedger:
    """Cumulative (epsilon, delta) of a federated run, checkpointable.

    Wraps an Opacus `RDPAccountant` (one step per round) and keeps a per-round
    history so the server can log and enforce a budget.
    """

    def __init__(self, delta: float) -> None:
        check_delta(delta)
        self.delta = delta
        self._accountant = RDPAccountant()
        self._history: list[RoundRecord] = []

    @property
    def history(self) -> list[RoundRecord]:
        return list(self._history)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far, at the ledger's delta unless another is given."""
        return rdp_epsilon(self._accountant.history, self.delta if delta is None else delta)

    def step(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        server_round: int | None = None,
    ) -> RoundRecord:
        """Account one round (numbered after the last one unless `server_round` is given)."""
        server_round = self._advance(noise_multiplier, sample_rate, server_round)
        record = RoundRecord(
            server_round, float(noise_multiplier), float(sample_rate), self.epsilon()
        )
        self._history.append(record)
        return record

    def _advance(
        self, noise_multiplier: float, sample_rate: float, server_round: int | None
    ) -> int:
        """Step the accountant; rounds must increase so a resume cannot count one twice."""
        check_step(noise_multiplier, sample_rate)
        last = self._history[-1].server_round if self._history else 0
        server_round = last + 1 if server_round is None else server_round
        if server_round <= last:
            raise ValueError(f"round {server_round} is not after the last accounted {last}")
        # Plain floats, so a replay from JSON steps through exactly the same values.
        self._accountant.step(
            noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate)
        )
        return server_round

    def would_exceed(
        self,
        *,
        max_epsilon: float,
        noise_multiplier: float,
        sample_rate: float,
        delta: float | None = None,
    ) -> bool:
        """Whether running one more round would push epsilon above `max_epsilon`.

        Checked on a copy so the round can be refused before any update is released.
        """
        check_step(noise_multiplier, sample_rate)
        trial = copy.deepcopy(self._accountant)
        trial.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))
        return rdp_epsilon(trial.history, self.delta if delta is None else delta) > max_epsilon

    def to_dict(self) -> dict[str, Any]:
        """JSON-able checkpoint state (epsilon is inf, JSON `Infinity`, after a noiseless round)."""
        return {
            "version": _STATE_VERSION,
            "delta": self.delta,
            "rounds": [asdict(record) for record in self._history],
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        """Restore a checkpoint, verifying its recorded epsilon against a replay."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported ledger state version {state.get('version')!r}")
        ledger = cls(float(state["delta"]))
        for raw in state["rounds"]:
            record = RoundRecord(
                server_round=int(raw["server_round"]),
                noise_multiplier=float(raw["noise_multiplier"]),
                sample_rate=float(raw["sample_rate"]),
                epsilon=float(raw["epsilon"]),
            )
            ledger._advance(record.noise_multiplier, record.sample_rate, record.server_round)
            ledger._history.append(record)
        if ledger._history and not math.isclose(
            ledger.epsilon(), ledger._history[-1].epsilon, rel_tol=1e-9
        ):
            raise ValueError("ledger state is inconsistent: its rounds do not give its epsilon")
        return ledger
