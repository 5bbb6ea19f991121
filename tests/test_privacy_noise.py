"""Calibration of central and distributed Gaussian noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedge.privacy.noise import (
    add_central_noise,
    add_distributed_noise,
    distributed_noise_stddev,
    realized_noise_multiplier,
)


def _assert_gaussian_with_std(samples: np.ndarray, std: float) -> None:
    """Mean ~ 0 and sample variance inside the 99.9% chi-square interval for `std`."""
    samples = samples.astype(np.float64).ravel()
    n = samples.size
    assert abs(samples.mean()) < 4 * std / math.sqrt(n)
    statistic = (n - 1) * samples.var(ddof=1) / std**2
    low, high = stats.chi2.ppf([0.0005, 0.9995], df=n - 1)
    assert low < statistic < high, f"sample std {samples.std():.5f}, expected {std:.5f}"


def test_central_noise_on_zero_update_has_calibrated_std() -> None:
    zeros = {"conv.weight": np.zeros((100, 10, 10), np.float32), "bias": np.zeros(20_000)}
    noised = add_central_noise(
        zeros, noise_multiplier=1.3, clip_norm=0.7, rng=np.random.default_rng(7)
    )
    assert {k: (a.shape, a.dtype) for k, a in noised.items()} == {
        k: (a.shape, a.dtype) for k, a in zeros.items()
    }
    assert not zeros["bias"].any()
    _assert_gaussian_with_std(np.concatenate([a.ravel() for a in noised.values()]), 1.3 * 0.7)


def test_central_noise_is_unpredictable_by_default() -> None:
    zeros = {"w": np.zeros(8)}
    first = add_central_noise(zeros, noise_multiplier=1.0, clip_norm=1.0)
    second = add_central_noise(zeros, noise_multiplier=1.0, clip_norm=1.0)
    assert not np.array_equal(first["w"], second["w"])


@pytest.mark.parametrize("survivors", [15, 18, 20])
def test_distributed_noise_of_survivors_matches_realized_multiplier(survivors: int) -> None:
    """20 clients expected, noise provisioned for 15; any 15..20 of them may survive."""
    sigma, clip, min_clients = 1.2, 0.5, 15
    rng = np.random.default_rng(survivors)
    zeros = {"w": np.zeros(20_000, np.float32)}
    total = sum(
        add_distributed_noise(
            zeros, noise_multiplier=sigma, clip_norm=clip, min_clients=min_clients, rng=rng
        )["w"].astype(np.float64)
        for _ in range(survivors)
    )
    realized = realized_noise_multiplier(
        noise_multiplier=sigma, min_clients=min_clients, num_contributors=survivors
    )
    _assert_gaussian_with_std(total, realized * clip)
    assert realized >= sigma


def test_realized_multiplier_reports_shortfall_and_overprovisioning() -> None:
    assert (
        realized_noise_multiplier(noise_multiplier=1.0, min_clients=10, num_contributors=10) == 1.0
    )
    assert realized_noise_multiplier(
        noise_multiplier=1.0, min_clients=10, num_contributors=5
    ) == pytest.approx(math.sqrt(0.5))
    # Everyone of 40 expected survives with m_min = 10: std is sqrt(4) = 2x the target.
    assert realized_noise_multiplier(
        noise_multiplier=1.0, min_clients=10, num_contributors=40
    ) == pytest.approx(2.0)
    assert distributed_noise_stddev(
        noise_multiplier=2.0, clip_norm=0.5, min_clients=4
    ) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": -1.0, "clip_norm": 1.0},
        {"noise_multiplier": 1.0, "clip_norm": 0.0},
    ],
)
def test_noise_rejects_bad_scale(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"noise_multiplier|clip_norm"):
        add_central_noise({"w": np.zeros(2)}, **kwargs)


def test_noise_rejects_integer_arrays_and_empty_rounds() -> None:
    with pytest.raises(TypeError):
        add_central_noise({"w": np.zeros(2, np.int64)}, noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(ValueError, match="num_contributors"):
        realized_noise_multiplier(noise_multiplier=1.0, min_clients=5, num_contributors=0)
