"""`fedge export`: checkpoint to fp32/int8 ONNX plus the edge backbone/head split."""

from __future__ import annotations

import argparse
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

from fedge.cli import UserError, reports_errors
from fedge.edge.artifacts import QUANTIZATIONS

TORCH_ARCHIVE_ENTRY = "/data.pkl"
"""Every `torch.save` zip holds `<name>/data.pkl`; a fedge run checkpoint holds `__state__.npy`."""


def check_model_file(path: Path) -> None:
    """Refuse, in one line, a path that is not a model fedge saved, before torch reads it.

    A wrong path (a run's checkpoint.npz, a README) is a user's slip: the answer names
    the right file, never torch's unpickling traceback and its unsafe-loading hint.
    """
    if not path.exists():
        raise FileNotFoundError(
            f"no model file at {path}; pass a run's final_model.pt (OUTPUT-DIR/RUN-NAME/)"
        )
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the final_model.pt inside it")
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{path} is not a model saved by fedge (not a torch archive); "
            "pass a run's final_model.pt"
        )
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if "__state__.npy" in names:
        raise UserError(
            f"{path} is a run checkpoint (for resume=true), not a model; "
            "export the final_model.pt in the same run folder"
        )
    if not any(name.endswith(TORCH_ARCHIVE_ENTRY) for name in names):
        raise UserError(
            f"{path} is a zip archive but not a saved model; pass a run's final_model.pt"
        )


def _provenance(path: Path) -> dict[str, Any]:
    """The model's record of its data, read weights-only; a refused file is one line."""
    from fedge.models import model_provenance

    check_model_file(path)
    try:
        return model_provenance(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as error:
        # torch's message would suggest weights_only=False, i.e. running the file's code.
        raise UserError(
            f"{path} is not a model saved by fedge ({type(error).__name__} while reading it "
            "weights-only; fedge never loads pickled code); pass a run's final_model.pt"
        ) from None


@reports_errors
def _export(args: argparse.Namespace) -> int:
    # torch and onnx load only when exporting, so other commands start fast without them.
    from fedge.data import TableColumns, load_dataset
    from fedge.edge.export import export_for_dataset

    # By default the split and columns of the run that trained the model, so the
    # held-out accuracy is measured on data the model never saw.
    trained_on = _provenance(args.checkpoint)
    dataset = args.dataset or trained_on.get("dataset", "digits")
    test_fraction = args.test_fraction or trained_on.get("test_fraction", 0.2)
    seed = trained_on.get("seed", 0) if args.seed is None else args.seed
    columns = TableColumns.from_provenance(trained_on)
    bundle = load_dataset(dataset, test_fraction=test_fraction, seed=seed, columns=columns)
    trained_classes = list(trained_on.get("class_names") or bundle.class_names)
    if trained_classes != list(bundle.class_names):
        raise UserError(
            f"the model was trained on classes {trained_classes[:10]} but {dataset} has "
            f"{list(bundle.class_names)[:10]}; export with the data the model was trained on"
        )
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
    export.add_argument(
        "checkpoint", type=Path, help="model .pt saved by fedge (a run's final_model.pt)"
    )
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
