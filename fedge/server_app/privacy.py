"""Server-side differential privacy for one run: clip norm, noise, ledger, budget.

Updates are clipped by the clients (the server checks), summed with equal
weights — n_k-weighting would scale a client's influence and so the
sensitivity — and divided by the number of *sampled* clients, a public
quantity, so the mean's denominator leaks nothing. Each round costs one step
of an Opacus RDP accountant at sampling rate q = sampled / connected nodes.
"""

from __future__ import annotations

import math
from typing import Any

from fedge.client_app.protocol import CLIP_KEY, MIN_CLIENTS_KEY, NOISE_MULTIPLIER_KEY
from fedge.config import FedgeConfig
from fedge.privacy.accountant import PrivacyLedger
from fedge.privacy.clipping import AdaptiveClipping, global_norm
from fedge.privacy.noise import (
    add_central_noise,
    distributed_noise_stddev,
    realized_noise_multiplier,
)
from fedge.records import NamedArrays


class BudgetExhausted(Exception):
    """The next round would spend more than `dp-max-epsilon`; the run stops cleanly."""


class ServerPrivacy:
    def __init__(self, config: FedgeConfig) -> None:
        self.config = config
        self.mode = config.dp_mode
        self.ledger = PrivacyLedger(config.dp_delta)
        self.min_clients = config.dp_min_clients
        self.fewest_contributors = 1
        self.adaptive: AdaptiveClipping | None = None
        self.stop_reason: str | None = None
        self.sample_rate = 0.0

    @property
    def clip_norm(self) -> float:
        return self.adaptive.clip_norm if self.adaptive else self.config.dp_clipping_norm

    def client_config(self) -> dict[str, float | int]:
        """What clients need this round: the clip norm and, distributed, their noise share."""
        settings: dict[str, float | int] = {CLIP_KEY: self.clip_norm}
        if self.mode == "distributed":
            settings[NOISE_MULTIPLIER_KEY] = self.config.dp_noise_multiplier
            settings[MIN_CLIENTS_KEY] = self.min_clients
        return settings

    def client_noise_stddev(self) -> float:
        """Std of the noise each client adds itself (distributed mode; 0 otherwise)."""
        if self.mode != "distributed":
            return 0.0
        return distributed_noise_stddev(
            noise_multiplier=self.config.dp_noise_multiplier,
            clip_norm=self.clip_norm,
            min_clients=self.min_clients,
        )

    def provision(self, threshold: int) -> None:
        """Distributed DP: a SecAgg round completes with at least `threshold` clients.

        Noise is provisioned for `dp-min-clients` survivors (default: exactly
        `threshold`), so the realized noise multiplier is at least σ unless a
        larger `dp-min-clients` was chosen; the budget check uses the worst case.
        """
        self.fewest_contributors = threshold
        self.min_clients = self.config.dp_min_clients or threshold

    def worst_case_noise_multiplier(self) -> float:
        sigma = self.config.dp_noise_multiplier
        if self.mode != "distributed":
            return sigma
        return min(
            sigma,
            realized_noise_multiplier(
                noise_multiplier=sigma,
                min_clients=self.min_clients,
                num_contributors=self.fewest_contributors,
            ),
        )

    def start_round(self, server_round: int, num_sampled: int, num_nodes: int) -> None:
        """Refuse (raise `BudgetExhausted`) a round that could push ε past the budget,
        checked with the smallest noise the round could end up with."""
        self.sample_rate = num_sampled / max(num_nodes, 1)
        if self.adaptive is None and self.config.dp_adaptive_clipping:
            count_stddev = self.config.dp_count_stddev or num_sampled / 20
            self.adaptive = AdaptiveClipping(
                self.config.dp_clipping_norm,
                count_stddev,
                self.config.dp_target_quantile,
                self.config.dp_clip_learning_rate,
            )
        budget = self.config.dp_max_epsilon
        if budget > 0 and self.ledger.would_exceed(
            max_epsilon=budget,
            noise_multiplier=self.worst_case_noise_multiplier(),
            sample_rate=self.sample_rate,
        ):
            self.stop_reason = (
                f"privacy budget: round {server_round} would take ε from "
                f"{self.ledger.epsilon():.4g} past dp-max-epsilon={budget:g} "
                f"(δ={self.config.dp_delta:g})"
            )
            raise BudgetExhausted(self.stop_reason)

    def clip_violation(self, update: NamedArrays) -> str | None:
        """A client that did not clip is dropped, whatever its reason."""
        norm = global_norm(update)
        if norm > self.clip_norm * (1 + 1e-5):
            return f"update norm {norm:.4g} exceeds the clip norm {self.clip_norm:.4g}"
        return None

    def central_noise(self, summed: NamedArrays) -> NamedArrays:
        """Noise for Σ clipped Δ_k; with adaptive clipping σ grows to pay for the count."""
        sigma = self.config.dp_noise_multiplier
        if self.adaptive is not None:
            sigma = self.adaptive.update_noise_multiplier(sigma)
        return add_central_noise(summed, noise_multiplier=sigma, clip_norm=self.clip_norm)

    def finish_round(
        self, server_round: int, num_contributors: int, num_sampled: int, unclipped: int
    ) -> float:
        """Account the round with the noise actually added; returns ε so far."""
        sigma = self.config.dp_noise_multiplier
        if self.mode == "distributed":
            sigma = realized_noise_multiplier(
                noise_multiplier=sigma,
                min_clients=self.min_clients,
                num_contributors=num_contributors,
            )
        self.ledger.step(
            noise_multiplier=sigma, sample_rate=self.sample_rate, server_round=server_round
        )
        if self.adaptive is not None:
            self.adaptive = self.adaptive.update(
                unclipped, num_contributors, expected_clients=num_sampled
            )
        return self.epsilon()

    def epsilon(self) -> float:
        return self.ledger.epsilon() if self.ledger.history else 0.0

    def state(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger.to_dict(),
            "adaptive": self.adaptive.to_dict() if self.adaptive else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.ledger = PrivacyLedger.from_dict(state["ledger"])
        if state.get("adaptive"):
            self.adaptive = AdaptiveClipping.from_dict(state["adaptive"])

    def report(self, stop_reason: str | None = None) -> dict[str, Any]:
        """privacy.json: the guarantee, how it was spent per round, why the run stopped.

        Written after every round with `stop_reason` None (still running, so a killed
        ServerApp leaves the ledger of its last round) and once more when the run stops.
        A refused round's budget reason wins over the caller's.
        """
        epsilon = self.epsilon()
        return {
            "mode": self.mode,
            "noise_multiplier": self.config.dp_noise_multiplier,
            "clipping_norm": self.config.dp_clipping_norm,
            "adaptive_clipping": self.config.dp_adaptive_clipping,
            "final_clipping_norm": self.clip_norm,
            "delta": self.config.dp_delta,
            "max_epsilon": self.config.dp_max_epsilon or None,
            "min_clients": self.min_clients if self.mode == "distributed" else None,
            "accountant": "opacus RDP",
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "rounds": [
                {
                    "round": r.server_round,
                    "noise_multiplier": r.noise_multiplier,
                    "sample_rate": r.sample_rate,
                    "epsilon": r.epsilon,
                }
                for r in self.ledger.history
            ],
            "stop_reason": self.stop_reason or stop_reason,
        }
