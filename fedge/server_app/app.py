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

from fedge.config import FedgeConfig
from fedge.data import DatasetBundle
from fedge.edge.broadcast import backbone_payload
from fedge.models import ModelSpec, build_model, save_model, state_to_numpy
from fedge.records import NamedArrays, to_array_record
from fedge.server_app.plotting import plot_metrics
from fedge.server_app.polling import responsive
from fedge.server_app.privacy import BudgetExhausted, ServerPrivacy
from fedge.server_app.recorder import RoundRecorder
from fedge.server_app.robust import InfluenceBound
from fedge.server_app.run_folder import PRIVACY_REPORT, RunFolder, restore_rng_state
from fedge.server_app.secure_round import SecAggSettings
from fedge.server_app.strategy import FedgeAvg
from fedge.task import dataset_for, model_spec_for

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


def build_strategy(config: FedgeConfig, spec: ModelSpec, bundle: DatasetBundle) -> FedgeAvg:
    privacy = None if config.dp_mode == "none" else ServerPrivacy(config)
    return FedgeAvg(
        privacy=privacy,
        server_lr=config.server_lr,
        server_momentum=config.server_momentum,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=config.min_train_nodes,
        min_available_nodes=config.min_available_nodes,
        edge_backbone=edge_backbone_exporter(config, spec, bundle),
        secagg=SecAggSettings.from_config(config) if config.secagg else None,
        influence=InfluenceBound(
            config.norm_bound, config.weight_bound, config.aggregator, config.trim_fraction
        ),
    )


def resume(folder: RunFolder, strategy: FedgeAvg, config: FedgeConfig) -> NamedArrays:
    """Restore model, round counter, momentum, RNGs and ε ledger from the checkpoint."""
    checkpoint = folder.load_checkpoint()
    strategy.rounds_done = checkpoint.round
    strategy.velocity = checkpoint.strategy_arrays.get("velocity")
    restore_rng_state(checkpoint.state["rng"])
    if strategy.privacy is not None and "privacy" in checkpoint.state:
        strategy.privacy.restore(checkpoint.state["privacy"])
    folder.keep_metrics_through(checkpoint.round)
    changed = sorted(
        key
        for key, value in config.to_run_config().items()
        if checkpoint.state["run_config"].get(key) != value
        and key not in ("resume", "num-server-rounds")
    )
    if changed:
        log(WARNING, "Resuming with a changed config: %s", ", ".join(changed))
    log(INFO, "fedge: resuming %s after round %s", folder.path, checkpoint.round)
    return checkpoint.arrays


def write_privacy_report(folder: RunFolder, strategy: FedgeAvg, stop_reason: str) -> None:
    """The final privacy.json: the recorder's per-round one plus why the run stopped."""
    if strategy.privacy is not None:
        folder.write_json(PRIVACY_REPORT, strategy.privacy.report(stop_reason))


def write_outputs(
    folder: RunFolder,
    config: FedgeConfig,
    strategy: FedgeAvg,
    spec: ModelSpec,
    bundle: DatasetBundle,
    arrays: NamedArrays,
) -> None:
    """privacy.json, final_model.pt (+ ONNX exports) and metrics.png."""
    write_privacy_report(folder, strategy, "completed all rounds")
    if strategy.privacy is not None:
        log(INFO, "fedge: ε=%.4g at δ=%g", strategy.privacy.epsilon(), config.dp_delta)
    final_model = folder.path / "final_model.pt"
    provenance = {
        "dataset": bundle.name,
        "test_fraction": config.test_fraction,
        "seed": config.seed,
    }
    save_model(final_model, spec, arrays, provenance)
    if config.export_onnx:
        from fedge.edge.export import export_for_dataset

        export_for_dataset(
            final_model, folder.path, bundle, config.export_quantization, seed=config.seed
        )
    plot_metrics(folder.read_metrics(), folder.path / "metrics.png")
    log(INFO, "fedge: results in %s", folder.path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FedgeConfig.from_context(context)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    folder = RunFolder.for_config(config)
    bundle = dataset_for(config)
    spec = model_spec_for(config, bundle)
    strategy = build_strategy(config, spec, bundle)
    if config.resume:
        arrays = resume(folder, strategy, config)
    else:
        arrays = state_to_numpy(build_model(spec))
    recorder = RoundRecorder(
        folder, strategy, spec, bundle, config.num_server_rounds, config.to_run_config()
    )
    remaining = config.num_server_rounds - strategy.rounds_done
    if remaining > 0:
        try:
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
            write_privacy_report(folder, strategy, f"the ServerApp failed: {error!r}")
            raise
        arrays = recorder.last_arrays
    else:
        log(INFO, "fedge: all %s rounds already done", config.num_server_rounds)
    write_outputs(folder, config, strategy, spec, bundle, arrays)
