"""Per-round metrics to TensorBoard or MLflow (`tracking`), beside metrics.jsonl.

metrics.jsonl stays the run's record: the recorder writes it (and the privacy
report and checkpoint) before a row reaches a tracker, and a tracker that fails
(disk full, a corrupt MLflow store, an unreachable server) is logged once and
switched off, so it can neither lose a row nor stop a run mid-round. A tracker
gets exactly the fields of each metrics.jsonl row (no client ids or updates)
plus the run config. Nothing leaves the machine unless the user says so: MLflow
writes to `<run>/mlruns/` unless `MLFLOW_TRACKING_URI` names a server, and its
usage telemetry is off unless the user turned it on.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Protocol, TypeVar

from flwr.common.logger import log

from fedge.config import ConfigError
from fedge.server_app.run_folder import RunFolder

INSTALL = 'pip install "fedge[tracking]"'
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
"""The package each tracker imports (mlflow-skinny installs `mlflow`)."""

T = TypeVar("T")

MLFLOW_DIR = "mlruns"
MLFLOW_EXPERIMENT = "fedge"


def require_tracker(kind: str) -> None:
    """Refuse, before any round, a tracker whose package is missing (no import: milliseconds)."""
    if kind and importlib.util.find_spec(PACKAGES[kind]) is None:
        raise ConfigError(f"tracking={kind!r} needs the {PACKAGES[kind]} package: {INSTALL}")


def split_row(row: dict[str, Any]) -> tuple[int, dict[str, float], dict[str, str]]:
    """A metrics.jsonl row as (round, numbers, texts).

    Booleans become 0/1; `epsilon` null (the guarantee is void) becomes +inf, as
    the log line prints it; another null (no train loss in a round without
    replies) is left out, as TensorBoard and MLflow have no null.
    """
    scalars: dict[str, float] = {}
    texts: dict[str, str] = {}
    for key, value in row.items():
        if key == "round":
            continue
        if isinstance(value, str):
            texts[key] = value
        elif value is None:
            if key == "epsilon":
                scalars[key] = math.inf
        else:
            scalars[key] = float(value)
    return row["round"], scalars, texts


class Sink(Protocol):
    """Where a tracker writes; `Tracking` guards every call."""

    def log_round(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None: ...

    def close(self, failed: bool) -> None: ...


class TensorBoardSink:
    """Event files in the run folder (`tensorboard --logdir <output-dir>` shows every run).

    A resumed run purges what the earlier files hold (TensorBoard drops their steps
    from `purge_step` on) and logs the run's history again, so each round appears once.
    """

    def __init__(self, folder: Path, run_config: dict[str, Any], resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), purge_step=0 if resumed else None)
        self.writer.add_text("run_config", json.dumps(run_config, indent=1), 0)
        self.writer.flush()

    def log_round(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        for key, value in texts.items():
            self.writer.add_text(key, value, step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class MlflowSink:
    """One MLflow run per ServerApp start in experiment `fedge`, named after the run folder.

    The default store is MLflow's SQLite backend in `<run>/mlruns/` (its file
    backend is deprecated); `mlflow ui --backend-store-uri sqlite:///<run>/mlruns/mlflow.db`
    shows it. A resumed run opens a new MLflow run that holds the whole history again.
    """

    def __init__(self, folder: Path, run_config: dict[str, Any], resumed: bool) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        store = folder / MLFLOW_DIR
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None  # a server's own default
        if not uri:
            store.mkdir(exist_ok=True)
            uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=artifacts)
        )
        tags = {"fedge.run_folder": folder.name, "fedge.resumed": str(resumed).lower()}
        run = self.client.create_run(experiment_id, run_name=folder.name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(key, str(value)) for key, value in run_config.items()]
        self.client.log_batch(self.run_id, params=params)
        log(INFO, "fedge: tracking with MLflow at %s (run %s)", uri, self.run_id)

    def log_round(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in scalars.items()]
        tags = [RunTag(f"{key}.round-{step}", value) for key, value in texts.items()]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


SINKS: dict[str, Callable[[Path, dict[str, Any], bool], Sink]] = {
    "tensorboard": TensorBoardSink,
    "mlflow": MlflowSink,
}


class Tracking:
    """The run's tracker (or none) behind one guard: its first failure is logged once
    and ends tracking for the run; metrics.jsonl, written before, is untouched."""

    def __init__(self, kind: str, sink: Sink | None) -> None:
        self.kind = kind
        self.sink = sink

    @classmethod
    def open(cls, kind: str, folder: RunFolder, run_config: dict[str, Any]) -> Tracking:
        """Start the tracker and give it the rows a resumed run already holds.

        A missing package is a config error; a tracker that fails to start is not.
        """
        if not kind:
            return cls(kind, None)
        require_tracker(kind)
        history = folder.read_metrics()
        tracking = cls(kind, None)
        tracking.sink = tracking.guard(lambda: SINKS[kind](folder.path, run_config, bool(history)))
        for row in history:
            tracking.log_row(row)
        return tracking

    def log_row(self, row: dict[str, Any]) -> None:
        if self.sink is not None:
            sink = self.sink
            self.guard(lambda: sink.log_round(*split_row(row)))

    def close(self, failed: bool = False) -> None:
        if self.sink is not None:
            sink = self.sink
            self.guard(lambda: sink.close(failed))
            self.sink = None

    def guard(self, action: Callable[[], T]) -> T | None:
        """`action()`, or None once it fails."""
        try:
            return action()
        except Exception as error:  # any tracker failure: the run and metrics.jsonl go on
            self.sink = None
            log(
                WARNING,
                "fedge: tracking=%r failed and is off for the rest of this run (%s: %s); "
                "metrics.jsonl still has every round",
                self.kind,
                type(error).__name__,
                first_line(error),
            )
            return None


def first_line(error: Exception) -> str:
    """An error's first line: a store's error can carry its whole SQL statement."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
