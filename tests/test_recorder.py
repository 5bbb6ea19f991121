"""The privacy report a run leaves behind however it ends.

privacy.json must be current after every round (a ServerApp killed with SIGKILL
writes nothing more) and, when the run stops by itself, say why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from fedge.config import FedgeConfig
from fedge.models import build_model, state_to_numpy
from fedge.records import to_array_record
from fedge.server_app.app import main as server_main
from fedge.server_app.app import write_privacy_report
from fedge.server_app.privacy import BudgetExhausted, ServerPrivacy
from fedge.server_app.recorder import RoundRecorder
from fedge.server_app.run_folder import PRIVACY_REPORT, RunFolder
from fedge.server_app.strategy import FedgeAvg
from fedge.simulation import NodeGrid
from fedge.task import dataset_for, model_spec_for

CENTRAL: dict[str, Any] = {"dp-mode": "central", "dp-noise-multiplier": 1.0, "seed": 5}


def read_report(folder: Path) -> dict[str, Any]:
    return json.loads((folder / PRIVACY_REPORT).read_text(encoding="utf-8"))


def recorded_rounds(tmp_path: Path, rounds: int, **extra: Any) -> tuple[RunFolder, FedgeAvg]:
    """`rounds` DP rounds (3 of 3 nodes) through the recorder, as Flower's loop calls it."""
    config = FedgeConfig.from_run_config({**CENTRAL, **extra})
    bundle = dataset_for(config)
    spec = model_spec_for(config, bundle)
    privacy = ServerPrivacy(config)
    strategy = FedgeAvg(privacy=privacy)
    folder = RunFolder(tmp_path)
    recorder = RoundRecorder(
        folder, strategy, spec, bundle, rounds, config.to_run_config(), privacy=privacy
    )
    record = to_array_record(state_to_numpy(build_model(spec)))
    recorder(0, record)
    assert strategy.privacy is not None
    for server_round in range(1, rounds + 1):
        strategy.privacy.start_round(server_round, 3, 3)
        strategy.privacy.finish_round(server_round, 3, 3, 0)
        recorder(server_round, record)
        report = read_report(tmp_path)
        assert [r["round"] for r in report["rounds"]] == list(range(1, server_round + 1))
        assert report["epsilon"] == pytest.approx(strategy.privacy.epsilon())
        assert report["stop_reason"] is None  # still running
    return folder, strategy


def test_privacy_report_is_current_after_every_round_and_says_why_the_run_stopped(
    tmp_path: Path,
) -> None:
    folder, strategy = recorded_rounds(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.npz",
        "metrics.jsonl",
        PRIVACY_REPORT,
    ]  # no temp file left behind
    assert strategy.privacy is not None
    write_privacy_report(folder, strategy.privacy, "completed all rounds")
    report = read_report(tmp_path)
    assert report["stop_reason"] == "completed all rounds"
    assert [r["round"] for r in report["rounds"]] == [1, 2]


def test_a_budget_stop_keeps_its_reason_in_the_final_report(tmp_path: Path) -> None:
    folder, strategy = recorded_rounds(tmp_path, 1, **{"dp-max-epsilon": 5.0})
    assert strategy.privacy is not None
    with pytest.raises(BudgetExhausted):  # σ = 1 at q = 1: round 2 would pass ε = 5
        strategy.privacy.start_round(2, 3, 3)
    write_privacy_report(folder, strategy.privacy, "completed all rounds")
    report = read_report(tmp_path)
    assert "round 2" in report["stop_reason"] and "dp-max-epsilon=5" in report["stop_reason"]
    assert [r["round"] for r in report["rounds"]] == [1]


def test_runs_without_dp_write_no_privacy_report(tmp_path: Path) -> None:
    config = FedgeConfig.from_run_config({"seed": 5})
    bundle = dataset_for(config)
    spec = model_spec_for(config, bundle)
    privacy = ServerPrivacy(config)
    folder = RunFolder(tmp_path)
    recorder = RoundRecorder(
        folder, FedgeAvg(), spec, bundle, 1, config.to_run_config(), privacy=privacy
    )
    recorder(1, to_array_record(state_to_numpy(build_model(spec))))
    write_privacy_report(folder, privacy, "completed all rounds")
    assert (tmp_path / "checkpoint.npz").is_file()
    assert not (tmp_path / PRIVACY_REPORT).exists()


class LostLink(NodeGrid):
    """A SuperLink that went away: asking who is online fails."""

    def get_node_ids(self) -> list[int]:
        raise ConnectionError("SuperLink unreachable")


def test_a_failing_serverapp_says_why_in_its_privacy_report(tmp_path: Path) -> None:
    run_config = FedgeConfig.from_run_config(
        {**CENTRAL, "output-dir": str(tmp_path), "run-name": "failed"}
    ).to_run_config()
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with pytest.raises(ConnectionError):
        server_main(LostLink([]), context)
    report = read_report(tmp_path / "failed")
    assert report["rounds"] == []
    assert report["stop_reason"] == (
        "the ServerApp failed: ConnectionError('SuperLink unreachable')"
    )
