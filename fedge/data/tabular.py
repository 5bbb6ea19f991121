"""User files as they come: CSVs with named (string) targets and id columns, and .npz archives.

Nothing is decoded before it is checked: the CSV header is read with a size cap, every
cell is parsed by the `csv` module (never evaluated), and .npz archives are opened with
`allow_pickle=False`, so a hostile file can fail to load but cannot run code. Every error
is one line naming the file and the fix.
"""

from __future__ import annotations

import csv
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_HEADER_CHARS = 1 << 20
"""A header line longer than this (1 Mi characters) is refused before it is parsed."""

ID_NAMES = frozenset({"id", "_id", "index", "row", "rowid", "row_id", "unnamed: 0"})
"""Column names that say "row number", compared case-insensitively."""


@dataclass(frozen=True)
class TableColumns:
    """Which columns of a CSV (or arrays of an .npz) are the target, the row id and the features.

    Hashable, so `load_dataset`'s per-process cache keys on it.
    """

    label: str = "label"
    id: str = ""
    features: tuple[str, ...] = ()

    @classmethod
    def parse(cls, label: str, id_column: str, features: str) -> TableColumns:
        """From the run-config strings; `features` is a comma list ("" = every other column)."""
        names = tuple(name.strip() for name in features.split(",") if name.strip())
        return cls(label.strip(), id_column.strip(), names)

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_COLUMNS

    def to_provenance(self) -> dict[str, str]:
        """What a saved model records, in run-config spelling, so export rereads the same data."""
        return {
            "label-column": self.label,
            "id-column": self.id,
            "feature-columns": ",".join(self.features),
        }

    @classmethod
    def from_provenance(cls, provenance: dict[str, Any]) -> TableColumns:
        return cls.parse(
            str(provenance.get("label-column", "label")),
            str(provenance.get("id-column", "")),
            str(provenance.get("feature-columns", "")),
        )


DEFAULT_COLUMNS = TableColumns()
"""Target "label", no id column, every other column a feature."""


def _shown(names: list[str], limit: int = 20) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows, with the header's size capped and ragged rows refused."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            first = handle.readline(MAX_HEADER_CHARS + 1)
            if len(first) > MAX_HEADER_CHARS:
                raise ValueError(
                    f"{path}: the header line is longer than {MAX_HEADER_CHARS} characters; "
                    "is this a CSV file?"
                )
            if not first.strip():
                raise ValueError(f"{path} is empty: a CSV needs a header line and data rows")
            header = [name.strip() for name in next(csv.reader([first]))]
            rows = [row for row in csv.reader(handle) if row]
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text ({error.reason}); save it as UTF-8 CSV"
        ) from None
    except csv.Error as error:
        raise ValueError(f"{path} is not a readable CSV ({error})") from None
    if not rows:
        raise ValueError(f"{path} has a header but no data rows")
    duplicates = sorted({name for name in header if header.count(name) > 1 and name})
    if duplicates:
        raise ValueError(f"{path} names columns {duplicates} more than once; rename them")
    for number, row in enumerate(rows, start=1):
        if len(row) != len(header):
            raise ValueError(
                f"{path}: data row {number} has {len(row)} cells but the header has {len(header)}"
            )
    return header, rows


def _numbers(path: Path, name: str, cells: list[str]) -> np.ndarray:
    """A column as float64, or an error naming the first cell that is not a finite number."""
    try:
        values = np.array(cells, dtype=np.float64)
    except ValueError:
        values = None
    if values is not None and np.isfinite(values).all():
        return values
    for number, cell in enumerate(cells, start=1):
        try:
            ok = np.isfinite(float(cell))
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{path}: feature column {name!r} holds {cell!r} in data row {number}, not a "
                "number; fedge reads numeric features only (drop it with feature-columns or "
                "id-column)"
            )
    raise AssertionError("unreachable: some cell failed to parse")


def labels_from_cells(path: Path, name: str, cells: np.ndarray) -> np.ndarray:
    """Integer labels when every value is an integer, else the values as strings (class names).

    Non-integer numbers are refused: fedge trains classifiers, not regressors.
    """
    cells = np.char.strip(cells.astype(str))
    empty = np.flatnonzero(cells == "")
    if len(empty):
        raise ValueError(f"{path}: label column {name!r} is empty in data row {int(empty[0]) + 1}")
    try:
        values = cells.astype(np.float64)
    except ValueError:
        return cells
    if not np.isfinite(values).all() or (values != np.round(values)).any():
        raise ValueError(
            f"{path}: label column {name!r} holds non-integer numbers; fedge trains classifiers "
            "and needs class labels (integers or names)"
        )
    return values.astype(np.int64)


def _named_id(name: str) -> bool:
    return name.lower() in ID_NAMES


def _warn_if_id_like(path: Path, name: str, values: np.ndarray) -> None:
    """A row number used as a feature lets a model memorise rows; say so once, with the fix.

    (A column *named* like an id is left out unless feature-columns lists it.)
    """
    integers = (values == np.round(values)).all()
    if integers and len(values) > 1 and len(np.unique(values)) == len(values):
        log.warning(
            "%s: column %r looks like a row id (it holds a distinct integer per row) and is "
            "used as a feature; set id-column='%s' to leave it out",
            path,
            name,
            name,
        )


def read_csv(path: Path, columns: TableColumns) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32) and raw labels (int64 or str) of one CSV, by `columns`."""
    header, rows = _read_rows(path)
    table = np.array(rows, dtype=str)
    # Spreadsheet exports often end every line with a comma: an unnamed, empty column.
    blank = [
        i for i, name in enumerate(header) if not name and not np.char.strip(table[:, i]).any()
    ]
    named = {name: i for i, name in enumerate(header) if i not in blank}
    wanted = [("label", columns.label, "label-column")]
    if columns.id:
        wanted.append(("id", columns.id, "id-column"))
    wanted += [("feature", name, "feature-columns") for name in columns.features]
    for what, name, key in wanted:
        if name not in named:
            raise ValueError(
                f"{path} has no {name!r} column (the {what} column; set {key}); "
                f"its columns are {_shown(list(named))}"
            )
    if columns.features and {columns.label, columns.id} & set(columns.features):
        raise ValueError(
            f"{path}: feature-columns {list(columns.features)} include the label or id column; "
            "remove it from feature-columns"
        )
    features = list(columns.features) or [
        name for name in named if name not in (columns.label, columns.id) and not _named_id(name)
    ]
    if not columns.features and not columns.id:
        for name in filter(_named_id, named):
            log.info(
                "%s: left out column %r, named like a row id; list it in feature-columns "
                "to train on it",
                path,
                name,
            )
    if not features:
        raise ValueError(f"{path} has no feature columns besides {columns.label!r}")
    x = np.empty((len(rows), len(features)), dtype=np.float32)
    for j, name in enumerate(features):
        values = _numbers(path, name, table[:, named[name]].tolist())
        if not columns.features:
            _warn_if_id_like(path, name, values)
        x[:, j] = values
    y = labels_from_cells(path, columns.label, table[:, named[columns.label]])
    return x, y


def read_npz(path: Path, columns: TableColumns) -> tuple[np.ndarray, np.ndarray]:
    """Arrays `x` and `y` (or the array named by label-column) of an .npz, never unpickled."""
    if columns.id or columns.features:
        raise ValueError(
            f"{path}: id-column and feature-columns apply to CSV files; an .npz holds its "
            "features in array 'x' (leave them empty)"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            label_key = columns.label if columns.label in names else "y"
            if "x" not in names or label_key not in names:
                found = None
            else:
                found = archive["x"], archive[label_key]
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        # allow_pickle=False turns pickled (object) arrays into a ValueError here.
        raise ValueError(
            f"{path} is not a readable .npz of plain arrays ({type(error).__name__}: {error}); "
            "write it with numpy.savez(path, x=features, y=labels)"
        ) from None
    if found is None:
        raise ValueError(f"{path} needs arrays 'x' and 'y'; it has {_shown(sorted(names))}")
    x, y = found
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{path}: array 'x' holds {x.dtype} values; fedge needs numbers")
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"{path}: x has {len(x)} rows {x.shape} but y has {len(y)} {y.shape}; "
            "one row per sample: x (N, features...), y (N,)"
        )
    if not len(x):
        raise ValueError(f"{path} holds no samples")
    if y.dtype.kind not in "biuU":
        y = labels_from_cells(path, label_key, np.asarray(y).astype(str))
    elif y.dtype.kind == "U":
        y = labels_from_cells(path, label_key, y)
    if x.dtype == np.uint8:
        x = x / 255.0
    if x.ndim == 3:  # (N, H, W) grayscale images
        x = x[:, None]
    return x.astype(np.float32), y
