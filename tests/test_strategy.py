"""FedgeAvg on real Flower messages: weighted update averaging, momentum, partial
updates, and every kind of bad reply being dropped."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import (
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity
from grids import instruction

from fedge.client_app.protocol import (
    CARRIES_PARTIAL,
    CARRIES_UPDATE,
    REPLY_KEY,
    UPDATE_INFO_KEY,
    update_tag,
)
from fedge.records import NamedArrays, from_array_record, to_array_record
from fedge.server_app.aggregation import apply_update, weighted_mean
from fedge.server_app.strategy import FedgeAvg
from fedge.server_app.validation import rejection_reason
from fedge.simulation import NodeGrid

NODES = (11, 22, 33)


def _global_arrays() -> NamedArrays:
    rng = np.random.default_rng(0)
    return {
        "features.0.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "features.0.bias": rng.normal(size=4).astype(np.float32),
        "head.weight": rng.normal(size=(2, 4)).astype(np.float32),
        "head.bias": rng.normal(size=2).astype(np.float32),
    }


GLOBAL = _global_arrays()
HEAD = ("head.weight", "head.bias")


def fake_backbone(arrays: NamedArrays) -> bytes:
    """Stands in for the ONNX export: a run with edge clients broadcasts some backbone."""
    return b"backbone"


def delta(seed: int, names: Iterable[str] = GLOBAL) -> NamedArrays:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(scale=0.1, size=GLOBAL[n].shape).astype(np.float32) for n in names}


# --- real Flower messages, no grid needed -----------------------------------------------


def reply(
    node_id: int,
    arrays: NamedArrays,
    num_examples: object = 10,
    *,
    loss: float = 1.0,
    partial: bool = False,
    metrics: dict[str, object] | None = None,
    array_key: str = "arrays",
    metric_key: str = "metrics",
    answers: tuple[int, NamedArrays] | None = None,
) -> Message:
    """A fedge ClientApp's reply (`reply_to=`), tagged as answering `answers`
    (round, global model; default round 1's GLOBAL)."""
    if metrics is None:
        metrics = {"train-loss": loss, "num-examples": num_examples}
    content = RecordDict(
        {array_key: to_array_record(arrays), metric_key: MetricRecord(metrics)}  # type: ignore[arg-type]
    )
    server_round, model = answers or (1, GLOBAL)
    content[UPDATE_INFO_KEY] = update_tag(
        {"server-round": server_round}, model, CARRIES_PARTIAL if partial else CARRIES_UPDATE
    )
    return Message(content, reply_to=instruction(node_id))


def error_reply(node_id: int) -> Message:
    return Message(
        Error(code=0, reason="ClientApp raised ValueError"), reply_to=instruction(node_id)
    )


StaticGrid = NodeGrid


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages carry the sending task's identity (set by Flower at runtime)."""
    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def start_round(
    strategy: FedgeAvg, arrays: NamedArrays = GLOBAL, server_round: int = 1
) -> list[Message]:
    return list(
        strategy.configure_train(
            server_round, to_array_record(arrays), ConfigRecord(), StaticGrid(NODES)
        )
    )


def aggregate(
    strategy: FedgeAvg, replies: list[Message], server_round: int = 1
) -> NamedArrays | None:
    record, metrics = strategy.aggregate_train(server_round, replies)
    assert (record is None) == (metrics is None)
    return None if record is None else from_array_record(record)


def by_hand(
    base: NamedArrays, updates: list[NamedArrays], weights: list[float], eta: float = 1.0
) -> NamedArrays:
    """w + η·Σ(n_k/n)Δ_k per array, n summing only the replies that carry that array."""
    out = {}
    for name, value in base.items():
        carriers = [(u[name], w) for u, w in zip(updates, weights, strict=True) if name in u]
        if not carriers:
            out[name] = value
            continue
        n = sum(w for _, w in carriers)
        mean = sum(w / n * u.astype(np.float64) for u, w in carriers)
        out[name] = (value + eta * mean).astype(value.dtype)
    return out


def assert_arrays_close(actual: NamedArrays | None, expected: NamedArrays) -> None:
    assert actual is not None
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        np.testing.assert_allclose(actual[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


# --- the round protocol -----------------------------------------------------------------


def test_configure_train_asks_every_node_for_an_update_at_the_absolute_round() -> None:
    strategy = FedgeAvg(rounds_done=4)
    messages = start_round(strategy, server_round=2)
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(NODES)
    for message in messages:
        assert message.metadata.message_type == MessageType.TRAIN
        config = message.content.config_records["config"]
        assert config[REPLY_KEY] == "update"
        assert config["server-round"] == 6
        sent = from_array_record(message.content.array_records["arrays"])
        assert all(np.array_equal(sent[k], GLOBAL[k]) for k in GLOBAL)


def test_reply_built_with_reply_to_comes_from_the_instructed_node() -> None:
    message = reply(22, delta(1))
    assert message.metadata.src_node_id == 22
    assert rejection_reason(message, GLOBAL, server_round=1) is None


@pytest.mark.parametrize("eta", [1.0, 0.5, 2.0])
def test_aggregate_is_global_plus_eta_times_example_weighted_mean_update(eta: float) -> None:
    strategy = FedgeAvg(server_lr=eta, min_train_nodes=2)
    start_round(strategy)
    updates, weights, losses = [delta(1), delta(2), delta(3)], [10, 30, 60], [2.0, 1.0, 0.5]
    replies = [
        reply(node, u, n, loss=loss)
        for node, u, n, loss in zip(NODES, updates, weights, losses, strict=True)
    ]
    record, metrics = strategy.aggregate_train(1, replies)
    assert record is not None and metrics is not None
    expected = {
        name: (
            GLOBAL[name].astype(np.float64)
            + eta * (10 * updates[0][name] + 30 * updates[1][name] + 60 * updates[2][name]) / 100
        ).astype(np.float32)
        for name in GLOBAL
    }
    assert_arrays_close(from_array_record(record), expected)
    assert metrics["train-loss"] == pytest.approx((10 * 2.0 + 30 * 1.0 + 60 * 0.5) / 100)
    assert "num-examples" not in metrics
    report = strategy.report
    assert (report.num_replies, report.num_rejected, report.aggregated) == (3, 0, True)
    assert report.train_loss == pytest.approx(0.8)


def test_equal_weights_give_the_plain_mean_and_unequal_weights_do_not() -> None:
    strategy = FedgeAvg(min_train_nodes=2)
    start_round(strategy)
    a, b = delta(1), delta(2)
    equal = aggregate(strategy, [reply(11, a, 5), reply(22, b, 5)])
    assert_arrays_close(equal, {k: GLOBAL[k] + (a[k] + b[k]) / 2 for k in GLOBAL})
    start_round(strategy)
    skewed = aggregate(strategy, [reply(11, a, 1), reply(22, b, 9)])
    assert skewed is not None and equal is not None
    assert not np.allclose(skewed["head.weight"], equal["head.weight"])
    assert_arrays_close(skewed, by_hand(GLOBAL, [a, b], [1, 9]))


def test_server_momentum_accumulates_the_mean_update_across_rounds() -> None:
    eta, beta = 0.8, 0.9
    strategy = FedgeAvg(server_lr=eta, server_momentum=beta, min_train_nodes=2)

    start_round(strategy, GLOBAL, 1)
    first = [delta(1), delta(2)]
    w1 = aggregate(strategy, [reply(11, first[0], 20), reply(22, first[1], 60)], 1)
    v1 = {k: (20 * first[0][k] + 60 * first[1][k]) / 80 for k in GLOBAL}
    assert_arrays_close(w1, {k: GLOBAL[k] + eta * v1[k] for k in GLOBAL})
    assert w1 is not None

    start_round(strategy, w1, 2)
    second = [delta(3), delta(4)]
    round_two = (2, w1)
    w2 = aggregate(
        strategy,
        [reply(11, second[0], 50, answers=round_two), reply(22, second[1], 50, answers=round_two)],
        2,
    )
    v2 = {k: beta * v1[k] + (second[0][k] + second[1][k]) / 2 for k in GLOBAL}
    assert_arrays_close(w2, {k: w1[k] + eta * v2[k] for k in GLOBAL})
    assert strategy.velocity is not None
    for k in GLOBAL:
        np.testing.assert_allclose(strategy.velocity[k], v2[k], rtol=1e-6, atol=1e-7)


def test_without_momentum_no_velocity_is_kept() -> None:
    strategy = FedgeAvg(min_train_nodes=1)
    start_round(strategy)
    aggregate(strategy, [reply(11, delta(1))])
    assert strategy.velocity is None


def test_partial_updates_average_only_with_replies_carrying_those_arrays() -> None:
    strategy = FedgeAvg(server_lr=1.0, min_train_nodes=3, edge_backbone=fake_backbone)
    start_round(strategy)
    full_a, full_b = delta(1), delta(2)
    head_only = delta(3, HEAD)
    replies = [
        reply(11, full_a, 10),
        reply(22, full_b, 30),
        reply(33, head_only, 60, partial=True),
    ]
    result = aggregate(strategy, replies)
    expected = {}
    for name in GLOBAL:
        if name in HEAD:
            mean = (10 * full_a[name] + 30 * full_b[name] + 60 * head_only[name]) / 100
        else:  # only the two full replies carry the feature extractor
            mean = (10 * full_a[name] + 30 * full_b[name]) / 40
        expected[name] = (GLOBAL[name].astype(np.float64) + mean).astype(np.float32)
    assert_arrays_close(result, expected)
    assert strategy.report.num_replies == 3


def test_arrays_no_reply_carries_stay_exactly_as_they_were() -> None:
    strategy = FedgeAvg(min_train_nodes=2, edge_backbone=fake_backbone)
    start_round(strategy)
    replies = [
        reply(11, delta(1, HEAD), 5, partial=True),
        reply(22, delta(2, HEAD), 5, partial=True),
    ]
    result = aggregate(strategy, replies)
    assert result is not None
    for name in ("features.0.weight", "features.0.bias"):
        np.testing.assert_array_equal(result[name], GLOBAL[name])
    assert not np.array_equal(result["head.bias"], GLOBAL["head.bias"])


def test_reply_records_under_other_names_do_not_crash_the_round() -> None:
    # Flower's own FedAvg takes a reply's single ArrayRecord/MetricRecord whatever its
    # name, and fedge's validation accepts it too; aggregation must then use it.
    strategy = FedgeAvg(min_train_nodes=2)
    start_round(strategy)
    a, b, c = delta(1), delta(2), delta(3)
    odd = reply(33, c, 20, array_key="weights", metric_key="stats")
    replies = [reply(11, a, 10), reply(22, b, 10), odd]
    result = aggregate(strategy, replies)
    assert strategy.report.num_replies + strategy.report.num_rejected == 3
    if strategy.report.num_replies == 3:
        assert_arrays_close(result, by_hand(GLOBAL, [a, b, c], [10, 10, 20]))
    else:
        assert_arrays_close(result, by_hand(GLOBAL, [a, b], [10, 10]))


# --- bad replies ------------------------------------------------------------------------


def _with(name: str, value: np.ndarray, base: NamedArrays | None = None) -> NamedArrays:
    arrays = dict(delta(9) if base is None else base)
    arrays[name] = value
    return arrays


def _without(name: str) -> NamedArrays:
    return {k: v for k, v in delta(9).items() if k != name}


def _poisoned(name: str, index: tuple[int, ...], value: float) -> NamedArrays:
    arrays = delta(9)
    arrays[name] = arrays[name].copy()
    arrays[name][index] = value
    return arrays


def _two_array_records(node: int) -> Message:
    message = reply(node, delta(9))
    message.content["more"] = to_array_record(delta(8))
    return message


BAD_REPLIES: dict[str, tuple[Callable[[int], Message], str]] = {
    "nan": (lambda n: reply(n, _poisoned("head.weight", (0, 1), np.nan)), "NaN or Inf"),
    "inf": (lambda n: reply(n, _poisoned("features.0.bias", (2,), np.inf)), "NaN or Inf"),
    "-inf": (lambda n: reply(n, _poisoned("head.bias", (0,), -np.inf)), "NaN or Inf"),
    "wrong shape": (
        lambda n: reply(n, _with("head.bias", np.zeros(3, np.float32))),
        "shape",
    ),
    "transposed": (
        lambda n: reply(n, _with("head.weight", np.zeros((4, 2), np.float32))),
        "shape",
    ),
    "wrong dtype": (
        lambda n: reply(n, _with("head.weight", np.zeros((2, 4), np.float64))),
        "dtype",
    ),
    "integer dtype": (
        lambda n: reply(n, _with("head.bias", np.zeros(2, np.int32))),
        "dtype",
    ),
    "missing key": (lambda n: reply(n, _without("features.0.bias")), "missing arrays"),
    "unknown key": (
        lambda n: reply(n, _with("head.extra", np.zeros(2, np.float32))),
        "unknown arrays",
    ),
    "partial with unknown key": (
        lambda n: reply(n, {**delta(9, HEAD), "backbone.x": np.zeros(2, np.float32)}, partial=True),
        "unknown arrays",
    ),
    "partial with no arrays": (lambda n: reply(n, {}, partial=True), "no arrays"),
    "missing num-examples": (
        lambda n: reply(n, delta(9), metrics={"train-loss": 1.0}),
        "num-examples",
    ),
    "zero num-examples": (lambda n: reply(n, delta(9), 0), "num-examples"),
    "negative num-examples": (lambda n: reply(n, delta(9), -5), "num-examples"),
    "nan num-examples": (lambda n: reply(n, delta(9), float("nan")), "num-examples"),
    "list num-examples": (lambda n: reply(n, delta(9), [3, 4]), "num-examples"),
    "two array records": (_two_array_records, "ArrayRecord"),
    "error reply": (error_reply, "client error"),
}


@pytest.mark.parametrize("kind", sorted(BAD_REPLIES))
def test_bad_reply_is_rejected_and_the_rest_aggregate_without_it(kind: str) -> None:
    make_bad, reason = BAD_REPLIES[kind]
    bad = make_bad(33)
    assert reason in (rejection_reason(bad, GLOBAL, server_round=1) or "")

    strategy = FedgeAvg(min_train_nodes=2)
    start_round(strategy)
    a, b = delta(1), delta(2)
    result = aggregate(strategy, [reply(11, a, 10), bad, reply(22, b, 30)])
    assert_arrays_close(result, by_hand(GLOBAL, [a, b], [10, 30]))
    report = strategy.report
    assert (report.num_replies, report.num_rejected) == (2, 1)
    assert list(report.rejected) == [33] and reason in report.rejected[33]


@pytest.mark.parametrize("kind", sorted(BAD_REPLIES))
def test_bad_reply_leaves_the_model_unchanged_below_min_train_nodes(kind: str) -> None:
    make_bad, _ = BAD_REPLIES[kind]
    strategy = FedgeAvg(min_train_nodes=3, server_momentum=0.5)
    strategy.velocity = {k: np.ones_like(v) for k, v in GLOBAL.items()}
    start_round(strategy)
    replies = [reply(11, delta(1), 10), make_bad(33), reply(22, delta(2), 30)]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert strategy.report.aggregated is False
    assert strategy.report.num_rejected == 1
    assert all(np.array_equal(v, np.ones_like(v)) for v in strategy.velocity.values())
    assert all(np.array_equal(strategy.current_arrays[k], GLOBAL[k]) for k in GLOBAL)


def test_no_valid_reply_aggregates_nothing_even_with_min_train_nodes_one() -> None:
    strategy = FedgeAvg(min_train_nodes=1)
    start_round(strategy)
    replies = [error_reply(11), reply(22, _poisoned("head.bias", (0,), np.nan))]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert strategy.aggregate_train(1, []) == (None, None)


def test_each_round_starts_a_fresh_report() -> None:
    strategy = FedgeAvg(min_train_nodes=1)
    start_round(strategy)
    aggregate(strategy, [reply(11, delta(1)), error_reply(22)])
    assert strategy.report.num_rejected == 1
    start_round(strategy)
    assert (strategy.report.num_rejected, strategy.report.aggregated) == (0, False)


# --- federated evaluation ---------------------------------------------------------------


def _eval_reply(node: int, metrics: dict[str, object]) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
    return Message(content, reply_to=instruction(node, MessageType.EVALUATE))


def test_federated_evaluation_is_weighted_and_recorded() -> None:
    strategy = FedgeAvg(min_evaluate_nodes=2)
    replies = [
        _eval_reply(11, {"val-accuracy": 0.5, "val-loss": 1.0, "num-examples": 10}),
        _eval_reply(22, {"val-accuracy": 1.0, "val-loss": 0.2, "num-examples": 30}),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None
    assert strategy.report.val_metrics["val-accuracy"] == pytest.approx(0.875)
    assert strategy.report.val_metrics["val-loss"] == pytest.approx(0.4)


def test_inconsistent_evaluation_replies_are_skipped_not_fatal() -> None:
    strategy = FedgeAvg()
    replies = [
        _eval_reply(11, {"val-accuracy": 0.5, "num-examples": 10}),
        _eval_reply(22, {"val-accuracy": 1.0}),
    ]
    assert strategy.aggregate_evaluate(1, replies) is None
    zero = [_eval_reply(n, {"val-accuracy": 0.5, "num-examples": 0}) for n in (11, 22)]
    assert strategy.aggregate_evaluate(1, zero) is None
    assert strategy.report.val_metrics == {}


BAD_EVALUATIONS = {
    "nan loss": {"val-loss": float("nan"), "val-accuracy": 0.5, "num-examples": 10},
    "accuracy above 1": {"val-loss": 0.1, "val-accuracy": 2.0, "num-examples": 10},
    "negative loss": {"val-loss": -1.0, "val-accuracy": 0.5, "num-examples": 10},
    "float weight": {"val-loss": 0.1, "val-accuracy": 0.5, "num-examples": 1e308},
    "negative weight": {"val-loss": 0.1, "val-accuracy": 0.5, "num-examples": -3},
    "list accuracy": {"val-loss": 0.1, "val-accuracy": [0.5, 0.6], "num-examples": 10},
}


@pytest.mark.parametrize("kind", sorted(BAD_EVALUATIONS))
def test_a_bad_evaluate_reply_is_dropped_and_the_rest_still_count(kind: str) -> None:
    strategy = FedgeAvg(max_num_examples=100)
    good = {"val-loss": 0.5, "val-accuracy": 0.8, "num-examples": 20}
    replies = [_eval_reply(11, good), _eval_reply(22, BAD_EVALUATIONS[kind])]
    strategy.aggregate_evaluate(1, replies)
    assert strategy.report.val_metrics == {"val-loss": 0.5, "val-accuracy": 0.8}


def test_evaluate_replies_keep_only_known_keys_and_capped_weights() -> None:
    strategy = FedgeAvg(max_num_examples=100)
    injected = {"val-loss": 1.0, "val-accuracy": 0.0, "num-examples": 10**9, "val_a|b<script>": 1}
    honest = {"val-loss": 0.0, "val-accuracy": 1.0, "num-examples": 100}
    strategy.aggregate_evaluate(1, [_eval_reply(11, injected), _eval_reply(22, honest)])
    # 10**9 counts as the cap (100): the two replies weigh the same
    assert strategy.report.val_metrics == {"val-loss": 0.5, "val-accuracy": 0.5}
    twice = [_eval_reply(11, honest), _eval_reply(11, honest), _eval_reply(22, injected)]
    strategy.aggregate_evaluate(2, twice)  # both of node 11's replies are dropped
    assert strategy.report.val_metrics["val-accuracy"] == 0.0


# --- aggregation helpers ----------------------------------------------------------------


def test_weighted_mean_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        weighted_mean([], [])
    with pytest.raises(ValueError):
        weighted_mean([delta(1)], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        weighted_mean([delta(1), delta(2)], [1.0, 0.0])


def test_weighted_mean_is_invariant_to_weight_scale_and_order() -> None:
    updates = [delta(1), delta(2), delta(3)]
    base = weighted_mean(updates, [1.0, 2.0, 3.0])
    scaled = weighted_mean(updates[::-1], [300.0, 200.0, 100.0])
    for name in GLOBAL:
        np.testing.assert_allclose(base[name], scaled[name], rtol=1e-12)


def test_apply_update_keeps_dtypes_and_untouched_arrays() -> None:
    mixed = {"a": np.ones(3, np.float32), "b": np.full(2, 2.0, np.float64)}
    updated, velocity = apply_update(mixed, {"a": np.full(3, 0.5)}, 2.0, 0.0, None)
    assert velocity is None
    assert updated["a"].dtype == np.float32 and np.allclose(updated["a"], 2.0)
    assert updated["b"] is mixed["b"]
