"""Whole federations: fedge's ServerApp main and ClientApp, rounds, outputs, resume.

Two harnesses:
- `run_inprocess` (Flower's Simulation Engine on Ray, ~30-50 s per run here), and
- `LocalGrid`, a Grid that hands each message to fedge's ClientApp in this thread:
  no Ray, a few seconds per run, and exactly reproducible, so resume can be
  compared with an uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity
from grids import node_contexts

from fedge.client_app import app as client_app
from fedge.config import ConfigError, FedgeConfig
from fedge.data import load_dataset
from fedge.models import load_model, state_to_numpy
from fedge.models.training import evaluate
from fedge.server_app.acceptance import HeldOut
from fedge.server_app.app import main as server_main
from fedge.server_app.run_folder import RunFolder
from fedge.simulation import NodeGrid, run_inprocess

REQUIRED_KEYS = {
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "num_replies",
    "num_rejected",
    "seconds",
}


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def assert_same_metrics(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    assert [r["round"] for r in rows] == [r["round"] for r in reference]
    for row, ref in zip(rows, reference, strict=True):
        for key in ("test_accuracy", "test_loss"):
            assert math.isclose(row[key], ref[key], rel_tol=1e-6), (row["round"], key)


class CrashingGrid(Grid):
    """Delegates to the real grid, but the process 'dies' when training round N is sent."""

    def __init__(self, inner: Grid, crash_on_train_call: int) -> None:
        self.inner = inner
        self.crash_on = crash_on_train_call
        self.train_calls = 0

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self.inner.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.inner.run

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.train_calls += 1
            if self.train_calls == self.crash_on:
                raise RuntimeError("simulated crash")
        return self.inner.send_and_receive(messages, timeout=timeout)


def crashing_server_app(crash_on_train_call: int) -> ServerApp:
    """fedge's own ServerApp main, on a grid that fails in the given training round."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server_main(CrashingGrid(grid, crash_on_train_call), context)

    return app


# --- Ray: Flower's Simulation Engine ----------------------------------------------------

RAY_CONFIG = {"partitioner": "iid", "seed": 7}
RAY_NODES = 10


@pytest.fixture(scope="module")
def ray_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim")


@pytest.fixture(scope="module")
def straight_run(ray_root: Path) -> Path:
    """4 uninterrupted rounds: the reference every resumed run must reproduce."""
    run_inprocess(
        {**RAY_CONFIG, "num-server-rounds": 4, "output-dir": str(ray_root), "run-name": "straight"},
        num_supernodes=RAY_NODES,
    )
    return ray_root / "straight"


def test_simulation_learns_and_writes_every_output(straight_run: Path) -> None:
    rows = read_rows(straight_run)
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row.keys() >= REQUIRED_KEYS
        assert (row["num_replies"], row["num_rejected"]) == (RAY_NODES, 0)
        assert math.isfinite(row["train_loss"]) and row["seconds"] >= 0
    assert rows[-1]["test_accuracy"] >= 0.6  # chance is 0.1
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]

    # final_model.pt is the last round's model: re-evaluate it independently
    model, spec = load_model(straight_run / "final_model.pt")
    config = FedgeConfig.from_run_config(RAY_CONFIG)
    bundle = load_dataset("digits", config.test_fraction, config.seed)
    assert spec.input_shape == bundle.input_shape and spec.num_classes == 10
    loss, accuracy = evaluate(model, *_held_out())
    assert accuracy == pytest.approx(rows[-1]["test_accuracy"], abs=1e-9)
    assert loss == pytest.approx(rows[-1]["test_loss"], rel=1e-5)

    checkpoint = RunFolder(straight_run).load_checkpoint()
    assert checkpoint.round == 4
    final = state_to_numpy(model)
    assert checkpoint.arrays.keys() == final.keys()
    assert all(np.array_equal(checkpoint.arrays[k], final[k]) for k in final)
    assert checkpoint.state["run_config"]["num-server-rounds"] == 4

    assert (straight_run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_same_seed_reproduces_and_a_finished_run_can_be_extended(
    straight_run: Path, ray_root: Path
) -> None:
    first = {**RAY_CONFIG, "output-dir": str(ray_root), "run-name": "extended"}
    run_inprocess({**first, "num-server-rounds": 2}, num_supernodes=RAY_NODES)
    reference = read_rows(straight_run)
    # same seed, same data, same clients: the same first two rounds
    assert_same_metrics(read_rows(ray_root / "extended"), reference[:2])

    run_inprocess({**first, "num-server-rounds": 4, "resume": True}, num_supernodes=RAY_NODES)
    rows = read_rows(ray_root / "extended")
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    assert_same_metrics(rows, reference)
    _, accuracy = evaluate(
        load_model(ray_root / "extended" / "final_model.pt")[0],
        *_held_out(),
    )
    assert accuracy == pytest.approx(rows[-1]["test_accuracy"]) and accuracy >= 0.6


def _held_out() -> tuple[np.ndarray, np.ndarray]:
    """The test part the recorder reports on (the acceptance slice is set aside)."""
    config = FedgeConfig.from_run_config(RAY_CONFIG)
    held_out = HeldOut.of(load_dataset("digits", config.test_fraction, config.seed), config.seed)
    return held_out.x_test, held_out.y_test


@pytest.mark.slow
def test_interrupted_run_resumes_after_its_last_checkpoint(
    straight_run: Path, ray_root: Path
) -> None:
    config = {**RAY_CONFIG, "num-server-rounds": 4, "output-dir": str(ray_root)}
    config["run-name"] = "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_inprocess(config, num_supernodes=RAY_NODES, server_app=crashing_server_app(3))
    run_dir = ray_root / "crashed"
    assert [row["round"] for row in read_rows(run_dir)] == [1, 2]
    assert RunFolder(run_dir).load_checkpoint().round == 2
    assert not (run_dir / "final_model.pt").exists()

    with pytest.raises(ConfigError, match="resume"):  # never silently starts over
        run_inprocess(config, num_supernodes=RAY_NODES)

    run_inprocess({**config, "resume": True}, num_supernodes=RAY_NODES)
    rows = read_rows(run_dir)
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    assert_same_metrics(rows, read_rows(straight_run))
    assert RunFolder(run_dir).load_checkpoint().round == 4
    assert (run_dir / "final_model.pt").is_file()


def test_invalid_config_fails_before_any_simulation_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num-rounds"):
        run_inprocess({"num-rounds": 3, "output-dir": str(tmp_path)}, num_supernodes=2)
    assert not list(tmp_path.iterdir())


# --- LocalGrid: the same apps without Ray -----------------------------------------------


class LocalGrid(NodeGrid):
    """Each message goes straight to fedge's ClientApp, as node `partition-id` would run it."""

    def __init__(
        self, run_config: dict[str, Any], num_nodes: int, poisoned_node: int | None = None
    ) -> None:
        self.contexts = node_contexts(range(100, 100 + num_nodes), run_config)
        super().__init__(self.contexts)
        self.poisoned_node = poisoned_node

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            answer: Message = client_app(message, self.contexts[node])
            if node == self.poisoned_node and message.metadata.message_type == MessageType.TRAIN:
                arrays = answer.content.array_records["arrays"]
                name = next(iter(arrays))
                poisoned = arrays[name].numpy().copy()
                poisoned.flat[0] = np.nan
                answer.content.array_records["arrays"] = _replace(arrays, name, poisoned)
            replies.append(answer)
        return replies


def _replace(record: Any, name: str, value: np.ndarray) -> Any:
    from fedge.records import from_array_record, to_array_record

    arrays = from_array_record(record)
    arrays[name] = value
    return to_array_record(arrays)


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages carry the ServerApp task's identity (Flower sets it at runtime)."""
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


LOCAL_NODES = 5
LOCAL_CONFIG = {
    "partitioner": "dirichlet",
    "dirichlet-alpha": 1.0,
    "fraction-train": 0.6,  # 3 of 5 nodes: resume must restore the sampling RNG
    "server-momentum": 0.5,  # ... and the momentum buffer
    "local-epochs": 1,
    "seed": 3,
}


def run_local(
    tmp_path: Path, run_name: str, rounds: int, crash_on_train_call: int | None = None, **extra: Any
) -> Path:
    config = FedgeConfig.from_run_config(
        {
            **LOCAL_CONFIG,
            "num-server-rounds": rounds,
            "output-dir": str(tmp_path),
            "run-name": run_name,
            **extra,
        }
    ).to_run_config()
    grid: Grid = LocalGrid(config, LOCAL_NODES)
    if crash_on_train_call is not None:
        grid = CrashingGrid(grid, crash_on_train_call)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    server_main(grid, context)
    return tmp_path / run_name


def final_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    return state_to_numpy(load_model(run_dir / "final_model.pt")[0])


@pytest.mark.usefixtures("serverapp_identity")
def test_resume_after_a_crash_reproduces_the_uninterrupted_run_exactly(tmp_path: Path) -> None:
    reference = run_local(tmp_path, "straight", rounds=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_local(tmp_path, "crashed", rounds=4, crash_on_train_call=3)
    resumed = run_local(tmp_path, "crashed", rounds=4, resume=True)

    rows, expected = read_rows(resumed), read_rows(reference)
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    for row, ref in zip(rows, expected, strict=True):
        for key in ("test_accuracy", "test_loss", "train_loss", "num_replies"):
            assert row[key] == ref[key], (row["round"], key)
    assert all(row["num_replies"] == 3 for row in rows)
    want, got = final_arrays(reference), final_arrays(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.usefixtures("serverapp_identity")
def test_resume_with_more_rounds_than_a_finished_run_continues_counting(tmp_path: Path) -> None:
    run_local(tmp_path, "short", rounds=2)
    run_dir = run_local(tmp_path, "short", rounds=3, resume=True)
    assert [row["round"] for row in read_rows(run_dir)] == [1, 2, 3]
    assert RunFolder(run_dir).load_checkpoint().round == 3
    # asking for no more rounds than are done trains nothing and keeps the model
    before = final_arrays(run_dir)
    run_local(tmp_path, "short", rounds=3, resume=True)
    assert [row["round"] for row in read_rows(run_dir)] == [1, 2, 3]
    after = final_arrays(run_dir)
    assert all(np.array_equal(after[k], before[k]) for k in before)


@pytest.mark.usefixtures("serverapp_identity")
def test_crash_between_checkpoint_and_metrics_row_loses_no_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies right after round 2's checkpoint, before its metrics row."""
    original = RunFolder.append_metrics

    def dies_before_round_2_row(self: RunFolder, row: dict[str, Any]) -> None:
        if row["round"] == 2:
            raise RuntimeError("simulated crash")
        original(self, row)

    monkeypatch.setattr(RunFolder, "append_metrics", dies_before_round_2_row)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_local(tmp_path, "torn", rounds=3)
    monkeypatch.setattr(RunFolder, "append_metrics", original)

    run_dir = run_local(tmp_path, "torn", rounds=3, resume=True)
    assert [row["round"] for row in read_rows(run_dir)] == [1, 2, 3]


@pytest.mark.usefixtures("serverapp_identity")
def test_a_node_sending_nan_is_dropped_every_round_and_the_rest_still_learn(
    tmp_path: Path,
) -> None:
    config = FedgeConfig.from_run_config(
        {
            "partitioner": "iid",
            "num-server-rounds": 2,
            "output-dir": str(tmp_path),
            "run-name": "poisoned",
        }
    ).to_run_config()
    grid = LocalGrid(config, LOCAL_NODES, poisoned_node=102)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    server_main(grid, context)
    rows = read_rows(tmp_path / "poisoned")
    assert [(r["num_replies"], r["num_rejected"]) for r in rows] == [(4, 1)] * 2
    assert all(np.isfinite(a).all() for a in final_arrays(tmp_path / "poisoned").values())
    assert rows[-1]["test_accuracy"] >= 0.6
