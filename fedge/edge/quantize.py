"""int8 quantization of exported ONNX graphs with onnxruntime.

Needs onnx and onnxruntime's quantization tools (not torch); the edge runtime never imports it.
"""

from __future__ import annotations

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

# Conv/Gemm/MatMul hold nearly all weights and FLOPs. Leaving norms and pools in fp32
# spares the Q/DQ pairs around them, whose per-tensor overhead dominates tiny models and
# which cost accuracy without saving compute. A Relu right after a quantized op is listed
# so the quantizer folds it into that op's output range (uint8, zero point 0) and drops
# it with a Q/DQ pair; a Relu after fp32 ops stays as it is.
_QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Relu"]


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
