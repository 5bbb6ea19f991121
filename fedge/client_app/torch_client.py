"""PyTorch training and evaluation on this node's partition."""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedge.client_app.local_data import LocalData, local_data, local_seed
from fedge.client_app.local_ledger import NodeLedger
from fedge.client_app.privatize import encoded_upload, privatize_update
from fedge.client_app.protocol import (
    DECLINED_KEY,
    LOCAL_EPSILON_KEY,
    REPLY_KEY,
    UPDATE_INFO_KEY,
    VAL_ACCURACY_KEY,
    VAL_LOSS_KEY,
    WEIGHT_KEY,
    reported_examples,
    update_tag,
)
from fedge.config import ConfigError, FedgeConfig
from fedge.models import build_model, load_numpy_state, state_to_numpy
from fedge.models.training import evaluate as evaluate_model
from fedge.models.training import make_loader, train_epochs
from fedge.records import NamedArrays, from_array_record, to_array_record

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalResult:
    arrays: NamedArrays | None  # None: declined (local privacy budget spent)
    loss: float
    local_epsilon: float | None = None
    accountant_state: bytes | None = None


def _make_optimizer(config: FedgeConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


@functools.cache
def _planned_sigma(target: float, delta: float, rounds: int, epochs: int, batches: int) -> float:
    from fedge.privacy.accountant import TargetUnreachable, noise_multiplier_for

    try:
        sigma = noise_multiplier_for(
            target, delta=delta, sample_rate=1 / batches, steps=rounds * epochs * batches
        )
    except TargetUnreachable as error:
        raise ConfigError(f"dp-target-epsilon (local DP): {error}") from None
    logger.info(
        "local DP: dp-target-epsilon=%g gives σ=%.4g for %s rounds × %s epochs × %s batches",
        target,
        sigma,
        rounds,
        epochs,
        batches,
    )
    return sigma


def local_noise_multiplier(config: FedgeConfig, num_batches: int) -> float:
    """DP-SGD's σ: local-dp-noise-multiplier or, under dp-target-epsilon, the σ that
    keeps a node training in every planned round (num-server-rounds × local-epochs ×
    its batches, Opacus's Poisson rate 1/batches) within the target. The same for
    every round and on a restart; the node's budget (the target unless
    local-dp-max-epsilon) still counts what its ledger spent in earlier runs."""
    if not config.dp_target_epsilon:
        return config.local_dp_noise_multiplier
    return _planned_sigma(
        config.dp_target_epsilon,
        config.dp_delta,
        config.num_server_rounds,
        config.local_epochs,
        num_batches,
    )


def train_locally(
    config: FedgeConfig,
    data: LocalData,
    global_arrays: NamedArrays,
    server_round: int,
    accountant_state: bytes | None = None,
) -> LocalResult:
    """Local epochs from the global weights, with Opacus DP-SGD when `local-dp` is on.

    With local DP the node's accountant continues from `accountant_state`, so
    its ε covers every round it trained in; past `local-dp-max-epsilon` it declines.
    """
    seed = local_seed(config, data.partition_id, server_round)
    torch.manual_seed(seed)
    model = build_model(data.spec)
    load_numpy_state(model, global_arrays)
    loader = make_loader(data.x_train, data.y_train, config.batch_size, shuffle=True, seed=seed)
    optimizer = _make_optimizer(config, model)
    if not config.local_dp:
        loss = train_epochs(model, loader, optimizer, config.local_epochs, config.proximal_mu)
        return LocalResult(state_to_numpy(model), loss)

    from fedge.privacy.local_dp import local_epsilon, local_would_exceed, make_local_dp

    budget = config.local_dp_budget
    sigma = local_noise_multiplier(config, len(loader))
    if budget > 0 and local_would_exceed(
        accountant_state,
        delta=config.dp_delta,
        max_epsilon=budget,
        noise_multiplier=sigma,
        sample_rate=1 / len(loader),
        steps=config.local_epochs * len(loader),
    ):
        spent = local_epsilon(accountant_state, config.dp_delta)
        logger.warning(
            "declining round %s: training would take local ε from %.3f past %.3f",
            server_round,
            spent,
            budget,
        )
        return LocalResult(None, float("nan"), spent, accountant_state)
    with (
        make_local_dp(
            model,
            optimizer,
            loader,
            noise_multiplier=sigma,
            max_grad_norm=config.local_dp_max_grad_norm,
            accountant_state=accountant_state,
        ) as private,
        warnings.catch_warnings(),
    ):
        # Opacus's per-sample hooks make torch warn on every backward; it is expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss = train_epochs(
            private.model,
            private.data_loader,
            private.optimizer,
            config.local_epochs,
            config.proximal_mu,
            private=True,
        )
        return LocalResult(
            state_to_numpy(model), loss, private.epsilon(config.dp_delta), private.state_bytes()
        )


def local_update(
    msg: Message, context: Context, config: FedgeConfig
) -> tuple[NamedArrays | None, MetricRecord]:
    """Train, then return what may leave the node (None if it declined) and its metrics.

    fedge's strategy gets Δw, clipped/noised as its DP mode asks; a stock
    Flower strategy gets full weights.
    """
    data = local_data(config, context)
    global_arrays = from_array_record(msg.content.array_records["arrays"])
    train_config = msg.content.config_records["config"]
    ledger = NodeLedger.for_node(config, context) if config.local_dp else None
    result = train_locally(
        config,
        data,
        global_arrays,
        int(train_config.get("server-round", 0)),
        ledger.load(config.dp_delta) if ledger else None,
    )
    metrics = MetricRecord({WEIGHT_KEY: reported_examples(len(data.y_train), train_config)})
    if ledger is not None and result.accountant_state is not None:
        ledger.save(result.accountant_state)
        metrics[LOCAL_EPSILON_KEY] = float(result.local_epsilon or 0.0)
    if result.arrays is None:
        metrics[DECLINED_KEY] = 1
        return None, metrics
    update = result.arrays
    if train_config.get(REPLY_KEY) == "update":
        update = {k: update[k] - global_arrays[k] for k in update}
        update, privacy_metrics = privatize_update(update, train_config)
        metrics.update(privacy_metrics)
    metrics["train-loss"] = result.loss
    return update, metrics


def train(msg: Message, context: Context, config: FedgeConfig) -> Message:
    """Reply with Δw tagged with the round and model it answers (fedge's strategy), or
    with untagged full weights (Flower's convention, for a stock strategy)."""
    update, metrics = local_update(msg, context, config)
    content = RecordDict({"metrics": metrics})
    train_config = msg.content.config_records["config"]
    if train_config.get(REPLY_KEY) != "update":
        if update is not None:
            content["arrays"] = to_array_record(update)
        return Message(content=content, reply_to=msg)
    global_arrays = from_array_record(msg.content.array_records["arrays"])
    encoding = "none"
    if update is not None:
        content["arrays"], encoding = encoded_upload(
            update, train_config, global_arrays, context.state, context.node_id
        )
    content[UPDATE_INFO_KEY] = update_tag(train_config, global_arrays, encoding=encoding)
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context, config: FedgeConfig) -> Message:
    data = local_data(config, context)
    model = build_model(data.spec)
    load_numpy_state(model, from_array_record(msg.content.array_records["arrays"]))
    loss, accuracy = evaluate_model(model, data.x_val, data.y_val)
    metrics = MetricRecord(
        {VAL_LOSS_KEY: loss, VAL_ACCURACY_KEY: accuracy, WEIGHT_KEY: len(data.y_val)}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
