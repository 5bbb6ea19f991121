"""Bounded client influence without SecAgg: the aggregators' math against numpy
references, and one malicious reply among honest ones moving the model at most
the bound (real FedgeAvg, real Flower messages)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from test_strategy import GLOBAL, aggregate, reply, serverapp_identity, start_round

from fedge.config import ConfigError, FedgeConfig
from fedge.privacy.clipping import global_norm
from fedge.records import NamedArrays, to_array_record
from fedge.server_app.aggregation import weighted_mean
from fedge.server_app.privacy import ServerPrivacy
from fedge.server_app.robust import InfluenceBound, coordinate_median, trimmed_mean
from fedge.server_app.strategy import FedgeAvg
from fedge.server_app.validation import DEFAULT_MAX_NUM_EXAMPLES
from fedge.simulation import NodeGrid

pytestmark = pytest.mark.usefixtures("serverapp_identity")
assert serverapp_identity  # the fixture, imported for its side effect

NODES = (11, 22, 33)  # test_strategy's StaticGrid nodes: two honest, one attacker
HONEST_WEIGHTS = (40, 60)
FAST = settings(max_examples=60, deadline=None)


def _stack(n: int, seed: int) -> list[NamedArrays]:
    rng = np.random.default_rng(seed)
    return [{"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)} for _ in range(n)]


def _reference_trimmed(values: np.ndarray, fraction: float) -> np.ndarray:
    """Sort each coordinate, drop floor(fraction·n) at each end, average the rest."""
    cut = math.floor(fraction * len(values))
    ordered = np.sort(values, axis=0)
    return ordered[cut : len(values) - cut].mean(axis=0)


def _reference_median(values: np.ndarray) -> np.ndarray:
    ordered = np.sort(values, axis=0)
    n = len(values)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@FAST
@given(n=st.integers(1, 12), fraction=st.floats(0, 0.49), seed=st.integers(0, 2**32 - 1))
def test_trimmed_mean_matches_a_sorting_reference(n: int, fraction: float, seed: int) -> None:
    updates = _stack(n, seed)
    got = trimmed_mean(updates, fraction)
    for name in ("a", "b"):
        want = _reference_trimmed(np.stack([u[name] for u in updates]), fraction)
        np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=1e-12)


@FAST
@given(n=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_coordinate_median_matches_a_sorting_reference(n: int, seed: int) -> None:
    updates = _stack(n, seed)
    got = coordinate_median(updates)
    for name in ("a", "b"):
        want = _reference_median(np.stack([u[name] for u in updates]))
        np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=1e-12)


def test_robust_aggregators_use_only_the_updates_that_carry_each_array() -> None:
    full = _stack(4, 1)
    head_only = [{"b": np.full(5, 100.0)}]
    for aggregate_fn in (coordinate_median, lambda u: trimmed_mean(u, 0.0)):
        got = aggregate_fn(full + head_only)
        np.testing.assert_array_equal(got["a"], aggregate_fn(full)["a"])
        assert not np.array_equal(got["b"], aggregate_fn(full)["b"])


def _reference_bound(updates: list[NamedArrays], factor: float) -> float:
    """factor × √Σ_name (median_k ‖Δ_k[name]‖)² (every update carries every name)."""
    medians = [np.median([np.linalg.norm(u[name]) for u in updates]) for name in updates[0]]
    return factor * float(np.sqrt(np.sum(np.square(medians))))


def test_updates_within_the_bound_are_untouched_and_the_rest_clipped_to_it() -> None:
    updates = _stack(5, 2)
    updates[0] = {k: v * 1e6 for k, v in updates[0].items()}
    bound = _reference_bound(updates, 2.0)
    bounded = InfluenceBound(norm_factor=2.0).bounded_updates(updates)
    assert bound * (1 - 1e-5) <= global_norm(bounded[0]) <= bound
    for original, kept in zip(updates[1:], bounded[1:], strict=True):
        assert all(np.array_equal(original[k], kept[k]) for k in original)


def test_head_only_updates_are_bounded_by_the_head_medians() -> None:
    """An edge client's head-only update is neither clipped for being small nor
    free to be large: its bound comes from every update's head arrays."""
    full = _stack(4, 3)
    head = {"b": full[0]["b"] * 0.9}
    bound = InfluenceBound()
    assert bound.bounded_updates([*full, head])[-1] is head  # within the bound: untouched
    huge = {"b": full[0]["b"] * 1e6}
    limit = float(max(np.linalg.norm(u["b"]) for u in full))
    assert global_norm(bound.bounded_updates([*full, huge])[-1]) <= limit


def test_weights_are_capped_at_the_factor_times_the_median() -> None:
    assert InfluenceBound(weight_factor=2.0).bounded_weights([10, 20, 30, 1e15]) == [
        10,
        20,
        30,
        50.0,
    ]
    assert InfluenceBound(weight_factor=0.0).bounded_weights([10, 1e15]) == [10, 1e15]


# --- one malicious reply among honest ones, through FedgeAvg.aggregate_train ---------------


def _honest() -> list[NamedArrays]:
    rng = np.random.default_rng(7)
    return [
        {n: rng.normal(scale=0.1, size=v.shape).astype(np.float32) for n, v in GLOBAL.items()}
        for _ in HONEST_WEIGHTS
    ]


def _attack(kind: str, honest: list[NamedArrays]) -> tuple[NamedArrays, float]:
    """The attacker's update and claimed num-examples."""
    own = honest[0]
    if kind == "scale-1e6":
        return {n: v * 1e6 for n, v in own.items()}, 50
    if kind == "entries-1e30":
        return {n: np.full_like(v, 1e30) for n, v in own.items()}, 50
    if kind == "replacement":  # Δ = target − w at the largest weight the gate lets through
        return {
            n: (np.full_like(v, 3.0) - GLOBAL[n]).astype(np.float32) for n, v in own.items()
        }, DEFAULT_MAX_NUM_EXAMPLES
    if kind == "sign-flip-10":
        return {n: -10 * v for n, v in own.items()}, 50
    raise ValueError(kind)


def _honest_bound() -> float:
    """With one attacker among 3 replies each array's median norm is at most the
    larger honest one, so the norm bound is at most √Σ_name max_k ‖h_k[name]‖²."""
    honest = _honest()
    return float(np.sqrt(sum(max(np.linalg.norm(h[n]) ** 2 for h in honest) for n in GLOBAL)))


def _move(strategy: FedgeAvg, kind: str) -> float:
    """‖new global − old global‖ after one round with the attacker among the replies."""
    honest = _honest()
    bad, weight = _attack(kind, honest)
    start_round(strategy)
    replies = [reply(node, u, w) for node, u, w in zip(NODES, honest, HONEST_WEIGHTS, strict=False)]
    new = aggregate(strategy, [*replies, reply(NODES[2], bad, weight)])
    assert new is not None
    return global_norm({n: new[n].astype(np.float64) - GLOBAL[n] for n in GLOBAL})


ATTACKS = ["scale-1e6", "entries-1e30", "replacement", "sign-flip-10"]


@pytest.mark.parametrize("kind", ATTACKS)
def test_one_attacker_moves_the_model_at_most_the_norm_bound(kind: str) -> None:
    """Every update is clipped to the median norm, so the weighted mean moves at
    most that; with the bound off (as before) the same reply moves it further."""
    bound = _honest_bound()
    assert _move(FedgeAvg(influence=InfluenceBound()), kind) <= bound * (1 + 1e-5)
    unbounded = FedgeAvg(influence=InfluenceBound(norm_factor=0.0, weight_factor=0.0))
    assert _move(unbounded, kind) > bound


@pytest.mark.parametrize("kind", ATTACKS)
@pytest.mark.parametrize("aggregator", ["trimmed-mean", "median"])
def test_robust_aggregators_stay_near_the_honest_updates(kind: str, aggregator: str) -> None:
    """Median of three (or trimmed mean cutting one at each end) with one attacker
    lies between the honest values in every coordinate."""
    strategy = FedgeAvg(influence=InfluenceBound(aggregator=aggregator, trim_fraction=0.34))
    honest = _honest()
    start_round(strategy)
    bad, weight = _attack(kind, honest)
    replies = [reply(node, u, w) for node, u, w in zip(NODES, honest, HONEST_WEIGHTS, strict=False)]
    new = aggregate(strategy, [*replies, reply(NODES[2], bad, weight)])
    assert new is not None
    for name in GLOBAL:
        step = new[name].astype(np.float64) - GLOBAL[name]
        low = np.minimum(honest[0][name], honest[1][name]) - 1e-6
        high = np.maximum(honest[0][name], honest[1][name]) + 1e-6
        assert np.all((low <= step) & (step <= high)), name


def test_the_weight_share_of_a_client_at_the_cap_is_bounded() -> None:
    """An update just inside the norm bound with a weight at the public cap counts
    as the median weight: one fifth of this round, not most of it."""
    own = _honest()[0]
    half = {n: v * 0.5 for n, v in own.items()}
    at_bound = {n: -v * 0.999 for n, v in own.items()}  # norms: 1, 1, 1, 0.5, 0.999
    updates = [own, own, own, half, at_bound]
    strategy = FedgeAvg(influence=InfluenceBound())
    strategy.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), NodeGrid(range(1, 6)))
    weights = [50, 50, 50, 50, DEFAULT_MAX_NUM_EXAMPLES]
    new = aggregate(
        strategy,
        [reply(k + 1, u, w) for k, (u, w) in enumerate(zip(updates, weights, strict=True))],
    )
    assert new is not None
    want = weighted_mean(updates, [50] * 5)  # median(50, ..., cap) = 50
    for name in GLOBAL:
        np.testing.assert_allclose(new[name] - GLOBAL[name], want[name], atol=1e-6)
    unbounded = weighted_mean(updates, weights)
    assert not np.allclose(unbounded["head.bias"], want["head.bias"], atol=1e-3)


def test_robust_aggregators_are_refused_where_updates_are_hidden_or_private() -> None:
    FedgeConfig.from_run_config({"aggregator": "median"})
    for extra in ({"secagg": True}, {"dp-mode": "central"}):
        with pytest.raises(ConfigError, match="aggregator='median' needs each client's update"):
            FedgeConfig.from_run_config({"aggregator": "median", **extra})


def test_the_server_app_bounds_influence_by_default() -> None:
    from fedge.server_app.app import build_strategy
    from fedge.server_app.privacy import ServerPrivacy
    from fedge.task import dataset_for, model_spec_for

    # the acceptance check scores real models; this test moves a toy model's arrays
    config = FedgeConfig.from_run_config({"accept-check": "off"})
    bundle = dataset_for(config)
    spec = model_spec_for(config, bundle)
    strategy = build_strategy(config, spec, bundle, ServerPrivacy(config))
    assert strategy.influence == InfluenceBound(norm_factor=1.0, weight_factor=1.0)
    assert _move(strategy, "scale-1e6") <= _honest_bound() * (1 + 1e-5)


def test_under_dp_an_update_above_the_clip_norm_is_rejected_and_one_at_it_is_not() -> None:
    """DP's sensitivity is the clip norm C: the server refuses any update longer than C
    (whatever the client's reason), and accepts one exactly at C."""
    config = FedgeConfig.from_run_config({"dp-mode": "central", "dp-clipping-norm": 1.0})
    strategy = FedgeAvg(privacy=ServerPrivacy(config), min_train_nodes=1)
    start_round(strategy)
    honest = _honest()
    at_clip = {n: v / global_norm(honest[0]) for n, v in honest[0].items()}
    over = {n: 1.01 * v for n, v in at_clip.items()}
    new = aggregate(strategy, [reply(NODES[0], at_clip), reply(NODES[2], over)], server_round=1)
    assert strategy.report.num_replies == 1
    assert "exceeds the clip norm" in strategy.report.rejected[NODES[2]]
    assert new is not None
