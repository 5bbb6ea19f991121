"""On-device learning of the classifier head: softmax regression in numpy on backbone features.

The frozen int8 backbone turns inputs into features once; only the last linear layer is
trained, which needs no autograd and fits devices without torch. Parameters keep the torch
model's names and shapes (`head.weight` (num_classes, feat_dim), `head.bias`
(num_classes,)) so the server can average edge head updates with full-model updates by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from fedge.edge.runtime import run_batched, softmax

HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"


class FeatureExtractor(Protocol):
    """Anything mapping a batch of inputs to a batch of feature vectors (e.g. EdgeModel)."""

    def forward(self, x: np.ndarray) -> np.ndarray: ...


def extract_features(
    backbone: FeatureExtractor, x: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Features for all of `x`, computed once so the head can train many epochs on them."""
    return run_batched(backbone.forward, x, batch_size).astype(np.float32, copy=False)


class HeadLearner:
    """A linear classifier trained with mini-batch SGD on cross-entropy (optional L2).

    Math runs in float64 for stable small updates; `weights()` hands back float32, the
    wire format of the rest of fedge.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        weight = np.array(weight, dtype=np.float64)
        bias = np.array(bias, dtype=np.float64)
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{HEAD_WEIGHT} must be (num_classes, feat_dim) and {HEAD_BIAS} (num_classes,), "
                f"got {weight.shape} and {bias.shape}"
            )
        self._weight = weight
        self._bias = bias

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> HeadLearner:
        missing = {HEAD_WEIGHT, HEAD_BIAS} - set(arrays)
        if missing:
            raise ValueError(
                f"head arrays lack {sorted(missing)} (have {sorted(arrays)}); "
                "use the head.npz written by `fedge export`"
            )
        return cls(arrays[HEAD_WEIGHT], arrays[HEAD_BIAS])

    @classmethod
    def load(cls, path: Path | str) -> HeadLearner:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no head weights at {path}; `fedge export` writes head.npz")
        with np.load(path, allow_pickle=False) as arrays:
            return cls.from_arrays(dict(arrays))

    def save(self, path: Path | str) -> None:
        np.savez(Path(path), **self.weights())

    @property
    def num_classes(self) -> int:
        return self._weight.shape[0]

    @property
    def feat_dim(self) -> int:
        return self._weight.shape[1]

    def weights(self) -> dict[str, np.ndarray]:
        """float32 copies named as in the torch model's state dict."""
        return {
            HEAD_WEIGHT: self._weight.astype(np.float32),
            HEAD_BIAS: self._bias.astype(np.float32),
        }

    def _check(self, features: np.ndarray, labels: np.ndarray | None = None) -> None:
        if features.ndim != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(
                f"expected features of shape (N, {self.feat_dim}), got {features.shape}: "
                "run inputs through the backbone with extract_features first"
            )
        if labels is None:
            return
        if labels.shape != (len(features),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"expected {len(features)} integer labels, got {labels.dtype} of shape "
                f"{labels.shape}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got [{labels.min()}, {labels.max()}]"
            )

    def logits(self, features: np.ndarray) -> np.ndarray:
        self._check(features)
        return features @ self._weight.T + self._bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.logits(features).argmax(axis=1)

    def loss(self, features: np.ndarray, labels: np.ndarray, l2: float = 0.0) -> float:
        """Mean cross-entropy plus `l2 / 2 * ||W||^2`, the objective `train` minimizes."""
        self._check(features, labels)
        logits = self.logits(features)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        ce = -log_probs[np.arange(len(labels)), labels].mean()
        return float(ce + 0.5 * l2 * np.sum(self._weight**2))

    def _accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        return float((self.predict(features) == labels).mean())

    def train(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        epochs: int = 5,
        lr: float = 0.1,
        batch_size: int = 32,
        seed: int = 0,
        l2: float = 0.0,
    ) -> dict[str, float | int]:
        """Shuffled mini-batch SGD in place; returns loss/accuracy before and after."""
        if epochs < 0 or batch_size < 1 or lr <= 0 or l2 < 0:
            raise ValueError(
                f"need epochs >= 0, batch_size >= 1, lr > 0, l2 >= 0; got {epochs}, "
                f"{batch_size}, {lr}, {l2}"
            )
        self._check(features, labels)
        if len(labels) == 0:
            raise ValueError("no examples to train the head on")
        features = features.astype(np.float64, copy=False)
        before = self.loss(features, labels, l2), self._accuracy(features, labels)
        rng = np.random.default_rng(seed)
        steps = 0
        for _ in range(epochs):
            order = rng.permutation(len(labels))
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                x, y = features[batch], labels[batch]
                # d(mean CE)/d(logits) = softmax - one_hot, averaged over the batch.
                grad = softmax(x @ self._weight.T + self._bias)
                grad[np.arange(len(y)), y] -= 1.0
                grad /= len(y)
                self._weight -= lr * (grad.T @ x + l2 * self._weight)
                self._bias -= lr * grad.sum(axis=0)
                steps += 1
        return {
            "loss_before": before[0],
            "loss_after": self.loss(features, labels, l2),
            "accuracy_before": before[1],
            "accuracy_after": self._accuracy(features, labels),
            "num_examples": len(labels),
            "steps": steps,
        }
