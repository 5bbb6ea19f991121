"""`fedge export`: checkpoint to fp32/int8 ONNX plus the edge backbone/head split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedge.cli import reports_errors
from fedge.edge.artifacts import QUANTIZATIONS


@reports_errors
def _export(args: argparse.Namespace) -> int:
    # torch and onnx load only when exporting, so other commands start fast without them.
    from fedge.data import load_dataset
    from fedge.edge.export import export_for_dataset
    from fedge.models import model_provenance

    # By default the split of the run that trained the model, so the held-out
    # accuracy is measured on data the model never saw.
    trained_on = model_provenance(args.checkpoint)
    dataset = args.dataset or trained_on.get("dataset", "digits")
    test_fraction = args.test_fraction or trained_on.get("test_fraction", 0.2)
    seed = trained_on.get("seed", 0) if args.seed is None else args.seed
    bundle = load_dataset(dataset, test_fraction=test_fraction, seed=seed)
    report = export_for_dataset(
        args.checkpoint,
        args.out,
        bundle,
        quantization=args.quantization,
        calibration_samples=args.calibration_samples,
        seed=seed,
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
        "--dataset",
        help="dataset for calibration and held-out evaluation (default: the training run's)",
    )
    export.add_argument(
        "--test-fraction",
        type=float,
        help="held-out fraction (default: the training run's, so evaluation data stays unseen)",
    )
    export.add_argument("--seed", type=int, help="split seed (default: the training run's)")
    export.add_argument("--calibration-samples", type=int, default=300)
    export.add_argument("--latency-repeats", type=int, default=50)
    export.set_defaults(func=_export)
