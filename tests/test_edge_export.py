"""ONNX export round-trips and int8 quantization quality, measured on digits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fedge.data import load_dataset
from fedge.edge import artifacts
from fedge.edge import export as export_module
from fedge.edge.compact import compact_onnx
from fedge.edge.export import DEFAULT_OPSET, export_model, export_onnx
from fedge.edge.head import HeadLearner, extract_features
from fedge.edge.quantize import quantize_onnx
from fedge.edge.runtime import EdgeModel
from fedge.models import (
    MODEL_BUILDERS,
    ModelSpec,
    build_model,
    load_model,
    save_model,
    state_to_numpy,
)

SAMPLE_SHAPES = {"cnn": (1, 8, 8), "mlp": (30,)}


def test_every_registered_model_is_covered() -> None:
    assert set(SAMPLE_SHAPES) == set(MODEL_BUILDERS), "add a sample shape for the new model"


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_onnx_export_matches_torch(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = ModelSpec(name, SAMPLE_SHAPES[name], 10)
    model = build_model(spec).eval()
    export_onnx(model, spec.input_shape, tmp_path / "model.onnx")
    export_onnx(model.features, spec.input_shape, tmp_path / "backbone.onnx", "features")

    proto = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version >= DEFAULT_OPSET
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    # 17 samples: a batch size other than the one traced, so the batch axis must be dynamic.
    x = np.random.default_rng(0).standard_normal((17, *spec.input_shape)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = EdgeModel(tmp_path / "model.onnx").forward(x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()

    head = HeadLearner(model.head.weight.detach().numpy(), model.head.bias.detach().numpy())
    split = head.logits(extract_features(EdgeModel(tmp_path / "backbone.onnx"), x, batch_size=5))
    np.testing.assert_allclose(split, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_head_weights_match_torch_state_names_and_shapes(name: str) -> None:
    model = build_model(ModelSpec(name, SAMPLE_SHAPES[name], 7))
    torch_head = {k: v for k, v in state_to_numpy(model).items() if k.startswith("head.")}
    edge_head = HeadLearner(torch_head["head.weight"], torch_head["head.bias"]).weights()
    assert {k: (v.shape, v.dtype) for k, v in edge_head.items()} == {
        k: (v.shape, v.dtype) for k, v in torch_head.items()
    }


def _train_digits_cnn(checkpoint: Path) -> None:
    bundle = load_dataset("digits", test_fraction=0.2, seed=0)
    spec = ModelSpec("cnn", bundle.input_shape, bundle.num_classes)
    torch.manual_seed(0)
    model = build_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.tensor(bundle.x_train), torch.tensor(bundle.y_train)
    for _ in range(8):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    save_model(checkpoint, spec, state_to_numpy(model))


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkpoint = tmp_path_factory.mktemp("digits") / "model.pt"
    _train_digits_cnn(checkpoint)
    return checkpoint


def _export(checkpoint: Path, out: Path, quantization: str) -> dict:
    bundle = load_dataset("digits", test_fraction=0.2, seed=0)
    x_calib = bundle.x_train[:300] if quantization == "static" else None
    return export_model(
        checkpoint,
        out,
        x_calib,
        bundle.x_test,
        bundle.y_test,
        quantization=quantization,
        latency_repeats=3,
    )


@pytest.fixture(scope="module")
def static_export(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("static")
    _export(digits_checkpoint, out, "static")
    return out


def _report(out: Path) -> dict:
    return json.loads((out / artifacts.REPORT).read_text())


@pytest.mark.parametrize("quantization", ["static", "dynamic"])
def test_int8_accuracy_drop_is_bounded_on_digits(
    quantization: str, digits_checkpoint: Path, tmp_path: Path
) -> None:
    report = _export(digits_checkpoint, tmp_path, quantization)
    accuracy = report["accuracy"]
    assert accuracy["torch_fp32"] > 0.9, "the CNN did not train; the bound would be vacuous"
    assert accuracy["onnx_fp32"] == accuracy["torch_fp32"]
    assert accuracy["onnx_fp32"] - accuracy["onnx_int8"] <= 0.015
    assert accuracy["onnx_fp32"] - accuracy["edge_int8_split"] <= 0.015
    assert report["quantization"] == {"static": "static-qdq", "dynamic": "dynamic"}[quantization]


def test_export_writes_artifacts_and_report(static_export: Path) -> None:
    report = _report(static_export)
    for name in report["files"].values():
        assert (static_export / name).is_file()
    sizes = report["size_bytes"]
    assert sizes["onnx_fp32"] == (static_export / artifacts.MODEL_FP32).stat().st_size
    # The target; 0.25 is the int8 weights alone, the rest is graph overhead.
    assert sizes["onnx_int8"] <= 0.27 * sizes["onnx_fp32"]
    assert report["size_ratio_int8"] <= 0.27
    assert sizes["backbone_int8"] <= 0.27 * sizes["backbone_fp32"]
    assert report["agreement"] == 1.0
    assert report["calibration_samples"] == 300
    for runtime in ("torch_fp32", "onnx_fp32", "onnx_int8"):
        for batch in ("batch_1", "batch_32"):
            stats = report["latency_ms"][runtime][batch]
            assert 0 < stats["p50"] <= stats["p95"]


def test_exported_head_file_completes_the_int8_backbone(static_export: Path) -> None:
    bundle = load_dataset("digits", test_fraction=0.2, seed=0)
    head = HeadLearner.load(static_export / artifacts.HEAD)
    features = extract_features(EdgeModel(static_export / artifacts.BACKBONE_INT8), bundle.x_test)
    accuracy = float((head.predict(features) == bundle.y_test).mean())
    assert accuracy == pytest.approx(
        _report(static_export)["accuracy"]["edge_int8_split"], abs=1e-4
    )


def test_static_export_without_calibration_fails_before_writing(
    digits_checkpoint: Path, tmp_path: Path
) -> None:
    bundle = load_dataset("digits", test_fraction=0.2, seed=0)
    with pytest.raises(ValueError, match="calibration inputs"):
        export_model(digits_checkpoint, tmp_path / "out", None, bundle.x_test, bundle.y_test)
    assert not (tmp_path / "out").exists()


def test_export_rejects_eval_data_of_another_shape(digits_checkpoint: Path, tmp_path: Path) -> None:
    x = np.zeros((4, 30), dtype=np.float32)
    with pytest.raises(ValueError, match=r"does not fit the checkpoint's input shape \(1, 8, 8\)"):
        export_model(digits_checkpoint, tmp_path, x, x, np.zeros(4, dtype=np.int64))


def _initializer_key(tensor: onnx.TensorProto) -> tuple[int, tuple[int, ...], bytes]:
    return tensor.data_type, tuple(tensor.dims), onnx.numpy_helper.to_array(tensor).tobytes()


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_compaction_keeps_outputs_identical(
    variant: str, digits_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The graphs exactly as torch and onnxruntime write them, before any compaction.
    monkeypatch.setattr(export_module, "compact_onnx", lambda path: None)
    model, spec = load_model(digits_checkpoint)
    raw = tmp_path / "raw.onnx"
    export_onnx(model, spec.input_shape, raw)
    if variant == "int8":
        bundle = load_dataset("digits", test_fraction=0.2, seed=0)
        fp32, raw = raw, tmp_path / "raw.int8.onnx"
        quantize_onnx(fp32, raw, "static", bundle.x_train[:300])
    compact = tmp_path / "compact.onnx"
    shutil.copy(raw, compact)
    compact_onnx(compact)

    before, after = onnx.load(str(raw)), onnx.load(str(compact))
    assert compact.stat().st_size < raw.stat().st_size
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]
    assert after.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    keys = [_initializer_key(tensor) for tensor in after.graph.initializer]
    assert len(keys) == len(set(keys)), "identical initializers should be stored once"
    rng = np.random.default_rng(1)
    for batch in (1, 7):
        x = rng.standard_normal((batch, *spec.input_shape)).astype(np.float32)
        np.testing.assert_array_equal(EdgeModel(compact).forward(x), EdgeModel(raw).forward(x))
