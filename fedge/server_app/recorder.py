"""Per-round bookkeeping, run as Flower's `evaluate_fn` after every round.

Centralized evaluation on the held-out split's test part (`HeldOut`: the
acceptance check's slice is set aside), then one metrics.jsonl row, the
privacy report (DP runs) and a checkpoint — in that order, so a crash in between
leaves at most a row the checkpoint does not hold, which resume drops before
re-running that round, and a privacy.json that may be a round ahead of the
checkpoint but never behind it: a killed ServerApp never under-reports ε.
The row goes to the run's tracker (`tracking`) last, so a tracker can lose
nothing that the run folder holds.

Every checkpoint carries the run's ε ledger, DP on or off; a round run without
DP is accounted here as a noiseless release (see `ServerPrivacy`).
"""

from __future__ import annotations

import math
import time
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from fedge.config import FedgeConfig
from fedge.data import DatasetBundle
from fedge.models import ModelSpec, build_model, load_numpy_state
from fedge.models.training import evaluate
from fedge.records import NamedArrays, from_array_record
from fedge.server_app.acceptance import HeldOut
from fedge.server_app.privacy import ServerPrivacy
from fedge.server_app.run_folder import PRIVACY_REPORT, Checkpoint, RunFolder, rng_state
from fedge.server_app.strategy import FedgeAvg
from fedge.server_app.tracking import Tracking


class RoundRecorder:
    def __init__(
        self,
        folder: RunFolder,
        strategy: FedgeAvg,
        spec: ModelSpec,
        bundle: DatasetBundle,
        total_rounds: int,
        run_config: dict[str, Any],
        *,
        privacy: ServerPrivacy,
    ) -> None:
        self.folder = folder
        self.strategy = strategy
        self.privacy = privacy
        self.bundle = bundle
        config = FedgeConfig.from_run_config(run_config)
        self.held_out = HeldOut.of(bundle, config.seed)
        self.total_rounds = total_rounds
        self.run_config = run_config
        self.model = build_model(spec)
        self.last_arrays: NamedArrays = {}
        self._last_time = time.perf_counter()
        self.tracking = Tracking.open(config.tracking, folder, run_config)

    def test_metrics(self, arrays: NamedArrays) -> tuple[float, float]:
        load_numpy_state(self.model, arrays)
        return evaluate(self.model, self.held_out.x_test, self.held_out.y_test)

    def __call__(self, server_round: int, record: ArrayRecord) -> MetricRecord:
        arrays = from_array_record(record)
        self.last_arrays = arrays
        loss, accuracy = self.test_metrics(arrays)
        absolute = self.strategy.absolute_round(server_round)
        if server_round == 0:
            log(INFO, "fedge: round %s model, held-out accuracy %.4f", absolute, accuracy)
            self._last_time = time.perf_counter()
            return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})
        now = time.perf_counter()
        report = self.strategy.report
        row: dict[str, Any] = {
            "round": absolute,
            "test_accuracy": accuracy,
            "test_loss": loss,
            "train_loss": report.train_loss,
            "num_replies": report.num_replies,
            "num_rejected": report.num_rejected,
            "aggregated": report.aggregated,
            "seconds": round(now - self._last_time, 4),
        }
        if report.skip_reason is not None:
            row["skip_reason"] = report.skip_reason
        if report.accept_loss is not None:
            row["accept_loss"] = report.accept_loss
        privacy = self.privacy
        if privacy.mode == "none":
            privacy.account_without_dp(absolute)
        if privacy.reports_epsilon():
            epsilon = privacy.epsilon()
            row["epsilon"] = epsilon if math.isfinite(epsilon) else None
            row["dp_guarantee"] = not privacy.rounds_without_dp()
        if report.client_epsilons:
            row["client_epsilon_max"] = max(report.client_epsilons)
            row["client_epsilon_mean"] = sum(report.client_epsilons) / len(report.client_epsilons)
            row["num_declined"] = report.num_declined
        row.update({key.replace("-", "_"): value for key, value in report.val_metrics.items()})
        self._last_time = now
        self.folder.append_metrics(row)
        if privacy.reports_epsilon():
            self.folder.write_json(PRIVACY_REPORT, privacy.report())
        self.folder.save_checkpoint(
            Checkpoint(absolute, arrays, self.strategy_arrays(), self.checkpoint_state())
        )
        self.tracking.log_row(row)
        log(
            INFO,
            "fedge: round %s/%s  test_accuracy=%.4f  test_loss=%.4f  train_loss=%s  "
            "replies=%s  rejected=%s%s  (%.1f s)",
            absolute,
            self.total_rounds,
            accuracy,
            loss,
            "n/a" if report.train_loss is None else f"{report.train_loss:.4f}",
            report.num_replies,
            report.num_rejected,
            epsilon_note(row),
            row["seconds"],
        )
        return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})

    def close(self, failed: bool = False) -> None:
        """End the tracker's run (MLflow marks it finished or failed)."""
        self.tracking.close(failed)

    def strategy_arrays(self) -> dict[str, NamedArrays]:
        return {"velocity": self.strategy.velocity} if self.strategy.velocity else {}

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "rng": rng_state(),
            "run_config": self.run_config,
            "data": self.bundle.source_digest,
            "privacy": self.privacy.state(),
        }


def epsilon_note(row: dict[str, Any]) -> str:
    """The log line's ε: a number while the guarantee holds, never one after it is void."""
    if "epsilon" not in row:
        return ""
    if row["epsilon"] is None:
        return "  ε=∞ (no DP guarantee: a round ran without DP)"
    return f"  ε={row['epsilon']:.3f}"
