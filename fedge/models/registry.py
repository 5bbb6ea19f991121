"""Build, save and load models by spec."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedge.models.cnn import SmallCNN
from fedge.models.mlp import TabularMLP
from fedge.models.spec import ModelSpec

MODEL_BUILDERS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "cnn": SmallCNN,
    "mlp": TabularMLP,
}


def build_model(spec: ModelSpec) -> nn.Module:
    try:
        builder = MODEL_BUILDERS[spec.name]
    except KeyError:
        raise ValueError(
            f"unknown model {spec.name!r}; choose one of {sorted(MODEL_BUILDERS)}"
        ) from None
    return builder(spec.input_shape, spec.num_classes)


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """Model weights as named float32 numpy arrays (the wire format)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})


def save_model(
    path: Path,
    spec: ModelSpec,
    arrays: dict[str, np.ndarray],
    provenance: dict[str, str | float | int] | None = None,
) -> None:
    """A `.pt` holding the state dict and the spec, rebuildable without config.

    `provenance` (dataset, test-fraction, seed) lets `fedge export` evaluate on
    the same held-out split the training run kept aside.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    torch.save({"spec": spec.to_dict(), "state_dict": state, "provenance": provenance or {}}, path)


def _read_saved_model(path: Path) -> dict[str, object]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no model file at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "spec" not in payload:
        raise ValueError(
            f"{path} is not a fedge model: expected a dict with 'spec' and 'state_dict'"
        )
    return payload


def model_provenance(path: Path) -> dict[str, str | float | int]:
    """The data a saved model was trained on ({} for models saved without it)."""
    return dict(_read_saved_model(path).get("provenance") or {})  # type: ignore[call-overload]


def load_model(path: Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model saved by `save_model` (or a fedge checkpoint)."""
    payload = _read_saved_model(path)
    spec = ModelSpec.from_dict(payload["spec"])  # type: ignore[arg-type]
    model = build_model(spec)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, spec
