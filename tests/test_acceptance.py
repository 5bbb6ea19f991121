"""The server's acceptance check on the real digits model: an in-bound SecAgg+ attack
(sign flip, replacement) passes the sum checks and is refused by the check, with the
reason in metrics.jsonl; honest steps are accepted; a refused step keeps the momentum
and is still in the DP ledger; the held-out split and the config key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord
from test_secagg_flower import SecAggGrid, serverapp_identity
from test_strategy import NODES as PLAIN_NODES
from test_strategy import StaticGrid, aggregate, reply

from fedge.client_app import secure_client
from fedge.client_app.protocol import WEIGHT_KEY
from fedge.config import ConfigError, FedgeConfig
from fedge.models import build_model, load_numpy_state, state_to_numpy
from fedge.models.training import evaluate, make_loader, train_epochs
from fedge.privacy.clipping import global_norm
from fedge.records import NamedArrays, from_array_record, to_array_record
from fedge.secagg import Stage
from fedge.server_app.acceptance import ACCEPT_MAX, AcceptanceCheck, HeldOut
from fedge.server_app.app import build_strategy
from fedge.server_app.privacy import ServerPrivacy
from fedge.server_app.recorder import RoundRecorder
from fedge.server_app.run_folder import RunFolder
from fedge.server_app.secure_round import SecAggSettings
from fedge.server_app.strategy import FedgeAvg
from fedge.task import dataset_for, model_spec_for

pytestmark = pytest.mark.usefixtures("serverapp_identity")
assert serverapp_identity  # the fixture, imported for its side effect

CONFIG = FedgeConfig()
TOLERANCE = CONFIG.accept_tolerance
SECAGG_NODES = tuple(range(201, 206))
ATTACKER = SECAGG_NODES[0]
CLIP = 10.0  # fedge's default secagg-clip-norm
MAX_WEIGHT = 1000  # fedge's default max-num-examples
HONEST_WEIGHT = 150  # about a digits client's training rows
MASKED_INPUT = f"train.{Stage.MASKED_INPUT.value}"


@pytest.fixture(scope="module")
def setting() -> tuple[object, object, NamedArrays, NamedArrays]:
    """(bundle, spec, the initial model, Δ of one honest epoch on the training pool)."""
    bundle = dataset_for(CONFIG)
    spec = model_spec_for(CONFIG, bundle)
    torch.manual_seed(CONFIG.seed)
    torch_model = build_model(spec)
    initial = state_to_numpy(torch_model)
    optimizer = torch.optim.SGD(torch_model.parameters(), lr=0.05, momentum=0.9)
    train_epochs(
        torch_model, make_loader(bundle.x_train, bundle.y_train, 32, shuffle=True), optimizer, 1
    )
    trained = state_to_numpy(torch_model)
    return bundle, spec, initial, {n: trained[n] - initial[n] for n in initial}


def check(setting: tuple) -> AcceptanceCheck:
    bundle, spec, _, _ = setting
    return AcceptanceCheck(spec, HeldOut.of(bundle, CONFIG.seed), TOLERANCE)


def scaled(update: NamedArrays, factor: float) -> NamedArrays:
    return {n: (v * factor).astype(v.dtype) for n, v in update.items()}


def attack_update(kind: str, initial: NamedArrays, honest: NamedArrays) -> NamedArrays:
    """Inside SecAgg's bound: the flipped honest Δ, or Δ towards a class-0 model, at norm C."""
    if kind == "sign-flip":
        direction = scaled(honest, -1.0)
    else:  # replacement: towards a model that answers class 0 to everything
        target = {n: np.zeros_like(v) for n, v in initial.items()}
        target[list(target)[-1]].flat[0] = 10.0
        direction = {n: target[n] - initial[n] for n in initial}
    return scaled(direction, CLIP * (1 - 1e-6) / global_norm(direction))


class UpdateGrid(SecAggGrid):
    """SecAggGrid whose masked-input stage sends the given (update, weight) per node."""

    def __init__(self, updates: dict[int, tuple[NamedArrays, int]]) -> None:
        super().__init__(updates)
        self.updates = updates

    def handle(self, message: Message, context: Context) -> Message:  # type: ignore[override]
        update, weight = self.updates.get(context.node_id, (None, 0))
        if update is not None and message.metadata.message_type == MASKED_INPUT:
            metrics = MetricRecord({WEIGHT_KEY: weight})
            return secure_client.masked_input(message, context, lambda: (update, metrics))
        return SecAggGrid.handle(message, context)


def secure_round(
    setting: tuple, attack: str | None, acceptance: AcceptanceCheck | None
) -> tuple[FedgeAvg, NamedArrays | None]:
    _, _, initial, honest = setting
    updates = {node: (honest, HONEST_WEIGHT) for node in SECAGG_NODES}
    if attack is not None:
        updates[ATTACKER] = (attack_update(attack, initial, honest), MAX_WEIGHT)
    strategy = FedgeAvg(
        secagg=SecAggSettings(
            num_shares=0, threshold=0, max_weight=MAX_WEIGHT, clip_norm=CLIP, timeout=60
        ),
        fraction_evaluate=0.0,
        min_train_nodes=2,
        min_available_nodes=2,
        acceptance=acceptance,
    )
    grid = UpdateGrid(updates)
    messages = strategy.configure_train(1, to_array_record(initial), ConfigRecord(), grid)
    record, _ = strategy.aggregate_train(1, grid.send_and_receive(messages, timeout=60))
    return strategy, None if record is None else from_array_record(record)


@pytest.mark.parametrize("attack", ["sign-flip", "replace"])
def test_an_in_bound_secagg_attack_is_refused_and_metrics_jsonl_says_why(
    setting: tuple, attack: str, tmp_path: Path
) -> None:
    bundle, spec, initial, _ = setting
    acceptance = check(setting)
    # Without the check the sum passes SecAgg's bounds and the step raises the loss.
    unchecked, applied = secure_round(setting, attack, None)
    assert applied is not None and unchecked.report.skip_reason is None
    assert acceptance.loss(applied) > acceptance.loss(initial) + TOLERANCE
    strategy, arrays = secure_round(setting, attack, acceptance)
    assert arrays is None and not strategy.report.aggregated
    RoundRecorder(
        RunFolder(tmp_path), strategy, spec, bundle, 1, {}, privacy=ServerPrivacy(CONFIG)
    )(1, to_array_record(initial))
    row = json.loads((tmp_path / "metrics.jsonl").read_text(encoding="utf-8"))
    assert row["aggregated"] is False
    assert row["skip_reason"].startswith("step refused: acceptance loss would rise")
    assert row["accept_loss"] > acceptance.loss(initial) + TOLERANCE


def test_an_honest_secagg_round_is_accepted(setting: tuple) -> None:
    acceptance = check(setting)
    strategy, arrays = secure_round(setting, None, acceptance)
    assert arrays is not None and strategy.report.aggregated
    assert strategy.report.accept_loss == pytest.approx(acceptance.loss(arrays))
    assert strategy.report.accept_loss < acceptance.loss(setting[2])


def plain_round(
    strategy: FedgeAvg, arrays: NamedArrays, updates: list[NamedArrays], server_round: int
) -> NamedArrays | None:
    list(
        strategy.configure_train(
            server_round, to_array_record(arrays), ConfigRecord(), StaticGrid(PLAIN_NODES)
        )
    )
    replies = [
        reply(node, u, 100, answers=(server_round, arrays))
        for node, u in zip(PLAIN_NODES, updates, strict=True)
    ]
    return aggregate(strategy, replies, server_round)


def test_a_refused_step_keeps_the_model_and_the_momentum(setting: tuple) -> None:
    _, _, initial, honest = setting
    strategy = FedgeAvg(server_momentum=0.9, acceptance=check(setting))
    after_one = plain_round(strategy, initial, [honest] * 3, 1)
    assert after_one is not None
    velocity = {n: v.copy() for n, v in (strategy.velocity or {}).items()}
    assert velocity
    flipped = scaled(honest, -10.0)
    assert plain_round(strategy, after_one, [flipped] * 3, 2) is None
    assert "acceptance loss would rise" in (strategy.report.skip_reason or "")
    assert strategy.velocity is not None
    for name, value in velocity.items():
        np.testing.assert_array_equal(strategy.velocity[name], value)


def test_a_refused_dp_round_is_still_in_the_ledger(setting: tuple) -> None:
    """The noise was drawn and the sum seen: ε counts the round, refused or not."""
    _, _, initial, honest = setting
    config = FedgeConfig.from_run_config(
        {"dp-mode": "central", "dp-clipping-norm": CLIP, "dp-noise-multiplier": 0.01}
    )
    flipped = attack_update("sign-flip", initial, honest)
    epsilons = []
    for acceptance in (None, check(setting)):
        privacy = ServerPrivacy(config)
        strategy = FedgeAvg(privacy=privacy, acceptance=acceptance)
        arrays = plain_round(strategy, initial, [flipped] * 3, 1)
        assert (arrays is None) == (acceptance is not None)
        assert strategy.report.epsilon is not None
        epsilons.append(privacy.epsilon())
    assert epsilons[0] == epsilons[1] > 0


def test_the_held_out_split_is_seeded_disjoint_and_complete(setting: tuple) -> None:
    bundle = setting[0]
    held = HeldOut.of(bundle, CONFIG.seed)
    n = len(bundle.y_test)
    assert len(held.y_accept) == min(ACCEPT_MAX, n // 3) and len(held.y_test) == n - n // 3
    rows = {tuple(x.ravel()) for x in bundle.x_test}
    accept = {tuple(x.ravel()) for x in held.x_accept}
    test = {tuple(x.ravel()) for x in held.x_test}
    assert not accept & test and accept | test == rows
    again = HeldOut.of(bundle, CONFIG.seed)
    np.testing.assert_array_equal(again.x_accept, held.x_accept)
    assert not np.array_equal(HeldOut.of(bundle, CONFIG.seed + 1).y_accept, held.y_accept)


def test_a_non_finite_candidate_is_refused(setting: tuple) -> None:
    initial = setting[2]
    broken = {n: np.full_like(v, np.nan) for n, v in initial.items()}
    problem, loss = check(setting).problem(initial, broken)
    assert problem is not None and not np.isfinite(loss)


def test_the_keys_are_validated_and_auto_runs_the_check_without_dp(setting: tuple) -> None:
    bundle, spec, _, _ = setting
    for bad, why in (
        ({"accept-tolerance": 0.0}, "accept-tolerance must be in"),
        ({"accept-tolerance": -0.1}, "accept-tolerance must be in"),
        ({"accept-tolerance": "high"}, "accept-tolerance must be a number"),
        ({"accept-check": "yes"}, "accept-check must be one of"),
    ):
        with pytest.raises(ConfigError, match=why):
            FedgeConfig.from_run_config(bad)
    with pytest.raises(ValueError, match="accept-check='off'"):
        AcceptanceCheck(spec, HeldOut.of(bundle, 0), 0.0)
    expected = {
        (): True,
        (("accept-check", "off"),): False,
        (("dp-mode", "central"),): False,
        (("dp-mode", "central"), ("accept-check", "on")): True,
        (("secagg", True),): True,
        (("secagg", True), ("dp-mode", "distributed")): False,
    }
    for extra, on in expected.items():
        config = FedgeConfig.from_run_config(dict(extra))
        acceptance = build_strategy(config, spec, bundle, ServerPrivacy(config)).acceptance
        assert (acceptance is not None) == on, extra
        assert acceptance is None or acceptance.tolerance == config.accept_tolerance


def test_recorder_reports_accuracy_on_the_test_part_only(setting: tuple, tmp_path: Path) -> None:
    bundle, spec, initial, _ = setting
    recorder = RoundRecorder(
        RunFolder(tmp_path), FedgeAvg(), spec, bundle, 1, {}, privacy=ServerPrivacy(CONFIG)
    )
    held = HeldOut.of(bundle, CONFIG.seed)
    model = build_model(spec)
    load_numpy_state(model, initial)
    assert recorder.test_metrics(initial) == evaluate(model, held.x_test, held.y_test)
