"""Torch-free inference on exported ONNX models: load, validate inputs, predict, benchmark.

Imports only numpy, onnxruntime and the stdlib (Pillow lazily, for image inputs), so it
runs on devices where torch is not installed.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fedge.edge import artifacts

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
POLARITIES = ("light-on-dark", "dark-on-light")
MAX_REPORT_BYTES = 16 << 20
"""An export.json larger than this (16 MiB) is refused unread."""


@dataclass(frozen=True)
class ExportInfo:
    """What export.json says a model's inputs look like and its outputs mean.

    Read from the file beside the model and checked field by field before use: a
    damaged or hand-edited report fails in one line instead of steering predictions.
    """

    class_names: tuple[str, ...] = ()
    polarity: str | None = None
    """Images: "light-on-dark" (digits, MNIST) or "dark-on-light" (ink on paper)."""
    value_range: tuple[float, float] | None = None
    scaling: str = ""

    @classmethod
    def beside(cls, model_path: Path) -> ExportInfo | None:
        """The export.json in the model's folder, or None when there is none."""
        path = Path(model_path).parent / artifacts.REPORT
        if not path.is_file():
            return None
        if path.stat().st_size > MAX_REPORT_BYTES:
            raise ValueError(f"{path} is larger than {MAX_REPORT_BYTES} bytes; re-export the model")
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_report(report)
        except (ValueError, TypeError, KeyError, RecursionError) as error:
            raise ValueError(
                f"{path} is not a valid fedge export report ({error}); re-export the model "
                "with `fedge export`, or remove the file to predict without it"
            ) from None

    @classmethod
    def from_report(cls, report: Any) -> ExportInfo:
        if not isinstance(report, dict):
            raise TypeError("the report is not a JSON object")
        names = report.get("class_names") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("class_names must be a list of strings")
        convention = report.get("input") or {}
        if not isinstance(convention, dict):
            raise TypeError("input must be an object")
        polarity = convention.get("polarity")
        if polarity is not None and polarity not in POLARITIES:
            raise ValueError(f"input.polarity must be one of {list(POLARITIES)}")
        bounds = convention.get("value_range")
        value_range = None
        if bounds is not None:
            low, high = (float(v) for v in bounds)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError("input.value_range must be two finite numbers, low < high")
            value_range = (low, high)
        return cls(tuple(names), polarity, value_range, str(convention.get("scaling", "")))

    def check_outputs(self, num_outputs: int, model_path: Path) -> None:
        if self.class_names and len(self.class_names) != num_outputs:
            raise ValueError(
                f"export.json beside {model_path} names {len(self.class_names)} classes but the "
                f"model has {num_outputs} outputs; predict with model.onnx / model.int8.onnx "
                "of the same export"
            )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row max so large logits don't overflow."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class EdgeModel:
    """An ONNX model on onnxruntime's CPU provider that checks inputs before running them.

    onnxruntime's own shape/dtype errors name internal tensors; checking here lets the
    error say what the model expects and how to fix the input.
    """

    def __init__(
        self, path: Path | str, threads: int | None = None, model_bytes: bytes | None = None
    ) -> None:
        """Load `path`, or `model_bytes` when given (then `path` only names it in messages)."""
        self.path = Path(path)
        if model_bytes is None and not self.path.is_file():
            raise FileNotFoundError(
                f"no ONNX model at {self.path}; create one with `fedge export CHECKPOINT --out DIR`"
            )
        options = ort.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
        self.threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path) if model_bytes is None else model_bytes,
                options,
                providers=["CPUExecutionProvider"],
            )
        # onnxruntime raises its own pybind exception types for unreadable models.
        except Exception as exc:
            raise ValueError(f"{self.path} is not a loadable ONNX model: {exc}") from exc
        model_input = self.session.get_inputs()[0]
        if model_input.type != "tensor(float)":
            raise ValueError(f"{self.path} takes {model_input.type}; fedge models take float32")
        self.input_name: str = model_input.name
        self.output_name: str = self.session.get_outputs()[0].name
        # Dynamic dimensions come back as names (str) or None.
        if not model_input.shape or not all(isinstance(d, int) for d in model_input.shape[1:]):
            raise ValueError(
                f"{self.path} has input shape {model_input.shape}; fedge needs a batch axis "
                "followed by fixed dimensions (re-export it with `fedge export`)"
            )
        batch = model_input.shape[0]
        self.batch_dim: int | None = batch if isinstance(batch, int) else None
        self.sample_shape: tuple[int, ...] = tuple(model_input.shape[1:])

    @classmethod
    def from_bytes(
        cls, model: bytes, name: str = "<in-memory model>", threads: int | None = None
    ) -> EdgeModel:
        """A model received over the network (e.g. the server's backbone), never written to disk."""
        return cls(name, threads, model_bytes=model)

    def _describe_input(self) -> str:
        batch = "N" if self.batch_dim is None else str(self.batch_dim)
        return f"({', '.join([batch, *map(str, self.sample_shape)])})"

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Return `x` as an array if it fits the model, else raise a ValueError saying how."""
        x = np.asarray(x)
        expected_ndim = len(self.sample_shape) + 1
        shape_ok = (
            x.ndim == expected_ndim
            and x.shape[1:] == self.sample_shape
            and (self.batch_dim is None or x.shape[0] == self.batch_dim)
        )
        if shape_ok and x.dtype == np.float32:
            return x
        fixes = []
        if x.dtype != np.float32:
            fixes.append("cast with x.astype(np.float32), scaled like the training data")
        if not shape_ok:
            if x.shape == self.sample_shape:
                fixes.append("add a batch axis with x[None]")
            else:
                fixes.append("reshape it to the model's input shape (load_input resizes images)")
        raise ValueError(
            f"expected float32 input of shape {self._describe_input()}, "
            f"got {x.shape} {x.dtype}: {'; '.join(fixes)}"
        )

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Raw model output: logits for a classifier, feature vectors for a backbone."""
        x = self.check_input(x)
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.forward(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class ids, one per sample."""
        return self.forward(x).argmax(axis=1)


def _load_npy(path: Path) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(
            f"could not read {path} as a NumPy .npy array ({exc}); write inputs with numpy.save"
        ) from exc
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"{path} holds {x.dtype} values; save float inputs preprocessed like the training "
            "data (images scaled to [0, 1])"
        )
    return x.astype(np.float32, copy=False)


def image_polarity(pixels: np.ndarray) -> str:
    """Which way round an image (C, H, W) in [0, 1] is: its border is its background."""
    gray = pixels.mean(axis=0)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return "dark-on-light" if float(np.median(border)) > 0.5 else "light-on-dark"


def _adapt_image(pixels: np.ndarray, path: Path, info: ExportInfo | None) -> np.ndarray:
    """Invert an image whose polarity is the opposite of the model's, and say so."""
    if info is None or info.polarity is None:
        log.warning(
            "%s: the model's input convention is unknown (no export.json with an input "
            "polarity beside the model), so the image is used as read, [0, 1], its polarity "
            "unchecked",
            path,
        )
        return pixels
    seen = image_polarity(pixels)
    if seen == info.polarity:
        return pixels
    log.warning(
        "%s is %s but the model was trained on %s images (export.json); inverted it",
        path,
        seen,
        info.polarity,
    )
    return 1.0 - pixels


def _check_array(x: np.ndarray, path: Path, info: ExportInfo | None) -> None:
    """Warn when a preprocessed array does not look like what the model was trained on."""
    if info is None or info.value_range is None or not x.size:
        return
    low, high = info.value_range
    margin = (high - low) / 2
    if float(x.min()) < low - margin or float(x.max()) > high + margin:
        log.warning(
            "%s spans [%.4g, %.4g] but the model's inputs spanned [%.4g, %.4g] (%s); "
            "scale it the same way or predictions will be wrong",
            path,
            float(x.min()),
            float(x.max()),
            low,
            high,
            info.scaling or "see export.json",
        )
    if info.polarity is not None and x.ndim == 4:
        flipped = [i for i, sample in enumerate(x) if image_polarity(sample) != info.polarity]
        if flipped:
            log.warning(
                "%s: samples %s look %s but the model was trained on %s images; invert them "
                "(1 - x) or predictions will be wrong",
                path,
                flipped[:10],
                "dark-on-light" if info.polarity == "light-on-dark" else "light-on-dark",
                info.polarity,
            )


def _load_image(path: Path, sample_shape: tuple[int, ...]) -> np.ndarray:
    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
        raise ValueError(
            f"the model takes inputs of shape {sample_shape}, not images (1 or 3, H, W); "
            "pass a .npy file instead"
        )
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(
            "reading images needs Pillow: pip install 'fedge[edge]' (or pillow), "
            "or pass a .npy file"
        ) from None
    channels, height, width = sample_shape
    try:
        with Image.open(path) as image:
            # BOX averages pixel blocks when shrinking, as the digits set was made.
            image = image.convert("L" if channels == 1 else "RGB").resize(
                (width, height), Image.Resampling.BOX
            )
    except OSError as exc:
        raise ValueError(f"could not read image {path}: {exc}") from exc
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def load_input(
    path: Path | str, sample_shape: Sequence[int], info: ExportInfo | None = None
) -> np.ndarray:
    """Read a `.npy` array or an image into a float32 batch for a model's input shape.

    Images are converted to grayscale/RGB, resized to (H, W), scaled to [0, 1] and, when
    `info` (the model's export.json) says the model saw the other polarity, inverted;
    arrays are used as given, with a warning when their range or polarity differs from
    `info`'s. A single sample (shape == `sample_shape`) gets a batch axis.
    """
    path = Path(path)
    sample_shape = tuple(int(d) for d in sample_shape)
    if not path.is_file():
        raise FileNotFoundError(f"no input file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        x = _load_npy(path)
        _check_array(x[None] if x.shape == sample_shape else x, path, info)
    elif suffix in IMAGE_SUFFIXES:
        x = _adapt_image(_load_image(path, sample_shape), path, info)
    else:
        raise ValueError(
            f"unsupported input file {path.name}: use .npy or an image "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return x[None] if x.shape == sample_shape else x


def run_batched(
    fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """`fn` over `x` in slices, concatenated; bounds memory for large inputs on small devices."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) == 0:
        raise ValueError("no inputs to run")
    return np.concatenate([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def measure_latency(
    fn: Callable[[np.ndarray], object], x: np.ndarray, repeats: int = 50, warmup: int = 5
) -> dict[str, float]:
    """p50/p95 wall time of `fn(x)` in ms; shared by export and bench so numbers compare."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn(x)
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn(x)
        times[i] = time.perf_counter() - start
    p50, p95 = np.percentile(times * 1000.0, [50, 95])
    return {"p50": round(float(p50), 4), "p95": round(float(p95), 4)}


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB; None where the OS has no getrusage."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 2)


def benchmark(
    model: EdgeModel,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 50,
    warmup: int = 5,
    seed: int = 0,
) -> dict[str, object]:
    """Latency (p50/p95 ms), throughput (samples/s at p50) and peak RSS on random inputs."""
    rng = np.random.default_rng(seed)
    latency: dict[str, dict[str, float]] = {}
    throughput: dict[str, float] = {}
    for batch in batch_sizes:
        if batch < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch}")
        x = rng.random((batch, *model.sample_shape), dtype=np.float32)
        stats = measure_latency(model.forward, x, repeats, warmup)
        latency[f"batch_{batch}"] = stats
        throughput[f"batch_{batch}"] = round(batch / (stats["p50"] / 1000.0), 1)
    return {
        "model": str(model.path),
        "threads": model.threads,
        "repeats": repeats,
        "latency_ms": latency,
        "throughput_per_s": throughput,
        "peak_rss_mb": peak_rss_mb(),
    }
