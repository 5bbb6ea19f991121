"""Server-side differential privacy for one run: clip norm, noise, ledger, budget.

Updates are clipped by the clients (the server checks), summed with equal
weights — n_k-weighting would scale a client's influence and so the
sensitivity — and divided by the number of *sampled* clients, a public
quantity, so the mean's denominator leaks nothing. Each round costs one step
of an Opacus RDP accountant at sampling rate q = sampled / connected nodes.

The ledger exists in every run, DP on or off, and travels in every checkpoint: a
round that ran without DP is accounted as a noiseless release (σ = 0, so ε = ∞),
so a run that ever had a guarantee reports that it no longer holds instead of a
smaller ε. Resuming a DP run with DP off is refused unless `resume-without-dp`.

With `dp-target-epsilon`, σ is computed at the first round's start (the sampling
rate needs the connected nodes) for all planned rounds, logged, kept in every
checkpoint and reused on resume, so a resumed run keeps its σ.
"""

from __future__ import annotations

import math
from logging import INFO, WARNING
from typing import Any

from flwr.common.logger import log

from fedge.client_app.protocol import CLIP_KEY, MIN_CLIENTS_KEY, NOISE_MULTIPLIER_KEY
from fedge.config import ConfigError, FedgeConfig
from fedge.privacy.accountant import PrivacyLedger, TargetUnreachable, noise_multiplier_for
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
    """The run's ε ledger and, under `dp-mode`, the clip norm, noise and budget.

    With dp-mode='none' only the ledger is used: `account_without_dp` each round.
    """

    def __init__(self, config: FedgeConfig) -> None:
        self.config = config
        self.mode = config.dp_mode
        self.ledger = PrivacyLedger(config.dp_delta)
        self.min_clients = config.dp_min_clients
        self.fewest_contributors = 1
        self.adaptive: AdaptiveClipping | None = None
        self.stop_reason: str | None = None
        self.sample_rate = 0.0
        self._sigma: float | None = None if self._planned_target() else config.dp_noise_multiplier

    @property
    def noise_multiplier(self) -> float:
        """σ: dp-noise-multiplier, or what dp-target-epsilon gave at the first round."""
        if self._sigma is None:
            raise RuntimeError("σ comes from dp-target-epsilon when the first round starts")
        return self._sigma

    @property
    def clip_norm(self) -> float:
        return self.adaptive.clip_norm if self.adaptive else self.config.dp_clipping_norm

    def client_config(self) -> dict[str, float | int]:
        """What clients need this round: the clip norm and, distributed, their noise share."""
        settings: dict[str, float | int] = {CLIP_KEY: self.clip_norm}
        if self.mode == "distributed":
            settings[NOISE_MULTIPLIER_KEY] = self.noise_multiplier
            settings[MIN_CLIENTS_KEY] = self.min_clients
        return settings

    def client_noise_stddev(self) -> float:
        """Std of the noise each client adds itself (distributed mode; 0 otherwise)."""
        if self.mode != "distributed":
            return 0.0
        return distributed_noise_stddev(
            noise_multiplier=self.noise_multiplier,
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

    def _worst_case_factor(self) -> float:
        """The smallest realized σ per unit of σ: below 1 only for distributed noise
        provisioned (`dp-min-clients`) for more survivors than a round may end with."""
        if self.mode != "distributed":
            return 1.0
        return min(
            1.0,
            realized_noise_multiplier(
                noise_multiplier=1.0,
                min_clients=self.min_clients,
                num_contributors=self.fewest_contributors,
            ),
        )

    def worst_case_noise_multiplier(self) -> float:
        return self.noise_multiplier * self._worst_case_factor()

    def _calibrate(self, server_round: int) -> float:
        """σ from dp-target-epsilon for every round still planned, at this round's q.

        Calibrated for the worst-case realized σ, so ε stays within the target however
        many clients drop (distributed noise then ends below it). A later round with a
        larger q than this one's is refused by the budget, never overspent.
        """
        target, delta = self.config.dp_target_epsilon, self.config.dp_delta
        rounds = self.config.num_server_rounds - server_round + 1
        try:
            worst = noise_multiplier_for(
                target, delta=delta, sample_rate=self.sample_rate, steps=rounds
            )
        except TargetUnreachable as error:
            raise ConfigError(f"dp-target-epsilon: {error}") from None
        factor = self._worst_case_factor()
        sigma = worst / factor
        while sigma * factor < worst:  # never a rounding ulp below what the target allows
            sigma = math.nextafter(sigma, math.inf)
        log(
            INFO,
            "fedge: dp-target-epsilon=%g: σ=%.4g for %s rounds at q=%.4g, δ=%g",
            target,
            sigma,
            rounds,
            self.sample_rate,
            delta,
        )
        return sigma

    def start_round(self, server_round: int, num_sampled: int, num_nodes: int) -> None:
        """Refuse (raise `BudgetExhausted`) a round that could push ε past the budget,
        checked with the smallest noise the round could end up with."""
        self.sample_rate = num_sampled / max(num_nodes, 1)
        if self._sigma is None:
            self._sigma = self._calibrate(server_round)
        if self.adaptive is None and self.config.dp_adaptive_clipping:
            sigma = self.noise_multiplier
            count_stddev = self.config.dp_count_stddev or AdaptiveClipping.default_count_stddev(
                num_sampled, sigma
            )
            AdaptiveClipping.check_count_stddev(count_stddev, sigma)  # before round 1, not in it
            self.adaptive = AdaptiveClipping(
                self.config.dp_clipping_norm,
                count_stddev,
                self.config.dp_target_quantile,
                self.config.dp_clip_learning_rate,
            )
        budget = self.config.dp_budget
        if budget > 0 and self.ledger.would_exceed(
            max_epsilon=budget,
            noise_multiplier=self.worst_case_noise_multiplier(),
            sample_rate=self.sample_rate,
        ):
            self.stop_reason = (
                f"privacy budget: round {server_round} would take ε from "
                f"{self.ledger.epsilon():.4g} past {self._budget_name()}={budget:g} "
                f"(δ={self.config.dp_delta:g})"
            )
            raise BudgetExhausted(self.stop_reason)

    def _budget_name(self) -> str:
        return "dp-max-epsilon" if self.config.dp_max_epsilon else "dp-target-epsilon"

    def clip_violation(self, update: NamedArrays) -> str | None:
        """A client that did not clip is dropped, whatever its reason."""
        norm = global_norm(update)
        if norm > self.clip_norm * (1 + 1e-5):
            return f"update norm {norm:.4g} exceeds the clip norm {self.clip_norm:.4g}"
        return None

    def central_noise(self, summed: NamedArrays) -> NamedArrays:
        """Noise for Σ clipped Δ_k; with adaptive clipping σ grows to pay for the count."""
        sigma = self.noise_multiplier
        if self.adaptive is not None:
            sigma = self.adaptive.update_noise_multiplier(sigma)
        return add_central_noise(summed, noise_multiplier=sigma, clip_norm=self.clip_norm)

    def finish_round(
        self, server_round: int, num_contributors: int, num_sampled: int, unclipped: int
    ) -> float:
        """Account the round with the noise actually added; returns ε so far."""
        sigma = self.noise_multiplier
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

    def account_without_dp(self, server_round: int) -> None:
        """A round that released updates without noise: σ = 0 at q = 1, ε = ∞ from now on."""
        self.ledger.step(noise_multiplier=0.0, sample_rate=1.0, server_round=server_round)

    def rounds_without_dp(self) -> list[int]:
        return [r.server_round for r in self.ledger.history if r.noise_multiplier == 0]

    def had_dp(self) -> bool:
        """Whether any accounted round was noised: then there is a guarantee to keep or void."""
        return any(r.noise_multiplier > 0 for r in self.ledger.history)

    def reports_epsilon(self) -> bool:
        """DP runs, and runs that had DP once, report ε (∞ once a round ran without DP)."""
        return self.mode != "none" or self.had_dp()

    def guarantee(self) -> str:
        """'holds', or why no (ε, δ) bounds what this run's model reveals."""
        missing = self.rounds_without_dp()
        if not missing:
            return "holds"
        listed = ", ".join(str(r) for r in missing)
        return f"void: round(s) {listed} ran without DP, so no (ε, δ) holds for this run"

    def epsilon(self) -> float:
        return self.ledger.epsilon() if self.ledger.history else 0.0

    def state(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger.to_dict(),
            "adaptive": self.adaptive.to_dict() if self.adaptive else None,
            "noise_multiplier": self._sigma,
            "target_epsilon": self._planned_target(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        ledger = PrivacyLedger.from_dict(state["ledger"])
        if self.mode != "none" and ledger.delta != self.config.dp_delta:
            raise ConfigError(
                f"dp-delta={self.config.dp_delta:g} but this run's ε is accounted at "
                f"δ={ledger.delta:g}; resume with dp-delta={ledger.delta:g}"
            )
        self._restore_sigma(state)
        self.ledger = ledger
        if state.get("adaptive"):
            self.adaptive = AdaptiveClipping.from_dict(state["adaptive"])

    def _restore_sigma(self, state: dict[str, Any]) -> None:
        """A run keeps the σ its dp-target-epsilon gave it; the target (hence the
        budget it implies) cannot be added, changed or dropped on resume."""
        if self.mode == "none":
            return
        target = self._planned_target()
        before = state.get("target_epsilon") or 0.0
        if before != target:
            planned = f"dp-target-epsilon={before:g}" if before else "dp-noise-multiplier"
            raise ConfigError(
                f"dp-target-epsilon={target:g}, but this run was planned with {planned}; "
                "resume with the run's own setting: ε already spent cannot be re-planned"
            )
        if target:
            self._sigma = float(state["noise_multiplier"])

    def _planned_target(self) -> float:
        """The target σ was calibrated for (0: σ is dp-noise-multiplier)."""
        return self.config.dp_target_epsilon if self.mode != "none" else 0.0

    def resume(
        self, state: dict[str, Any] | None, rounds_done: int, previous_mode: str | None
    ) -> None:
        """Continue the checkpoint's ledger; never lose a guarantee silently.

        A checkpoint without ledger state (written before ledgers travelled in every
        checkpoint) may hide rounds released without noise: all its rounds count as such.
        """
        if state is None:
            log(WARNING, "fedge: the checkpoint has no ε ledger; its rounds count as without DP")
            for server_round in range(1, rounds_done + 1):
                self.account_without_dp(server_round)
        else:
            self.restore(state)
        if self.mode == "none" and self.had_dp() and not self.config.resume_without_dp:
            raise ConfigError(
                f"this run spent ε={self.epsilon():.4g} (δ={self.ledger.delta:g}) under "
                f"dp-mode='{previous_mode}'; resuming it with dp-mode='none' would release "
                "updates without noise and void that guarantee. Resume with its DP settings, "
                "or set resume-without-dp=true to continue anyway: every report then says "
                "that no (ε, δ) holds for this run"
            )
        if self.mode == "none" and self.had_dp():
            log(
                WARNING,
                "fedge: resume-without-dp=true: rounds after %s run without DP; "
                "no (ε, δ) holds for this run from now on",
                rounds_done,
            )
        elif self.mode != "none" and self.rounds_without_dp():
            log(WARNING, "fedge: privacy guarantee %s", self.guarantee())

    def report(self, stop_reason: str | None = None) -> dict[str, Any]:
        """privacy.json: the guarantee, how it was spent per round, why the run stopped.

        Written after every round with `stop_reason` None (still running, so a killed
        ServerApp leaves the ledger of its last round) and once more when the run stops.
        A refused round's budget reason wins over the caller's. ε is None (JSON null),
        never a number, once any round ran without DP; `guarantee` says why.
        """
        epsilon = self.epsilon()
        return {
            "guarantee": self.guarantee(),
            "rounds_without_dp": self.rounds_without_dp(),
            "mode": self.mode,
            "noise_multiplier": self._sigma,
            "target_epsilon": self._planned_target() or None,
            "planned_rounds": self.config.num_server_rounds,
            "clipping_norm": self.config.dp_clipping_norm,
            "adaptive_clipping": self.config.dp_adaptive_clipping,
            "final_clipping_norm": self.clip_norm,
            "delta": self.ledger.delta,
            "max_epsilon": self.config.dp_budget or None,
            "min_clients": self.min_clients if self.mode == "distributed" else None,
            "accountant": "opacus RDP",
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "rounds": [
                {
                    "round": r.server_round,
                    "noise_multiplier": r.noise_multiplier,
                    "sample_rate": r.sample_rate,
                    "epsilon": r.epsilon if math.isfinite(r.epsilon) else None,
                }
                for r in self.ledger.history
            ],
            "stop_reason": self.stop_reason or stop_reason,
        }
