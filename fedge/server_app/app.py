"""fedge ServerApp: config → data → strategy → Flower's round loop → outputs."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedge.check import server_config
from fedge.compression import Encoding
from fedge.config import ConfigError, FedgeConfig
from fedge.data import DatasetBundle
from fedge.edge.broadcast import backbone_payload
from fedge.models import ModelSpec, build_model, save_model, state_to_numpy
from fedge.records import NamedArrays, to_array_record
from fedge.server_app.acceptance import AcceptanceCheck, HeldOut
from fedge.server_app.plotting import plot_metrics
from fedge.server_app.polling import responsive
from fedge.server_app.privacy import BudgetExhausted, ServerPrivacy
from fedge.server_app.recorder import RoundRecorder
from fedge.server_app.robust import InfluenceBound
from fedge.server_app.run_folder import (
    FAILURE_REPORT,
    PRIVACY_REPORT,
    Checkpoint,
    RunFolder,
    restore_rng_state,
)
from fedge.server_app.secure_round import SecAggSettings
from fedge.server_app.strategy import FedgeAvg
from fedge.server_app.tracking import require_tracker
from fedge.task import check_data_plan, dataset_for, model_spec_for

app = ServerApp()


def edge_backbone_exporter(
    config: FedgeConfig, spec: ModelSpec, bundle: DatasetBundle
) -> Callable[[NamedArrays], bytes] | None:
    """What edge clients get each round: the global backbone as fp32 or int8 ONNX.

    int8 calibrates on a slice of the held-out split, the public side of the data.
    """
    kind = config.edge_backbone
    if kind == "auto":
        kind = "fp32" if config.edge_clients > 0 else "off"
    if kind == "off":
        return None
    calibration = bundle.x_test[:256] if kind == "int8" else None
    return partial(backbone_payload, spec, int8=kind == "int8", x_calib=calibration)


def build_strategy(
    config: FedgeConfig, spec: ModelSpec, bundle: DatasetBundle, privacy: ServerPrivacy
) -> FedgeAvg:
    return FedgeAvg(
        privacy=privacy if privacy.mode != "none" else None,
        server_lr=config.server_lr,
        server_momentum=config.server_momentum,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=config.min_train_nodes,
        min_available_nodes=config.min_available_nodes,
        edge_backbone=edge_backbone_exporter(config, spec, bundle),
        secagg=SecAggSettings.from_config(config) if config.secagg else None,
        max_num_examples=config.max_num_examples,
        influence=InfluenceBound(
            config.norm_bound, config.weight_bound, config.aggregator, config.trim_fraction
        ),
        acceptance=AcceptanceCheck(spec, HeldOut.of(bundle, config.seed), config.accept_tolerance)
        if config.acceptance_on
        else None,
        max_failed_rounds=config.max_failed_rounds,
        compression=Encoding(
            config.update_compression, config.update_rotation, config.topk_fraction
        )
        if config.update_compression != "none"
        else None,
    )


DATA_KEYS = (
    "dataset",
    "partitioner",
    "dirichlet-alpha",
    "classes-per-client",
    "test-fraction",
    "val-fraction",
    "seed",
    "model",
)
"""Keys that define what a run trains on: resuming with another value is another experiment."""


def check_same_data(checkpoint: Checkpoint, config: FedgeConfig, bundle: DatasetBundle) -> None:
    """Refuse, listing every difference, to resume on other data unless resume-allow-changes."""
    before, now = checkpoint.state["run_config"], config.to_run_config()
    changed = [
        f"{k} ({before.get(k)!r} -> {now[k]!r})" for k in DATA_KEYS if before.get(k) != now[k]
    ]
    if checkpoint.state.get("data", bundle.source_digest) != bundle.source_digest:
        changed.append("the dataset's content")
    if not changed:
        return
    if not config.resume_allow_changes:
        raise ConfigError(
            f"resume would change the data this run trains on: {', '.join(changed)}. Resume "
            "with the run's own settings, or set resume-allow-changes=true to continue anyway"
        )
    log(WARNING, "fedge: resume-allow-changes=true: resuming with %s", ", ".join(changed))


def resume(
    folder: RunFolder,
    strategy: FedgeAvg,
    privacy: ServerPrivacy,
    config: FedgeConfig,
    bundle: DatasetBundle,
) -> NamedArrays:
    """Restore model, round counter, momentum, RNGs and ε ledger from the checkpoint.

    Everything that could refuse the resume is checked before anything is changed.
    """
    checkpoint = folder.load_checkpoint()
    check_same_data(checkpoint, config, bundle)
    before = checkpoint.state["run_config"]
    privacy.resume(checkpoint.state.get("privacy"), checkpoint.round, before.get("dp-mode"))
    strategy.rounds_done = checkpoint.round
    strategy.velocity = checkpoint.strategy_arrays.get("velocity")
    restore_rng_state(checkpoint.state["rng"])
    folder.keep_metrics_through(checkpoint.round)
    changed = sorted(
        key
        for key, value in config.to_run_config().items()
        if before.get(key) != value
        and key not in DATA_KEYS
        and not key.startswith("resume")
        and key != "num-server-rounds"
    )
    if changed:
        log(WARNING, "Resuming with a changed config: %s", ", ".join(changed))
    log(INFO, "fedge: resuming %s after round %s", folder.path, checkpoint.round)
    return checkpoint.arrays


def write_privacy_report(folder: RunFolder, privacy: ServerPrivacy, stop_reason: str) -> None:
    """The final privacy.json: the recorder's per-round one plus why the run stopped."""
    if privacy.reports_epsilon():
        folder.write_json(PRIVACY_REPORT, privacy.report(stop_reason))


def write_outputs(
    folder: RunFolder,
    config: FedgeConfig,
    privacy: ServerPrivacy,
    spec: ModelSpec,
    bundle: DatasetBundle,
    arrays: NamedArrays,
) -> None:
    """privacy.json, final_model.pt (+ ONNX exports) and metrics.png."""
    write_privacy_report(folder, privacy, "completed all rounds")
    if privacy.rounds_without_dp() and privacy.reports_epsilon():
        log(WARNING, "fedge: privacy guarantee %s", privacy.guarantee())
    elif privacy.reports_epsilon():
        log(INFO, "fedge: ε=%.4g at δ=%g", privacy.epsilon(), privacy.ledger.delta)
    final_model = folder.path / "final_model.pt"
    save_model(final_model, spec, arrays, bundle.provenance())
    if config.export_onnx:
        from fedge.edge.export import export_for_dataset

        export_for_dataset(
            final_model, folder.path, bundle, config.export_quantization, seed=config.seed
        )
    plot_metrics(folder.read_metrics(), folder.path / "metrics.png")
    log(INFO, "fedge: results in %s", folder.path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = server_config(context)  # first: a refused config fails in one log line
    require_tracker(config.tracking)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    with RunFolder.for_config(config) as folder:
        run(grid, config, folder)


def run(grid: Grid, config: FedgeConfig, folder: RunFolder) -> None:
    """The run in its (locked) folder: resume or start, Flower's rounds, then the outputs."""
    bundle = dataset_for(config)
    spec = model_spec_for(config, bundle)
    # The first model built after seeding is the run's initial model (the strategy's
    # acceptance check builds one too, so it must come second).
    arrays = state_to_numpy(build_model(spec))
    privacy = ServerPrivacy(config)
    strategy = build_strategy(config, spec, bundle, privacy)
    (folder.path / FAILURE_REPORT).unlink(missing_ok=True)  # a resumed run's old failure
    if config.resume:
        arrays = resume(folder, strategy, privacy, config, bundle)
    recorder = RoundRecorder(
        folder,
        strategy,
        spec,
        bundle,
        config.num_server_rounds,
        config.to_run_config(),
        privacy=privacy,
    )
    remaining = config.num_server_rounds - strategy.rounds_done
    if remaining > 0:
        try:
            strategy.wait_for_nodes(grid)
            # Simulated and `fedge deploy local` nodes split the pool among all of them
            check_data_plan(config, bundle, len(list(grid.get_node_ids())))
            strategy.start(
                grid=responsive(grid),
                initial_arrays=to_array_record(arrays),
                num_rounds=remaining,
                timeout=config.round_timeout,
                evaluate_fn=recorder,
            )
        except BudgetExhausted as stop:
            log(WARNING, "fedge: stopping early: %s", stop)
        except Exception as error:
            write_privacy_report(folder, privacy, f"the ServerApp failed: {error!r}")
            folder.write_json(FAILURE_REPORT, {"error": type(error).__name__, "reason": str(error)})
            recorder.close(failed=True)
            raise
        arrays = recorder.last_arrays
    else:
        log(INFO, "fedge: all %s rounds already done", config.num_server_rounds)
    recorder.close()
    write_outputs(folder, config, privacy, spec, bundle, arrays)
