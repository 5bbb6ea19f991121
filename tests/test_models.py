"""Models: a spec per dataset, output shapes, save/load round trips."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedge.data import load_dataset
from fedge.models import (
    ModelSpec,
    build_model,
    load_model,
    load_numpy_state,
    save_model,
    spec_for_data,
    state_to_numpy,
)

SEED = 3


def _forward(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.array(x, dtype=np.float32)))


def _check_dataset_model(name: str, shape: tuple[int, ...], classes: int, arch: str) -> None:
    bundle = load_dataset(name, 0.25, SEED)
    assert bundle.input_shape == shape and bundle.num_classes == classes
    spec = spec_for_data("auto", bundle.input_shape, bundle.num_classes)
    assert spec == ModelSpec(arch, shape, classes)
    torch.manual_seed(0)
    model = build_model(spec)
    logits = _forward(model, bundle.x_test[:5])
    assert logits.shape == (5, classes)
    assert torch.isfinite(logits).all()
    assert model.head.out_features == classes


@pytest.mark.parametrize(
    ("name", "shape", "classes", "arch"),
    [("digits", (1, 8, 8), 10, "cnn"), ("breast-cancer", (30,), 2, "mlp")],
)
def test_builtin_datasets_get_a_model_with_the_right_output(
    name: str, shape: tuple[int, ...], classes: int, arch: str
) -> None:
    _check_dataset_model(name, shape, classes, arch)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_28x28_folder_gets_a_cnn_with_ten_outputs(
    make_idx_folder: Callable[..., Path], gz: bool
) -> None:
    _check_dataset_model(str(make_idx_folder(gz=gz)), (1, 28, 28), 10, "cnn")


def test_csv_folder_gets_an_mlp(csv_folder: Path) -> None:
    _check_dataset_model(str(csv_folder), (7,), 3, "mlp")


def test_npz_image_folder_gets_a_cnn(npz_folder: Path) -> None:
    _check_dataset_model(str(npz_folder), (1, 12, 12), 4, "cnn")


def test_mlp_can_be_forced_on_images_but_cnn_not_on_tables() -> None:
    spec = spec_for_data("mlp", (1, 8, 8), 10)
    assert _forward(build_model(spec), np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 10)
    with pytest.raises(ValueError, match="mlp"):
        spec_for_data("cnn", (30,), 2)


def test_unknown_architecture_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build_model(ModelSpec("resnet", (1, 8, 8), 10))


def test_models_use_no_batchnorm() -> None:
    # Opacus (DP-SGD) cannot train BatchNorm; the registry promises GroupNorm.
    for spec in (ModelSpec("cnn", (3, 32, 32), 10), ModelSpec("mlp", (30,), 2)):
        model = build_model(spec)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_spec_round_trips_through_a_dict() -> None:
    spec = ModelSpec("cnn", (1, 28, 28), 10)
    raw = spec.to_dict()
    raw["input_shape"] = list(raw["input_shape"])  # as JSON would give it back
    assert ModelSpec.from_dict(raw) == spec
    with pytest.raises(ValueError, match="input_shape"):
        ModelSpec.from_dict({"name": "cnn", "input_shape": 28, "num_classes": 10})


def test_numpy_state_round_trips(tmp_path: Path) -> None:
    spec = ModelSpec("cnn", (1, 8, 8), 10)
    torch.manual_seed(1)
    source = build_model(spec)
    arrays = state_to_numpy(source)
    assert all(a.dtype == np.float32 for a in arrays.values())
    torch.manual_seed(2)
    target = build_model(spec)
    load_numpy_state(target, arrays)
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    torch.testing.assert_close(_forward(target, x), _forward(source, x))


def test_save_and_load_model_rebuild_the_same_network(tmp_path: Path) -> None:
    spec = ModelSpec("mlp", (30,), 2)
    torch.manual_seed(4)
    model = build_model(spec)
    path = tmp_path / "nested" / "model.pt"
    save_model(path, spec, state_to_numpy(model))
    loaded, loaded_spec = load_model(path)
    assert loaded_spec == spec and not loaded.training
    x = np.random.default_rng(1).normal(size=(4, 30)).astype(np.float32)
    torch.testing.assert_close(_forward(loaded, x), _forward(model, x))


def test_load_model_errors_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model file"):
        load_model(tmp_path / "missing.pt")
    bare = tmp_path / "bare.pt"
    torch.save({"weight": torch.zeros(2)}, bare)
    with pytest.raises(ValueError, match="not a fedge model"):
        load_model(bare)
