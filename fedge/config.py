"""One typed, validated view of `context.run_config`, built once at start.

Every key is kebab-case in pyproject.toml / `--run-config` and snake_case here.
An unknown key, a wrong type or an out-of-range value raises `ConfigError`
naming the key and what it accepts, before any training starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Flower (and numpy) would make `fedge check` take a second, not 0.1 s
    from flwr.app import Context


class ConfigError(ValueError):
    """A run-config value fedge cannot use; the message names the key and the fix."""


def _opt(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """A config field with its validation rule and one-line documentation."""
    rule = {
        "help": help,
        "choices": choices,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
    }
    return field(default=default, metadata=rule)


EDGE_MODE_REFUSAL = (
    "edge nodes cannot join secagg=true or local-dp=true runs yet (SecAgg+ gives the whole "
    "model one weight, which head-only updates would skew; DP-SGD needs torch): set "
    "secagg=false local-dp=false (dp-mode=central works with edge nodes), or start the "
    "SuperNode without edge=true and set edge-clients=0 edge-backbone=off"
)
"""Why a run with edge nodes refuses SecAgg+ and local DP (server config and edge node alike)."""


@dataclass(frozen=True)
class FedgeConfig:
    """All run-config keys with their defaults (mirrored in pyproject.toml)."""

    # Federation
    num_server_rounds: int = _opt(20, "federated rounds", low=1)
    fraction_train: float = _opt(
        1.0, "fraction of nodes sampled per round", low=0, high=1, low_open=True
    )
    fraction_evaluate: float = _opt(1.0, "fraction of nodes evaluating per round", low=0, high=1)
    min_train_nodes: int = _opt(2, "fewest replies a round aggregates", low=1)
    min_available_nodes: int = _opt(2, "nodes online before any round starts (waits)", low=1)
    round_timeout: float = _opt(
        600.0, "seconds to wait for replies per stage", low=0, low_open=True
    )
    max_failed_rounds: int = _opt(
        3, "stop after this many rounds in a row where every reply failed alike; 0 = never", low=0
    )
    # Client training
    local_epochs: int = _opt(3, "local epochs per round", low=1)
    batch_size: int = _opt(32, "local mini-batch size", low=1)
    lr: float = _opt(0.05, "client learning rate", low=0, low_open=True)
    optimizer: str = _opt("sgd", "client optimizer", choices=("sgd", "adam"))
    momentum: float = _opt(0.9, "SGD momentum", low=0, high=1, high_open=True)
    proximal_mu: float = _opt(0.0, "FedProx proximal term weight (0 = FedAvg)", low=0)
    # Server aggregation
    server_lr: float = _opt(
        1.0, "server learning rate eta in w + eta * mean update", low=0, low_open=True
    )
    server_momentum: float = _opt(
        0.0, "server momentum on the aggregated update", low=0, high=1, high_open=True
    )
    max_num_examples: int = _opt(
        1000,
        "public cap on a reply's num-examples (plain and SecAgg); clients report min(n, cap)",
        low=1,
    )
    norm_bound: float = _opt(
        1.0, "without DP/SecAgg, clip each update to this x the round's median norm; 0 = off", low=0
    )
    weight_bound: float = _opt(
        1.0, "without DP/SecAgg, cap each num-examples at this x the round's median; 0 = off", low=0
    )
    aggregator: str = _opt(
        "mean",
        "without DP/SecAgg: weighted mean or a robust coordinate-wise aggregator",
        choices=("mean", "trimmed-mean", "median"),
    )
    trim_fraction: float = _opt(
        0.1, "trimmed-mean: share of values cut at each end", low=0, high=0.5, high_open=True
    )
    accept_check: str = _opt(
        "auto",
        "check each step on server-held data; auto = on unless dp-mode is set",
        choices=("auto", "on", "off"),
    )
    accept_tolerance: float = _opt(
        0.1,
        "the check refuses a step that raises its loss by more than this (nats)",
        low=0,
        low_open=True,
    )
    update_compression: str = _opt(
        "none",
        "without SecAgg: encode uploads (int8/int4 stochastic per 256-value block, top-k)",
        choices=("none", "int8", "int4", "topk"),
    )
    update_rotation: bool = _opt(
        False, "int8/int4: randomized Hadamard rotation per block before quantizing"
    )
    topk_fraction: float = _opt(
        0.01,
        "topk: share of values sent (the rest is kept for later rounds)",
        low=0,
        high=1,
        low_open=True,
    )
    # Data and model
    dataset: str = _opt("digits", "digits, breast-cancer, a folder or .csv/.npz path, or hf:<id>")
    label_column: str = _opt("label", "CSV: the target column (numbers or class names)")
    id_column: str = _opt(
        "", "CSV: a row-id column to leave out of the features; '' = any column named id/index"
    )
    feature_columns: str = _opt("", "CSV: comma list of feature columns; empty = all others")
    partitioner: str = _opt(
        "dirichlet", "how the pool is split", choices=("iid", "dirichlet", "pathological")
    )
    dirichlet_alpha: float = _opt(
        0.5, "Dirichlet concentration (smaller = more skew)", low=0, low_open=True
    )
    classes_per_client: int = _opt(2, "classes per client for the pathological split", low=1)
    test_fraction: float = _opt(
        0.2,
        "held-out share when the source has one split",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
    )
    val_fraction: float = _opt(
        0.1, "share of each client's partition kept for validation", low=0, high=1, high_open=True
    )
    model: str = _opt("auto", "model architecture", choices=("auto", "cnn", "mlp"))
    edge_clients: int = _opt(
        0, "simulation: the last N partitions run the torch-free edge learner", low=0
    )
    edge_backbone: str = _opt(
        "auto",
        "backbone sent to edge clients; auto = fp32 when edge-clients > 0",
        choices=("auto", "off", "fp32", "int8"),
    )
    seed: int = _opt(42, "seed for data splits, init and sampling", low=0)
    # Secure aggregation (SecAgg+)
    secagg: bool = _opt(False, "SecAgg+: the server only learns the sum of the updates")
    secagg_num_shares: int = _opt(
        0, "neighbours per client incl. itself (odd); 0 = all sampled", low=0
    )
    secagg_threshold: int = _opt(
        0, "shares needed to reconstruct; 0 = about 2/3 of num-shares", low=0
    )
    secagg_clip_norm: float = _opt(
        10.0, "without DP, clients clip Δ to this L2 norm for quantization", low=0, low_open=True
    )
    # Differential privacy (server side: central or distributed noise on client updates)
    dp_mode: str = _opt("none", "update-level DP", choices=("none", "central", "distributed"))
    dp_noise_multiplier: float = _opt(1.0, "sigma: noise std / clipping norm", low=0, low_open=True)
    dp_clipping_norm: float = _opt(
        1.0, "C: clients clip their update to this L2 norm", low=0, low_open=True
    )
    dp_delta: float = _opt(
        1e-5, "delta of the reported (epsilon, delta)", low=0, high=1, low_open=True, high_open=True
    )
    dp_max_epsilon: float = _opt(
        0.0, "never start a round that would exceed it; 0 = no budget", low=0
    )
    dp_target_epsilon: float = _opt(
        0.0,
        "set sigma (and local DP's) so all planned rounds end at or just under it; 0 = off",
        low=0,
    )
    dp_adaptive_clipping: bool = _opt(False, "track a norm quantile (central DP without SecAgg)")
    dp_target_quantile: float = _opt(
        0.5, "adaptive clipping: target quantile of update norms", low=0, high=1
    )
    dp_clip_learning_rate: float = _opt(0.2, "adaptive clipping: geometric step size", low=0)
    dp_count_stddev: float = _opt(
        0.0, "adaptive clipping: noise on the count, above σ/2; 0 = max(clients/20, σ)", low=0
    )
    dp_min_clients: int = _opt(
        0, "distributed DP: noise provisioned for this many survivors; 0 = secagg-threshold", low=0
    )
    # Local DP-SGD (Opacus) in every ClientApp
    local_dp: bool = _opt(False, "clients train with Opacus DP-SGD")
    local_dp_noise_multiplier: float = _opt(1.0, "DP-SGD noise multiplier", low=0, low_open=True)
    local_dp_max_grad_norm: float = _opt(
        1.0, "DP-SGD per-sample gradient clipping norm", low=0, low_open=True
    )
    local_dp_max_epsilon: float = _opt(
        0.0, "a client declines to train past it; 0 = no budget", low=0
    )
    # Outputs
    export_onnx: bool = _opt(False, "export the final model to fp32 + int8 ONNX in the run folder")
    export_quantization: str = _opt(
        "static", "int8 scheme for export-onnx", choices=("static", "dynamic")
    )
    tracking: str = _opt(
        "",
        "also log every metrics.jsonl field per round to TensorBoard or MLflow; empty = off",
        choices=("", "tensorboard", "mlflow"),
    )
    output_dir: str = _opt("outputs", "results folder (relative: see resolve_path)")
    run_name: str = _opt("", "subfolder of output-dir; empty = a timestamp")
    resume: bool = _opt(False, "continue the run in output-dir/run-name from its checkpoint")
    resume_without_dp: bool = _opt(
        False, "resume a DP run with dp-mode=none; its reports then say no (ε, δ) holds"
    )
    resume_allow_changes: bool = _opt(
        False, "resume although data-defining keys changed (dataset, split, seed, model)"
    )
    # Vertical FL (fedge.vertical apps; epochs = num-server-rounds, batch-size, lr)
    vertical_key_bits: int = _opt(
        2048, "vertical: each party's Paillier key size; a shorter peer key is refused", low=1024
    )
    vertical_max_ids: int = _opt(
        1_000_000, "vertical: most IDs a party may hold or send in PSI", low=1
    )
    vertical_min_batch: int = _opt(
        16, "vertical: smallest batch a party computes on (small ones leak rows)", low=4
    )
    vertical_l2: float = _opt(0.01, "vertical: L2 penalty on each party's weights", low=0)
    vertical_tol: float = _opt(
        1e-4, "vertical: stop once an epoch's loss falls by less than this; 0 = never", low=0
    )

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FedgeConfig:
        """Validate a Flower run config; keys missing from it take their defaults."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = (k.replace("_", "-") for k in fields)
                raise ConfigError(f"unknown run-config key {key!r}; {did_you_mean(key, known)}")
            values[name] = _check(key, raw, fields[name])
        config = cls(**values)
        config._check_consistency()
        return config

    @classmethod
    def from_context(cls, context: Context) -> FedgeConfig:
        return cls.from_run_config(dict(context.run_config))

    def _check_consistency(self) -> None:
        if self.min_available_nodes < self.min_train_nodes:
            raise ConfigError(
                f"min-available-nodes ({self.min_available_nodes}) must be at least "
                f"min-train-nodes ({self.min_train_nodes})"
            )
        if self.dp_adaptive_clipping and self.dp_mode != "central":
            raise ConfigError("dp-adaptive-clipping=true needs dp-mode='central'")
        if self.dp_mode == "distributed" and not self.secagg:
            raise ConfigError(
                "dp-mode='distributed' needs secagg=true: without it the server sees "
                "each noised update"
            )
        self._check_target_epsilon()
        if self.dp_adaptive_clipping and self.dp_count_stddev and not self.dp_target_epsilon:
            from fedge.privacy.clipping import AdaptiveClipping  # numpy: only when needed

            try:
                AdaptiveClipping.check_count_stddev(self.dp_count_stddev, self.dp_noise_multiplier)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if self.dp_adaptive_clipping and self.secagg:
            raise ConfigError(
                "dp-adaptive-clipping needs per-client clip reports, which SecAgg hides; "
                "set secagg=false or dp-adaptive-clipping=false"
            )
        if self.aggregator != "mean" and (self.secagg or self.dp_mode != "none"):
            raise ConfigError(
                f"aggregator={self.aggregator!r} needs each client's update, which SecAgg hides "
                "and DP's sensitivity analysis does not cover; set aggregator='mean' (DP and "
                "SecAgg bound each client by the clip norm) or secagg=false dp-mode='none'"
            )
        if self.edge_nodes_expected and (self.secagg or self.local_dp):
            raise ConfigError(EDGE_MODE_REFUSAL)
        self._check_compression()
        if self.secagg and self.secagg_num_shares and self.secagg_num_shares < 3:
            raise ConfigError(f"secagg-num-shares must be 0 or >= 3, got {self.secagg_num_shares}")

    def _check_compression(self) -> None:
        if self.update_compression != "none" and self.secagg:
            raise ConfigError(
                f"update-compression={self.update_compression!r} needs each client's upload, "
                "which SecAgg+ masks with its own encoding; set update-compression='none' "
                "with secagg=true, or secagg=false"
            )
        if self.update_rotation and self.update_compression not in ("int8", "int4"):
            raise ConfigError(
                "update-rotation=true rotates before quantizing: set update-compression to "
                "'int8' or 'int4', or update-rotation=false"
            )

    def _check_target_epsilon(self) -> None:
        """dp-target-epsilon sets σ; the noise multipliers it replaces stay at their
        defaults, and a budget, if set, is not below it (the run would stop early)."""
        target = self.dp_target_epsilon
        if not target:
            return
        if self.dp_mode == "none" and not self.local_dp:
            raise ConfigError(
                "dp-target-epsilon needs DP to calibrate: set dp-mode='central' (or "
                "'distributed' with secagg=true) or local-dp=true, or dp-target-epsilon=0"
            )
        defaults = FedgeConfig.__dataclass_fields__
        pairs = [("dp", self.dp_mode != "none"), ("local-dp", self.local_dp)]
        for prefix, on in pairs:
            name = prefix.replace("-", "_")
            sigma = getattr(self, f"{name}_noise_multiplier")
            if on and sigma != defaults[f"{name}_noise_multiplier"].default:
                raise ConfigError(
                    f"{prefix}-noise-multiplier={sigma:g} conflicts with dp-target-epsilon="
                    f"{target:g}, which computes σ itself; set one of them"
                )
            budget = getattr(self, f"{name}_max_epsilon")
            if on and 0 < budget < target:
                raise ConfigError(
                    f"{prefix}-max-epsilon={budget:g} is below dp-target-epsilon={target:g}, "
                    f"so the run would stop before its planned rounds; set {prefix}-max-epsilon"
                    "=0 (the budget is then the target) or at least the target"
                )

    @property
    def dp_budget(self) -> float:
        """The server's ε budget: dp-max-epsilon, else the target (0 = none)."""
        return self.dp_max_epsilon or self.dp_target_epsilon

    @property
    def local_dp_budget(self) -> float:
        """A node's ε budget: local-dp-max-epsilon, else the target (0 = none)."""
        return self.local_dp_max_epsilon or self.dp_target_epsilon

    @property
    def edge_nodes_expected(self) -> bool:
        """Whether this run serves edge nodes: it broadcasts a backbone for them."""
        return self.edge_clients > 0 or self.edge_backbone in ("fp32", "int8")

    @property
    def acceptance_on(self) -> bool:
        """Whether the acceptance check runs. `auto` leaves it off under dp-mode, whose
        noise alone raised the loss by up to 1.26 nats in one honest round on digits
        (σ = 1): any tolerance above that would let the attacks it is for through."""
        return self.accept_check == "on" or (self.accept_check == "auto" and self.dp_mode == "none")

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case dict, as in pyproject.toml (also what a checkpoint records)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """The closest known key (a typo is the usual cause), else all of them, on one line."""
    known = sorted(known)
    close = difflib.get_close_matches(key.replace("_", "-"), known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"


def _check(key: str, raw: Any, spec: dataclasses.Field[Any]) -> Any:
    rule = spec.metadata
    expected = spec.type
    if expected == "bool":
        if not isinstance(raw, bool):
            raise ConfigError(f"{key} must be true or false, got {raw!r}")
        return raw
    if expected == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{key} must be an integer, got {raw!r}")
    elif expected == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{key} must be a number, got {raw!r}")
        raw = float(raw)
    elif not isinstance(raw, str):
        raise ConfigError(f"{key} must be a string, got {raw!r}")
    if rule["choices"] is not None and raw not in rule["choices"]:
        raise ConfigError(f"{key} must be one of {list(rule['choices'])}, got {raw!r}")
    low, high = rule["low"], rule["high"]
    too_low = low is not None and (raw <= low if rule["low_open"] else raw < low)
    too_high = high is not None and (raw >= high if rule["high_open"] else raw > high)
    if too_low or too_high:
        left = "(" if rule["low_open"] else "["
        right = ")" if rule["high_open"] else "]"
        bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ConfigError(f"{key} must be in {bounds}, got {raw!r}")
    return raw


def resolve_path(path: str) -> Path:
    """Resolve a run-config path deliberately, not against whatever cwd a process has.

    `flwr run` executes the ServerApp under a background SuperLink whose working
    directory is wherever the *first* `flwr run` was started, so a bare relative
    path would land in another project's folder. Relative paths therefore resolve
    against `$FEDGE_WORKDIR` when set, else the process's working directory, and
    callers log the absolute result.
    """
    candidate = Path(os.path.expandvars(path)).expanduser()
    if candidate.is_absolute():
        return candidate
    base = Path(os.environ.get("FEDGE_WORKDIR", os.getcwd()))
    return (base / candidate).resolve()
