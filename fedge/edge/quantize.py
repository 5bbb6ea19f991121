"""int8 quantization of exported ONNX graphs with onnxruntime, and graph compaction.

Needs onnx and onnxruntime's quantization tools (not torch); the edge runtime never imports it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from fedge.edge.artifacts import QUANTIZATIONS

log = logging.getLogger(__name__)

# Conv/Gemm/MatMul hold nearly all weights and FLOPs. Leaving norms and activations in
# fp32 spares the Q/DQ pairs around them, whose per-tensor overhead dominates tiny models
# and which cost accuracy without saving compute.
_QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds a calibration array to `quantize_static` in fixed-size batches."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int = 32) -> None:
        self._input_name = input_name
        self._x = np.ascontiguousarray(x, dtype=np.float32)
        self._batch_size = batch_size
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self._x):
            return None
        batch = self._x[self._pos : self._pos + self._batch_size]
        self._pos += self._batch_size
        return {self._input_name: batch}

    def rewind(self) -> None:
        self._pos = 0


def check_quantization(quantization: str, x_calib: np.ndarray | None) -> None:
    """Fail before any export work if the quantization settings can't be satisfied."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "static" and (x_calib is None or len(x_calib) == 0):
        raise ValueError(
            "static quantization needs calibration inputs (x_calib): pass a few hundred "
            "representative samples, or use quantization='dynamic'"
        )


def quantize_onnx(
    src: Path,
    dst: Path,
    quantization: str = "static",
    x_calib: np.ndarray | None = None,
    per_channel: bool = False,
) -> str:
    """Write an int8 version of `src` to `dst`; returns the method label for export.json.

    "static": QDQ with int8 weights and uint8 activations, MinMax ranges calibrated on
    `x_calib` (a few hundred representative inputs). "dynamic": int8 weights, activation
    ranges computed per batch at run time (no calibration data, slower per call).
    """
    check_quantization(quantization, x_calib)
    if quantization == "dynamic":
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            op_types_to_quantize=_QUANTIZED_OPS,
        )
        return "dynamic"
    assert x_calib is not None  # check_quantization guarantees it
    input_name = onnx.load(str(src)).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        # Shape inference and graph cleanup, as onnxruntime recommends before calibrating.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared))
        quantize_static(
            str(prepared),
            str(dst),
            ArrayCalibrationReader(input_name, x_calib),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            op_types_to_quantize=_QUANTIZED_OPS,
            calibrate_method=CalibrationMethod.MinMax,
            # An fp32 bias costs the same bytes as an int32 one, without its scale and DQ node.
            extra_options={"QuantizeBias": False},
        )
    return "static-qdq"


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(attr.g.node or attr.graphs for node in graph.node for attr in node.attribute)


def compact_onnx(path: Path) -> None:
    """Drop doc strings, cached shapes and long internal names from a model file, in place.

    Exporter and quantizer names (e.g. `/features/features.0/Conv_output_0_QuantizeLinear`)
    cost ~100 bytes per node: on a tiny int8 model that is a quarter of the file. Graph
    inputs and outputs keep their names; graphs with control-flow subgraphs keep all
    names, since those may refer to outer tensors by name.
    """
    model = onnx.load(str(path))
    graph = model.graph
    del graph.value_info[:]
    graph.doc_string = ""
    rename = not _has_subgraphs(graph)
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    short: dict[str, str] = {}

    def shorten(name: str) -> str:
        if not rename or not name or name in keep:
            return name
        return short.setdefault(name, f"t{len(short)}")

    for tensor in graph.initializer:
        tensor.name = shorten(tensor.name)
    for node in graph.node:
        node.doc_string = ""
        if rename:
            node.name = ""
        node.input[:] = [shorten(name) for name in node.input]
        node.output[:] = [shorten(name) for name in node.output]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    log.debug("compacted %s (%d tensors renamed)", path, len(short))
