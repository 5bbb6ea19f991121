"""Export a fedge checkpoint for the edge: fp32 and int8 ONNX, and a backbone/head split.

The split (int8 backbone ONNX + head weights as .npz) lets a torch-free device fine-tune
the classifier head on its own data with `fedge.edge.head`. `export_model` also measures
what quantization costs and buys (size, accuracy, latency) and records it in export.json.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedge.data import DatasetBundle
from fedge.edge import artifacts
from fedge.edge.compact import compact_onnx
from fedge.edge.head import HeadLearner, extract_features
from fedge.edge.quantize import check_quantization, quantize_onnx
from fedge.edge.runtime import EdgeModel, measure_latency, run_batched
from fedge.models import load_model

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INPUT_NAME = "input"
LATENCY_BATCHES = (1, 32)


def export_onnx(
    module: nn.Module,
    sample_shape: tuple[int, ...],
    path: Path,
    output_name: str = "logits",
    opset: int = DEFAULT_OPSET,
) -> None:
    """Write `module` (in eval mode) as a checked ONNX file with a dynamic batch axis."""
    dummy = torch.zeros(1, *sample_shape)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated, but the dynamo one needs onnxscript,
        # which fedge does not depend on.
        warnings.simplefilter("ignore", DeprecationWarning)
        # GroupNorm's batch-size sanity check gets traced as a constant; it only guards
        # training, and the dynamic batch axis is tested against torch.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    compact_onnx(path)  # also runs onnx.checker.check_model


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return round(float((logits.argmax(axis=1) == labels).mean()), 4)


def _latencies(
    fn: Callable[[np.ndarray], np.ndarray], x_eval: np.ndarray, repeats: int
) -> dict[str, dict[str, float]]:
    # Real samples, repeated if the eval set is smaller than the largest batch.
    return {
        f"batch_{batch}": measure_latency(fn, x_eval[np.arange(batch) % len(x_eval)], repeats)
        for batch in LATENCY_BATCHES
    }


def export_model(
    checkpoint: Path,
    out_dir: Path,
    x_calib: np.ndarray | None,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    quantization: str = "static",
    per_channel: bool = False,
    latency_repeats: int = 50,
    opset: int = DEFAULT_OPSET,
    class_names: Sequence[str] = (),
    input_convention: dict[str, Any] | None = None,
) -> dict[str, object]:
    """Export `checkpoint` into `out_dir`, evaluate every variant, write and return export.json.

    `x_calib` (a few hundred representative inputs, disjoint from `x_eval` so accuracy
    stays honest) calibrates static quantization; `x_eval`/`y_eval` is the held-out split
    that accuracy, agreement and latency are measured on. `class_names` (what each output
    means) and `input_convention` (shape, scaling, polarity) go into export.json for
    `fedge edge predict`.
    """
    check_quantization(quantization, x_calib)
    # A writable float32 copy: torch warns on (and may not share) read-only arrays.
    x_eval = np.array(x_eval, dtype=np.float32)
    model, spec = load_model(checkpoint)
    if class_names and len(class_names) != spec.num_classes:
        raise ValueError(
            f"{len(class_names)} class names for a model with {spec.num_classes} outputs; "
            "pass the dataset the model was trained on"
        )
    if x_eval.shape[1:] != spec.input_shape or len(x_eval) != len(y_eval) or not len(x_eval):
        raise ValueError(
            f"eval data {x_eval.shape} with {len(y_eval)} labels does not fit the checkpoint's "
            f"input shape {spec.input_shape}; pass the dataset the model was trained on"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        key: out_dir / name
        for key, name in {
            "onnx_fp32": artifacts.MODEL_FP32,
            "onnx_int8": artifacts.MODEL_INT8,
            "backbone_fp32": artifacts.BACKBONE_FP32,
            "backbone_int8": artifacts.BACKBONE_INT8,
            "head": artifacts.HEAD,
        }.items()
    }

    log.info("exporting %s (%s) to ONNX opset %d", checkpoint, spec.name, opset)
    export_onnx(model, spec.input_shape, paths["onnx_fp32"], "logits", opset)
    export_onnx(model.features, spec.input_shape, paths["backbone_fp32"], "features", opset)
    head = HeadLearner(model.head.weight.detach().numpy(), model.head.bias.detach().numpy())
    head.save(paths["head"])

    for fp32, int8 in (("onnx_fp32", "onnx_int8"), ("backbone_fp32", "backbone_int8")):
        log.info("quantizing %s (%s)", paths[fp32].name, quantization)
        method = quantize_onnx(paths[fp32], paths[int8], quantization, x_calib, per_channel)
        compact_onnx(paths[int8])

    log.info("evaluating on %d held-out samples", len(x_eval))
    onnx_fp32 = EdgeModel(paths["onnx_fp32"])
    onnx_int8 = EdgeModel(paths["onnx_int8"])

    def torch_forward(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).numpy()

    with torch.inference_mode():
        torch_logits = run_batched(torch_forward, x_eval)
        fp32_logits = run_batched(onnx_fp32.forward, x_eval)
        int8_logits = run_batched(onnx_int8.forward, x_eval)
        split_logits = head.logits(extract_features(EdgeModel(paths["backbone_int8"]), x_eval))

        log.info("timing batch sizes %s", LATENCY_BATCHES)
        latency = {
            "torch_fp32": _latencies(torch_forward, x_eval, latency_repeats),
            "onnx_fp32": _latencies(onnx_fp32.forward, x_eval, latency_repeats),
            "onnx_int8": _latencies(onnx_int8.forward, x_eval, latency_repeats),
        }

    sizes = {key: path.stat().st_size for key, path in paths.items()}
    report: dict[str, object] = {
        "checkpoint": str(checkpoint),
        "model": spec.to_dict(),
        "class_names": list(class_names) or None,
        "input": input_convention,
        "opset": opset,
        "quantization": method,
        "per_channel": per_channel,
        "calibration_samples": 0 if x_calib is None else len(x_calib),
        "eval_samples": len(x_eval),
        "files": {key: path.name for key, path in paths.items()},
        "size_bytes": sizes,
        "size_ratio_int8": round(sizes["onnx_int8"] / sizes["onnx_fp32"], 4),
        "accuracy": {
            "torch_fp32": _accuracy(torch_logits, y_eval),
            "onnx_fp32": _accuracy(fp32_logits, y_eval),
            "onnx_int8": _accuracy(int8_logits, y_eval),
            "edge_int8_split": _accuracy(split_logits, y_eval),
        },
        "agreement": round(float((fp32_logits.argmax(1) == torch_logits.argmax(1)).mean()), 4),
        "max_abs_logit_diff": float(np.abs(fp32_logits - torch_logits).max()),
        "latency_ms": latency,
        "torch_threads": torch.get_num_threads(),
    }
    (out_dir / artifacts.REPORT).write_text(json.dumps(report, indent=2) + "\n")
    log.info(
        "wrote %s: int8 %.3fx fp32 size, accuracy %s",
        out_dir / artifacts.REPORT,
        report["size_ratio_int8"],
        report["accuracy"],
    )
    return report


def export_for_dataset(
    checkpoint: Path,
    out_dir: Path,
    bundle: DatasetBundle,
    quantization: str = "static",
    calibration_samples: int = 300,
    seed: int = 0,
    **options: Any,
) -> dict[str, object]:
    """`export_model` with calibration drawn from the training pool and evaluation on
    the held-out split, which calibration therefore never sees; the bundle's class names
    and input convention go into export.json."""
    if calibration_samples < 1:
        raise ValueError(f"calibration samples must be >= 1, got {calibration_samples}")
    rng = np.random.default_rng(seed)
    count = min(calibration_samples, len(bundle.x_train))
    x_calib = bundle.x_train[rng.choice(len(bundle.x_train), size=count, replace=False)]
    options.setdefault("class_names", bundle.class_names)
    options.setdefault("input_convention", bundle.input_convention)
    return export_model(
        checkpoint, out_dir, x_calib, bundle.x_test, bundle.y_test, quantization, **options
    )
