"""Each party's own table: an ID column, its feature columns and (guest only) the label.

`breast_cancer_parties` is the bundled example: scikit-learn's breast-cancer table split
by columns into a guest (label + 10 features) and a host (20 features) whose ID columns
overlap partly and come in different orders, as two real parties' files would.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.vertical.errors import VerticalError


@dataclass(frozen=True)
class PartyTable:
    """One party's rows; `y` is None on the host."""

    ids: list[str]
    x: np.ndarray
    y: np.ndarray | None
    columns: list[str]

    def aligned(self, common: list[str]) -> PartyTable:
        """The rows of `common` (the PSI result), in its order."""
        where = {i: n for n, i in enumerate(self.ids)}
        rows = [where[i] for i in common]
        y = None if self.y is None else self.y[rows]
        return PartyTable(list(common), self.x[rows], y, self.columns)


def read_party_csv(
    path: str | Path, *, id_column: str, label_column: str, guest: bool
) -> PartyTable:
    """Read a party's CSV; the guest's must hold `label_column`, every one `id_column`."""
    if not id_column:
        raise VerticalError("vertical runs need id-column: the column both parties join on")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise VerticalError(f"{path} has no rows")
    header = list(rows[0])
    if id_column not in header:
        raise VerticalError(f"{path} has no ID column {id_column!r} (set id-column)")
    if guest and label_column not in header:
        raise VerticalError(
            f"{path} has no label column {label_column!r}: the guest holds the labels "
            "(set label-column, or start this node with role='host')"
        )
    features = [c for c in header if c not in (id_column, label_column)]
    try:
        x = np.array([[float(r[c]) for c in features] for r in rows], dtype=np.float64)
        y = np.array([float(r[label_column]) for r in rows]) if guest else None
    except (TypeError, ValueError) as err:
        raise VerticalError(f"{path}: every feature and label must be a number ({err})") from err
    return PartyTable([r[id_column] for r in rows], x, y, features)


def breast_cancer_parties(seed: int = 0) -> tuple[PartyTable, PartyTable]:
    """Guest (label + features 0-9) and host (features 10-29) with partial, shuffled overlap."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    rng = np.random.default_rng(seed)
    ids = np.array([f"patient-{i:04d}" for i in range(len(data.target))])
    guest_rows = rng.permutation(np.arange(0, 500))
    host_rows = rng.permutation(np.arange(60, len(ids)))
    names = [str(n) for n in data.feature_names]
    guest = PartyTable(
        ids[guest_rows].tolist(), data.data[guest_rows, :10], data.target[guest_rows], names[:10]
    )
    host = PartyTable(ids[host_rows].tolist(), data.data[host_rows, 10:], None, names[10:])
    return guest, host


def write_party_csv(
    table: PartyTable, path: str | Path, *, id_column: str, label_column: str
) -> None:
    """Write a party's table as CSV (the bundled split as files, for `local-data`)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        label = [] if table.y is None else [label_column]
        writer.writerow([id_column, *label, *table.columns])
        for n, row_id in enumerate(table.ids):
            y = [] if table.y is None else [int(table.y[n])]
            writer.writerow([row_id, *y, *table.x[n].tolist()])
