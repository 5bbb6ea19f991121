"""dp-target-epsilon: σ computed from (ε, δ, planned rounds, q) so a run uses all its rounds.

The adversary is the arithmetic itself: a σ even a rounding step below what the
target allows would overspend. Every ε here is recomputed with Opacus's own
`RDPAccountant`, stepped independently of fedge's ledger, for the planned rounds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opacus.accountants import RDPAccountant

from fedge.client_app.protocol import NOISE_MULTIPLIER_KEY
from fedge.client_app.torch_client import local_noise_multiplier
from fedge.config import ConfigError, FedgeConfig
from fedge.privacy.accountant import TargetUnreachable, noise_multiplier_for
from fedge.server_app.privacy import BudgetExhausted, ServerPrivacy
from fedge.simulation import run_inprocess

DELTA = 1e-5
TOLERANCE = 0.01  # Opacus's bisection stops within this of the target, below it


def opacus_epsilon(sigma: float, sample_rate: float, steps: int, delta: float = DELTA) -> float:
    """ε after `steps` steps, stepped one by one through Opacus's accountant."""
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
    return accountant.get_epsilon(delta)


def config(**keys: Any) -> FedgeConfig:
    return FedgeConfig.from_run_config(keys)


# --- the calibration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "sample_rate", "steps"),
    [(8.0, 1.0, 20), (1.0, 1.0, 5), (2.0, 0.1, 300), (0.5, 1 / 11, 33)],
)
def test_sigma_from_target_spends_at_most_the_target_and_close_to_it(
    target: float, sample_rate: float, steps: int
) -> None:
    sigma = noise_multiplier_for(target, delta=DELTA, sample_rate=sample_rate, steps=steps)
    spent = opacus_epsilon(sigma, sample_rate, steps)
    assert target - TOLERANCE <= spent <= target
    # and it is the smallest such σ to within the bisection: 1% less noise overspends
    assert opacus_epsilon(sigma * 0.99, sample_rate, steps) > target - TOLERANCE


def test_more_planned_rounds_need_more_noise() -> None:
    sigmas = [noise_multiplier_for(4.0, delta=DELTA, sample_rate=1.0, steps=r) for r in (5, 10, 20)]
    assert sigmas == sorted(sigmas) and len(set(sigmas)) == 3


def test_unreachable_target_is_refused_naming_the_fix() -> None:
    with pytest.raises(TargetUnreachable, match="raise the target or δ, or plan fewer rounds"):
        noise_multiplier_for(0.01, delta=DELTA, sample_rate=1.0, steps=20)


@pytest.mark.parametrize(
    ("target", "sample_rate", "steps"),
    [(0.0, 1.0, 5), (-1.0, 1.0, 5), (math.inf, 1.0, 5), (1.0, 0.0, 5), (1.0, 1.0, 0)],
)
def test_calibration_rejects_what_would_not_end(
    target: float, sample_rate: float, steps: int
) -> None:
    with pytest.raises(ValueError):
        noise_multiplier_for(target, delta=DELTA, sample_rate=sample_rate, steps=steps)


# --- the config rule --------------------------------------------------------------------


def test_target_needs_a_dp_mode() -> None:
    with pytest.raises(ConfigError, match="dp-target-epsilon needs"):
        config(**{"dp-target-epsilon": 4.0})


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"dp-mode": "central", "dp-noise-multiplier": 0.8}, "dp-noise-multiplier=0.8"),
        ({"local-dp": True, "local-dp-noise-multiplier": 2.0}, "local-dp-noise-multiplier=2"),
        ({"dp-mode": "central", "dp-max-epsilon": 2.0}, "dp-max-epsilon=2"),
        ({"local-dp": True, "local-dp-max-epsilon": 1.0}, "local-dp-max-epsilon=1"),
    ],
)
def test_conflicts_with_explicit_settings_are_refused_naming_both(
    keys: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=named) as info:
        config(**keys, **{"dp-target-epsilon": 4.0})
    assert "dp-target-epsilon=4" in str(info.value)


def test_the_budget_defaults_to_the_target_and_a_larger_one_is_kept() -> None:
    central = config(**{"dp-mode": "central", "dp-target-epsilon": 4.0})
    assert central.dp_budget == 4.0 and central.local_dp_budget == 4.0
    wider = config(**{"dp-mode": "central", "dp-target-epsilon": 4.0, "dp-max-epsilon": 6.0})
    assert wider.dp_budget == 6.0
    assert config().dp_budget == 0.0  # no target, no budget: as before


# --- central and distributed DP on the server ------------------------------------------


def run_rounds(
    privacy: ServerPrivacy, rounds: range, sampled: int, nodes: int, survivors: int
) -> None:
    for server_round in rounds:
        privacy.start_round(server_round, sampled, nodes)
        privacy.finish_round(server_round, survivors, sampled, unclipped=survivors)


@pytest.mark.parametrize(("sampled", "nodes"), [(10, 10), (1, 10)])
def test_central_target_runs_every_planned_round_within_the_target(
    sampled: int, nodes: int
) -> None:
    target, rounds = 3.0, 6
    privacy = ServerPrivacy(
        config(**{"dp-mode": "central", "dp-target-epsilon": target, "num-server-rounds": rounds})
    )
    run_rounds(privacy, range(1, rounds + 1), sampled, nodes, sampled)
    q = sampled / nodes
    sigma = privacy.noise_multiplier
    assert sigma == noise_multiplier_for(target, delta=DELTA, sample_rate=q, steps=rounds)
    assert [r.noise_multiplier for r in privacy.ledger.history] == [sigma] * rounds
    spent = opacus_epsilon(sigma, q, rounds)
    assert privacy.epsilon() == pytest.approx(spent, rel=1e-9)
    assert target - TOLERANCE <= spent <= target
    # fail closed: one round past the plan would overspend, so the budget refuses it
    with pytest.raises(BudgetExhausted, match="dp-target-epsilon=3"):
        privacy.start_round(rounds + 1, sampled, nodes)
    report = privacy.report()
    assert (report["noise_multiplier"], report["target_epsilon"]) == (sigma, target)
    assert (report["max_epsilon"], report["planned_rounds"]) == (target, rounds)


def test_distributed_target_holds_when_only_the_threshold_survives() -> None:
    """Noise provisioned for more survivors than the threshold: the fewest survivors
    realize less than σ, and the calibration pays for that worst case."""
    target, rounds, threshold = 4.0, 5, 4
    privacy = ServerPrivacy(
        config(
            **{
                "dp-mode": "distributed",
                "secagg": True,
                "dp-target-epsilon": target,
                "num-server-rounds": rounds,
                "dp-min-clients": 6,
            }
        )
    )
    privacy.provision(threshold)
    run_rounds(privacy, range(1, rounds + 1), 8, 8, survivors=threshold)
    realized = privacy.noise_multiplier * math.sqrt(threshold / 6)
    assert privacy.ledger.history[-1].noise_multiplier == pytest.approx(realized, rel=1e-12)
    spent = opacus_epsilon(privacy.ledger.history[-1].noise_multiplier, 1.0, rounds)
    assert target - TOLERANCE <= spent <= target
    assert privacy.epsilon() <= target


def test_target_is_computed_when_the_first_round_starts_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    privacy = ServerPrivacy(
        config(**{"dp-mode": "distributed", "secagg": True, "dp-target-epsilon": 5.0})
    )
    with pytest.raises(RuntimeError, match="first round"):
        privacy.client_config()  # no noise share can leave before σ is computed
    assert privacy.report()["noise_multiplier"] is None
    privacy.provision(7)  # as the strategy does, before the round starts
    with caplog.at_level("INFO", logger="flwr"):
        privacy.start_round(1, 10, 10)
    assert privacy.client_config()[NOISE_MULTIPLIER_KEY] == privacy.noise_multiplier
    assert any("dp-target-epsilon=5: σ=" in r.getMessage() for r in caplog.records)


def test_unreachable_server_target_is_a_config_error() -> None:
    privacy = ServerPrivacy(config(**{"dp-mode": "central", "dp-target-epsilon": 0.01}))
    with pytest.raises(ConfigError, match=r"dp-target-epsilon: .* plan fewer rounds"):
        privacy.start_round(1, 10, 10)


# --- resume -------------------------------------------------------------------------------

CENTRAL_TARGET = {"dp-mode": "central", "dp-target-epsilon": 4.0, "num-server-rounds": 6}


def checkpointed_after(rounds: int) -> tuple[ServerPrivacy, dict[str, Any]]:
    privacy = ServerPrivacy(config(**CENTRAL_TARGET))
    run_rounds(privacy, range(1, rounds + 1), 10, 10, 10)
    return privacy, json.loads(json.dumps(privacy.state()))  # as the checkpoint stores it


@pytest.mark.parametrize("planned", [6, 9])
def test_resumed_run_keeps_its_sigma(planned: int) -> None:
    """Also when more rounds are planned on resume: the budget, not a smaller σ, then
    ends the run."""
    before, state = checkpointed_after(3)
    resumed = ServerPrivacy(config(**{**CENTRAL_TARGET, "num-server-rounds": planned}))
    resumed.resume(state, rounds_done=3, previous_mode="central")
    run_rounds(resumed, range(4, 7), 10, 10, 10)
    assert resumed.noise_multiplier == before.noise_multiplier
    assert {r.noise_multiplier for r in resumed.ledger.history} == {before.noise_multiplier}
    assert resumed.epsilon() <= 4.0
    with pytest.raises(BudgetExhausted):
        resumed.start_round(7, 10, 10)


@pytest.mark.parametrize(
    ("keys", "planned"),
    [
        ({"dp-target-epsilon": 6.0}, "dp-target-epsilon=4"),
        ({"dp-target-epsilon": 0.0}, "dp-target-epsilon=4"),
    ],
)
def test_resume_refuses_a_changed_or_dropped_target(keys: dict[str, Any], planned: str) -> None:
    _, state = checkpointed_after(2)
    resumed = ServerPrivacy(config(**{**CENTRAL_TARGET, **keys}))
    with pytest.raises(ConfigError, match=planned):
        resumed.resume(state, rounds_done=2, previous_mode="central")


def test_resume_refuses_a_target_added_to_a_run_planned_by_sigma() -> None:
    privacy = ServerPrivacy(config(**{"dp-mode": "central", "num-server-rounds": 6}))
    run_rounds(privacy, range(1, 3), 10, 10, 10)
    resumed = ServerPrivacy(config(**CENTRAL_TARGET))
    with pytest.raises(ConfigError, match="planned with dp-noise-multiplier"):
        resumed.resume(privacy.state(), rounds_done=2, previous_mode="central")


# --- local DP-SGD -----------------------------------------------------------------------


@pytest.mark.parametrize(("rounds", "epochs", "batches"), [(5, 1, 4), (3, 2, 11)])
def test_local_sigma_covers_every_planned_step(rounds: int, epochs: int, batches: int) -> None:
    target = 6.0
    local = config(
        **{
            "local-dp": True,
            "dp-target-epsilon": target,
            "num-server-rounds": rounds,
            "local-epochs": epochs,
        }
    )
    sigma = local_noise_multiplier(local, batches)
    spent = opacus_epsilon(sigma, 1 / batches, rounds * epochs * batches)
    assert target - TOLERANCE <= spent <= target
    assert local_noise_multiplier(config(**{"local-dp": True}), batches) == 1.0  # no target


def test_unreachable_local_target_is_a_config_error() -> None:
    local = config(**{"local-dp": True, "dp-target-epsilon": 0.01})
    with pytest.raises(ConfigError, match=r"dp-target-epsilon \(local DP\)"):
        local_noise_multiplier(local, 10)


# --- in-process runs that use all their rounds -------------------------------------------

SIM_NODES = 4
SIM_ROUNDS = 3
SIM_TARGET = 4.0


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Its own node-state folder: local-DP ledgers of other tests' runs on the same data
    would otherwise count against these nodes' budgets."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDGE_NODE_STATE_DIR", str(tmp_path_factory.mktemp("target-nodes")))
        yield tmp_path_factory.mktemp("dp-target")


def simulate(root: Path, name: str, **keys: Any) -> tuple[list[dict[str, Any]], Path]:
    run_config = {
        "partitioner": "iid",
        "seed": 3,
        "local-epochs": 1,
        "num-server-rounds": SIM_ROUNDS,
        "dp-target-epsilon": SIM_TARGET,
        "output-dir": str(root),
        "run-name": name,
        **keys,
    }
    run_inprocess(run_config, num_supernodes=SIM_NODES)
    lines = (root / name / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()], root / name


CENTRAL_SIM = {"secagg": True, "dp-mode": "central"}


def read_privacy(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "privacy.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def central_run(sim_root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """SecAgg+ with central DP to a target; its outputs read before any resume."""
    rows, run_dir = simulate(sim_root, "central", **CENTRAL_SIM)
    return rows, read_privacy(run_dir)


@pytest.mark.slow
def test_secagg_central_target_run_uses_all_its_rounds(
    central_run: tuple[list[dict[str, Any]], dict[str, Any]],
) -> None:
    rows, privacy = central_run
    assert [row["round"] for row in rows] == list(range(1, SIM_ROUNDS + 1))
    assert all(row["aggregated"] for row in rows)
    assert privacy["stop_reason"] == "completed all rounds"
    sigma = privacy["noise_multiplier"]
    assert sigma == noise_multiplier_for(SIM_TARGET, delta=DELTA, sample_rate=1.0, steps=SIM_ROUNDS)
    assert privacy["target_epsilon"] == SIM_TARGET
    spent = opacus_epsilon(sigma, 1.0, SIM_ROUNDS)
    assert privacy["epsilon"] == pytest.approx(spent, rel=1e-9)
    assert rows[-1]["epsilon"] == pytest.approx(spent, rel=1e-9)
    assert SIM_TARGET - TOLERANCE <= spent <= SIM_TARGET


@pytest.mark.slow
def test_resumed_target_run_keeps_sigma_and_stops_at_the_target(
    central_run: tuple[list[dict[str, Any]], dict[str, Any]], sim_root: Path
) -> None:
    """One more round planned on resume: a smaller σ would fit it in the target; the
    run keeps its σ and the budget refuses that round instead."""
    _, before = central_run
    rows, run_dir = simulate(
        sim_root, "central", **CENTRAL_SIM, **{"num-server-rounds": SIM_ROUNDS + 1, "resume": True}
    )
    privacy = read_privacy(run_dir)
    assert [row["round"] for row in rows] == list(range(1, SIM_ROUNDS + 1))
    assert privacy["noise_multiplier"] == before["noise_multiplier"]
    assert f"round {SIM_ROUNDS + 1}" in privacy["stop_reason"]
    assert "dp-target-epsilon" in privacy["stop_reason"]
    assert privacy["epsilon"] == before["epsilon"] <= SIM_TARGET


@pytest.mark.slow
def test_local_target_run_uses_all_its_rounds(sim_root: Path) -> None:
    rows, _ = simulate(sim_root, "local", **{"local-dp": True})
    assert [row["round"] for row in rows] == list(range(1, SIM_ROUNDS + 1))
    assert all(row["num_declined"] == 0 for row in rows)
    assert all(row["num_replies"] == SIM_NODES for row in rows)
    assert rows[-1]["client_epsilon_max"] <= SIM_TARGET
    # the nodes trained every planned step: their ε is the target's, not a fraction of it
    assert rows[-1]["client_epsilon_mean"] >= SIM_TARGET - TOLERANCE
    assert rows[0]["client_epsilon_max"] < rows[-1]["client_epsilon_max"]
