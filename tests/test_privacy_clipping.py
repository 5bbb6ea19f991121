"""Global L2 clipping and adaptive clip norms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from opacus.accountants.analysis import rdp as rdp_analysis

from fedge.privacy.clipping import AdaptiveClipping, clip_update, global_norm


@st.composite
def updates(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """1-4 float32/float64 arrays of random shapes (scalars included)."""
    update = {}
    for i in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, max_side=6))
        elements = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
        update[f"layer{i}.weight"] = draw(hnp.arrays(dtype, shape, elements=elements))
    return update


def _flat_norm(update: dict[str, np.ndarray]) -> float:
    return float(
        np.linalg.norm(np.concatenate([a.ravel().astype(np.float64) for a in update.values()]))
    )


@settings(max_examples=300, deadline=None)
@given(update=updates(), clip_norm=st.floats(1e-3, 1e3))
def test_clip_bounds_norm_and_keeps_direction(
    update: dict[str, np.ndarray], clip_norm: float
) -> None:
    clipped, norm = clip_update(update, clip_norm)

    assert norm == pytest.approx(_flat_norm(update), rel=1e-12, abs=1e-300)
    assert global_norm(clipped) <= clip_norm
    assert {k: (a.shape, a.dtype) for k, a in clipped.items()} == {
        k: (a.shape, a.dtype) for k, a in update.items()
    }
    if norm <= clip_norm:
        for name, array in update.items():
            np.testing.assert_array_equal(clipped[name], array)
    else:
        assert global_norm(clipped) >= clip_norm * (1 - 1e-5)
        for name, array in update.items():
            expected = array.astype(np.float64) * (clip_norm / norm)
            np.testing.assert_allclose(clipped[name], expected, rtol=1e-5, atol=clip_norm * 1e-6)


def test_unclipped_update_is_an_unchanged_copy() -> None:
    update = {"w": np.array([0.3, -0.4], dtype=np.float32), "b": np.array([0.0], np.float32)}
    clipped, norm = clip_update(update, clip_norm=1.0)
    assert norm == pytest.approx(0.5)
    np.testing.assert_array_equal(clipped["w"], update["w"])
    clipped["w"][0] = 99.0
    assert update["w"][0] == np.float32(0.3)


def test_global_norm_does_not_overflow_float32() -> None:
    big = {"w": np.full(4, 1e30, dtype=np.float32)}
    assert global_norm(big) == pytest.approx(2e30, rel=1e-6)
    clipped, _ = clip_update(big, clip_norm=1.0)
    assert global_norm(clipped) <= 1.0


@pytest.mark.parametrize(
    ("update", "clip_norm", "error"),
    [
        ({"w": np.array([np.nan, 1.0])}, 1.0, ValueError),
        ({"w": np.array([np.inf])}, 1.0, ValueError),
        ({"steps": np.array([3, 4])}, 1.0, TypeError),
        ({"w": np.ones(2)}, 0.0, ValueError),
    ],
)
def test_clip_rejects_unboundable_input(
    update: dict[str, np.ndarray], clip_norm: float, error: type[Exception]
) -> None:
    with pytest.raises(error):
        clip_update(update, clip_norm)


@pytest.mark.parametrize(
    ("unclipped", "expected_log_change"),
    [(10, -0.2 * 0.5), (0, 0.2 * 0.5), (5, 0.0)],
)
def test_adaptive_update_is_geometric(unclipped: int, expected_log_change: float) -> None:
    state = AdaptiveClipping(
        clip_norm=2.0, count_stddev=0.0, target_quantile=0.5, learning_rate=0.2
    )
    new = state.update(unclipped, 10, expected_clients=10, rng=np.random.default_rng(0))
    assert math.log(new.clip_norm / 2.0) == pytest.approx(expected_log_change)
    assert new.count_stddev == state.count_stddev


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_adaptive_clip_norm_tracks_target_quantile(quantile: float) -> None:
    rng = np.random.default_rng(42)
    clients = 100
    state = AdaptiveClipping(
        clip_norm=0.05, count_stddev=clients / 20, target_quantile=quantile, learning_rate=0.2
    )
    for _ in range(400):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=clients)
        unclipped = int(np.sum(norms <= state.clip_norm))
        state = state.update(unclipped, clients, expected_clients=clients, rng=rng)
    true_quantile = math.exp(0.5 * float(np.quantile(rng.standard_normal(1_000_000), quantile)))
    assert state.clip_norm == pytest.approx(true_quantile, rel=0.1)


def test_update_noise_multiplier_keeps_the_round_cost() -> None:
    """Sum and count queries together cost exactly the requested multiplier (RDP at q=1)."""
    state = AdaptiveClipping(clip_norm=1.0, count_stddev=5.0)
    target = 1.1
    update_multiplier = state.update_noise_multiplier(target)
    assert update_multiplier > target

    def rdp(multiplier: float) -> np.ndarray:
        return np.asarray(
            rdp_analysis.compute_rdp(
                q=1.0, noise_multiplier=multiplier, steps=1, orders=[2.0, 8.0, 32.0]
            )
        )

    np.testing.assert_allclose(rdp(update_multiplier) + rdp(2 * state.count_stddev), rdp(target))
    with pytest.raises(ValueError, match="count_stddev"):
        AdaptiveClipping(clip_norm=1.0, count_stddev=0.5).update_noise_multiplier(1.0)


def test_adaptive_state_round_trips_through_json() -> None:
    state = AdaptiveClipping(
        clip_norm=0.7, count_stddev=2.5, target_quantile=0.8, learning_rate=0.1
    )
    assert AdaptiveClipping.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_adaptive_rejects_an_impossible_target_quantile() -> None:
    with pytest.raises(ValueError, match="target_quantile"):
        AdaptiveClipping(clip_norm=1.0, count_stddev=1.0, target_quantile=1.5)


@pytest.mark.parametrize(
    ("reported", "clamped"), [(-3, 0), (-1e9, 0), (11, 10), (1e300, 10), (float("-inf"), None)]
)
def test_a_misreported_count_moves_the_clip_norm_at_most_one_step(
    reported: float, clamped: int | None
) -> None:
    """dp-unclipped = -3 from one client used to raise out of the round."""
    state = AdaptiveClipping(clip_norm=1.0, count_stddev=0.0, learning_rate=0.2)
    new = state.update(reported, 10, expected_clients=10, rng=np.random.default_rng(0))
    if clamped is None:  # no information: the clip norm stays
        assert new == state
    else:
        want = state.update(clamped, 10, expected_clients=10, rng=np.random.default_rng(0))
        assert new.clip_norm == want.clip_norm
        assert abs(math.log(new.clip_norm)) <= 0.2 * 0.5 + 1e-12


def test_nan_count_leaves_the_clip_norm() -> None:
    state = AdaptiveClipping(clip_norm=1.0, count_stddev=1.0)
    assert state.update(float("nan"), 10, expected_clients=10) == state


@pytest.mark.parametrize(("clients", "sigma"), [(10, 1.0), (2, 0.5), (40, 3.0), (1000, 1.0)])
def test_default_count_stddev_always_leaves_noise_for_the_update(
    clients: int, sigma: float
) -> None:
    """clients/20 alone fails for 10 clients at σ = 1 (2 * 0.5 is not > 1)."""
    count_stddev = AdaptiveClipping.default_count_stddev(clients, sigma)
    assert count_stddev >= clients / 20
    state = AdaptiveClipping(clip_norm=1.0, count_stddev=count_stddev)
    update_sigma = state.update_noise_multiplier(sigma)
    assert sigma < update_sigma <= sigma * 2 / math.sqrt(3) + 1e-12
