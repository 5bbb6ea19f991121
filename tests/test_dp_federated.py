"""Differential privacy end to end: server noise, budget stop, resume, local DP, SecAgg+.

One unit-level check (FedgeAvg + ServerPrivacy on constructed Flower messages) and
four Flower simulations (`run_inprocess`, ~1 min each here), each shared by the
tests that read its outputs:

- central DP + SecAgg+ with a budget that allows 2 of 5 rounds,
- the same run resumed with a larger budget and more rounds,
- local DP-SGD with a per-client budget that makes clients decline,
- distributed DP + SecAgg+ for 2 rounds.

Every epsilon is checked against Opacus's own `RDPAccountant`, stepped here
independently of fedge's ledger.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from grids import instruction
from opacus.accountants import RDPAccountant
from scipy import stats

from fedge.client_app.protocol import (
    CLIP_KEY,
    UNCLIPPED_KEY,
    UPDATE_INFO_KEY,
    WEIGHT_KEY,
    update_tag,
)
from fedge.config import FedgeConfig
from fedge.data import client_split
from fedge.records import NamedArrays, from_array_record, to_array_record
from fedge.server_app.privacy import ServerPrivacy
from fedge.server_app.run_folder import RunFolder
from fedge.server_app.secure_round import SecAggSettings
from fedge.server_app.strategy import FedgeAvg
from fedge.simulation import NodeGrid, run_inprocess
from fedge.task import dataset_for

DELTA = 1e-5


def opacus_epsilons(steps: list[tuple[float, float, int]], delta: float = DELTA) -> list[float]:
    """Opacus's epsilon after each (noise_multiplier, sample_rate, num_steps) entry."""
    accountant = RDPAccountant()
    epsilons = []
    for sigma, q, count in steps:
        for _ in range(count):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
        epsilons.append(accountant.get_epsilon(delta))
    return epsilons


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_privacy(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "privacy.json").read_text(encoding="utf-8"))


# --- unit level: the noise the server adds ------------------------------------------------

NODES = (11, 22, 33)


StaticGrid = NodeGrid


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages carry the sending task's identity (set by Flower at runtime)."""
    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def zero_reply(node_id: int, arrays: NamedArrays) -> Message:
    """A ClientApp's reply carrying an all-zero (so trivially clipped) update."""
    update = {name: np.zeros_like(value) for name, value in arrays.items()}
    metrics = MetricRecord({WEIGHT_KEY: 10, "train-loss": 1.0, UNCLIPPED_KEY: 1})
    tag = update_tag({"server-round": 1}, arrays)  # an update of round 1's `arrays`
    content = RecordDict(
        {"arrays": to_array_record(update), "metrics": metrics, UPDATE_INFO_KEY: tag}
    )
    return Message(content, reply_to=instruction(node_id))


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize(("sigma", "clip"), [(1.0, 1.0), (0.7, 2.5), (3.0, 0.1)])
def test_central_noise_on_zero_updates_has_std_sigma_times_clip(sigma: float, clip: float) -> None:
    """(new − old global) · num_sampled is pure noise of std σ·C on every coordinate."""
    rng = np.random.default_rng(0)
    old = {
        "conv.weight": rng.normal(size=(64, 16, 3, 3)).astype(np.float32),  # 9216
        "fc.weight": rng.normal(size=(256, 400)).astype(np.float32),  # 102400
        "fc.bias": rng.normal(size=256).astype(np.float32),
    }
    config = FedgeConfig.from_run_config(
        {"dp-mode": "central", "dp-noise-multiplier": sigma, "dp-clipping-norm": clip}
    )
    privacy = ServerPrivacy(config)
    strategy = FedgeAvg(privacy=privacy, min_train_nodes=2, min_available_nodes=2)
    messages = list(
        strategy.configure_train(1, to_array_record(old), ConfigRecord(), StaticGrid(NODES))
    )
    assert len(messages) == len(NODES)
    for message in messages:
        assert message.content.config_records["config"][CLIP_KEY] == clip

    record, _ = strategy.aggregate_train(1, [zero_reply(node, old) for node in NODES])
    assert record is not None and strategy.report.num_replies == len(NODES)
    new = from_array_record(record)
    noise = np.concatenate(
        [(new[name].astype(np.float64) - old[name].astype(np.float64)).ravel() for name in old]
    ) * len(NODES)
    expected = sigma * clip
    n = noise.size
    # sample std has relative standard error ~ 1/sqrt(2n) ≈ 0.2%: 2% is ~9 standard errors
    assert np.std(noise) == pytest.approx(expected, rel=0.02)
    assert abs(np.mean(noise)) < 6 * expected / math.sqrt(n)
    assert stats.kstest(noise / expected, "norm").pvalue > 1e-4
    # each array got its own noise, not one shared draw
    for name in old:
        part = (new[name].astype(np.float64) - old[name].astype(np.float64)) * len(NODES)
        if part.size >= 1000:
            assert np.std(part) == pytest.approx(expected, rel=0.1), name
    # the round costs one step of the sampled Gaussian mechanism at q = 3/3
    assert strategy.report.epsilon == pytest.approx(opacus_epsilons([(sigma, 1.0, 1)])[0], rel=1e-9)
    assert privacy.ledger.history[-1].sample_rate == 1.0


# --- simulations ----------------------------------------------------------------------

SIM_BASE: dict[str, Any] = {"partitioner": "iid", "seed": 7, "local-epochs": 1}
SIM_NODES = 10

CENTRAL_SIGMA = 1.5
CENTRAL_BUDGET = 5.0  # at q = 1, δ = 1e-5: ε = 2.98, 4.42 after 2 rounds, 5.58 after 3
CENTRAL_ROUNDS = 5
RESUMED_BUDGET = 8.0  # 6.60 after 4 rounds
RESUMED_ROUNDS = 4


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dp-sim")


def central_config(root: Path) -> dict[str, Any]:
    return {
        **SIM_BASE,
        "secagg": True,
        "dp-mode": "central",
        "dp-noise-multiplier": CENTRAL_SIGMA,
        "dp-clipping-norm": 1.0,
        "dp-delta": DELTA,
        "dp-max-epsilon": CENTRAL_BUDGET,
        "num-server-rounds": CENTRAL_ROUNDS,
        "output-dir": str(root),
        "run-name": "central",
    }


@pytest.fixture(scope="module")
def central_run(sim_root: Path) -> dict[str, Any]:
    """Central DP + SecAgg+ that the budget stops; outputs copied before any resume."""
    run_inprocess(central_config(sim_root), num_supernodes=SIM_NODES)
    run_dir = sim_root / "central"
    return {
        "dir": run_dir,
        "rows": read_rows(run_dir),
        "privacy": read_privacy(run_dir),
        "checkpoint_round": RunFolder(run_dir).load_checkpoint().round,
        "final_model": (run_dir / "final_model.pt").is_file(),
    }


@pytest.mark.slow
def test_central_dp_with_secagg_stops_at_the_budget_and_never_exceeds_it(
    central_run: dict[str, Any],
) -> None:
    rows, privacy = central_run["rows"], central_run["privacy"]
    assert [row["round"] for row in rows] == [1, 2]  # fewer than num-server-rounds=5
    for row in rows:
        # SecAgg+ aggregated every sampled client's masked update
        assert (row["num_replies"], row["num_rejected"], row["aggregated"]) == (SIM_NODES, 0, True)
        assert row["train_loss"] is None  # per-client metrics are hidden under SecAgg
        assert 0 < row["epsilon"] <= CENTRAL_BUDGET
    assert rows[0]["epsilon"] < rows[1]["epsilon"]

    assert privacy["mode"] == "central" and privacy["max_epsilon"] == CENTRAL_BUDGET
    assert "budget" in privacy["stop_reason"] and "round 3" in privacy["stop_reason"]
    assert "dp-max-epsilon" in privacy["stop_reason"]
    assert [r["round"] for r in privacy["rounds"]] == [1, 2]
    assert all(r["epsilon"] <= CENTRAL_BUDGET for r in privacy["rounds"])
    assert all(r["sample_rate"] == 1.0 for r in privacy["rounds"])
    assert all(r["noise_multiplier"] == CENTRAL_SIGMA for r in privacy["rounds"])

    # the ledger's numbers are Opacus's for the same (σ, q, steps, δ) ...
    expected = opacus_epsilons([(CENTRAL_SIGMA, 1.0, 1)] * 3)
    for row, record, want in zip(rows, privacy["rounds"], expected, strict=False):
        assert record["epsilon"] == pytest.approx(want, rel=1e-9)
        assert row["epsilon"] == pytest.approx(want, rel=1e-9)
    assert privacy["epsilon"] == pytest.approx(expected[1], rel=1e-9)
    # ... and the refused round really would have crossed the budget (not stopped early)
    assert expected[1] <= CENTRAL_BUDGET < expected[2]

    # the run ended cleanly: checkpoint and final model of round 2
    assert central_run["checkpoint_round"] == 2
    assert central_run["final_model"]


@pytest.fixture(scope="module")
def resumed_run(central_run: dict[str, Any], sim_root: Path) -> Path:
    config = {
        **central_config(sim_root),
        "num-server-rounds": RESUMED_ROUNDS,
        "dp-max-epsilon": RESUMED_BUDGET,
        "resume": True,
    }
    run_inprocess(config, num_supernodes=SIM_NODES)
    return central_run["dir"]


@pytest.mark.slow
def test_resume_keeps_the_spent_epsilon_and_keeps_counting(
    central_run: dict[str, Any], resumed_run: Path
) -> None:
    rows, privacy = read_rows(resumed_run), read_privacy(resumed_run)
    before_rows, before = central_run["rows"], central_run["privacy"]
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    # the first rounds are untouched, in metrics.jsonl and in privacy.json
    assert rows[:2] == before_rows
    assert privacy["rounds"][:2] == before["rounds"]

    # ε continues from the checkpointed ledger: 4 steps in all, not 2 after a restart
    expected = opacus_epsilons([(CENTRAL_SIGMA, 1.0, 1)] * RESUMED_ROUNDS)
    epsilons = [r["epsilon"] for r in privacy["rounds"]]
    assert [r["round"] for r in privacy["rounds"]] == [1, 2, 3, 4]
    assert epsilons == pytest.approx(expected, rel=1e-9)
    assert [row["epsilon"] for row in rows] == pytest.approx(expected, rel=1e-9)
    assert epsilons[2] > before["epsilon"] and epsilons[3] > epsilons[2]
    assert all(e <= RESUMED_BUDGET for e in epsilons)
    assert privacy["epsilon"] == pytest.approx(expected[-1], rel=1e-9)
    assert privacy["stop_reason"] == "completed all rounds"
    assert privacy["max_epsilon"] == RESUMED_BUDGET
    assert RunFolder(resumed_run).load_checkpoint().round == RESUMED_ROUNDS


# --- local DP-SGD ---------------------------------------------------------------------

LOCAL_SIGMA = 1.0
LOCAL_BUDGET = 6.0
LOCAL_ROUNDS = 3
# Dirichlet(0.5) partitions of different sizes: 3 to 7 batches of 32 per epoch, so
# clients spend their budget at different rounds (see `expected_local_schedule`).
LOCAL_CONFIG: dict[str, Any] = {
    "partitioner": "dirichlet",
    "seed": 7,
    "local-epochs": 1,
    "batch-size": 32,
    "local-dp": True,
    "local-dp-noise-multiplier": LOCAL_SIGMA,
    "local-dp-max-grad-norm": 1.0,
    "local-dp-max-epsilon": LOCAL_BUDGET,
    "dp-delta": DELTA,
    "num-server-rounds": LOCAL_ROUNDS,
}


def expected_local_schedule() -> list[list[tuple[float, bool]]]:
    """Per round, per client: (ε it reports, declined?), from the partition sizes.

    A client with b batches per epoch takes b DP-SGD steps at q = 1/b per round and
    declines a round that would take its ε past the budget.
    """
    config = FedgeConfig.from_run_config(LOCAL_CONFIG)
    bundle = dataset_for(config)
    rounds: list[list[tuple[float, bool]]] = [[] for _ in range(LOCAL_ROUNDS)]
    for pid in range(SIM_NODES):
        _, y_train, _, _ = client_split(
            bundle,
            pid,
            SIM_NODES,
            config.partitioner,
            config.seed,
            config.val_fraction,
            config.dirichlet_alpha,
            config.classes_per_client,
        )
        batches = math.ceil(len(y_train) / config.batch_size)
        accountant, spent = RDPAccountant(), 0.0
        for server_round in range(LOCAL_ROUNDS):
            trial = RDPAccountant()
            trial.history = list(accountant.history)
            for _ in range(batches):
                trial.step(noise_multiplier=LOCAL_SIGMA, sample_rate=1 / batches)
            after = trial.get_epsilon(DELTA)
            if after > LOCAL_BUDGET:
                rounds[server_round].append((spent, True))
            else:
                accountant, spent = trial, after
                rounds[server_round].append((spent, False))
    return rounds


@pytest.fixture(scope="module")
def local_run(sim_root: Path) -> Path:
    config = {**LOCAL_CONFIG, "output-dir": str(sim_root), "run-name": "local"}
    run_inprocess(config, num_supernodes=SIM_NODES)
    return sim_root / "local"


@pytest.mark.slow
def test_local_epsilon_grows_per_node_and_clients_decline_past_their_budget(
    local_run: Path,
) -> None:
    schedule = expected_local_schedule()
    declined = [sum(d for _, d in clients) for clients in schedule]
    # the scenario this test is about: nobody declines at first, some (not all) later
    assert declined[0] == 0 and 0 < declined[1] < SIM_NODES

    rows = read_rows(local_run)
    assert [row["round"] for row in rows] == list(range(1, LOCAL_ROUNDS + 1))
    for row, clients, num_declined in zip(rows, schedule, declined, strict=True):
        assert "epsilon" not in row  # dp-mode=none: no server-side ledger
        assert row["num_declined"] == num_declined
        assert row["num_replies"] == SIM_NODES - num_declined
        assert row["num_rejected"] == 0
        assert row["client_epsilon_max"] <= LOCAL_BUDGET
        # every node's accountant carried over from its earlier rounds
        epsilons = [e for e, _ in clients]
        assert row["client_epsilon_max"] == pytest.approx(max(epsilons), rel=1e-9)
        assert row["client_epsilon_mean"] == pytest.approx(np.mean(epsilons), rel=1e-9)
    assert rows[1]["client_epsilon_max"] > rows[0]["client_epsilon_max"]
    assert rows[1]["client_epsilon_mean"] > rows[0]["client_epsilon_mean"]
    assert rows[-1]["num_declined"] > 0


# --- distributed DP with SecAgg+ ------------------------------------------------------

DISTRIBUTED_SIGMA = 1.0
DISTRIBUTED_NODES = 6


@pytest.fixture(scope="module")
def distributed_run(sim_root: Path) -> Path:
    config = {
        **SIM_BASE,
        "secagg": True,
        "dp-mode": "distributed",
        "dp-noise-multiplier": DISTRIBUTED_SIGMA,
        "dp-clipping-norm": 1.0,
        "dp-delta": DELTA,
        "num-server-rounds": 2,
        "output-dir": str(sim_root),
        "run-name": "distributed",
    }
    run_inprocess(config, num_supernodes=DISTRIBUTED_NODES)
    return sim_root / "distributed"


@pytest.mark.slow
def test_distributed_dp_with_secagg_accounts_the_realized_noise(distributed_run: Path) -> None:
    rows, privacy = read_rows(distributed_run), read_privacy(distributed_run)
    assert [row["round"] for row in rows] == [1, 2]
    assert all(row["aggregated"] and row["num_replies"] == DISTRIBUTED_NODES for row in rows)
    assert all(math.isfinite(row["test_loss"]) for row in rows)

    assert privacy["mode"] == "distributed"
    assert privacy["stop_reason"] == "completed all rounds"
    min_clients = privacy["min_clients"]
    # dp-min-clients=0 provisions the noise for the SecAgg threshold: the fewest
    # survivors a round can complete with
    threshold = SecAggSettings.from_config(FedgeConfig()).shape(DISTRIBUTED_NODES)[1]
    assert min_clients == threshold
    # each of n clients added std σC/sqrt(m_min): the sum has σ·sqrt(n/m_min) >= σ
    realized = DISTRIBUTED_SIGMA * math.sqrt(DISTRIBUTED_NODES / min_clients)
    assert realized >= DISTRIBUTED_SIGMA
    for record in privacy["rounds"]:
        assert record["noise_multiplier"] == pytest.approx(realized, rel=1e-12)
        assert record["sample_rate"] == 1.0
    expected = opacus_epsilons([(realized, 1.0, 1)] * 2)
    assert [r["epsilon"] for r in privacy["rounds"]] == pytest.approx(expected, rel=1e-9)
    assert [row["epsilon"] for row in rows] == pytest.approx(expected, rel=1e-9)
    assert privacy["epsilon"] == pytest.approx(expected[-1], rel=1e-9)
