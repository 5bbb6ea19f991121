"""`fedge export` refuses what is not a model in one line; export.json records the input
convention and class names; `fedge edge predict` applies them (or warns)."""

from __future__ import annotations

import argparse
import json
import shutil
import zipfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_user import breast_cancer_csv

from fedge.data import DatasetBundle, TableColumns, load_dataset
from fedge.edge import artifacts
from fedge.edge.commands import register
from fedge.edge.export import export_for_dataset
from fedge.edge.export_command import register_export
from fedge.models import ModelSpec, build_model, save_model, spec_for_data, state_to_numpy
from fedge.server_app.run_folder import Checkpoint, RunFolder

SEED = 0


def fedge(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedge")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    register_export(subparsers)
    args = parser.parse_args(list(argv))
    return args.func(args)


def train(bundle: DatasetBundle, path: Path, epochs: int) -> Path:
    """A model fitted centrally on the bundle's pool, saved as a run saves its final model."""
    spec = spec_for_data("auto", bundle.input_shape, bundle.num_classes)
    torch.manual_seed(SEED)
    model = build_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.tensor(bundle.x_train), torch.tensor(bundle.y_train)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    save_model(path, spec, state_to_numpy(model), bundle.provenance())
    return path


def export(checkpoint: Path, out: Path) -> dict:
    with redirect_stdout(StringIO()):
        assert fedge("export", str(checkpoint), "--out", str(out), "--quantization", "dynamic",
                     "--latency-repeats", "1") == 0  # fmt: skip
    return json.loads((out / artifacts.REPORT).read_text())


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    bundle = load_dataset("digits", 0.2, SEED)
    checkpoint = train(bundle, folder / "final_model.pt", epochs=8)
    export_for_dataset(checkpoint, folder / "export", bundle, "dynamic", latency_repeats=1)
    return folder / "export"


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A breast-cancer CSV (diagnosis M/B, id column) and a model trained on it."""
    folder = tmp_path_factory.mktemp("csv")
    csv = breast_cancer_csv(folder / "data.csv")
    bundle = load_dataset(str(csv), 0.2, SEED, TableColumns.parse("diagnosis", "id", ""))
    train(bundle, folder / "final_model.pt", epochs=20)
    return folder


# --- export refuses what is not a model ------------------------------------------------


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert "Traceback" not in err and "weights_only=False" not in err
    return err


def test_export_of_a_run_checkpoint_names_the_model_to_export_instead(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = RunFolder(tmp_path)
    folder.save_checkpoint(Checkpoint(1, {"w": np.zeros(3)}, {}, {"run_config": {}}))
    assert fedge("export", str(folder.checkpoint_path), "--out", str(tmp_path / "x")) == 1
    err = one_line_error(capsys)
    assert "run checkpoint" in err and "final_model.pt" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("# fedge\n"), "not a model saved by fedge (not a torch archive)"),
        (lambda p: p.write_bytes(b""), "not a torch archive"),
        (lambda p: p.mkdir(), "is a folder"),
        (lambda p: zipfile.ZipFile(p, "w").close(), "zip archive but not a saved model"),
        (lambda p: torch.save({"weights": torch.zeros(2)}, p), "is not a fedge model"),
        (lambda p: torch.save(torch.zeros(2), p), "is not a fedge model"),
    ],
    ids=["readme", "empty", "folder", "zip", "dict-without-spec", "tensor"],
)
def test_export_of_a_wrong_file_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make, message: str
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "README.md"
    make(path)
    assert fedge("export", str(path), "--out", str(tmp_path / "out")) == 1
    assert message in one_line_error(capsys)


def test_export_of_a_missing_file_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fedge("export", str(tmp_path / "final_model.pt"), "--out", str(tmp_path)) == 1
    assert "no model file at" in one_line_error(capsys)


class _Payload:
    """Unpickling this would create `marker`: proof that the loader ran the file's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_a_model_file_with_pickled_code_is_refused_without_running_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "final_model.pt"
    spec = ModelSpec("mlp", (4,), 2)
    torch.save({"spec": spec.to_dict(), "state_dict": {}, "provenance": _Payload(marker)}, path)
    assert fedge("export", str(path), "--out", str(tmp_path / "out")) == 1
    err = one_line_error(capsys)
    assert "not a model saved by fedge" in err and "never loads pickled code" in err
    assert not marker.exists()


def test_export_refuses_data_whose_classes_differ_from_the_models(
    csv_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.csv"
    text = (csv_run / "data.csv").read_text().replace(",M,", ",malignant,")
    other.write_text(text)
    out = tmp_path / "out"
    code = fedge("export", str(csv_run / "final_model.pt"), "--out", str(out), "--dataset",
                 str(other))  # fmt: skip
    assert code == 1
    err = one_line_error(capsys)
    assert "['B', 'M']" in err and "malignant" in err


# --- export.json: class names and the input convention ------------------------------------


def test_export_records_class_names_and_the_tabular_convention(
    csv_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = export(csv_run / "final_model.pt", tmp_path)
    assert report["class_names"] == ["B", "M"]
    convention = report["input"]
    assert convention["kind"] == "tabular" and convention["shape"] == [30]
    assert len(convention["mean"]) == len(convention["std"]) == 30
    assert report["accuracy"]["onnx_fp32"] > 0.9

    bundle = load_dataset(
        str(csv_run / "data.csv"), 0.2, SEED, TableColumns.parse("diagnosis", "id", "")
    )
    np.save(tmp_path / "rows.npy", bundle.x_test[:20])
    model = str(tmp_path / artifacts.MODEL_FP32)
    assert fedge("edge", "predict", model, "--input", str(tmp_path / "rows.npy"), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["labels"] == [["B", "M"][c] for c in result["predictions"]]
    truth = [bundle.class_names[c] for c in bundle.y_test[:20]]
    assert sum(a == b for a, b in zip(result["labels"], truth, strict=True)) >= 18


def test_digits_export_records_light_ink_on_dark(digits_export: Path) -> None:
    report = json.loads((digits_export / artifacts.REPORT).read_text())
    assert report["class_names"] == [str(d) for d in range(10)]
    assert report["input"] == {
        "shape": [1, 8, 8],
        "kind": "image",
        "layout": "NCHW",
        "value_range": [0.0, 1.0],
        "polarity": "light-on-dark",
        "scaling": "pixel values 0..16 divided by 16",
    }


def ink_on_paper(folder: Path, count: int) -> tuple[list[Path], list[int]]:
    """Held-out digits as a user photographs them: dark ink on white paper, 32x32 PNGs."""
    bundle = load_dataset("digits", 0.2, SEED)
    paths = []
    for i in range(count):
        pixels = bundle.x_test[i, 0]
        paper = np.round(255 * (1.0 - pixels)).astype(np.uint8)
        path = folder / f"digit{i}.png"
        Image.fromarray(np.kron(paper, np.ones((4, 4), dtype=np.uint8))).save(path)
        paths.append(path)
    return paths, bundle.y_test[:count].tolist()


def predict_each(model: Path, images: list[Path], capsys: pytest.CaptureFixture[str]) -> list[int]:
    predictions = []
    for image in images:
        assert fedge("edge", "predict", str(model), "--input", str(image), "--json") == 0
        predictions += json.loads(capsys.readouterr().out)["predictions"]
    return predictions


def test_predict_inverts_dark_ink_on_white_paper(
    digits_export: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    images, truth = ink_on_paper(tmp_path, 5)
    # Before: the same model without its export.json reads the images as they are.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(digits_export / artifacts.MODEL_INT8, bare)
    before = predict_each(bare / artifacts.MODEL_INT8, images, capsys)
    assert "polarity unchecked" in caplog.text
    caplog.clear()
    after = predict_each(digits_export / artifacts.MODEL_INT8, images, capsys)
    assert after == truth
    assert sum(b == t for b, t in zip(before, truth, strict=True)) <= 1  # measured: 0 of 5
    assert caplog.text.count("inverted it") == 5


def test_predict_leaves_light_ink_on_dark_images_alone(
    digits_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog
) -> None:  # type: ignore[no-untyped-def]
    bundle = load_dataset("digits", 0.2, SEED)
    path = tmp_path / "digit.png"
    pixels = np.round(255 * bundle.x_test[0, 0]).astype(np.uint8)
    Image.fromarray(np.kron(pixels, np.ones((4, 4), dtype=np.uint8))).save(path)
    assert predict_each(digits_export / artifacts.MODEL_INT8, [path], capsys) == [bundle.y_test[0]]
    assert "inverted" not in caplog.text


@pytest.mark.parametrize(
    ("transform", "warning"),
    [
        (lambda x: x * 16.0, "spans [0, 16]"),
        (lambda x: 1.0 - x, "samples [0, 1, 2] look dark-on-light"),
    ],
    ids=["unscaled", "inverted"],
)
def test_predict_warns_about_arrays_unlike_the_training_data(
    digits_export: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog,
    transform,
    warning: str,
) -> None:  # type: ignore[no-untyped-def]
    x = transform(load_dataset("digits", 0.2, SEED).x_test[:3])
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    model = str(digits_export / artifacts.MODEL_INT8)
    assert fedge("edge", "predict", model, "--input", str(tmp_path / "x.npy")) == 0
    assert warning in caplog.text


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r | {"class_names": "B,M"}, "class_names must be a list of strings"),
        (lambda r: r | {"input": r["input"] | {"polarity": "sideways"}}, "input.polarity"),
        (lambda r: r | {"input": r["input"] | {"value_range": [1, 0]}}, "value_range"),
        (lambda r: r | {"class_names": ["a", "b"]}, "names 2 classes but the model has 10"),
        (lambda r: [r], "not a JSON object"),
    ],
    ids=["names-not-list", "polarity", "range", "class-count", "not-object"],
)
def test_predict_refuses_a_damaged_export_report(
    digits_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit, message: str
) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "export"
    shutil.copytree(digits_export, folder)
    report = json.loads((folder / artifacts.REPORT).read_text())
    (folder / artifacts.REPORT).write_text(json.dumps(edit(report)))
    np.save(tmp_path / "x.npy", load_dataset("digits", 0.2, SEED).x_test[:2])
    model = str(folder / artifacts.MODEL_INT8)
    assert fedge("edge", "predict", model, "--input", str(tmp_path / "x.npy")) == 1
    assert message in one_line_error(capsys)


@pytest.mark.parametrize("text", ["{", "[" * 100_000], ids=["truncated", "nested"])
def test_predict_refuses_an_export_report_that_is_not_json(
    digits_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    shutil.copy(digits_export / artifacts.MODEL_INT8, tmp_path)
    (tmp_path / artifacts.REPORT).write_text(text)
    np.save(tmp_path / "x.npy", load_dataset("digits", 0.2, SEED).x_test[:2])
    model = str(tmp_path / artifacts.MODEL_INT8)
    assert fedge("edge", "predict", model, "--input", str(tmp_path / "x.npy")) == 1
    assert "is not a valid fedge export report" in one_line_error(capsys)
