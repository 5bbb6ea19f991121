"""The torch-free runtime: predictions, input checks with fixable errors, file loading, bench."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.edge.export import export_onnx
from fedge.edge.runtime import EdgeModel, benchmark, load_input
from fedge.models import ModelSpec, build_model


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> EdgeModel:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cnn") / "model.onnx"
    export_onnx(build_model(ModelSpec("cnn", (1, 8, 8), 10)).eval(), (1, 8, 8), path)
    return EdgeModel(path, threads=1)


def test_predict_returns_the_most_probable_class(cnn: EdgeModel) -> None:
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    proba = cnn.predict_proba(x)
    assert proba.shape == (5, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(cnn.predict(x), proba.argmax(axis=1))
    assert cnn.sample_shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (
            np.zeros((8, 8), np.uint8),
            r"expected float32 input of shape \(N, 1, 8, 8\), got \(8, 8\) uint8: cast with "
            r"x\.astype\(np\.float32\).*; reshape it",
        ),
        (
            np.zeros((1, 8, 8), np.float32),
            r"got \(1, 8, 8\) float32: add a batch axis with x\[None\]",
        ),
        (np.zeros((2, 1, 8, 8), np.float64), r"got \(2, 1, 8, 8\) float64: cast with"),
        (np.zeros((2, 3, 8, 8), np.float32), r"got \(2, 3, 8, 8\) float32: reshape it"),
    ],
)
def test_bad_inputs_get_an_error_that_names_the_fix(
    cnn: EdgeModel, x: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cnn.predict(x)


def test_missing_or_invalid_model_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fedge export"):
        EdgeModel(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a loadable ONNX model"):
        EdgeModel(tmp_path / "junk.onnx")


def test_npy_inputs_gain_a_batch_axis_only_when_single(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", np.ones((1, 8, 8)))
    np.save(tmp_path / "many.npy", np.ones((3, 1, 8, 8), np.float32))
    one = load_input(tmp_path / "one.npy", (1, 8, 8))
    assert one.shape == (1, 1, 8, 8) and one.dtype == np.float32
    assert load_input(tmp_path / "many.npy", (1, 8, 8)).shape == (3, 1, 8, 8)


def test_images_are_grayscaled_resized_and_scaled(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, 16:] = 255  # right half white
    image_module.fromarray(pixels).save(tmp_path / "half.png")
    x = load_input(tmp_path / "half.png", (1, 8, 8))
    assert x.shape == (1, 1, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0, :, :4], 0.0)
    np.testing.assert_allclose(x[0, 0, :, 4:], 1.0)


@pytest.mark.parametrize(
    ("name", "content", "error", "message"),
    [
        ("missing.npy", None, FileNotFoundError, "no input file at"),
        ("junk.npy", b"garbage", ValueError, "could not read .* as a NumPy .npy array"),
        ("junk.png", b"garbage", ValueError, "could not read image"),
        ("input.txt", b"1 2 3", ValueError, "unsupported input file input.txt: use .npy"),
    ],
)
def test_unreadable_input_files_are_reported(
    tmp_path: Path, name: str, content: bytes | None, error: type[Exception], message: str
) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=message):
        load_input(tmp_path / name, (1, 8, 8))


def test_integer_npy_and_images_for_tabular_models_are_rejected(tmp_path: Path) -> None:
    np.save(tmp_path / "raw.npy", np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="holds uint8 values; save float inputs"):
        load_input(tmp_path / "raw.npy", (1, 8, 8))
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"inputs of shape \(30,\), not images"):
        load_input(tmp_path / "x.png", (30,))


def test_images_without_pillow_say_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="needs Pillow: pip install"):
        load_input(tmp_path / "x.png", (1, 8, 8))


def test_benchmark_reports_latency_throughput_and_memory(cnn: EdgeModel) -> None:
    result = benchmark(cnn, batch_sizes=(1, 4), repeats=5)
    assert set(result["latency_ms"]) == set(result["throughput_per_s"]) == {"batch_1", "batch_4"}
    for stats in result["latency_ms"].values():
        assert 0 < stats["p50"] <= stats["p95"]
    assert result["throughput_per_s"]["batch_4"] == pytest.approx(
        4000 / result["latency_ms"]["batch_4"]["p50"], rel=1e-3
    )
    assert result["peak_rss_mb"] > 10
    assert result["threads"] == 1


def test_invalid_settings_are_rejected(cnn: EdgeModel) -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        EdgeModel(cnn.path, threads=0)
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        benchmark(cnn, batch_sizes=(0,))
