"""The in-memory form every data source is turned into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedge.data.tabular import DEFAULT_COLUMNS, TableColumns


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
    class_names: tuple[str, ...] = ()
    """The source's label values, in class-index order (`encode_classes`)."""
    input_convention: dict[str, Any] = field(default_factory=dict)
    """Shape, scaling and (images) polarity of a model input; recorded in export.json."""
    test_fraction: float = 0.2
    seed: int = 0
    columns: TableColumns = DEFAULT_COLUMNS

    def provenance(self) -> dict[str, Any]:
        """What a saved model records about its data: enough for `fedge export` to reload
        the same split and columns, and the class names its outputs mean."""
        return {
            "dataset": self.name,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            **self.columns.to_provenance(),
            "class_names": list(self.class_names),
        }

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])
