"""Model registry: Opacus-compatible (GroupNorm) and ONNX-exportable networks.

`ModelSpec` and `spec_for_data` are torch-free; everything else loads torch on
first use, so torch-free edge code can still describe models.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedge.models.spec import ModelSpec, default_model_name, spec_for_data

_TORCH_EXPORTS = {
    "MODEL_BUILDERS",
    "build_model",
    "load_model",
    "load_numpy_state",
    "model_provenance",
    "save_model",
    "state_to_numpy",
}


def __getattr__(name: str) -> Any:
    if name in _TORCH_EXPORTS:
        return getattr(importlib.import_module("fedge.models.registry"), name)
    raise AttributeError(f"module 'fedge.models' has no attribute {name!r}")


__all__ = [  # torch-backed names resolve lazily via __getattr__
    "ModelSpec",
    "default_model_name",
    "spec_for_data",
    *sorted(_TORCH_EXPORTS),
]
