"""`fedge edge predict` and `fedge edge bench`: torch-free commands for devices."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedge.cli import reports_errors
from fedge.edge.runtime import EdgeModel, ExportInfo, benchmark, load_input


@reports_errors
def _predict(args: argparse.Namespace) -> int:
    model = EdgeModel(args.model, args.threads)
    info = ExportInfo.beside(args.model)
    proba = model.predict_proba(load_input(args.input, model.sample_shape, info))
    if info is not None:
        info.check_outputs(proba.shape[1], args.model)
    classes = proba.argmax(axis=1)
    names = info.class_names if info is not None and info.class_names else None
    labels = [names[c] if names else str(c) for c in classes]
    if args.json:
        result = {
            "model": str(args.model),
            "input": str(args.input),
            "predictions": classes.tolist(),
            "labels": labels,
            "confidence": [round(float(p), 4) for p in proba.max(axis=1)],
        }
        print(json.dumps(result))
    else:
        print("\n".join(labels))
    return 0


@reports_errors
def _bench(args: argparse.Namespace) -> int:
    model = EdgeModel(args.model, args.threads)
    print(json.dumps(benchmark(model, args.batch_sizes, args.repeats), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `edge predict` and `edge bench` to the `fedge` command line."""
    edge = subparsers.add_parser("edge", help="run exported ONNX models (no torch needed)")
    commands = edge.add_subparsers(dest="edge_command", required=True)

    predict = commands.add_parser(
        "predict",
        help="print the predicted class of each input (names and input convention from the "
        "export.json beside the model)",
    )
    predict.add_argument("model", type=Path, help="ONNX file, e.g. OUT/model.int8.onnx")
    predict.add_argument(
        "--input", required=True, type=Path, help=".npy array (one sample or a batch) or image"
    )
    predict.add_argument("--json", action="store_true", help="print predictions as JSON")
    predict.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    predict.set_defaults(func=_predict)

    bench = commands.add_parser("bench", help="print latency, throughput and memory as JSON")
    bench.add_argument("model", type=Path, help="ONNX file, e.g. OUT/model.int8.onnx")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    bench.add_argument("--repeats", type=int, default=50, help="timed runs per batch size")
    bench.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    bench.set_defaults(func=_bench)
