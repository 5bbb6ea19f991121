"""Budgets that fail closed, and run folders that hold: issue 12, items 5 and 7.

Each test reproduces a finding of the issue (it failed before this change):
- a DP run resumed once with DP off lost the server's ε ledger,
- deleting a node's local-DP ledger reset its ε to 0, and the server could start a
  fresh node ledger on the same rows by nudging val-fraction (or any split setting),
- adaptive clipping crashed the server with its defaults on 10 nodes, and on one
  client reporting dp-unclipped = -3,
- two runs with one run-name interleaved, a torn metrics line blocked resume, and a
  resume with another seed or dataset only warned.

Federations run fedge's ServerApp main and ClientApp in this thread (LocalGrid, no
Ray); the kill/resume test runs the ServerApp in its own process and SIGKILLs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from grids import instruction, node_contexts
from test_simulation import LocalGrid

from fedge.cli import main as fedge_cli
from fedge.client_app import app as client_app
from fedge.client_app.local_ledger import NodeLedger, NodeLedgerError
from fedge.client_app.protocol import (
    REPLY_KEY,
    UNCLIPPED_KEY,
    UPDATE_INFO_KEY,
    WEIGHT_KEY,
    update_tag,
)
from fedge.config import ConfigError, FedgeConfig
from fedge.data.loading import load_digits_pool
from fedge.models import build_model, state_to_numpy
from fedge.records import NamedArrays, to_array_record
from fedge.server_app.app import check_same_data
from fedge.server_app.app import main as server_main
from fedge.server_app.privacy import ServerPrivacy
from fedge.server_app.run_folder import CHECKPOINT, METRICS, PRIVACY_REPORT, Checkpoint, RunFolder
from fedge.server_app.strategy import FedgeAvg
from fedge.simulation import NodeGrid
from fedge.task import dataset_for, model_spec_for

REPO = Path(__file__).resolve().parents[1]
NODES = 3
BASE: dict[str, Any] = {  # small and fast: 569 rows, an MLP, no federated evaluation
    "dataset": "breast-cancer",
    "partitioner": "iid",
    "seed": 7,
    "local-epochs": 1,
    "fraction-evaluate": 0.0,
}
CENTRAL: dict[str, Any] = {**BASE, "dp-mode": "central", "dp-noise-multiplier": 1.0}


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages carry the ServerApp task's identity (Flower sets it at runtime)."""
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def full_config(root: Path, name: str, **run_config: Any) -> dict[str, Any]:
    return FedgeConfig.from_run_config(
        {**run_config, "output-dir": str(root), "run-name": name}
    ).to_run_config()


def run_server(root: Path, name: str, **run_config: Any) -> Path:
    """fedge's ServerApp main for one run, its nodes fedge's ClientApp in this thread."""
    config = full_config(root, name, **run_config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    server_main(LocalGrid(config, NODES), context)
    return root / name


def rows_of(run_dir: Path) -> list[dict[str, Any]]:
    return RunFolder(run_dir).read_metrics()


def report_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / PRIVACY_REPORT).read_text(encoding="utf-8"))


def checkpoint_ledger(run_dir: Path) -> list[dict[str, Any]]:
    return RunFolder(run_dir).load_checkpoint().state["privacy"]["ledger"]["rounds"]


# --- the server's ε ledger ---------------------------------------------------------------


@pytest.mark.usefixtures("serverapp_identity")
def test_a_dp_run_resumed_with_dp_off_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    run_dir = run_server(tmp_path, "dp", **{**CENTRAL, "num-server-rounds": 2})
    before = {name: (run_dir / name).read_bytes() for name in (CHECKPOINT, METRICS, PRIVACY_REPORT)}
    with pytest.raises(ConfigError, match="resume-without-dp=true") as refusal:
        run_server(tmp_path, "dp", **{**BASE, "num-server-rounds": 3, "resume": True})
    assert f"spent ε={report_of(run_dir)['epsilon']:.4g}" in str(refusal.value)
    after = {name: (run_dir / name).read_bytes() for name in before}
    assert after == before


@pytest.mark.usefixtures("serverapp_identity")
def test_rounds_without_dp_void_the_guarantee_and_epsilon_never_shrinks(tmp_path: Path) -> None:
    """The finding: DP 2 rounds, resumed with DP off, then with DP on again, reported a
    fresh ledger's ε (10.9) against the 19.3 spent. Now every report says no ε holds."""
    run_dir = run_server(tmp_path, "mixed", **{**CENTRAL, "num-server-rounds": 2})
    spent = report_of(run_dir)["rounds"]
    run_server(
        tmp_path,
        "mixed",
        **{**BASE, "num-server-rounds": 3, "resume": True},
        **{"resume-without-dp": True},
    )
    rows, report = rows_of(run_dir), report_of(run_dir)
    assert [row["epsilon"] for row in rows[:2]] == [r["epsilon"] for r in spent]
    assert rows[2]["epsilon"] is None and rows[2]["dp_guarantee"] is False
    assert rows[0]["dp_guarantee"] is True
    assert report["epsilon"] is None and report["rounds_without_dp"] == [3]
    assert report["guarantee"].startswith("void: round(s) 3 ran without DP")
    assert report["rounds"][:2] == spent

    run_server(tmp_path, "mixed", **{**CENTRAL, "num-server-rounds": 4, "resume": True})
    rows, report = rows_of(run_dir), report_of(run_dir)
    assert [r["server_round"] for r in checkpoint_ledger(run_dir)] == [1, 2, 3, 4]
    assert [r["noise_multiplier"] for r in checkpoint_ledger(run_dir)] == [1.0, 1.0, 0.0, 1.0]
    assert rows[3]["epsilon"] is None and report["epsilon"] is None
    assert report["rounds_without_dp"] == [3] and report["stop_reason"] == "completed all rounds"


@pytest.mark.usefixtures("serverapp_identity")
def test_a_run_that_started_without_dp_never_reports_a_finite_epsilon(tmp_path: Path) -> None:
    run_dir = run_server(tmp_path, "late", **{**BASE, "num-server-rounds": 1})
    assert not (run_dir / PRIVACY_REPORT).exists()
    assert checkpoint_ledger(run_dir)[0]["noise_multiplier"] == 0.0  # the ledger travels
    run_server(tmp_path, "late", **{**CENTRAL, "num-server-rounds": 2, "resume": True})
    report = report_of(run_dir)
    assert report["epsilon"] is None and report["rounds_without_dp"] == [1]
    assert rows_of(run_dir)[1]["epsilon"] is None


def test_a_budget_refuses_every_round_once_the_guarantee_is_void(tmp_path: Path) -> None:
    privacy = ServerPrivacy(FedgeConfig.from_run_config({**CENTRAL, "dp-max-epsilon": 50.0}))
    privacy.resume(None, 2, "none")  # a checkpoint without a ledger: its rounds had no DP
    assert privacy.rounds_without_dp() == [1, 2]
    with pytest.raises(Exception, match="dp-max-epsilon=50"):
        privacy.start_round(3, 3, 3)


def test_resume_refuses_another_dp_delta() -> None:
    first = ServerPrivacy(FedgeConfig.from_run_config(CENTRAL))
    first.start_round(1, 3, 3)
    first.finish_round(1, 3, 3, 0)
    state = json.loads(json.dumps(first.state()))
    looser = ServerPrivacy(FedgeConfig.from_run_config({**CENTRAL, "dp-delta": 1e-3}))
    with pytest.raises(ConfigError, match="resume with dp-delta=1e-05"):
        looser.resume(state, 1, "central")


# --- adaptive clipping -------------------------------------------------------------------


def zero_reply(node_id: int, arrays: NamedArrays, unclipped: int) -> Message:
    update = {name: np.zeros_like(value) for name, value in arrays.items()}
    metrics = MetricRecord({WEIGHT_KEY: 10, "train-loss": 1.0, UNCLIPPED_KEY: unclipped})
    tag = update_tag({"server-round": 1}, arrays)  # an update of round 1's `arrays`
    content = RecordDict(
        {"arrays": to_array_record(update), "metrics": metrics, UPDATE_INFO_KEY: tag}
    )
    return Message(content, reply_to=instruction(node_id))


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize(
    ("count_stddev", "honest", "odd_one", "used_stddev"),
    [
        # the defaults on 10 nodes: `need 0 < noise_multiplier < 2 * count_stddev` (10/20 at σ=1)
        (0.0, 1, 1, 1.0),
        # nine clipped clients and one reporting -3: `unclipped_count must be in [0, 10]`
        (2.0, 0, -3, 2.0),
    ],
)
def test_adaptive_clipping_runs_its_round_on_10_nodes(
    count_stddev: float, honest: int, odd_one: int, used_stddev: float
) -> None:
    """Both cases raised out of aggregate_train before (measured on main)."""
    config = FedgeConfig.from_run_config(
        {"dp-mode": "central", "dp-adaptive-clipping": True, "dp-count-stddev": count_stddev}
    )
    privacy = ServerPrivacy(config)
    strategy = FedgeAvg(privacy=privacy, min_train_nodes=2, min_available_nodes=2)
    nodes = range(1, 11)
    model = state_to_numpy(build_model(model_spec_for(config, dataset_for(config))))
    messages = strategy.configure_train(1, to_array_record(model), ConfigRecord(), NodeGrid(nodes))
    assert len(list(messages)) == 10
    replies = [zero_reply(node, model, honest) for node in nodes[:-1]]
    record, _ = strategy.aggregate_train(1, [*replies, zero_reply(10, model, odd_one)])
    assert record is not None and strategy.report.aggregated
    assert [r.server_round for r in privacy.ledger.history] == [1]
    assert privacy.adaptive is not None and privacy.adaptive.count_stddev == used_stddev
    # one geometric step at most, whatever was reported: exp(±0.2 · 0.5) around C = 1
    assert math.exp(-0.1) - 1e-9 <= privacy.clip_norm <= math.exp(0.1) + 1e-9


def test_a_count_noise_that_leaves_no_update_noise_fails_validation() -> None:
    with pytest.raises(ConfigError, match=r"dp-count-stddev above 0\.5"):
        FedgeConfig.from_run_config(
            {"dp-mode": "central", "dp-adaptive-clipping": True, "dp-count-stddev": 0.5}
        )
    FedgeConfig.from_run_config(
        {"dp-mode": "central", "dp-adaptive-clipping": True, "dp-count-stddev": 0.51}
    )


# --- run folders ---------------------------------------------------------------------------


def test_a_second_run_with_the_same_name_fails_fast_while_the_first_holds_it(
    tmp_path: Path,
) -> None:
    config = FedgeConfig.from_run_config({"output-dir": str(tmp_path), "run-name": "busy"})
    with (
        RunFolder.for_config(config),
        pytest.raises(ConfigError, match=rf"in use by another fedge run \(pid {os.getpid()}\)"),
    ):
        RunFolder.for_config(config)
    RunFolder.for_config(config).unlock()  # released with the first run


def test_a_torn_last_metrics_line_is_dropped_and_a_damaged_one_refused(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    for round_ in (1, 2):
        folder.append_metrics({"round": round_, "test_accuracy": 0.5})
    with open(folder.metrics_path, "a", encoding="utf-8") as handle:
        handle.write('{"round": 3, "test_acc')  # the run died mid-append
    assert [row["round"] for row in folder.read_metrics()] == [1, 2]
    folder.keep_metrics_through(2)
    assert folder.metrics_path.read_text(encoding="utf-8").count("\n") == 2
    lines = folder.metrics_path.read_text(encoding="utf-8").splitlines()
    folder.metrics_path.write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")
    with pytest.raises(ConfigError, match="line 2 is not a metrics row"):
        folder.read_metrics()


def test_an_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ConfigError, match="unreadable"):
        RunFolder(tmp_path).load_checkpoint()


@pytest.mark.usefixtures("serverapp_identity")
def test_resume_on_other_data_is_refused_listing_every_key(tmp_path: Path) -> None:
    run_dir = run_server(tmp_path, "data", **{**BASE, "num-server-rounds": 1})
    changed = {**BASE, "seed": 8, "val-fraction": 0.1000001, "num-server-rounds": 2}
    with pytest.raises(ConfigError) as refusal:
        run_server(tmp_path, "data", **changed, resume=True)
    message = str(refusal.value)
    assert "seed (7 -> 8)" in message and "val-fraction (0.1 -> 0.1000001)" in message
    assert "resume-allow-changes=true" in message and "lr" not in message
    assert [row["round"] for row in rows_of(run_dir)] == [1]
    run_server(tmp_path, "data", **changed, resume=True, **{"resume-allow-changes": True})
    assert [row["round"] for row in rows_of(run_dir)] == [1, 2]


def test_resume_on_other_data_content_is_refused() -> None:
    """Same settings, another file behind the same dataset path."""
    config = FedgeConfig.from_run_config({})
    bundle = dataset_for(config)
    state = {"rng": {}, "run_config": config.to_run_config(), "data": bundle.source_digest}
    checkpoint = Checkpoint(1, {}, {}, state)
    check_same_data(checkpoint, config, bundle)
    other = dataclasses.replace(bundle, source_digest="0" * 64)
    with pytest.raises(ConfigError, match="the dataset's content"):
        check_same_data(checkpoint, config, other)


# --- the node's local-DP ledger ------------------------------------------------------------


def node_context(partition: int = 0, partitions: int = 4) -> Context:
    return Context(
        0, 7, {"partition-id": partition, "num-partitions": partitions}, RecordDict(), {}
    )


def ledger_for(context: Context | None = None, **run_config: Any) -> NodeLedger:
    return NodeLedger.for_node(FedgeConfig.from_run_config(run_config), context or node_context())


def test_every_split_of_the_same_data_charges_one_ledger(tmp_path: Path) -> None:
    """The server used to get a fresh ledger by nudging val-fraction by 1e-7 (ε 8.9 → 4.5)."""
    folder = tmp_path / "digits-as-npz"
    folder.mkdir()
    x, y, _, _ = load_digits_pool()
    np.savez(folder / "data.npz", x=x, y=y)
    same = {ledger_for().ledger_id}
    for server_choice in (
        {"val-fraction": 0.1 + 1e-7},
        {"test-fraction": 0.3},
        {"dirichlet-alpha": 0.5000001},
        {"seed": 1},
        {"partitioner": "pathological", "classes-per-client": 3},
        {"dataset": str(folder)},  # the same content under another name
    ):
        same.add(ledger_for(**server_choice).ledger_id)
    assert len(same) == 1
    assert ledger_for(node_context(partition=1)).ledger_id not in same
    assert ledger_for(dataset="breast-cancer").ledger_id not in same


STATE = b'{"mechanism": "rdp", "history": [[1.0, 0.25, 8]]}'


def test_a_lost_or_damaged_ledger_refuses_until_the_operator_resets_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDGE_NODE_STATE_DIR", str(tmp_path))
    ledger = ledger_for()
    assert ledger.load(1e-5) is None  # never trained on this data: starts at 0
    ledger.save(STATE)
    assert ledger.load(1e-5) == STATE

    ledger.path.unlink()
    with pytest.raises(NodeLedgerError, match="fedge node reset-ledger " + ledger.ledger_id):
        ledger.load(1e-5)
    assert fedge_cli(["node", "ledgers"]) == 0
    assert f"{ledger.ledger_id}  MISSING" in capsys.readouterr().out

    assert fedge_cli(["node", "reset-ledger", ledger.ledger_id]) == 0
    assert "starts again at 0" in capsys.readouterr().out
    assert ledger.load(1e-5) is None

    ledger.save(STATE)
    ledger.path.write_bytes(STATE[:20])  # damaged
    with pytest.raises(NodeLedgerError, match="unreadable"):
        ledger.load(1e-5)
    assert fedge_cli(["node", "reset-ledger", "not-hex"]) == 1
    assert fedge_cli(["node", "reset-ledger", "0" * 20]) == 1


def local_dp_config(**extra: Any) -> dict[str, Any]:
    return {**BASE, "local-dp": True, "num-server-rounds": 1, **extra}


@pytest.mark.usefixtures("serverapp_identity")
def test_a_nudged_split_continues_the_nodes_epsilon_and_a_deleted_ledger_stops_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both findings end to end, through fedge's ServerApp and ClientApp."""
    monkeypatch.setenv("FEDGE_NODE_STATE_DIR", str(tmp_path / "node-state"))
    first = rows_of(run_server(tmp_path, "a", **local_dp_config()))[0]
    nudged = rows_of(run_server(tmp_path, "b", **local_dp_config(**{"val-fraction": 0.1000001})))
    assert nudged[0]["client_epsilon_mean"] > first["client_epsilon_mean"]
    assert len(list((tmp_path / "node-state").glob("local-dp-*.json"))) == NODES

    config = full_config(tmp_path, "c", **local_dp_config())
    context = node_contexts([100], config)[100]
    context.node_config["num-partitions"] = NODES  # node 0 of the run above
    typed = FedgeConfig.from_run_config(config)
    ledger = NodeLedger.for_node(typed, context)
    assert ledger.path.is_file()
    ledger.path.unlink()
    model = state_to_numpy(build_model(model_spec_for(typed, dataset_for(typed))))
    content = RecordDict(
        {
            "arrays": to_array_record(model),
            "config": ConfigRecord({"server-round": 1, REPLY_KEY: "update"}),
        }
    )
    train = Message(content, dst_node_id=100, message_type=MessageType.TRAIN)
    with pytest.raises(NodeLedgerError, match="is missing"):
        client_app(train, context)
    assert not ledger.path.exists()  # it did not start a new ledger either


# --- a real process killed after a checkpoint, resumed with DP off ----------------------------

SCRIPT = Path(__file__).with_name("budget_process.py")


def start(config: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, str(SCRIPT), json.dumps(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def finish(process: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> tuple[int, str]:
    code = process.wait(timeout=timeout)
    return code, log.read_text(encoding="utf-8", errors="replace")


@pytest.mark.slow
def test_a_killed_dp_run_resumed_with_dp_off_keeps_its_epsilon(tmp_path: Path) -> None:
    config = {**CENTRAL, "num-server-rounds": 500, "output-dir": str(tmp_path), "run-name": "k"}
    run_dir = tmp_path / "k"
    first = start(config, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / CHECKPOINT).is_file():
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        # a second run with the same run-name, while the first holds the folder
        second = start({**config, "resume": True}, tmp_path / "second.log")
        code, output = finish(second, tmp_path / "second.log")
        assert code == 1 and f"in use by another fedge run (pid {first.pid})" in output
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    done = RunFolder(run_dir).load_checkpoint()
    spent = done.state["privacy"]["ledger"]["rounds"]
    assert done.round >= 1 and [r["server_round"] for r in spent] == list(range(1, done.round + 1))
    with open(run_dir / METRICS, "a", encoding="utf-8") as handle:
        handle.write('{"round": 999, "test_')  # as if killed mid-append
    frozen = (run_dir / CHECKPOINT).read_bytes()

    without_dp = {**BASE, "output-dir": str(tmp_path), "run-name": "k", "resume": True}
    without_dp["num-server-rounds"] = done.round + 1
    code, output = finish(start(without_dp, tmp_path / "off.log"), tmp_path / "off.log")
    assert code == 1, output
    assert "resume-without-dp=true" in output and f"ε={spent[-1]['epsilon']:.4g}" in output
    assert (run_dir / CHECKPOINT).read_bytes() == frozen  # the killed run's lock did not block

    code, output = finish(
        start({**without_dp, "resume-without-dp": True}, tmp_path / "override.log"),
        tmp_path / "override.log",
    )
    assert code == 0, output
    assert "dropped a torn last line" in output
    rows, report = rows_of(run_dir), report_of(run_dir)
    assert [row["round"] for row in rows] == list(range(1, done.round + 2))
    assert [row["epsilon"] for row in rows[:-1]] == [r["epsilon"] for r in spent]
    assert rows[-1]["epsilon"] is None and rows[-1]["dp_guarantee"] is False
    assert report["epsilon"] is None and report["rounds_without_dp"] == [done.round + 1]
    kept = [(r["round"], r["epsilon"]) for r in report["rounds"][: done.round]]
    assert kept == [(r["server_round"], r["epsilon"]) for r in spent]
    assert "no (ε, δ) holds" in output
