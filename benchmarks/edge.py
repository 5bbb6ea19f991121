"""Edge deployment side by side: fp32 vs int8 ONNX size, accuracy and latency, and a head step.

For each input size (digits at 8x8, and the same digits upsampled to 32x32 and 64x64 to
show how the picture changes with more compute per sample; `--sizes 28` gives MNIST's
size) the script trains fedge's SmallCNN centrally for a few epochs,
exports it with `fedge.edge.export.export_model` (static QDQ int8 and dynamic int8),
and reports in one JSON on stdout:

- int8/fp32 ONNX file size ratio (target <= 0.27),
- held-out accuracy of fp32 ONNX vs int8 (target: drop <= 1.0 point),
- batch-1 and batch-32 latency of torch fp32 eager, onnxruntime fp32 and int8 (static,
  dynamic), measured interleaved in one process, one thread each (target: int8 >= 2x
  faster than torch fp32 at batch 1),
- the op types onnxruntime actually runs for each int8 model (after its graph
  optimizations), which explains the latency,
- a synthetic conv chain without GroupNorm (28x28 and 64x64, random weights) through
  the same export and int8 path, to show where int8 pays off,
- one on-device head update (int8 backbone features + one `HeadLearner.train` epoch on
  one client's partition), timed in a fresh torch-free subprocess with its peak memory.

Usage: `python benchmarks/edge.py [--sizes 8 32 64] [--out result.json]`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from report import finish, parse_with_common_options, start

if TYPE_CHECKING:
    from torch import nn

HEAD_STEP_FLAG = "--head-step"
TARGETS = {"size_ratio_max": 0.27, "accuracy_drop_max_pts": 1.0, "int8_speedup_min": 2.0}
NUM_CLIENTS = 10
TRAIN_EPOCHS = {8: 12, 32: 6, 64: 4}


# --- torch-free head step (runs in a subprocess, like a device would) ----------------


def memory_mb() -> dict[str, float | None]:
    """This process's resident memory now and its peak (VmRSS, VmHWM), in MiB.

    VmHWM belongs to this process image only, unlike `ru_maxrss`, which on Linux also
    counts the parent's pages a forked child held before exec.
    """
    values: dict[str, float | None] = {"rss_mb": None, "peak_rss_mb": None}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    name = "rss_mb" if key == "VmRSS" else "peak_rss_mb"
                    values[name] = round(int(rest.split()[0]) / 1024, 2)
    except OSError:  # not Linux
        pass
    return values


def head_step(folder: Path) -> dict[str, Any]:
    """One edge head update as fedge's edge client does it: backbone bytes → features → train.

    Imports only numpy, onnxruntime and fedge's torch-free edge modules.
    """
    from fedge.edge.head import HeadLearner, extract_features
    from fedge.edge.runtime import EdgeModel

    after_imports = memory_mb()
    with np.load(folder / "client.npz") as data:
        x, y = data["x"], data["y"]
    payload = (folder / "backbone.int8.onnx").read_bytes()
    t0 = time.perf_counter()
    backbone = EdgeModel.from_bytes(payload, name="backbone.int8.onnx", threads=1)
    learner = HeadLearner.load(folder / "head.npz")
    t1 = time.perf_counter()
    features = extract_features(backbone, x)
    t2 = time.perf_counter()
    stats = learner.train(features, y, epochs=1, lr=0.05, batch_size=32, seed=0)
    t3 = time.perf_counter()
    after_step = memory_mb()
    # A second, identical epoch under tracemalloc: numpy's own allocations for the step.
    tracemalloc.start()
    learner.train(extract_features(backbone, x), y, epochs=1, lr=0.05, batch_size=32, seed=0)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "num_examples": len(y),
        "backbone_bytes": len(payload),
        "load_ms": round((t1 - t0) * 1000, 3),
        "features_ms": round((t2 - t1) * 1000, 3),
        "train_epoch_ms": round((t3 - t2) * 1000, 3),
        "total_ms": round((t3 - t0) * 1000, 3),
        "steps": stats["steps"],
        "loss_before": round(stats["loss_before"], 4),
        "loss_after": round(stats["loss_after"], 4),
        "rss_after_imports_mb": after_imports["rss_mb"],
        "rss_after_step_mb": after_step["rss_mb"],
        "peak_rss_mb": after_step["peak_rss_mb"],
        "python_heap_peak_mb": round(traced_peak / 2**20, 3),
        "torch_loaded": sys.modules.get("torch") is not None,
    }


def run_head_step(folder: Path) -> dict[str, Any]:
    """`head_step` in a fresh interpreter with torch blocked, so its memory is the device's.

    The script's folder goes on `sys.path` for its `report` import, as `python` does for
    a script it runs.
    """
    script = Path(__file__).resolve()
    code = (
        "import sys, json, runpy; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
        f"sys.path.insert(0, {str(script.parent)!r}); mod = runpy.run_path({str(script)!r}); "
        f"print(json.dumps(mod['head_step'](__import__('pathlib').Path({str(folder)!r}))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    if done.returncode != 0:
        raise RuntimeError(f"head step failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- training, export and side-by-side latency (parent process, torch) ---------------


def upsample(x: np.ndarray, size: int) -> np.ndarray:
    """Digits (N, 1, 8, 8) bilinearly resized to (N, 1, size, size)."""
    import torch
    import torch.nn.functional as F

    if x.shape[-1] == size:
        return np.ascontiguousarray(x, dtype=np.float32)
    t = F.interpolate(torch.from_numpy(np.array(x)), size=(size, size), mode="bilinear")
    return t.numpy().astype(np.float32)


def train_model(
    x: np.ndarray, y: np.ndarray, num_classes: int, epochs: int, seed: int
) -> nn.Module:
    """fedge's SmallCNN trained centrally with the default client optimizer settings."""
    import torch

    from fedge.models import ModelSpec, build_model
    from fedge.models.training import make_loader, train_epochs

    torch.manual_seed(seed)
    model = build_model(ModelSpec("cnn", tuple(x.shape[1:]), num_classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_epochs(model, make_loader(x, y, 32, shuffle=True, seed=seed), optimizer, epochs)
    return model.eval()


def executed_ops(path: Path) -> dict[str, int]:
    """Op types of the graph onnxruntime runs after its default (full) optimizations."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3  # not the "hardware-specific file" warning
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def interleaved_latency(
    fns: dict[str, Callable[[np.ndarray], object]],
    x: np.ndarray,
    rounds: int,
    calls: int,
) -> dict[str, dict[str, float]]:
    """Per-call ms (median and p90 over `rounds` blocks of `calls` calls), variants interleaved.

    Each round runs every variant once, in a rotating order, so machine noise falls on all
    of them alike.
    """
    names = list(fns)
    for fn in fns.values():  # warm-up
        for _ in range(5):
            fn(x)
    blocks: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(calls):
                fn(x)
            blocks[name].append((time.perf_counter() - start) / calls * 1000.0)
    return {
        name: {
            "median_ms": round(float(np.median(v)), 4),
            "p90_ms": round(float(np.percentile(v, 90)), 4),
        }
        for name, v in blocks.items()
    }


def run_case(size: int, work: Path, seed: int, rounds: int, quick: bool) -> dict[str, Any]:
    """Train, export (static and dynamic) and compare one input size."""
    import torch

    from fedge.data import client_split, load_dataset
    from fedge.edge.export import export_model
    from fedge.edge.runtime import EdgeModel
    from fedge.models import ModelSpec, save_model, state_to_numpy

    bundle = load_dataset("digits", 0.2, seed)
    x_pool, x_test = upsample(bundle.x_train, size), upsample(bundle.x_test, size)
    epochs = 2 if quick else TRAIN_EPOCHS.get(size, 5)
    torch.set_num_threads(1)  # 2 threads made training 5-25x slower on the noisy 2-core box
    start = time.perf_counter()
    model = train_model(x_pool, bundle.y_train, bundle.num_classes, epochs, seed)
    train_s = time.perf_counter() - start
    case_dir = work / f"cnn_{size}x{size}"
    spec = ModelSpec("cnn", tuple(x_pool.shape[1:]), bundle.num_classes)
    checkpoint = case_dir / "model.pt"
    save_model(checkpoint, spec, state_to_numpy(model))

    # Calibration from the training pool, evaluation on the held-out split: disjoint.
    calib = x_pool[np.random.default_rng(seed).permutation(len(x_pool))[:256]]
    reports: dict[str, dict[str, Any]] = {}
    for method in ("static", "dynamic"):
        reports[method] = export_model(
            checkpoint,
            case_dir / method,
            calib if method == "static" else None,
            x_test,
            bundle.y_test,
            quantization=method,
            latency_repeats=5,  # export's own timing; the side-by-side one is below
        )
    static, dynamic = reports["static"], reports["dynamic"]
    sizes = static["size_bytes"]
    accuracy = {
        "torch_fp32": static["accuracy"]["torch_fp32"],
        "onnx_fp32": static["accuracy"]["onnx_fp32"],
        "onnx_int8_static": static["accuracy"]["onnx_int8"],
        "onnx_int8_dynamic": dynamic["accuracy"]["onnx_int8"],
        "edge_split_int8_static": static["accuracy"]["edge_int8_split"],
    }
    drop_static = round((accuracy["onnx_fp32"] - accuracy["onnx_int8_static"]) * 100, 2)
    drop_dynamic = round((accuracy["onnx_fp32"] - accuracy["onnx_int8_dynamic"]) * 100, 2)

    paths = {
        "onnx_fp32": case_dir / "static" / "model.onnx",
        "onnx_int8_static": case_dir / "static" / "model.int8.onnx",
        "onnx_int8_dynamic": case_dir / "dynamic" / "model.int8.onnx",
    }
    sessions = {name: EdgeModel(path, threads=1) for name, path in paths.items()}

    def torch_fp32(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).numpy()

    fns: dict[str, Callable[[np.ndarray], object]] = {"torch_fp32": torch_fp32}
    fns.update({name: session.forward for name, session in sessions.items()})
    latency: dict[str, Any] = {}
    with torch.inference_mode():
        for batch, calls in ((1, 20), (32, 3)):
            x = np.ascontiguousarray(x_test[np.arange(batch) % len(x_test)])
            latency[f"batch_{batch}"] = interleaved_latency(fns, x, rounds, calls)
    b1 = latency["batch_1"]
    b32 = latency["batch_32"]

    def speedup(table: dict[str, Any], slow: str, fast: str) -> float:
        return round(table[slow]["median_ms"] / table[fast]["median_ms"], 3)

    # One client's partition (as in a 10-client simulation) for the on-device head step.
    x_client, y_client, _, _ = client_split(bundle, 0, NUM_CLIENTS, "dirichlet", seed, 0.1, 0.5, 2)
    head_dir = case_dir / "static"
    np.savez(head_dir / "client.npz", x=upsample(x_client, size), y=y_client)
    head = run_head_step(head_dir)

    return {
        "input_shape": list(spec.input_shape),
        "params": int(sum(p.numel() for p in model.parameters())),
        "train_epochs": epochs,
        "train_s": round(train_s, 2),
        "size_bytes": {
            "onnx_fp32": sizes["onnx_fp32"],
            "onnx_int8_static": sizes["onnx_int8"],
            "onnx_int8_dynamic": dynamic["size_bytes"]["onnx_int8"],
            "backbone_int8_static": sizes["backbone_int8"],
            "head_npz": sizes["head"],
        },
        "size_ratio": {
            "int8_static_vs_fp32": static["size_ratio_int8"],
            "int8_dynamic_vs_fp32": dynamic["size_ratio_int8"],
        },
        "accuracy": accuracy,
        "accuracy_drop_pts": {"int8_static": drop_static, "int8_dynamic": drop_dynamic},
        "latency_ms": latency,
        "speedup": {
            "batch_1": {
                "int8_static_vs_torch_fp32": speedup(b1, "torch_fp32", "onnx_int8_static"),
                "int8_dynamic_vs_torch_fp32": speedup(b1, "torch_fp32", "onnx_int8_dynamic"),
                "onnx_fp32_vs_torch_fp32": speedup(b1, "torch_fp32", "onnx_fp32"),
                "int8_static_vs_onnx_fp32": speedup(b1, "onnx_fp32", "onnx_int8_static"),
            },
            "batch_32": {
                "int8_static_vs_torch_fp32": speedup(b32, "torch_fp32", "onnx_int8_static"),
                "int8_dynamic_vs_torch_fp32": speedup(b32, "torch_fp32", "onnx_int8_dynamic"),
                "onnx_fp32_vs_torch_fp32": speedup(b32, "torch_fp32", "onnx_fp32"),
                "int8_static_vs_onnx_fp32": speedup(b32, "onnx_fp32", "onnx_int8_static"),
            },
        },
        "executed_ops": {name: executed_ops(path) for name, path in paths.items()},
        "int8_static_file_bytes": size_breakdown(paths["onnx_int8_static"]),
        "targets": {
            "size_ratio_met": static["size_ratio_int8"] <= TARGETS["size_ratio_max"],
            "accuracy_drop_met": drop_static <= TARGETS["accuracy_drop_max_pts"],
            "int8_speedup_batch1_met": speedup(b1, "torch_fp32", "onnx_int8_static")
            >= TARGETS["int8_speedup_min"],
        },
        "head_step": head,
        "quantization": {"static": static["quantization"], "dynamic": dynamic["quantization"]},
    }


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to fd 1 (the torch exporter prints there) to stderr.

    Keeps stdout for the JSON report alone.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def size_breakdown(path: Path) -> dict[str, int]:
    """Bytes of an ONNX file by initializer dtype, and the rest (graph, names, metadata)."""
    import onnx
    from onnx import numpy_helper

    parts: dict[str, int] = {}
    for tensor in onnx.load(str(path)).graph.initializer:
        array = numpy_helper.to_array(tensor)
        key = f"initializers_{array.dtype}"
        parts[key] = parts.get(key, 0) + array.nbytes
    parts["graph_and_other"] = path.stat().st_size - sum(parts.values())
    return dict(sorted(parts.items()))


def plain_cnn(width: int) -> nn.Module:
    """Four 3x3 convs with ReLU (no norm layers), global pooling and a linear classifier."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    ).eval()


def synthetic_case(size: int, width: int, work: Path, seed: int, rounds: int) -> dict[str, Any]:
    """Random-weight conv chain without GroupNorm through fedge's ONNX + static int8 path.

    Shows where int8 pays off: every conv can stay int8 end to end. Latency and size only
    (random weights, random inputs: accuracy would mean nothing).
    """
    import torch

    from fedge.edge.compact import compact_onnx
    from fedge.edge.export import export_onnx
    from fedge.edge.quantize import quantize_onnx
    from fedge.edge.runtime import EdgeModel

    torch.manual_seed(seed)
    model = plain_cnn(width)
    case_dir = work / f"plain_{size}x{size}_w{width}"
    case_dir.mkdir(parents=True)
    fp32, int8 = case_dir / "model.onnx", case_dir / "model.int8.onnx"
    export_onnx(model, (1, size, size), fp32)
    x = np.random.default_rng(seed).random((256, 1, size, size), dtype=np.float32)
    quantize_onnx(fp32, int8, "static", x)
    compact_onnx(int8)
    sessions = {"onnx_fp32": EdgeModel(fp32, threads=1), "onnx_int8_static": EdgeModel(int8, 1)}

    def torch_fp32(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch)).numpy()

    fns: dict[str, Callable[[np.ndarray], object]] = {"torch_fp32": torch_fp32}
    fns.update({name: session.forward for name, session in sessions.items()})
    with torch.inference_mode():
        latency = interleaved_latency(fns, x[:1], rounds, 10)
    agree = float(
        (sessions["onnx_fp32"].predict(x) == sessions["onnx_int8_static"].predict(x)).mean()
    )
    return {
        "input_shape": [1, size, size],
        "params": int(sum(p.numel() for p in model.parameters())),
        "size_ratio_int8_static_vs_fp32": round(int8.stat().st_size / fp32.stat().st_size, 4),
        "latency_ms": {"batch_1": latency},
        "speedup": {
            "batch_1": {
                "int8_static_vs_torch_fp32": round(
                    latency["torch_fp32"]["median_ms"] / latency["onnx_int8_static"]["median_ms"],
                    3,
                ),
                "int8_static_vs_onnx_fp32": round(
                    latency["onnx_fp32"]["median_ms"] / latency["onnx_int8_static"]["median_ms"],
                    3,
                ),
            }
        },
        "top1_agreement_int8_vs_fp32_random_inputs": round(agree, 4),
        "executed_ops": {"onnx_int8_static": executed_ops(int8)},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--synthetic-sizes", type=int, nargs="*", default=[28, 64])
    parser.add_argument("--synthetic-width", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=40, help="interleaved timing rounds")
    parser.add_argument("--quick", action="store_true", help="2 training epochs (smoke test)")
    return parse_with_common_options(parser, argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report, started = start("edge", "torch", "onnxruntime")
    report["machine"]["threads_for_latency"] = 1
    report["targets"] = TARGETS
    report["cases"] = {}
    with stdout_to_stderr(), tempfile.TemporaryDirectory(prefix="fedge-edge-bench-") as tmp:
        for size in args.sizes:
            name = f"cnn_{size}x{size}"
            try:
                report["cases"][name] = run_case(
                    size, Path(tmp), args.seed, args.rounds, args.quick
                )
            except Exception as exc:  # e.g. an input size fedge cannot export: keep the rest
                message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                report["cases"][name] = {"error": f"{type(exc).__name__}: {message}"}
        report["synthetic"] = {}
        for size in args.synthetic_sizes:
            name = f"plain_cnn_{size}x{size}_w{args.synthetic_width}"
            report["synthetic"][name] = synthetic_case(
                size, args.synthetic_width, Path(tmp), args.seed, args.rounds
            )
    return finish(report, started, args.out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == HEAD_STEP_FLAG:
        print(json.dumps(head_step(Path(sys.argv[2]))))
    else:
        main()
