"""Edge deployment: ONNX export and int8 quantization, a runtime, and on-device head training.

Nothing is imported here on purpose: `runtime`, `head` and `commands` need only
numpy and onnxruntime, so a device without torch can use them, while `export`,
`quantize` and `export_command` (torch/onnx) are imported only where needed.
"""
