"""Where data comes from: bundled sklearn sets, local folders, Hugging Face ids.

Each loader returns raw `(x, y)` pools (or predefined train/test pools): float32
features and labels as stored (integers or class-name strings); `load_dataset`
maps the labels to class indices and turns them into a `DatasetBundle`.
"""

from __future__ import annotations

import gzip
import importlib
import struct
from functools import partial
from pathlib import Path
from types import ModuleType

import numpy as np

from fedge.data.tabular import DEFAULT_COLUMNS, TableColumns, read_csv, read_npz

Pools = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]
"""x, y and, when the source ships one, a predefined test split (x_test, y_test)."""


def train_extra(module: str, needed_for: str) -> ModuleType:
    """Import `module` from the `data` extra, or say in one line how to get it.

    The lean edge install (`fedge[edge]`) leaves out scikit-learn and flwr-datasets;
    an edge node reads its own `local-data` file with numpy alone.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{needed_for} needs {error.name or module}, which fedge[edge] leaves out: "
            'pip install "fedge[data]" (fedge[train] includes it), or give this edge node its '
            "own data with --node-config \"edge=true local-data='/path/to/data.npz'\""
        ) from error


def load_digits_pool() -> Pools:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], shaped (N, 1, 8, 8)."""
    raw = train_extra("sklearn.datasets", "the built-in 'digits'").load_digits()
    x = (raw.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x, raw.target.astype(np.int64), None, None


def load_breast_cancer_pool() -> Pools:
    """scikit-learn's bundled Wisconsin breast-cancer table (30 features, 2 classes)."""
    raw = train_extra("sklearn.datasets", "the built-in 'breast-cancer'").load_breast_cancer()
    return raw.data.astype(np.float32), raw.target.astype(np.int64), None, None


def _read_idx(path: Path) -> np.ndarray:
    """Parse one MNIST-format IDX file (optionally gzipped)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise ValueError(f"{path}: unsupported IDX element type 0x{dtype_code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    expected = int(np.prod(dims))
    if body.size != expected:
        raise ValueError(f"{path}: header says {expected} values, file has {body.size}")
    return body.reshape(dims)


def _idx_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    images = sorted(folder.glob(f"{prefix}*-images-idx3-ubyte*"))
    labels = sorted(folder.glob(f"{prefix}*-labels-idx1-ubyte*"))
    if not images or not labels:
        return None
    x = _read_idx(images[0]).astype(np.float32)
    y = _read_idx(labels[0]).astype(np.int64)
    if len(x) != len(y):
        raise ValueError(
            f"{images[0].name} has {len(x)} images but {labels[0].name} has {len(y)} labels"
        )
    if x.max(initial=0) > 1.0:
        x = x / 255.0
    return x.reshape(len(x), 1, *x.shape[1:]).astype(np.float32), y


def _load_idx_folder(folder: Path) -> Pools | None:
    """train*/t10k* (or test*) pairs keep their split; a lone pair is one pool."""
    train = _idx_pair(folder, "train")
    test = _idx_pair(folder, "t10k") or _idx_pair(folder, "test")
    if train is not None and test is not None:
        return train[0], train[1], test[0], test[1]
    pool = train or test or _idx_pair(folder, "")
    if pool is None:
        return None
    return pool[0], pool[1], None, None


def _split_named(folder: Path, suffix: str, loader) -> Pools | None:  # type: ignore[no-untyped-def]
    files = sorted(folder.glob(f"*{suffix}"))
    if not files:
        return None
    train_files = [f for f in files if f.stem.startswith("train")]
    test_files = [f for f in files if f.stem.startswith("test")]
    if train_files and test_files:
        x, y = loader(train_files[0])
        x_test, y_test = loader(test_files[0])
        return x, y, x_test, y_test
    if len(files) > 1:
        raise ValueError(
            f"{folder} has several {suffix} files {[f.name for f in files]}: keep one, "
            f"or name them train{suffix} and test{suffix}"
        )
    x, y = loader(files[0])
    return x, y, None, None


READERS = {".npz": read_npz, ".csv": read_csv}


def load_folder_pool(folder: Path, columns: TableColumns = DEFAULT_COLUMNS) -> Pools:
    """A local folder with IDX files, a CSV (target in `columns.label`) or an `.npz`;
    or the path of one such CSV / .npz file."""
    if folder.is_file() and folder.suffix.lower() in READERS:
        x, y = READERS[folder.suffix.lower()](folder, columns)
        return x, y, None, None
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset {folder} is neither a folder nor a .csv / .npz file that exists"
        )
    pools = _load_idx_folder(folder)
    if pools is not None:
        if not columns.is_default:
            raise ValueError(
                f"{folder} holds IDX files, which have no named columns; leave label-column, "
                "id-column and feature-columns at their defaults"
            )
        return pools
    for suffix, reader in READERS.items():
        pools = _split_named(folder, suffix, partial(reader, columns=columns))
        if pools is not None:
            return pools
    raise ValueError(
        f"{folder} holds no dataset fedge can read: expected MNIST IDX files "
        "(*-images-idx3-ubyte[.gz] + *-labels-idx1-ubyte[.gz]), a CSV with a header "
        f"(target column {columns.label!r}: set label-column), or an .npz with arrays 'x' and 'y'"
    )


def load_hf_pool(dataset_id: str) -> Pools:
    """A Hugging Face dataset through flwr-datasets (needs network access)."""
    datasets = train_extra("flwr_datasets", "an 'hf:' dataset")
    federated = datasets.FederatedDataset(dataset=dataset_id, partitioners={"train": 1})
    try:
        train = federated.load_split("train")
    except Exception as exc:  # offline, unknown id, gated…: one clear message
        raise RuntimeError(
            f"could not download Hugging Face dataset {dataset_id!r} ({type(exc).__name__}). "
            "hf: datasets need network access to the Hugging Face Hub; offline, use "
            "dataset='digits', 'breast-cancer' or a local folder path instead"
        ) from exc
    try:
        test = federated.load_split("test")
    except (KeyError, ValueError):
        test = None

    def to_arrays(split) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
        label_key = "label" if "label" in split.column_names else split.column_names[-1]
        feature_key = next(c for c in split.column_names if c != label_key)
        x = np.stack([np.asarray(v, dtype=np.float32) for v in split[feature_key]])
        if x.max(initial=0) > 1.0:
            x = x / 255.0
        if x.ndim == 3:
            x = x[:, None]
        return x.astype(np.float32), np.asarray(split[label_key], dtype=np.int64)

    x, y = to_arrays(train)
    if test is None:
        return x, y, None, None
    x_test, y_test = to_arrays(test)
    return x, y, x_test, y_test
