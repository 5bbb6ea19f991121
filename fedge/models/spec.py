"""What a model is, independent of its weights: enough to rebuild it anywhere."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelSpec:
    """Architecture name, input shape (without batch) and number of classes.

    A checkpoint stores this next to the weights so export and edge tools can
    rebuild the network without the run config that trained it.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> ModelSpec:
        shape = raw["input_shape"]
        if not isinstance(shape, (list, tuple)):
            raise ValueError(f"input_shape must be a list of ints, got {shape!r}")
        return cls(
            name=str(raw["name"]),
            input_shape=tuple(int(d) for d in shape),
            num_classes=int(raw["num_classes"]),  # type: ignore[call-overload]
        )


def default_model_name(input_shape: tuple[int, ...]) -> str:
    """Images (C, H, W) get the CNN, everything else the MLP."""
    return "cnn" if len(input_shape) == 3 else "mlp"


def spec_for_data(model: str, input_shape: tuple[int, ...], num_classes: int) -> ModelSpec:
    """The spec a run uses: `model="auto"` picks by input rank."""
    name = default_model_name(input_shape) if model == "auto" else model
    if name == "cnn" and len(input_shape) != 3:
        raise ValueError(
            f"model 'cnn' needs image data (C, H, W) but the dataset has shape {input_shape}; "
            "set model='mlp' or 'auto'"
        )
    return ModelSpec(name, tuple(input_shape), num_classes)
