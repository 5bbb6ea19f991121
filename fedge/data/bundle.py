"""The in-memory form every data source is turned into."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DatasetBundle:
    """A training pool (to be partitioned across clients) and a held-out test split.

    Features are float32 shaped `(N, *input_shape)`, labels int64 in
    `[0, num_classes)`. The test split never enters any client partition.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source_digest: str = ""
    """sha256 of the source pools before any split: which data this is, whatever the
    split settings (keys a node's local-DP ledger; checked when a run resumes)."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])
