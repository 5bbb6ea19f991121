"""Shared builders for the spine tests: small on-disk datasets in every local format."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

IDX_UBYTE = 0x08


@pytest.fixture(autouse=True, scope="session")
def isolated_node_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Nodes keep their local-DP ledgers in a session folder, never in ~/.fedge.

    Session-wide, so module-scoped simulation fixtures (set up before any
    function-scoped fixture) see it too.
    """
    folder = tmp_path_factory.mktemp("node-state")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDGE_NODE_STATE_DIR", str(folder))
        yield folder


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte array in MNIST's IDX format (magic 0x0000 08 <ndim>, big-endian dims)."""
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1").tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    payload = idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def synthetic_images(
    num: int, num_classes: int, seed: int, size: int = 28
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (num, size, size) whose brightest row encodes the label, every class present."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(num, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, label * size // num_classes, :] = 255
    return images, labels.astype(np.uint8)


@pytest.fixture
def make_idx_folder(tmp_path: Path) -> Callable[..., Path]:
    """An MNIST-style folder of IDX files: train-* (+ t10k-* when `num_test`), gzipped or not."""

    def make(
        gz: bool = False, num_train: int = 60, num_test: int = 20, num_classes: int = 10
    ) -> Path:
        folder = tmp_path / f"idx-{'gz' if gz else 'raw'}-{num_train}-{num_test}"
        folder.mkdir()
        ext = ".gz" if gz else ""
        x, y = synthetic_images(num_train, num_classes, seed=1)
        write_idx(folder / f"train-images-idx3-ubyte{ext}", x)
        write_idx(folder / f"train-labels-idx1-ubyte{ext}", y)
        if num_test:
            x_test, y_test = synthetic_images(num_test, num_classes, seed=2)
            write_idx(folder / f"t10k-images-idx3-ubyte{ext}", x_test)
            write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", y_test)
        return folder

    return make


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, label_position: int = 0) -> Path:
    columns = [f"f{i}" for i in range(x.shape[1])]
    columns.insert(label_position, "label")
    table = np.insert(x.astype(np.float64), label_position, y, axis=1)
    lines = [",".join(columns)] + [",".join(repr(float(v)) for v in row) for row in table]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tabular(num: int, num_features: int, num_classes: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    y = np.arange(num) % num_classes
    rng.shuffle(y)
    x = rng.normal(size=(num, num_features)) * 10 + y[:, None]
    return x, y


@pytest.fixture
def csv_folder(tmp_path: Path) -> Path:
    """One CSV, 7 features, 3 classes, the label column in the middle."""
    folder = tmp_path / "csv"
    folder.mkdir()
    x, y = tabular(90, 7, 3, seed=3)
    write_csv(folder / "data.csv", x, y, label_position=3)
    return folder


@pytest.fixture
def npz_folder(tmp_path: Path) -> Path:
    """One .npz of uint8 (N, 12, 12) grayscale images and 4 classes."""
    folder = tmp_path / "npz"
    folder.mkdir()
    x, y = synthetic_images(80, 4, seed=4, size=12)
    np.savez(folder / "data.npz", x=x, y=y.astype(np.int64))
    return folder
