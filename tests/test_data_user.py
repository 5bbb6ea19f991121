"""User files as users have them: named string targets, id columns, chosen features, and
the files an adversary (or an accident) hands fedge: empty, corrupt, pickled, ragged, huge."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from test_secagg_flower import serverapp_identity
from test_simulation import LocalGrid

from fedge.config import FedgeConfig
from fedge.data import TableColumns, client_split, load_dataset
from fedge.data.tabular import MAX_HEADER_CHARS
from fedge.models import model_provenance
from fedge.server_app.app import main as server_main
from fedge.simulation import run_inprocess

assert serverapp_identity  # the fixture, imported for its side effect

SEED = 0


def breast_cancer_csv(path: Path, rows: int | None = None) -> Path:
    """The Wisconsin table as Kaggle ships it: quoted header, `id`, `diagnosis` M/B first,
    and a trailing comma on every line (an unnamed, empty last column)."""
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer()
    names = [name.replace(" ", "_") for name in raw.feature_names]
    lines = ['"id","diagnosis",' + ",".join(f'"{n}"' for n in names) + ","]
    for i, (row, target) in enumerate(zip(raw.data[:rows], raw.target[:rows], strict=True)):
        diagnosis = "B" if target else "M"  # sklearn: 1 = benign
        lines.append(f"{842302 + 7 * i},{diagnosis}," + ",".join(repr(float(v)) for v in row) + ",")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def columns(label: str = "label", id_column: str = "", features: str = "") -> TableColumns:
    return TableColumns.parse(label, id_column, features)


# --- named targets, ids, features --------------------------------------------------------


def test_string_target_becomes_named_classes_and_the_id_column_is_left_out(
    tmp_path: Path,
) -> None:
    csv = breast_cancer_csv(tmp_path / "data.csv")
    bundle = load_dataset(str(csv), 0.2, SEED, columns("diagnosis", "id"))
    assert bundle.class_names == ("B", "M") and bundle.num_classes == 2
    assert bundle.input_shape == (30,)  # 32 columns - id - diagnosis, the empty one dropped
    labels = np.concatenate([bundle.y_train, bundle.y_test])
    assert (labels == 1).sum() == 212 and (labels == 0).sum() == 357  # M and B counts
    assert bundle.provenance()["class_names"] == ["B", "M"]
    assert bundle.provenance()["id-column"] == "id"


def test_a_column_named_like_an_id_is_left_out_unless_listed_as_a_feature(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    csv = breast_cancer_csv(tmp_path / "data.csv", rows=60)
    with caplog.at_level(logging.INFO, logger="fedge.data.tabular"):
        bundle = load_dataset(str(csv), 0.2, SEED, columns("diagnosis"))
    assert bundle.input_shape == (30,)  # the same features as with id-column='id'
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "left out column 'id'" in said[0] and "feature-columns" in said[0]
    explicit = load_dataset(str(csv), 0.2, SEED, columns("diagnosis", "id"))
    np.testing.assert_array_equal(bundle.x_train, explicit.x_train)
    kept = load_dataset(str(csv), 0.2, SEED, columns("diagnosis", features="id,mean_radius"))
    assert kept.input_shape == (2,)


def test_unique_integers_per_row_are_flagged_whatever_the_column_is_called(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [f"{1000 + i},{i % 2},{i * 0.5 % 3}" for i in range(20)]
    (tmp_path / "data.csv").write_text("patient,label,dose\n" + "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="fedge.data.tabular"):
        load_dataset(str(tmp_path), 0.2, SEED)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "column 'patient'" in warned[0] and "dose" not in warned[0]


def test_classes_are_counted_from_the_data_not_max_plus_one(tmp_path: Path) -> None:
    rows = [f"{i * 0.1},{1 + i % 3}" for i in range(30)]
    (tmp_path / "data.csv").write_text("x,label\n" + "\n".join(rows) + "\n")
    bundle = load_dataset(str(tmp_path), 0.2, SEED)
    assert bundle.num_classes == 3 and bundle.class_names == ("1", "2", "3")
    assert set(np.concatenate([bundle.y_train, bundle.y_test])) == {0, 1, 2}


def test_feature_columns_pick_and_order_the_features(tmp_path: Path) -> None:
    rows = [f"{i},{i % 2},{10 * i},{-i}" for i in range(10)]
    (tmp_path / "data.csv").write_text("a,label,b,c\n" + "\n".join(rows) + "\n")
    x, y, _, _ = _pools(tmp_path, columns(features="c, a"))
    np.testing.assert_array_equal(x, np.array([[-i, i] for i in range(10)], dtype=np.float32))
    np.testing.assert_array_equal(y, np.arange(10) % 2)


def _pools(path: Path, table: TableColumns):  # type: ignore[no-untyped-def]
    from fedge.data.sources import load_folder_pool

    return load_folder_pool(path, table)


def test_npz_with_string_labels_gets_the_same_class_mapping(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((40, 5))
    y = np.array(["dog", "cat", "emu", "cat"] * 10)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    bundle = load_dataset(str(tmp_path / "data.npz"), 0.25, SEED)
    assert bundle.class_names == ("cat", "dog", "emu")


# --- one mapping for every party -----------------------------------------------------------


def test_a_client_missing_classes_still_agrees_on_every_index(tmp_path: Path) -> None:
    """Each party maps classes from the whole file, before partitioning: a client that sees
    only "cat" and "dog" still calls a dog 2 (after "bee"), as the server does."""
    rng = np.random.default_rng(1)
    names = np.array(["ant", "bee", "dog", "cat"])
    y = names[np.arange(80) % 4]
    code = {"ant": 0.0, "bee": 1.0, "cat": 2.0, "dog": 3.0}
    x = np.stack([[code[label], rng.random()] for label in y])  # feature 0 encodes the class
    lines = ["label,kind,noise"] + [f"{label},{a},{b}" for label, (a, b) in zip(y, x, strict=True)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    bundle = load_dataset(str(tmp_path), 0.2, SEED)
    assert bundle.class_names == ("ant", "bee", "cat", "dog")
    mean, std = bundle.input_convention["mean"][0], bundle.input_convention["std"][0]
    partitions = [
        client_split(bundle, pid, 4, "pathological", SEED, 0.0, 0.5, 2) for pid in range(4)
    ]
    seen = []
    for x_client, y_client, _, _ in partitions:
        raw_kind = np.round(x_client[:, 0] * std + mean).astype(int)
        true_names = np.array(sorted(code, key=code.get))[raw_kind]
        np.testing.assert_array_equal(np.array(bundle.class_names)[y_client], true_names)
        seen.append(set(y_client.tolist()))
    assert all(len(classes) == 2 for classes in seen)  # nobody sees all four


# --- files that must fail in one line naming the file ----------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        ("a,label\n", "no data rows"),
        ("a,label\n1,0\nx,1\n", "feature column 'a' holds 'x' in data row 2, not a number"),
        ("a,label\n1,0\n,1\n", "feature column 'a' holds '' in data row 2"),
        ("a,label\n1,0\nnan,1\n", "holds 'nan'"),
        ("a,label\n1,0\n2,1,3\n", "data row 2 has 3 cells but the header has 2"),
        ("a,a,label\n1,2,0\n", "names columns ['a'] more than once"),
        ("a,label\n1,0\n2,\n", "label column 'label' is empty in data row 2"),
        ("a,label\n1,0.5\n2,1\n", "non-integer numbers"),
        ("a,label\n1,0\n2,0\n", "a single class"),
        ("a,target\n1,0\n2,1\n", "has no 'label' column (the label column; set label-column)"),
    ],
)
def test_bad_csv_fails_in_one_line_naming_the_file(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "data.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"^[^\n]*$") as info:
        load_dataset(str(path), 0.2, SEED)
    assert message in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (columns("diagnosis", "patient"), "no 'patient' column (the id column; set id-column)"),
        (columns("diagnosis", "", "a,zz"), "no 'zz' column (the feature column; set feature"),
        (columns("diagnosis", "", "a,diagnosis"), "include the label or id column"),
    ],
)
def test_missing_or_conflicting_columns_name_the_key_to_set(
    tmp_path: Path, table: TableColumns, message: str
) -> None:
    (tmp_path / "data.csv").write_text("a,diagnosis\n1,M\n2,B\n")
    with pytest.raises(ValueError) as info:
        load_dataset(str(tmp_path), 0.5, SEED, table)
    assert message in str(info.value) and str(tmp_path) in str(info.value)


def test_a_huge_header_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a," * (MAX_HEADER_CHARS // 2 + 1) + "label\n1,0\n")
    with pytest.raises(ValueError, match="header line is longer than"):
        load_dataset(str(path), 0.2, SEED)


def test_non_utf8_csv_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes("a,label\n1,0\n\xe9,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_dataset(str(path), 0.2, SEED)


def test_a_corrupt_npz_names_the_file_and_the_error(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((4, 2)), y=np.arange(4))
    path.write_bytes(path.read_bytes()[:60])  # truncated download
    with pytest.raises(ValueError, match="BadZipFile") as info:
        load_dataset(str(tmp_path), 0.2, SEED)
    assert str(path) in str(info.value)


class _Payload:
    """Unpickling this would create `marker`: proof that a loader ran the file's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_pickled_arrays_in_an_npz_are_refused_unopened(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    labels = np.empty(4, dtype=object)
    labels[:] = [_Payload(marker)] * 4
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 2)), y=labels)
    with pytest.raises(ValueError, match=r"not a readable \.npz of plain arrays") as info:
        load_dataset(str(tmp_path), 0.2, SEED)
    assert "data.npz" in str(info.value)
    assert not marker.exists()


def test_a_pickle_renamed_to_npz_is_refused_unopened(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "code-ran"
    (tmp_path / "data.npz").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        load_dataset(str(tmp_path), 0.2, SEED)
    assert not marker.exists()


def test_column_options_on_a_built_in_dataset_are_refused() -> None:
    with pytest.raises(ValueError, match="apply to CSV"):
        load_dataset("digits", 0.2, SEED, columns("diagnosis"))


# --- one extra key: a user CSV federates --------------------------------------------------


@pytest.mark.usefixtures("serverapp_identity")
def test_a_user_csv_federates_with_one_extra_key(tmp_path: Path) -> None:
    """Kaggle's breast-cancer CSV (id, diagnosis M/B, trailing comma) with `label-column`
    only: the real ServerApp and ClientApps, in this thread, 3 nodes, 3 rounds."""
    csv = breast_cancer_csv(tmp_path / "data.csv")
    config = FedgeConfig.from_run_config(
        {
            "dataset": str(csv),
            "label-column": "diagnosis",  # the one extra key
            "num-server-rounds": 3,
            "output-dir": str(tmp_path / "out"),
            "run-name": "user-csv",
        }
    ).to_run_config()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    server_main(LocalGrid(config, 3), context)
    run_dir = tmp_path / "out" / "user-csv"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows][-1] == 3
    assert rows[-1]["test_accuracy"] > 0.9  # the majority class alone is 0.63; measured 0.96
    provenance = model_provenance(run_dir / "final_model.pt")
    assert provenance["class_names"] == ["B", "M"]
    assert provenance["label-column"] == "diagnosis"


@pytest.mark.slow
def test_a_user_csv_federates_on_flowers_simulation_engine(tmp_path: Path) -> None:
    csv = breast_cancer_csv(tmp_path / "data.csv")
    run_inprocess(
        {
            "dataset": str(csv),
            "label-column": "diagnosis",
            "num-server-rounds": 3,
            "output-dir": str(tmp_path / "out"),
            "run-name": "sim",
        },
        num_supernodes=3,
        num_cpus_per_client=0.5,
    )
    lines = (tmp_path / "out" / "sim" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["test_accuracy"] > 0.9
    assert model_provenance(tmp_path / "out" / "sim" / "final_model.pt")["class_names"] == [
        "B",
        "M",
    ]
