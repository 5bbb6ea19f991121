"""`fedge export`: checkpoint to fp32/int8 ONNX plus the edge backbone/head split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fedge.edge.artifacts import QUANTIZATIONS
from fedge.edge.commands import reports_errors


@reports_errors
def _export(args: argparse.Namespace) -> int:
    # torch and onnx load only when exporting, so other commands start fast without them.
    from fedge.data import load_dataset
    from fedge.edge.export import export_model

    if args.calibration_samples < 1:
        raise ValueError(f"--calibration-samples must be >= 1, got {args.calibration_samples}")
    bundle = load_dataset(args.dataset, test_fraction=args.test_fraction, seed=args.seed)
    # Calibration needs only representative inputs; drawing them from the training pool
    # keeps the held-out split, on which accuracy is reported, unseen.
    rng = np.random.default_rng(args.seed)
    count = min(args.calibration_samples, len(bundle.x_train))
    x_calib = bundle.x_train[rng.choice(len(bundle.x_train), size=count, replace=False)]
    report = export_model(
        args.checkpoint,
        args.out,
        x_calib,
        bundle.x_test,
        bundle.y_test,
        quantization=args.quantization,
        per_channel=args.per_channel,
        latency_repeats=args.latency_repeats,
    )
    print(json.dumps(report, indent=2))
    return 0


def register_export(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `export` to the `fedge` command line."""
    export = subparsers.add_parser(
        "export", help="export a checkpoint to fp32/int8 ONNX and an edge backbone/head split"
    )
    export.add_argument("checkpoint", type=Path, help="model .pt saved by fedge")
    export.add_argument("--out", type=Path, required=True, help="directory for the exports")
    export.add_argument("--quantization", choices=QUANTIZATIONS, default="static")
    export.add_argument("--per-channel", action="store_true", help="per-channel int8 weights")
    export.add_argument(
        "--dataset", default="digits", help="dataset for calibration and held-out evaluation"
    )
    export.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="held-out fraction; match the training run so evaluation data stays unseen",
    )
    export.add_argument("--seed", type=int, default=0, help="split and calibration sampling seed")
    export.add_argument("--calibration-samples", type=int, default=300)
    export.add_argument("--latency-repeats", type=int, default=50)
    export.set_defaults(func=_export)
