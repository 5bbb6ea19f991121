"""Names shared by the exporter, the CLI and the torch-free edge side, importable anywhere.

Kept apart from `export`/`quantize` so reading them pulls in neither torch nor onnx.
"""

MODEL_FP32 = "model.onnx"
MODEL_INT8 = "model.int8.onnx"
BACKBONE_FP32 = "backbone.onnx"
BACKBONE_INT8 = "backbone.int8.onnx"
HEAD = "head.npz"
REPORT = "export.json"

QUANTIZATIONS = ("static", "dynamic")
