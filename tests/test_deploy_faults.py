"""Faults on a real deployment: SecAgg+ and DP over TLS, a SuperNode kill -9 mid-round,
a ServerApp killed and resumed, a killed node rejoining.

One module-scoped deployment (flower-superlink + 5 flower-supernode on 127.0.0.1, TLS and
SuperNode authentication on) serves every test; each test first brings exactly the
SuperNodes it needs online (the others are stopped gracefully, which deregisters them at
once), so any test also runs alone. Teardown proves that no process survived.

Flower 1.41 timings that shape these tests (see docs/benchmarks.md): a SuperNode polls
the SuperLink every 3 s when idle and every message runs in a fresh `flwr-clientapp`
process (fedge's ResponsiveGrid sees replies within a second). A SuperNode killed
without a goodbye stays "online" until its heartbeat lapses (30-60 s after the kill,
hard-coded in Flower: the one wait these tests cannot trim); the SuperLink then answers
the ServerApp with an error reply for it, which ends the stage early.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from deploy_helpers import (
    REPO,
    FlwrRun,
    app_copy,
    deployment,
    log_since,
    log_size,
    node_log_since_start,
    processes_running,
    read_rows,
    saved_checkpoint,
    use_nodes,
    wait_for,
)
from flwr.app import ConfigRecord, RecordDict
from grids import instruction, node_contexts

from fedge.client_app.protocol import CLIP_KEY, REPLY_KEY, WEIGHT_KEY
from fedge.client_app.torch_client import local_update
from fedge.config import FedgeConfig
from fedge.deploy import LocalDeployment
from fedge.deploy.local import node_threads
from fedge.models import build_model, state_to_numpy
from fedge.records import to_array_record
from fedge.secagg import quantization_error_bound
from fedge.server_app.run_folder import Checkpoint
from fedge.task import dataset_for, model_spec_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc"),
]

NODES = 5
SMALL_SIGMA = 0.01
"""Central DP noise multiplier for the DP runs. With 3-5 clients, noise that gives a
meaningful ε (σ ≈ 1) swamps the mean update, so these tests check that clipping, SecAgg,
noise, accounting and resume work *together*; ε here is in the thousands, not a guarantee."""

# Common run config: IID partitions (3 of the 5 Dirichlet partitions miss classes, which
# caps accuracy at ~0.55 whatever the protocol does), 1 local epoch, no federated
# evaluation (the ServerApp evaluates centrally on the held-out split every round, which
# is what the accuracy checks read). A SecAgg+ round costs ~50 s (3 nodes) to ~70 s
# (5 nodes) on a busy 2-core machine: per message a SuperNode poll (3 s) and a fresh
# flwr-clientapp process.
BASE: dict[str, Any] = {"partitioner": "iid", "local-epochs": 1, "fraction-evaluate": 0.0}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    # Flower's own SuperNodes: these fault tests read their logs and kill -9 whole nodes;
    # the fast SuperNode's worker recovery is tested in test_deploy_fast.py.
    with deployment(NODES, tmp_path_factory.mktemp("faults"), fast=False) as federation:
        yield federation


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    pyproject = (REPO / "pyproject.toml").read_bytes()
    yield app_copy(tmp_path_factory.mktemp("app") / "app")
    assert (REPO / "pyproject.toml").read_bytes() == pyproject, "flwr rewrote pyproject.toml"


def finished(run: FlwrRun, timeout: float) -> str:
    """The run's output once `flwr run` exited 0 (the ServerApp completed)."""
    code = run.wait(timeout)
    output = run.output()
    assert code == 0, f"flwr run failed ({code}):\n{output[-4000:]}"
    return output


def epsilons(rows: list[dict[str, Any]]) -> list[float]:
    return [float(row["epsilon"]) for row in rows]


# --- 1. SecAgg+ and central DP over TLS with SuperNode auth ---------------------------------


@pytest.mark.timeout(600)
def test_deploy_secagg_dp_tls_run_learns(
    federation: LocalDeployment, app: Path, tmp_path: Path
) -> None:
    assert not federation.insecure and federation.certs is not None  # TLS + node auth
    use_nodes(federation, range(3))
    out = tmp_path / "out"
    config = {
        **BASE,
        "num-server-rounds": 3,
        "min-available-nodes": 3,
        "min-train-nodes": 3,
        "secagg": True,
        "dp-mode": "central",
        "dp-noise-multiplier": SMALL_SIGMA,
        "dp-clipping-norm": 1.0,
        "output-dir": str(out),
        "run-name": "x",
    }
    with FlwrRun(federation, app, config, tmp_path / "flwr-run.log") as run:
        output = finished(run, 540)

    rows = read_rows(out / "x" / "metrics.jsonl")
    assert [row["round"] for row in rows] == [1, 2, 3], rows
    assert all(row["num_replies"] == 3 and row["aggregated"] for row in rows), rows
    assert rows[-1]["test_accuracy"] >= 0.5, rows  # chance is 0.1
    assert "SecAgg: summed 3 clients' masked updates" in output, output[-3000:]

    report = json.loads((out / "x" / "privacy.json").read_text())
    assert report["mode"] == "central" and report["noise_multiplier"] == SMALL_SIGMA
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    ledger = [r["epsilon"] for r in report["rounds"]]
    assert ledger == pytest.approx(epsilons(rows))
    assert all(np.isfinite(ledger)) and ledger[0] < ledger[1] < ledger[2]
    assert report["epsilon"] == pytest.approx(ledger[-1])
    assert report["stop_reason"] == "completed all rounds"


# --- 2. the ServerApp is killed mid-run; a new run resumes it -------------------------------


def run_status(federation: LocalDeployment, run_id: int) -> str:
    """The SuperLink's status for a run, e.g. 'running' or 'finished:failed'."""
    result = federation.flwr(
        "ls", federation.connection, "--run-id", str(run_id), "--format", "json"
    )
    payload = json.loads(result.stdout[result.stdout.index("{") :])
    return str(payload["runs"][0]["status"])


@pytest.mark.timeout(900)
def test_deploy_serverapp_killed_then_resumes(
    federation: LocalDeployment, app: Path, tmp_path: Path
) -> None:
    """kill -9 of flwr-serverapp after round 2 of 3 (central DP, no SecAgg: the crash and the
    resume are the point, SecAgg is test 1's); `resume=true` continues from the checkpoint."""
    use_nodes(federation, range(3))
    out = tmp_path / "out"
    folder = out / "r"
    config = {
        **BASE,
        "num-server-rounds": 3,
        "min-available-nodes": 3,
        "min-train-nodes": 3,
        "dp-mode": "central",
        "dp-noise-multiplier": SMALL_SIGMA,
        "dp-clipping-norm": 1.0,
        "output-dir": str(out),
        "run-name": "r",
    }
    superlink_env = f"FLWR_HOME={federation.homes_dir / 'superlink'}"
    with FlwrRun(federation, app, config, tmp_path / "first.log") as first:
        # The checkpoint comes after the round's metrics row and privacy.json.
        wait_for(lambda: saved_checkpoint(folder, 2), 480, "round 2's checkpoint")
        serverapps = processes_running("flwr-serverapp", superlink_env)
        assert len(serverapps) == 1, serverapps
        os.kill(serverapps[0], signal.SIGKILL)  # a crash: no cleanup, no final outputs
        wait_for(lambda: not processes_running("flwr-serverapp", superlink_env), 30, "exit")
        before = read_rows(folder / "metrics.jsonl")
        run_id = first.run_id()
        # `flwr run --stream` would follow the dead run until the SuperLink gives up on it
        # (no heartbeat for ~60 s); it is only a log follower, so stop it here.
    assert run_id is not None
    assert [row["round"] for row in before] == [1, 2], before
    assert not (folder / "final_model.pt").exists()
    # privacy.json is rewritten every round: the killed run's says what rounds 1-2 spent.
    killed = json.loads((folder / "privacy.json").read_text())
    assert [r["round"] for r in killed["rounds"]] == [1, 2]
    assert [r["epsilon"] for r in killed["rounds"]] == pytest.approx(epsilons(before))
    assert killed["stop_reason"] is None  # SIGKILL left no chance to say why

    with FlwrRun(federation, app, {**config, "resume": True}, tmp_path / "resumed.log") as again:
        output = finished(again, 480)
    assert f"resuming {folder} after round 2" in output, output[-3000:]

    rows = read_rows(folder / "metrics.jsonl")
    assert [row["round"] for row in rows] == [1, 2, 3], rows
    assert rows[:2] == before  # rows 1-2 (and their ε) kept as written, not recomputed
    assert epsilons(rows)[2] > epsilons(rows)[1]
    assert rows[-1]["num_replies"] == 3 and rows[-1]["test_accuracy"] >= 0.5, rows
    report = json.loads((folder / "privacy.json").read_text())
    assert report["rounds"][:2] == killed["rounds"]  # the restored ledger, same ε so far
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert [r["epsilon"] for r in report["rounds"]] == pytest.approx(epsilons(rows))
    assert report["stop_reason"] == "completed all rounds"
    assert (folder / "final_model.pt").is_file()
    # The SuperLink noticed the dead ServerApp (its heartbeat lapsed) and failed that run.
    wait_for(lambda: run_status(federation, run_id) != "running", 90, "the run to end")
    assert run_status(federation, run_id) == "finished:failed"


# --- 3. kill -9 a SuperNode inside a SecAgg+ round; it rejoins the next one ---------------


VICTIM = NODES - 1
MASKED_INPUT = "Receiving: train.secagg_masked_input"


@dataclass
class KilledRound:
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    output: str
    round_1: Checkpoint
    victim_log_before_kill: str
    victim_leftovers_after_kill: list[int]
    victim_log_after_restart: str
    victim_id: int
    victim_id_after_restart: int


@pytest.fixture(scope="module")
def killed_round(
    federation: LocalDeployment, app: Path, tmp_path_factory: pytest.TempPathFactory
) -> KilledRound:
    """A 2-round SecAgg+ run on 5 nodes; node 4 is SIGKILLed in round 1 after sharing its
    keys (when its masked-input message arrives) and started again once round 1 is summed.

    min-available-nodes=5 makes round 2 wait for it. round-timeout=90 exceeds the ~60 s
    heartbeat lapse, so round 1's masked-input stage ends on the SuperLink's
    "node unavailable" reply for the victim, and the victim is offline when round 2 starts.
    Round 2 cannot end before the victim is back, so the first checkpoint seen after the
    restart is round 1's (whether the ServerApp wrote it before or after the restart).
    """
    use_nodes(federation, range(NODES))
    tmp = tmp_path_factory.mktemp("kill9")
    out = tmp / "out"
    folder = out / "k"
    config = {
        **BASE,
        "local-epochs": 3,  # one round must learn; the victim also trains longer
        "num-server-rounds": 2,
        "min-available-nodes": NODES,
        "min-train-nodes": 3,
        "round-timeout": 90.0,
        "secagg": True,
        "secagg-threshold": 3,
        "output-dir": str(out),
        "run-name": "k",
    }
    victim_id = federation.node_ids[VICTIM]
    victim_log = federation.supernodes[VICTIM].log_path
    offset = log_size(victim_log)
    with FlwrRun(federation, app, config, tmp / "flwr-run.log") as run:
        wait_for(lambda: MASKED_INPUT in log_since(victim_log, offset), 480, "masked input")
        federation.kill_node(VICTIM)  # like a power cut: node, SuperExec and ClientApp
        leftovers = federation.supernodes[VICTIM].leftover_processes()
        before_kill = log_since(victim_log, offset)
        wait_for(lambda: "SecAgg: summed" in run.output(), 300, "round 1's unmasked sum")
        federation.restart_node(VICTIM, timeout=240)  # retries while still marked online
        round_1 = wait_for(lambda: saved_checkpoint(folder), 300, "round 1's checkpoint")
        output = finished(run, 400)
    return KilledRound(
        config=config,
        rows=read_rows(folder / "metrics.jsonl"),
        output=output,
        round_1=round_1,
        victim_log_before_kill=before_kill,
        victim_leftovers_after_kill=leftovers,
        victim_log_after_restart=node_log_since_start(federation, VICTIM),
        victim_id=victim_id,
        victim_id_after_restart=federation.node_ids[VICTIM],
    )


Arrays = dict[str, np.ndarray]


@dataclass
class Round1:
    """Round 1 recomputed in this process: its start model and each partition's w_k·Δ_k."""

    start: Arrays
    weighted: dict[int, Arrays]
    weights: dict[int, int]
    quantization_bound: float
    """Bound on the error of the unmasked Σ w_k·Δ_k, per coordinate (fedge.secagg.quantize)."""

    def model_after(self, partitions: list[int]) -> Arrays:
        """start + Σ w_k·Δ_k / Σ w_k over `partitions` (server-lr 1, no momentum)."""
        total = sum(self.weights[p] for p in partitions)
        return {
            name: value + sum(self.weighted[p][name] for p in partitions) / total
            for name, value in self.start.items()
        }

    def tolerance(self, partitions: list[int], expected: Arrays) -> float:
        """Quantization error of the mean, plus rounding the new model to float32."""
        largest = max(float(np.max(np.abs(value))) for value in expected.values())
        total = sum(self.weights[p] for p in partitions)
        return self.quantization_bound / total + float(np.finfo(np.float32).eps) * largest


def recompute_round_1(config: dict[str, Any]) -> Round1:
    """Every partition's round-1 contribution, computed here by the ClientApp's own code.

    The ServerApp's initial model comes from the run's seed (fedge.server_app.app.main);
    each node's training is seeded per (seed, partition, round), so `local_update` on the
    message the node got reproduces its update: Δ_k clipped to secagg-clip-norm, weighted
    by n_k capped at max-num-examples, as the node quantizes it.
    """
    cfg = FedgeConfig.from_run_config(config)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    start = state_to_numpy(build_model(model_spec_for(cfg, dataset_for(cfg))))
    content = RecordDict(
        {
            "arrays": to_array_record(start),
            "config": ConfigRecord(
                {"server-round": 1, REPLY_KEY: "update", CLIP_KEY: cfg.secagg_clip_norm}
            ),
        }
    )
    weighted, weights = {}, {}
    # The nodes trained with their share of the cores; float sums depend on the thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(node_threads(NODES))
    try:
        for partition, context in node_contexts(range(NODES), config).items():
            message = instruction(partition)
            message.content = content
            update, metrics = local_update(message, context, cfg)
            assert update is not None
            weights[partition] = min(int(metrics[WEIGHT_KEY]), cfg.max_num_examples)
            weighted[partition] = {
                name: weights[partition] * value.astype(np.float64)
                for name, value in update.items()
            }
    finally:
        torch.set_num_threads(threads)
    bound = quantization_error_bound(NODES, cfg.max_num_examples, cfg.secagg_clip_norm)
    return Round1(start, weighted, weights, bound)


def max_difference(a: Arrays, b: Arrays) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


@pytest.mark.timeout(900)
def test_deploy_secagg_survives_kill9(killed_round: KilledRound) -> None:
    run = killed_round
    # The victim got its masked-input message (so it had shared its keys) and never replied.
    assert MASKED_INPUT in run.victim_log_before_kill
    assert "Sending: train.secagg_masked_input" not in run.victim_log_before_kill
    assert "SecAgg: 5 of 5 clients shared keys" in run.output
    assert "SecAgg: summed 4 clients' masked updates" in run.output, run.output[-4000:]
    assert f"SecAgg: node {run.victim_id} left out" in run.output
    first = run.rows[0]
    assert (first["round"], first["num_replies"], first["num_rejected"]) == (1, 4, 1), first
    assert first["aggregated"] and first["test_accuracy"] >= 0.5, first  # chance is 0.1

    # The new global model is the start model plus the survivors' weighted mean update,
    # to within SecAgg's quantization; with the victim, or without any one survivor, the
    # same check fails by orders of magnitude.
    assert run.round_1.round == 1
    got = run.round_1.arrays
    round_1 = recompute_round_1(run.config)
    survivors = [p for p in range(NODES) if p != VICTIM]
    expected = round_1.model_after(survivors)
    tolerance = round_1.tolerance(survivors, expected)
    assert max_difference(got, expected) <= tolerance, (max_difference(got, expected), tolerance)
    wrong = [list(range(NODES))] + [[p for p in survivors if p != q] for q in survivors]
    for partitions in wrong:
        assert max_difference(got, round_1.model_after(partitions)) > 100 * tolerance, partitions


@pytest.mark.timeout(900)
def test_deploy_restarted_node_rejoins_next_round(killed_round: KilledRound) -> None:
    """The node killed in round 1 comes back under its own key and takes part in round 2."""
    run = killed_round
    assert run.victim_leftovers_after_kill == []  # SuperExec and ClientApp died with it
    assert run.victim_id_after_restart == run.victim_id
    assert [row["round"] for row in run.rows] == [1, 2], run.rows
    second = run.rows[1]
    assert (second["num_replies"], second["num_rejected"]) == (NODES, 0), second
    assert "SecAgg: summed 5 clients' masked updates" in run.output, run.output[-4000:]
    for stage in ("setup", "share_keys", "masked_input", "unmask"):
        assert f"Sending: train.secagg_{stage}" in run.victim_log_after_restart, stage
