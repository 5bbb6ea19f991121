"""Data spine: held-out split, client partitions, label skew, local folders, hf: ids."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_images, tabular, write_csv, write_idx

from fedge.data import PARTITIONERS, client_split, load_dataset, partition_indices
from fedge.data.bundle import DatasetBundle
from fedge.data.sources import load_digits_pool, load_folder_pool

NUM_CLIENTS = 10
SEED = 5


def row_keys(x: np.ndarray) -> list[bytes]:
    """One hashable key per sample (its raw feature bytes)."""
    return [row.tobytes() for row in np.ascontiguousarray(x).reshape(len(x), -1)]


def label_tv(labels: np.ndarray, reference: np.ndarray, num_classes: int) -> float:
    """Total-variation distance between two label distributions."""
    p = np.bincount(labels, minlength=num_classes) / len(labels)
    q = np.bincount(reference, minlength=num_classes) / len(reference)
    return 0.5 * float(np.abs(p - q).sum())


def mean_tv(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    num_classes = int(labels.max()) + 1
    return float(np.mean([label_tv(labels[p], labels, num_classes) for p in parts]))


@pytest.fixture(scope="module")
def digits() -> DatasetBundle:
    return load_dataset("digits", 0.2, SEED)


# --- held-out split ---------------------------------------------------------------------


def test_digits_bundle_shapes_types_and_ranges(digits: DatasetBundle) -> None:
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert digits.x_test.dtype == np.float32 and digits.y_test.dtype == np.int64
    assert digits.x_train.min() >= 0.0 and digits.x_train.max() <= 1.0
    assert len(digits.x_train) == len(digits.y_train) and len(digits.x_test) == len(digits.y_test)
    assert not digits.x_train.flags.writeable  # shared by every simulated client


def test_held_out_and_pool_split_the_source_exactly(digits: DatasetBundle) -> None:
    x, y, _, _ = load_digits_pool()
    source = sorted(zip(row_keys(x), y.tolist(), strict=True))
    split = sorted(zip(row_keys(digits.x_train), digits.y_train.tolist(), strict=True)) + sorted(
        zip(row_keys(digits.x_test), digits.y_test.tolist(), strict=True)
    )
    assert sorted(split) == source  # same rows, same labels, none duplicated or lost
    assert not set(row_keys(digits.x_train)) & set(row_keys(digits.x_test))
    assert len(digits.y_test) == int(np.ceil(0.2 * len(y)))
    # stratified: every class keeps its share in the held-out split (±1 sample)
    expected = np.bincount(y) * len(digits.y_test) / len(y)
    assert np.all(np.abs(np.bincount(digits.y_test) - expected) <= 1)


def test_held_out_split_depends_on_the_seed() -> None:
    first = load_dataset("digits", 0.2, 1)
    second = load_dataset("digits", 0.2, 2)
    assert set(row_keys(first.x_test)) != set(row_keys(second.x_test))
    again = load_dataset("digits", 0.2, 1)
    np.testing.assert_array_equal(first.x_test, again.x_test)


def test_breast_cancer_is_tabular_two_class_and_standardized_on_the_pool() -> None:
    bundle = load_dataset("breast-cancer", 0.25, SEED)
    assert bundle.input_shape == (30,) and bundle.num_classes == 2
    assert len(bundle.y_test) == int(np.ceil(0.25 * 569))
    np.testing.assert_allclose(bundle.x_train.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(bundle.x_train.std(axis=0), 1.0, atol=1e-3)
    assert abs(float(bundle.x_test.mean())) < 0.3  # pool statistics, not its own


# --- partitions -------------------------------------------------------------------------


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_client_data_is_disjoint_covers_the_pool_and_never_holds_held_out_rows(
    digits: DatasetBundle, partitioner: str
) -> None:
    pool = set(row_keys(digits.x_train))
    held_out = set(row_keys(digits.x_test))
    seen: set[bytes] = set()
    for pid in range(NUM_CLIENTS):
        x_tr, y_tr, x_val, y_val = client_split(
            digits, pid, NUM_CLIENTS, partitioner, SEED, 0.1, 0.5, 2
        )
        rows = row_keys(x_tr) + row_keys(x_val)
        assert len(rows) == len(set(rows)), "train and val overlap inside a client"
        assert not set(rows) & seen, f"client {pid} shares rows with another client"
        assert not set(rows) & held_out, f"client {pid} holds held-out rows"
        assert set(rows) <= pool
        seen.update(rows)
        assert len(y_tr) == len(x_tr) and len(y_val) == len(x_val)
    # iid and dirichlet promise to cover the pool; with 10 classes, 2 per client and
    # 10 clients, the pathological split assigns every class too
    assert seen == pool


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_partition_indices_are_disjoint_and_cover_every_row(
    digits: DatasetBundle, partitioner: str
) -> None:
    parts = partition_indices(digits.y_train, partitioner, NUM_CLIENTS, SEED)
    assert len(parts) == NUM_CLIENTS
    flat = np.concatenate(parts)
    assert len(flat) == len(np.unique(flat)) == len(digits.y_train)
    assert all(len(p) > 0 for p in parts)


def test_iid_partitions_follow_the_global_label_distribution(digits: DatasetBundle) -> None:
    parts = partition_indices(digits.y_train, "iid", NUM_CLIENTS, SEED)
    assert mean_tv(digits.y_train, parts) < 0.15
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_partitions_are_iid_even_when_the_pool_is_sorted_by_label() -> None:
    # A folder source with its own train/test files keeps its row order, which is
    # often sorted by class; "iid" must not hand each client a single class then.
    labels = np.repeat(np.arange(10), 60).astype(np.int64)
    parts = partition_indices(labels, "iid", NUM_CLIENTS, SEED)
    assert mean_tv(labels, parts) < 0.2
    assert all(len(np.unique(labels[p])) >= 8 for p in parts)


def test_dirichlet_skew_shrinks_as_alpha_grows(digits: DatasetBundle) -> None:
    y = digits.y_train
    tv = {
        alpha: np.mean(
            [
                mean_tv(y, partition_indices(y, "dirichlet", NUM_CLIENTS, seed, alpha))
                for seed in (0, 1, 2)
            ]
        )
        for alpha in (0.1, 1.0, 100.0)
    }
    iid = mean_tv(y, partition_indices(y, "iid", NUM_CLIENTS, SEED))
    assert tv[0.1] > 0.5, tv  # strongly skewed
    assert tv[0.1] > tv[1.0] + 0.1 > tv[100.0] + 0.2, tv
    assert tv[100.0] < iid + 0.05, tv  # large alpha approaches iid


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")
@pytest.mark.parametrize(("num_clients", "classes"), [(10, 1), (10, 2), (10, 3), (7, 3), (5, 4)])
def test_pathological_gives_each_client_exactly_its_classes(
    digits: DatasetBundle, num_clients: int, classes: int
) -> None:
    parts = partition_indices(
        digits.y_train, "pathological", num_clients, SEED, classes_per_client=classes
    )
    assert [len(np.unique(digits.y_train[p])) for p in parts] == [classes] * num_clients
    flat = np.concatenate(parts)
    assert len(flat) == len(np.unique(flat))


def test_partitions_are_reproducible_and_seed_dependent(digits: DatasetBundle) -> None:
    y = digits.y_train
    first = partition_indices(y, "dirichlet", NUM_CLIENTS, 1)
    again = partition_indices(y.copy(), "dirichlet", NUM_CLIENTS, 1)
    other = partition_indices(y, "dirichlet", NUM_CLIENTS, 2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(
        len(a) == len(b) and np.array_equal(a, b) for a, b in zip(first, other, strict=True)
    )


def test_partition_indices_accept_any_integer_label_dtype() -> None:
    labels = np.repeat(np.arange(5), 20)
    for dtype in (np.int32, np.uint8, np.int64):
        parts = partition_indices(labels.astype(dtype), "iid", 4, SEED)
        flat = np.concatenate(parts)
        assert sorted(flat.tolist()) == list(range(len(labels))), dtype


def test_unknown_partitioner_is_rejected() -> None:
    with pytest.raises(ValueError, match="partitioner"):
        partition_indices(np.arange(10) % 2, "by-hand", 2, SEED)


def test_validation_share_comes_out_of_the_clients_own_partition(digits: DatasetBundle) -> None:
    parts = partition_indices(digits.y_train, "dirichlet", NUM_CLIENTS, SEED, 0.5)
    for pid in (0, 3, 9):
        x_tr, _, x_val, _ = client_split(digits, pid, NUM_CLIENTS, "dirichlet", SEED, 0.2, 0.5, 2)
        assert len(x_val) == round(len(parts[pid]) * 0.2)
        expected = set(row_keys(digits.x_train[parts[pid]]))
        assert set(row_keys(x_tr)) | set(row_keys(x_val)) == expected
    _, _, x_val, _ = client_split(digits, 0, NUM_CLIENTS, "iid", SEED, 0.0, 0.5, 2)
    assert len(x_val) == 0


@pytest.mark.parametrize("partition_id", [-1, NUM_CLIENTS])
def test_partition_id_outside_range_is_rejected(digits: DatasetBundle, partition_id: int) -> None:
    with pytest.raises(ValueError, match="partition-id"):
        client_split(digits, partition_id, NUM_CLIENTS, "iid", SEED, 0.1, 0.5, 2)


# --- local folders ----------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_with_its_own_test_split(make_idx_folder: Callable[..., Path], gz: bool) -> None:
    folder = make_idx_folder(gz=gz, num_train=60, num_test=20)
    bundle = load_dataset(str(folder), 0.2, SEED)
    x_train, y_train = synthetic_images(60, 10, seed=1)
    x_test, y_test = synthetic_images(20, 10, seed=2)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    np.testing.assert_allclose(bundle.x_train[:, 0], x_train / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(bundle.y_train, y_train)
    np.testing.assert_allclose(bundle.x_test[:, 0], x_test / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(bundle.y_test, y_test)


def test_idx_folder_without_test_files_holds_out_a_stratified_share(
    make_idx_folder: Callable[..., Path],
) -> None:
    folder = make_idx_folder(num_train=100, num_test=0)
    bundle = load_dataset(str(folder), 0.2, SEED)
    assert (len(bundle.y_train), len(bundle.y_test)) == (80, 20)
    assert np.array_equal(np.bincount(bundle.y_test), [2] * 10)
    assert not set(row_keys(bundle.x_train)) & set(row_keys(bundle.x_test))


def test_idx_folder_with_only_t10k_files_keeps_held_out_out_of_the_pool(tmp_path: Path) -> None:
    folder = tmp_path / "only-test-files"
    folder.mkdir()
    x, y = synthetic_images(50, 5, seed=6)
    write_idx(folder / "t10k-images-idx3-ubyte", x)
    write_idx(folder / "t10k-labels-idx1-ubyte", y)
    bundle = load_dataset(str(folder), 0.2, SEED)
    assert len(bundle.y_train) + len(bundle.y_test) == 50
    assert not set(row_keys(bundle.x_train)) & set(row_keys(bundle.x_test))


def test_csv_folder_finds_the_label_column_anywhere(csv_folder: Path) -> None:
    x, y, x_test, y_test = load_folder_pool(csv_folder)
    expected_x, expected_y = tabular(90, 7, 3, seed=3)
    assert x_test is None and y_test is None
    np.testing.assert_allclose(x, expected_x, rtol=1e-6)
    np.testing.assert_array_equal(y, expected_y)
    bundle = load_dataset(str(csv_folder), 0.2, SEED)
    assert bundle.input_shape == (7,) and bundle.num_classes == 3
    assert (len(bundle.y_train), len(bundle.y_test)) == (72, 18)


def test_csv_folder_with_train_and_test_files_keeps_the_given_split(tmp_path: Path) -> None:
    x, y = tabular(40, 4, 2, seed=7)
    write_csv(tmp_path / "train.csv", x[:30], y[:30])
    write_csv(tmp_path / "test.csv", x[30:], y[30:], label_position=4)
    bundle = load_dataset(str(tmp_path), 0.2, SEED)
    np.testing.assert_array_equal(bundle.y_train, y[:30])
    np.testing.assert_array_equal(bundle.y_test, y[30:])


def test_npz_folder_of_uint8_images_is_scaled_and_given_a_channel(npz_folder: Path) -> None:
    bundle = load_dataset(str(npz_folder), 0.25, SEED)
    assert bundle.input_shape == (1, 12, 12) and bundle.num_classes == 4
    assert (len(bundle.y_train), len(bundle.y_test)) == (60, 20)
    assert bundle.x_train.dtype == np.float32 and bundle.x_train.max() <= 1.0
    x, _ = synthetic_images(80, 4, seed=4, size=12)
    source = set(row_keys((x / 255.0).astype(np.float32)))
    assert set(row_keys(bundle.x_train)) | set(row_keys(bundle.x_test)) == source


def test_csv_without_label_column_names_the_columns(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b,target\n1,2,0\n3,4,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'label' column") as info:
        load_folder_pool(tmp_path)
    assert "target" in str(info.value)


def test_csv_with_non_numeric_cells_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,label\n1,0\nx,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="numeric"):
        load_folder_pool(tmp_path)


def test_several_unnamed_csv_files_are_ambiguous(tmp_path: Path) -> None:
    x, y = tabular(10, 2, 2, seed=8)
    write_csv(tmp_path / "a.csv", x, y)
    write_csv(tmp_path / "b.csv", x, y)
    with pytest.raises(ValueError, match=r"train\.csv"):
        load_folder_pool(tmp_path)


def test_idx_with_bad_magic_is_rejected(tmp_path: Path) -> None:
    x, y = synthetic_images(10, 2, seed=9)
    images = write_idx(tmp_path / "train-images-idx3-ubyte", x)
    images.write_bytes(b"\x12\x34" + images.read_bytes()[2:])
    write_idx(tmp_path / "train-labels-idx1-ubyte", y)
    with pytest.raises(ValueError, match="magic"):
        load_folder_pool(tmp_path)


def test_gzipped_idx_with_bad_magic_is_rejected(tmp_path: Path) -> None:
    _, y = synthetic_images(10, 2, seed=9)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(b"PK\x03\x04 definitely not idx")
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y)
    with pytest.raises(ValueError, match="magic"):
        load_folder_pool(tmp_path)


def test_idx_images_and_labels_with_different_counts_are_rejected(tmp_path: Path) -> None:
    x, y = synthetic_images(10, 2, seed=9)
    write_idx(tmp_path / "train-images-idx3-ubyte", x)
    write_idx(tmp_path / "train-labels-idx1-ubyte", y[:9])
    with pytest.raises(ValueError, match="10 images") as info:
        load_folder_pool(tmp_path)
    assert "9 labels" in str(info.value)


def test_truncated_idx_body_is_rejected(tmp_path: Path) -> None:
    x, y = synthetic_images(10, 2, seed=9)
    images = write_idx(tmp_path / "train-images-idx3-ubyte", x)
    images.write_bytes(images.read_bytes()[:-28])
    write_idx(tmp_path / "train-labels-idx1-ubyte", y)
    with pytest.raises(ValueError, match="header says"):
        load_folder_pool(tmp_path)


def test_npz_needs_x_and_y_of_equal_length(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", images=np.zeros((4, 3)), y=np.zeros(4))
    with pytest.raises(ValueError, match="'x' and 'y'"):
        load_folder_pool(tmp_path)
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 3)), y=np.zeros(3))
    with pytest.raises(ValueError, match="4 rows"):
        load_folder_pool(tmp_path)


def test_empty_folder_explains_what_it_expects(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no dataset") as info:
        load_dataset(str(tmp_path), 0.2, SEED)
    message = str(info.value)
    assert "IDX" in message and "label" in message and ".npz" in message


def test_missing_folder_and_unknown_name_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_folder_pool(tmp_path / "absent")
    with pytest.raises(ValueError, match="digits") as info:
        load_dataset(str(tmp_path / "absent"), 0.2, SEED)
    assert "hf:" in str(info.value)


def test_negative_labels_are_classes_like_any_other(tmp_path: Path) -> None:
    x, y = tabular(20, 2, 2, seed=10)
    write_csv(tmp_path / "data.csv", x, y - 1)
    bundle = load_dataset(str(tmp_path), 0.2, SEED)
    assert bundle.class_names == ("-1", "0") and bundle.num_classes == 2
    assert set(bundle.y_train) | set(bundle.y_test) == {0, 1}


# --- Hugging Face ids -------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_hf_dataset_offline_fails_with_one_clear_runtime_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read HF_HUB_OFFLINE at import time; without it every request is
    # retried for ~30 s before failing.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError) as info:
        load_dataset("hf:fedge-tests/no-such-dataset", 0.2, SEED)
    message = str(info.value)
    assert "fedge-tests/no-such-dataset" in message
    assert "network" in message and "digits" in message
