"""The numpy head learner: correct gradients, lower loss, torch-compatible weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.edge.head import HEAD_BIAS, HEAD_WEIGHT, HeadLearner


def _blobs(n: int = 300, classes: int = 3, dim: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(classes, dim))
    labels = rng.integers(0, classes, size=n)
    return (centers[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def _learner(classes: int = 3, dim: int = 5, seed: int = 1) -> HeadLearner:
    rng = np.random.default_rng(seed)
    return HeadLearner(rng.normal(scale=0.1, size=(classes, dim)), np.zeros(classes))


def test_training_lowers_loss_and_reports_it() -> None:
    features, labels = _blobs()
    learner = _learner()
    result = learner.train(features, labels, epochs=5, lr=0.1, batch_size=32)
    assert result["loss_after"] < 0.5 * result["loss_before"]
    assert result["accuracy_after"] >= 0.95
    assert result["loss_after"] == pytest.approx(learner.loss(features, labels))
    assert result["steps"] == 5 * 10 and result["num_examples"] == 300


@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_sgd_step_follows_the_numerical_gradient(l2: float) -> None:
    features, labels = _blobs(n=40)
    learner = _learner()
    start = learner.weights()
    eps, lr = 1e-5, 1e-3
    numeric = {}
    for name, value in start.items():
        grad = np.zeros(value.shape)
        for index in np.ndindex(value.shape):
            shifted = {k: v.astype(np.float64) for k, v in start.items()}
            shifted[name][index] += eps
            plus = HeadLearner(shifted[HEAD_WEIGHT], shifted[HEAD_BIAS]).loss(features, labels, l2)
            shifted[name][index] -= 2 * eps
            minus = HeadLearner(shifted[HEAD_WEIGHT], shifted[HEAD_BIAS]).loss(features, labels, l2)
            grad[index] = (plus - minus) / (2 * eps)
        numeric[name] = grad
    # One full-batch step moves each parameter by -lr * gradient.
    learner.train(features, labels, epochs=1, lr=lr, batch_size=len(labels), l2=l2)
    for name, value in learner.weights().items():
        step = (start[name].astype(np.float64) - value) / lr
        np.testing.assert_allclose(step, numeric[name], rtol=1e-2, atol=1e-3)


def test_training_is_reproducible_per_seed() -> None:
    features, labels = _blobs()
    runs = [_learner() for _ in range(3)]
    for learner, seed in zip(runs, (7, 7, 8), strict=True):
        learner.train(features, labels, epochs=1, batch_size=16, seed=seed)
    w = [learner.weights()[HEAD_WEIGHT] for learner in runs]
    np.testing.assert_array_equal(w[0], w[1])
    assert not np.array_equal(w[0], w[2])


def test_weights_are_float32_and_round_trip_through_npz(tmp_path: Path) -> None:
    learner = _learner(classes=4, dim=6)
    learner.save(tmp_path / "head.npz")
    loaded = HeadLearner.load(tmp_path / "head.npz").weights()
    assert {k: (v.shape, v.dtype) for k, v in loaded.items()} == {
        HEAD_WEIGHT: ((4, 6), np.float32),
        HEAD_BIAS: ((4,), np.float32),
    }
    for name, value in learner.weights().items():
        np.testing.assert_array_equal(loaded[name], value)


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.zeros((4, 3), np.float32), np.zeros(4, np.int64), r"shape \(N, 5\).*extract_features"),
        (np.zeros((4, 5), np.float32), np.zeros(3, np.int64), "expected 4 integer labels"),
        (np.zeros((4, 5), np.float32), np.zeros(4, np.float32), "expected 4 integer labels"),
        (np.zeros((4, 5), np.float32), np.array([0, 1, 2, 3]), r"labels must lie in \[0, 3\)"),
    ],
)
def test_bad_training_data_is_rejected(
    features: np.ndarray, labels: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _learner().train(features, labels)


def test_bad_weights_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must be \(num_classes, feat_dim\)"):
        HeadLearner(np.zeros((3, 5)), np.zeros(5))
    np.savez(tmp_path / "other.npz", W=np.zeros((3, 5)), b=np.zeros(3))
    with pytest.raises(ValueError, match=r"lack \['head.bias', 'head.weight'\]"):
        HeadLearner.load(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="fedge export"):
        HeadLearner.load(tmp_path / "missing.npz")
