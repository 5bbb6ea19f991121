"""The current global backbone as ONNX bytes, sent to edge clients every round.

Edge clients train only the classifier head, so their features must come from the same
backbone the torch clients are updating; otherwise their head updates would fit stale
features. torch and onnx are imported only when a payload is built, so edge clients can
import `BACKBONE_KEY` from here without them.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fedge.edge import artifacts
from fedge.edge.head import HEAD_BIAS, HEAD_WEIGHT
from fedge.models.spec import ModelSpec
from fedge.records import NamedArrays

BACKBONE_KEY = "edge-backbone-onnx"
"""ConfigRecord key (train and evaluate config) holding the backbone ONNX model as bytes."""

_CACHE_SIZE = 4
_cache: OrderedDict[str, bytes] = OrderedDict()


def _fingerprint(
    spec: ModelSpec, arrays: NamedArrays, int8: bool, x_calib: np.ndarray | None
) -> str:
    """Identity of a payload: the head is left out, as it is not part of the backbone.

    So rounds that change only the head (e.g. an all-edge federation), and the evaluate
    stage that follows a round's training, reuse the previous export.
    """
    digest = hashlib.blake2b(repr((spec, int8)).encode(), digest_size=16)
    for name in sorted(set(arrays) - {HEAD_WEIGHT, HEAD_BIAS}):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{value.dtype}:{value.shape}".encode())
        digest.update(value.data)
    if int8 and x_calib is not None:
        digest.update(np.ascontiguousarray(x_calib, dtype=np.float32).data)
    return digest.hexdigest()


def _export(spec: ModelSpec, arrays: NamedArrays, int8: bool, x_calib: np.ndarray | None) -> bytes:
    from fedge.edge.compact import compact_onnx
    from fedge.edge.export import export_onnx
    from fedge.edge.quantize import quantize_onnx
    from fedge.models import build_model, load_numpy_state

    model = build_model(spec).eval()
    load_numpy_state(model, arrays)
    with tempfile.TemporaryDirectory(prefix="fedge-backbone-") as tmp:
        path = Path(tmp, artifacts.BACKBONE_FP32)
        export_onnx(model.features, spec.input_shape, path, "features")
        if int8:
            fp32, path = path, Path(tmp, artifacts.BACKBONE_INT8)
            quantize_onnx(fp32, path, "static", x_calib)
            compact_onnx(path)
        return path.read_bytes()


def backbone_payload(
    spec: ModelSpec,
    arrays: NamedArrays,
    int8: bool = False,
    x_calib: np.ndarray | None = None,
) -> bytes:
    """The backbone of the model `arrays` describe, as ONNX bytes (fp32, or int8 QDQ).

    int8 uses static quantization calibrated on `x_calib` (a few hundred representative
    inputs the server holds): about a quarter of the bytes to send, as deployed on devices.
    Results are cached by content, so the same weights are exported once.
    """
    key = _fingerprint(spec, arrays, int8, x_calib)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    payload = _export(spec, arrays, int8, x_calib)
    _cache[key] = payload
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return payload
