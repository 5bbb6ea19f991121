"""Empirical epsilon lower bounds (one-run canary audit) beside the accountant's epsilon.

Steinke, Nasr & Jagielski (2023): m canaries are each included with probability
1/2; from per-canary scores the auditor guesses in/out for `--guesses` of them,
and the number of correct guesses gives a lower bound on ε that holds with
confidence 95% (β = 0.05) whatever the mechanism. A lower bound above the
accountant's ε (an upper bound) would mean the clipping, the noise or the
accounting is broken. Two audits, both of central DP, both with q = 1:

- `core`: `fedge.privacy.audit.run_canary_audit`: each canary is a client whose
  update is 2C along its own coordinate, clipped with `clip_update` and noised
  with `add_central_noise` (the privacy core alone).
- `strategy`: the same canaries through the code a federation runs: every canary
  node gets a real training instruction from `FedgeAvg.configure_train`
  (clip norm in its config), clips its update with the ClientApp's
  `privatize_update`, and replies; `FedgeAvg.aggregate_train` with `ServerPrivacy`
  validates the replies, sums them, adds the noise, divides by the sampled count
  and applies the update. The auditor sees only the new global model (what every
  client receives) and scores canary i by coordinate i of its change, summed over
  rounds. An excluded canary still takes part with a zero update, so the number
  of sampled nodes (public, the mean's denominator) does not depend on inclusion.
  The accountant's ε is the one fedge's own ledger recorded for the run.

A negative control runs the core audit with 10x less noise than the accountant is
told, to show the audit would catch such a bug.

Each setting runs `--trials` times with fresh canary draws and fresh noise; the
number of guesses is fixed in advance (choosing it after seeing the scores would
invalidate the bound).

Usage: `python benchmarks/audit.py [--canaries 5000] [--guesses 500] [--trials 5]
[--out result.json]` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedge.client_app.privatize import privatize_update
from fedge.client_app.protocol import UPDATE_INFO_KEY, WEIGHT_KEY, update_tag
from fedge.config import FedgeConfig
from fedge.privacy.accountant import PrivacyLedger
from fedge.privacy.audit import audit_scores, run_canary_audit
from fedge.privacy.noise import secure_rng
from fedge.records import from_array_record, to_array_record
from fedge.server_app.privacy import ServerPrivacy
from fedge.server_app.strategy import FedgeAvg

DELTA = 1e-5
BETA = 0.05
# (noise multiplier, rounds): accountant ε at δ = 1e-5 is 2.17, 4.73 and 10.73
SETTINGS = ((2.0, 1), (1.0, 1), (1.0, 4))

T = TypeVar("T")


def accountant_epsilon(noise_multiplier: float, rounds: int) -> float:
    ledger = PrivacyLedger(DELTA)
    for _ in range(rounds):
        ledger.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
    return ledger.epsilon()


class StubGrid:
    """Just enough of a Grid for `configure_train` to sample node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


core_audit = partial(run_canary_audit, delta=DELTA, beta=BETA)
"""The privacy core's audit at this benchmark's δ and β (`strategy_audit` uses them itself)."""


def strategy_audit(
    *,
    num_canaries: int,
    noise_multiplier: float,
    clip_norm: float,
    rounds: int,
    num_guesses: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One canary audit through ClientApp clipping and FedgeAvg + ServerPrivacy."""
    config = FedgeConfig.from_run_config(
        {
            "dp-mode": "central",
            "dp-noise-multiplier": noise_multiplier,
            "dp-clipping-norm": clip_norm,
            "dp-delta": DELTA,
        }
    )
    privacy = ServerPrivacy(config)
    strategy = FedgeAvg(privacy=privacy, min_train_nodes=2, min_available_nodes=2)
    nodes = list(range(1, num_canaries + 1))
    grid = StubGrid(nodes)
    included = rng.random(num_canaries) < 0.5
    # a float32 model: the canary coordinates plus a block no canary touches
    arrays = {
        "canary.weight": rng.normal(size=num_canaries).astype(np.float32),
        "other.weight": rng.normal(size=(32, 32)).astype(np.float32),
    }
    zero_other = np.zeros_like(arrays["other.weight"])
    scores = np.zeros(num_canaries)
    for server_round in range(1, rounds + 1):
        instructions = list(
            strategy.configure_train(
                server_round,
                to_array_record(arrays),
                ConfigRecord(),
                grid,  # type: ignore[arg-type]
            )
        )
        replies = []
        for message in instructions:
            node = message.metadata.dst_node_id
            update = {
                "canary.weight": np.zeros(num_canaries, np.float32),
                "other.weight": zero_other,
            }
            if included[node - 1]:
                update["canary.weight"][node - 1] = 2 * clip_norm  # clipping must halve it
            private, metrics = privatize_update(update, message.content.config_records["config"])
            content = RecordDict(
                {
                    "arrays": to_array_record(private),
                    "metrics": MetricRecord({WEIGHT_KEY: 1, "train-loss": 0.0, **metrics}),
                    UPDATE_INFO_KEY: update_tag(message.content.config_records["config"], arrays),
                }
            )
            replies.append(Message(content, reply_to=message))
        record, _ = strategy.aggregate_train(server_round, replies)
        assert record is not None and strategy.report.num_replies == num_canaries
        new = from_array_record(record)
        scores += new["canary.weight"].astype(np.float64) - arrays["canary.weight"]
        arrays = new
    result = audit_scores(scores, included, num_guesses=num_guesses, delta=DELTA, beta=BETA)
    return {
        "epsilon_lower_bound": result.epsilon_lower_bound,
        "num_correct": result.num_correct,
        "ledger_epsilon": privacy.epsilon(),
    }


@dataclass(frozen=True)
class AuditSize:
    """Canaries, guesses and trials: the options the core and strategy audits each get."""

    canaries: int
    guesses: int
    trials: int


def repeat_audit(
    audit: Callable[..., T],
    size: AuditSize,
    clip_norm: float,
    noise_multiplier: float,
    rounds: int,
) -> list[T]:
    """`size.trials` runs of `audit`, each with fresh canaries and noise (its own secure RNG)."""
    return [
        audit(
            num_canaries=size.canaries,
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            rounds=rounds,
            num_guesses=size.guesses,
            rng=secure_rng(),
        )
        for _ in range(size.trials)
    ]


def summarize(
    size: AuditSize,
    noise_multiplier: float,
    rounds: int,
    bounds: list[float],
    accountant: float,
) -> dict[str, Any]:
    """One report entry: the setting, the audit's size, and its bounds beside the accountant."""
    return {
        "noise_multiplier": noise_multiplier,
        "rounds": rounds,
        "canaries": size.canaries,
        "guesses": size.guesses,
        "lower_bounds": [round(b, 4) for b in bounds],
        "lower_bound_median": round(statistics.median(bounds), 4),
        "lower_bound_max": round(max(bounds), 4),
        "accountant_epsilon": round(accountant, 4),
        "max_bound_over_accountant": round(max(bounds) / accountant, 3),
        "bound_below_accountant": max(bounds) <= accountant,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=5000)
    parser.add_argument("--guesses", type=int, default=500)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--strategy-canaries", type=int, default=2000)
    parser.add_argument("--strategy-guesses", type=int, default=200)
    parser.add_argument("--strategy-trials", type=int, default=3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if TaskIdentity._run_id is None:  # Messages need a task identity outside a simulation
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 0, 1
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "audit",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "delta": DELTA,
        "confidence": 1 - BETA,
        "sample_rate": 1.0,
        "clip_norm": args.clip,
        "core": [],
        "strategy": [],
    }
    core_size = AuditSize(args.canaries, args.guesses, args.trials)
    strategy_size = AuditSize(args.strategy_canaries, args.strategy_guesses, args.strategy_trials)
    for sigma, rounds in SETTINGS:
        runs = repeat_audit(core_audit, core_size, args.clip, sigma, rounds)
        bounds = [run.epsilon_lower_bound for run in runs]
        accountant = accountant_epsilon(sigma, rounds)
        report["core"].append(summarize(core_size, sigma, rounds, bounds, accountant))
        print(json.dumps(report["core"][-1]), flush=True)
    for sigma, rounds in SETTINGS[:2]:
        runs = repeat_audit(strategy_audit, strategy_size, args.clip, sigma, rounds)
        ledger = runs[0]["ledger_epsilon"]
        assert all(run["ledger_epsilon"] == ledger for run in runs)
        bounds = [run["epsilon_lower_bound"] for run in runs]
        report["strategy"].append(
            summarize(strategy_size, sigma, rounds, bounds, ledger)
            | {"ledger_matches_accountant": ledger == accountant_epsilon(sigma, rounds)}
        )
        print(json.dumps(report["strategy"][-1]), flush=True)
    # Negative control: the noise is 10x smaller than the σ = 2 the accountant is told,
    # so the audit should find more leakage than the claimed ε (it has the power to).
    claimed = accountant_epsilon(2.0, 1)
    runs = repeat_audit(core_audit, core_size, args.clip, noise_multiplier=0.2, rounds=1)
    control = [run.epsilon_lower_bound for run in runs]
    report["control_noise_10x_too_small"] = {
        "actual_noise_multiplier": 0.2,
        "claimed_noise_multiplier": 2.0,
        "claimed_epsilon": round(claimed, 4),
        "lower_bounds": [round(b, 4) for b in control],
        "detected": min(control) > claimed,
    }
    report["all_bounds_below_accountant"] = all(
        entry["bound_below_accountant"] for entry in report["core"] + report["strategy"]
    )
    report["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
