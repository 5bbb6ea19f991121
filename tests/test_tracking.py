"""Tracking (`tracking` = tensorboard | mlflow) and metrics.png's plot data.

The adversaries here are a broken tracker (disk full, a corrupt store) and a
missing package: neither may lose a metrics.jsonl row or stop a run mid-round,
and a missing package stops the run before round 1 with the install line.
Each tracker is read back with its own library's reader and compared with
metrics.jsonl, row by row.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from test_simulation import (  # the LocalGrid harness: fedge's apps without Ray
    LocalGrid,
    read_rows,
    run_local,
    serverapp_identity,  # noqa: F401 (a fixture)
)

from fedge.config import ConfigError, FedgeConfig
from fedge.server_app.app import main as server_main
from fedge.server_app.plotting import metrics_figure
from fedge.server_app.run_folder import RunFolder
from fedge.server_app.tracking import Tracking, split_row

SMALL = {"dataset": "breast-cancer"}  # an MLP on 30 features: a round takes a fraction of a second
DP = {**SMALL, "dp-mode": "central", "dp-noise-multiplier": 1.0}


# --- what a tracker is given -----------------------------------------------------------


def test_a_row_is_split_into_numbers_and_texts_with_a_void_epsilon_as_infinity() -> None:
    row = {
        "round": 4,
        "test_accuracy": 0.5,
        "num_replies": 3,
        "aggregated": True,
        "dp_guarantee": False,
        "epsilon": None,
        "train_loss": None,
        "skip_reason": "too few replies",
    }
    step, scalars, texts = split_row(row)
    assert step == 4
    assert scalars == {
        "test_accuracy": 0.5,
        "num_replies": 3.0,
        "aggregated": 1.0,
        "dp_guarantee": 0.0,
        "epsilon": math.inf,
    }
    assert texts == {"skip_reason": "too few replies"}


def test_the_tracking_key_accepts_only_the_two_trackers() -> None:
    assert FedgeConfig().tracking == ""
    assert FedgeConfig.from_run_config({"tracking": "mlflow"}).tracking == "mlflow"
    with pytest.raises(ConfigError, match="tracking must be one of"):
        FedgeConfig.from_run_config({"tracking": "wandb"})


@pytest.mark.parametrize(("kind", "module"), [("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_missing_tracker_package_stops_the_run_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    config = FedgeConfig.from_run_config(
        {"tracking": kind, "output-dir": str(tmp_path), "run-name": "r"}
    ).to_run_config()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    with pytest.raises(ConfigError) as raised:
        server_main(LocalGrid(config, 2), context)
    message = str(raised.value)
    assert message == f'tracking={kind!r} needs the {module} package: pip install "fedge[tracking]"'
    assert not list(tmp_path.iterdir())  # no run folder, no round


# --- a short run with each tracker, read back ------------------------------------------


def tensorboard_values(folder: Path) -> tuple[dict[str, dict[int, float]], dict[str, dict]]:
    """{tag: {step: value}} of the scalars and {tag: {step: text}} of the texts, as read by
    TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {
        tag: {event.step: event.value for event in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
    }
    texts = {
        tag.removesuffix("/text_summary"): {
            event.step: make_ndarray(event.tensor_proto).item().decode()
            for event in events.Tensors(tag)
        }
        for tag in events.Tags()["tensors"]
    }
    return scalars, texts


def mlflow_values(folder: Path) -> tuple[dict[str, dict[int, float]], Any]:
    """{metric: {step: value}} of the folder's one MLflow run, and that run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedge")
    (run,) = client.search_runs([experiment.experiment_id])
    metrics = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in run.data.metrics
    }
    return metrics, run


def expected_scalars(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """What a tracker must hold: every numeric metrics.jsonl field at step = round."""
    expected: dict[str, dict[int, float]] = {}
    for row in rows:
        step, scalars, _ = split_row(row)
        for key, value in scalars.items():
            expected.setdefault(key, {})[step] = value
    return expected


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_each_tracker_holds_every_metrics_field_and_epsilon_of_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    folder = run_local(tmp_path, kind, rounds=2, tracking=kind, **DP)
    rows = read_rows(folder)
    assert [row["round"] for row in rows] == [1, 2]
    expected = expected_scalars(rows)
    assert {"epsilon", "test_accuracy", "test_loss", "train_loss", "num_replies"} <= set(expected)
    assert all(math.isfinite(value) and value > 0 for value in expected["epsilon"].values())

    if kind == "tensorboard":
        logged, texts = tensorboard_values(folder)
        assert set(texts) == {"run_config"}  # no other text: this run skipped no round
        assert '"tracking": "tensorboard"' in texts["run_config"][0]
    else:
        logged, run = mlflow_values(folder)
        assert run.info.status == "FINISHED"
        assert run.info.run_name == kind
        assert run.data.params["dp-mode"] == "central"
        assert run.data.params["num-server-rounds"] == "2"
        assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # no usage pings from a run
    assert set(logged) == set(expected)  # every field, and nothing metrics.jsonl does not have
    for key, values in expected.items():
        assert logged[key].keys() == values.keys(), key
        for step, value in values.items():
            assert logged[key][step] == pytest.approx(value, rel=1e-6), (key, step)


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_a_resumed_run_is_tracked_once_per_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_local(tmp_path, kind, rounds=2, crash_on_train_call=2, tracking=kind, **SMALL)
    folder = run_local(tmp_path, kind, rounds=2, resume=True, tracking=kind, **SMALL)
    rows = read_rows(folder)
    assert [row["round"] for row in rows] == [1, 2]
    if kind == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        steps = [event.step for event in events.Scalars("test_accuracy")]
        values = [event.value for event in events.Scalars("test_accuracy")]
    else:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("fedge")
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
        assert [run.info.status for run in runs] == ["FAILED", "FINISHED"]
        assert [run.data.tags["fedge.resumed"] for run in runs] == ["false", "true"]
        history = client.get_metric_history(runs[1].info.run_id, "test_accuracy")
        steps = [metric.step for metric in history]
        values = [metric.value for metric in history]
    assert steps == [1, 2]  # round 1 again from metrics.jsonl, round 2 from the resumed run
    assert values == pytest.approx([row["test_accuracy"] for row in rows], rel=1e-6)


def test_mlflow_tracking_uri_sends_the_run_where_the_user_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    elsewhere = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    tracking = Tracking.open("mlflow", RunFolder(run_folder), {"seed": 1})
    tracking.log_row({"round": 1, "test_accuracy": 0.25})
    tracking.close()
    assert tracking.sink is None and not (run_folder / "mlruns").exists()
    client = MlflowClient(tracking_uri=elsewhere)
    (run,) = client.search_runs([client.get_experiment_by_name("fedge").experiment_id])
    assert run.data.metrics == {"test_accuracy": 0.25} and run.data.params == {"seed": "1"}


class DiskFull:
    """A sink whose disk filled up after `ok` rounds."""

    def __init__(self, ok: int) -> None:
        self.ok = ok
        self.steps: list[int] = []
        self.closed = False

    def log_round(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        if len(self.steps) >= self.ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.steps.append(step)

    def close(self, failed: bool) -> None:
        self.closed = True


def test_a_failing_tracker_is_reported_once_and_then_left_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = DiskFull(ok=1)
    tracking = Tracking("tensorboard", sink)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        for step in (1, 2, 3, 4):
            tracking.log_row({"round": step, "test_accuracy": 0.5})
        tracking.close()
    warnings = [r.getMessage() for r in caplog.records if "tracking=" in r.getMessage()]
    assert len(warnings) == 1
    assert "OSError" in warnings[0] and "No space left on device" in warnings[0]
    assert sink.steps == [1]
    assert not sink.closed  # a broken sink is not called again, not even to close


class CorruptsTheMlflowStore(LocalGrid):
    """Delivers messages, but overwrites the run's MLflow database before round `at`'s training."""

    def __init__(self, run_config: dict[str, Any], num_nodes: int, at: int, store: Path) -> None:
        super().__init__(run_config, num_nodes)
        self.at, self.store, self.train_calls = at, store, 0

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.train_calls += 1
            if self.train_calls == self.at:
                with open(self.store, "r+b") as handle:
                    handle.write(b"not a database" * 64)
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.usefixtures("serverapp_identity")
def test_a_corrupt_mlflow_store_mid_run_loses_no_round_and_stops_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = FedgeConfig.from_run_config(
        {
            **SMALL,
            "num-server-rounds": 2,
            "local-epochs": 1,
            "tracking": "mlflow",
            "output-dir": str(tmp_path),
            "run-name": "broken",
        }
    ).to_run_config()
    folder = tmp_path / "broken"
    grid = CorruptsTheMlflowStore(config, 2, at=2, store=folder / "mlruns" / "mlflow.db")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        server_main(grid, context)
    assert grid.train_calls == 2
    assert [row["round"] for row in read_rows(folder)] == [1, 2]
    assert (folder / "final_model.pt").is_file() and (folder / "metrics.png").is_file()
    warnings = [
        r.getMessage() for r in caplog.records if "tracking='mlflow' failed" in r.getMessage()
    ]
    assert len(warnings) == 1 and "\n" not in warnings[0]


# --- metrics.png's data ------------------------------------------------------------------


def rows_for(rounds: range, epsilon: bool = True) -> list[dict[str, Any]]:
    rows = []
    for r in rounds:
        row: dict[str, Any] = {"round": r, "test_accuracy": 0.1 * (r % 10), "test_loss": 1.0}
        row["train_loss"] = None if r == rounds[0] else 1.5
        if epsilon:
            row["epsilon"] = 0.7 * r
        rows.append(row)
    return rows


def visible_ticks(axis: Any) -> list[float]:
    low, high = axis.get_xlim()
    return [t for t in axis.xaxis.get_ticklocs() if low <= t <= high]


@pytest.mark.parametrize(
    "rounds", [range(1, 2), range(1, 3), range(1, 4), range(1, 21), range(4, 7)]
)
def test_every_panel_counts_whole_rounds(rounds: range) -> None:
    figure = metrics_figure(rows_for(rounds))
    assert len(figure.axes) == 3
    for axis in figure.axes:
        ticks = visible_ticks(axis)
        assert ticks, axis.get_title()
        assert all(float(t).is_integer() for t in ticks), (axis.get_title(), ticks)
        if len(rounds) <= 3:  # a short run labels each of its rounds
            assert ticks == list(rounds), (axis.get_title(), ticks)


def test_epsilon_has_its_own_panel_from_round_one() -> None:
    rows = rows_for(range(1, 2))  # the README's one-round DP run: one point, still drawn
    (eps_axis,) = [a for a in metrics_figure(rows).axes if a.get_title().startswith("Privacy")]
    (line,) = eps_axis.get_lines()
    assert list(line.get_xdata()) == [1]
    assert list(line.get_ydata()) == [pytest.approx(0.7)]
    assert line.get_marker() == "o"  # a lone point without a marker draws nothing


def test_a_void_epsilon_is_a_gap_named_in_the_title_and_no_dp_means_no_panel() -> None:
    rows = rows_for(range(1, 4))
    rows[2]["epsilon"] = None
    (eps_axis,) = [a for a in metrics_figure(rows).axes if a.get_title().startswith("Privacy")]
    ydata = eps_axis.get_lines()[0].get_ydata()
    assert np.isnan(ydata[2]) and ydata[1] == pytest.approx(1.4)
    assert "ε = ∞" in eps_axis.get_title()
    assert len(metrics_figure(rows_for(range(1, 4), epsilon=False)).axes) == 2
