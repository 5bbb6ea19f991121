"""fedge SecAgg+ vs Flower's SecAgg+ vs fedge plain FedAvg: bytes, round time, accuracy.

Printed as one JSON object on stdout (logs go to stderr).

1. **Protocol** (default). Three variants run the same kind of round on the
   same model size (`--sizes` parameters) with the same number of clients, the
   same client updates and weights, and the same harness:

   - `flower_secagg`: Flower's legacy `SecAggPlusWorkflow` (server) and
     `secaggplus_mod` in front of a `NumPyClient` (clients), with a legacy
     `FedAvg` in a `LegacyContext`; one round = one call of the workflow, as
     `DefaultWorkflow` makes it (configure_fit, the 4 stages, aggregate_fit).
   - `fedge_secagg`: fedge's `FedgeAvg` with SecAgg+ and fedge's real ClientApp
     (`fedge.client_app.app`); one round = configure_train (setup and key
     sharing), the training exchange (masked upload), aggregate_train
     (consistency and unmasking), as Flower's `Strategy.start` runs them.
   - `fedge_plain`: the same without secure aggregation (plain float32 updates).

   Two workloads (`--workload`): `fixed`, where local training is replaced by
   a no-op returning a fixed random float32 vector per client (protocol cost
   only), and `training`, where each client trains an MLP of the same size on
   its digits shard with fedge's default local settings (see `Workload`). In
   both, Flower's client returns the vector as its "parameters" and fedge's as
   its update. Both SecAgg+ variants use the same neighbourhood size and
   threshold (`--shares`).

   Harness: `WireGrid`, an in-memory Grid in this process. It hands every
   message to the variant's ClientApp for its destination node, one after the
   other, and sends each message and each reply through Flower's protobuf wire
   format (serialize to bytes, parse back), which is also where bytes are
   counted: `upload_bytes_per_client` is the mean, over clients, of the summed
   serialized sizes of that client's replies in one round (all stages).
   `round_s` is the wall time of a whole round with the clients run one after
   the other. Local training uses one torch thread; a fedge SecAgg+ client
   expands its mask on a second thread while it trains (as it does in the
   product), so `round_s` counts that work only where it outlasts the
   training, and `cpu_s` (process CPU time, all threads) counts all of it.
   `parallel_round_s` estimates a
   deployment with parallel clients: round_s minus the clients' own time
   (ClientApp call plus its message's wire round trip) plus, per exchange, the
   slowest client's. Variants are interleaved round by round (after one
   warm-up round each) and medians are reported. Every round is checked: the
   new global model must equal the weighted mean of the client vectors within
   quantization error (`max_abs_error`).

2. **Accuracy and round time of the product** (`--accuracy`): fedge's default
   run (digits CNN, 10 clients, 20 rounds, seed 42) through
   `fedge.simulation.run_inprocess` (Flower's simulation engine, real ServerApp
   and ClientApps) with secagg=false and secagg=true, everything else equal.
   `--pairs` runs in the order plain, secagg, secagg, plain, … so that load
   drift hits both; round times are the per-round `seconds` of metrics.jsonl
   (round 1, which includes start-up, is left out), pooled per variant.

Usage: `python benchmarks/secagg.py [--sizes 100000x10 1000000x20] [--rounds 3]
[--workload fixed training] [--accuracy [--pairs 2]] [--skip-protocol]
[--out result.json]`
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.proto.message_pb2 import Message as ProtoMessage  # type: ignore[attr-defined]
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.task_identity import TaskIdentity
from report import finish, parse_with_common_options, start

from fedge.client_app import app as fedge_client_app
from fedge.client_app import torch_client
from fedge.client_app.privatize import privatize_update
from fedge.client_app.protocol import WEIGHT_KEY
from fedge.config import FedgeConfig
from fedge.records import NamedArrays, from_array_record, to_array_record
from fedge.secagg import quantization_error_bound, upload_bytes_per_client
from fedge.server_app.secure_round import SecAggSettings
from fedge.server_app.strategy import FedgeAvg
from fedge.simulation import NodeGrid

VARIANTS = ("flower_secagg", "fedge_secagg", "fedge_plain")
TARGETS = {
    "bytes_fedge_secagg_over_flower": 0.5,
    "time_fedge_secagg_over_flower": 1.0,
    "time_fedge_secagg_over_fedge_plain": 1.3,
}
MAX_WEIGHT = 1000
UPDATE_NORM = 1.0  # L2 norm of every synthetic client vector (below any clip norm used)
TIMEOUT = 600.0
NODE0 = 1001


# --- the shared harness -------------------------------------------------------------------


@dataclass
class Exchange:
    """One `send_and_receive` call: what each node sent back and how long it took."""

    label: str
    up_bytes: dict[int, int] = field(default_factory=dict)  # serialized reply message
    up_content_bytes: dict[int, int] = field(default_factory=dict)  # its RecordDict only
    down_bytes: dict[int, int] = field(default_factory=dict)
    node_s: dict[int, float] = field(default_factory=dict)  # ClientApp + wire round trip


class WireGrid(NodeGrid):
    """In-memory Grid: each message crosses the protobuf wire format to its node's ClientApp."""

    def __init__(self, app: ClientApp, contexts: dict[int, Context]) -> None:
        super().__init__(contexts)
        self.app = app
        self.contexts = contexts
        self.exchanges: list[Exchange] = []

    def send_and_receive(  # type: ignore[override]
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        exchange = Exchange(_label(messages[0]) if messages else "empty")
        self.exchanges.append(exchange)
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            start = time.perf_counter()
            down = message_to_proto(message).SerializeToString()
            received = message_from_proto(ProtoMessage.FromString(down))
            reply = self.app(received, self.contexts[node])
            up = message_to_proto(reply).SerializeToString()
            replies.append(message_from_proto(ProtoMessage.FromString(up)))
            exchange.node_s[node] = time.perf_counter() - start
            exchange.down_bytes[node] = len(down)
            exchange.up_bytes[node] = len(up)
            if not reply.has_error():
                exchange.up_content_bytes[node] = recorddict_to_proto(reply.content).ByteSize()
        return replies


def _label(message: Message) -> str:
    """fedge's stage is its message type; Flower's is a field of its config record."""
    kind = message.metadata.message_type
    flower = message.content.config_records.get(RECORD_KEY_CONFIGS)
    if flower is not None and "stage" in flower:
        return f"{kind}:{flower['stage']}"
    return kind


def make_contexts(num_clients: int, run_config: dict[str, Any]) -> dict[int, Context]:
    return {
        NODE0 + i: Context(
            run_id=1,
            node_id=NODE0 + i,
            node_config={"partition-id": i, "num-partitions": num_clients},
            state=RecordDict(),
            run_config=run_config,
        )
        for i in range(num_clients)
    }


@dataclass(frozen=True)
class Workload:
    """The model each client updates, and each client's update and weight.

    `fixed`: a synthetic `fc` model; every client's update is a fixed random
    vector (protocol cost only). `training`: an MLP of the same size on digits
    (64 → hidden → 10); every client's update comes from real local training
    with fedge's defaults (epochs, batch, lr, momentum) on its own IID shard,
    rescaled to norm UPDATE_NORM so that no variant clips and all sum the same
    vectors. Every variant trains the same way, so the training time is common.
    """

    kind: str
    shapes: dict[str, tuple[int, ...]]
    initial: NamedArrays
    vectors: dict[int, NamedArrays]
    weights: dict[int, int]
    shards: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def make(cls, kind: str, num_params: int, num_clients: int, seed: int) -> Workload:
        if num_params < 2000:
            raise ValueError("--sizes needs at least 2000 parameters")
        if kind == "training":
            hidden = (num_params - 10) // 75  # 64·h + h + 10·h + 10 parameters
            shapes = {
                "hidden.weight": (hidden, 64),
                "hidden.bias": (hidden,),
                "out.weight": (10, hidden),
                "out.bias": (10,),
            }
        else:
            rows = num_params // 1000 - 1
            shapes = {"fc.weight": (rows, 1000), "fc.bias": (num_params - rows * 1000,)}
        rng = np.random.default_rng(seed)
        initial = {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in shapes.items()}
        vectors = {}
        for i in range(num_clients):
            raw = {n: rng.normal(size=s) for n, s in shapes.items()}
            vectors[NODE0 + i] = _scaled_to_update_norm(raw)
        weights = {NODE0 + i: 50 + 10 * i for i in range(num_clients)}
        shards = {}
        if kind == "training":
            from sklearn.datasets import load_digits

            features, labels = load_digits(return_X_y=True)
            order = rng.permutation(len(labels))
            for i, part in enumerate(np.array_split(order, num_clients)):
                shards[NODE0 + i] = (features[part] / 16.0, labels[part])
        return cls(kind, shapes, initial, vectors, weights, shards)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes.values())

    def update(self, node: int) -> NamedArrays:
        """This round's update of `node` (trained now in `training` mode)."""
        if self.kind == "training":
            self.vectors[node] = self._train(node)
        return self.vectors[node]

    def _train(self, node: int) -> NamedArrays:
        import torch

        defaults = FedgeConfig()
        torch.set_num_threads(1)  # one core for training: less noise between runs
        torch.manual_seed(node)
        model = torch.nn.Sequential()
        model.add_module("hidden", torch.nn.Linear(64, self.shapes["out.weight"][1]))
        model.add_module("relu", torch.nn.ReLU())
        model.add_module("out", torch.nn.Linear(self.shapes["out.weight"][1], 10))
        model.load_state_dict({n: torch.from_numpy(a) for n, a in self.initial.items()})
        optimizer = torch.optim.SGD(model.parameters(), lr=defaults.lr, momentum=defaults.momentum)
        features, labels = self.shards[node]
        x = torch.tensor(features, dtype=torch.float32)
        y = torch.tensor(labels)
        for _ in range(defaults.local_epochs):
            for batch in torch.randperm(len(y)).split(defaults.batch_size):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
        trained = {n: t.detach().numpy() for n, t in model.state_dict().items()}
        return _scaled_to_update_norm(
            {n: trained[n].astype(np.float64) - self.initial[n] for n in self.shapes}
        )

    def mean_vector(self) -> NamedArrays:
        total = sum(self.weights.values())
        return {
            name: sum(w * self.vectors[k][name].astype(np.float64) for k, w in self.weights.items())
            / total
            for name in self.shapes
        }


def _scaled_to_update_norm(arrays: dict[str, np.ndarray]) -> NamedArrays:
    norm = np.sqrt(sum(float(np.sum(a * a)) for a in arrays.values()))
    return {n: (a * UPDATE_NORM / norm).astype(np.float32) for n, a in arrays.items()}


# --- the three variants -------------------------------------------------------------------


class Variant:
    """One side of the comparison: `round()` runs one federated round on its own grid."""

    name = ""

    def __init__(self, workload: Workload, num_shares: int, threshold: int) -> None:
        self.workload = workload
        self.num_shares = num_shares
        self.threshold = threshold
        self.grid: WireGrid
        self.server_round = 0

    def round(self) -> dict[str, Any]:
        self.server_round += 1
        first = len(self.grid.exchanges)
        start, cpu_start = time.perf_counter(), time.process_time()
        error = self.run_round()
        round_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        exchanges = self.grid.exchanges[first:]
        nodes = list(self.grid.contexts)
        node_total = sum(sum(e.node_s.values()) for e in exchanges)
        slowest = sum(max(e.node_s.values(), default=0.0) for e in exchanges)
        return {
            "round_s": round_s,
            "cpu_s": cpu_s,
            "parallel_round_s": round_s - node_total + slowest,
            "server_s": round_s - node_total,
            "client_s_mean": node_total / len(nodes),
            "upload_bytes": statistics.mean(
                sum(e.up_bytes.get(n, 0) for e in exchanges) for n in nodes
            ),
            "upload_content_bytes": statistics.mean(
                sum(e.up_content_bytes.get(n, 0) for e in exchanges) for n in nodes
            ),
            "download_bytes": statistics.mean(
                sum(e.down_bytes.get(n, 0) for e in exchanges) for n in nodes
            ),
            "upload_bytes_by_exchange": {
                e.label: statistics.mean(e.up_bytes.values()) for e in exchanges if e.up_bytes
            },
            "client_s_by_exchange": {
                e.label: statistics.mean(e.node_s.values()) for e in exchanges if e.node_s
            },
            "replies": min(len(e.up_bytes) for e in exchanges),
            "max_abs_error": error,
        }

    def run_round(self) -> float:
        """One round; returns max |(new model) - (expected model)|."""
        raise NotImplementedError


class FlowerSecAgg(Variant):
    """Flower's legacy SecAgg+ workflow and mod around a NumPyClient returning the update."""

    name = "flower_secagg"

    def __init__(self, workload: Workload, num_shares: int, threshold: int) -> None:
        super().__init__(workload, num_shares, threshold)
        vectors, weights = workload.vectors, workload.weights
        names = list(workload.shapes)

        class WorkloadClient(NumPyClient):
            def __init__(self, node: int) -> None:
                self.node = node

            def fit(self, parameters, config):  # type: ignore[no-untyped-def]
                update = workload.update(self.node)
                return [update[n] for n in names], weights[self.node], {}

        app = ClientApp(
            client_fn=lambda context: WorkloadClient(context.node_id).to_client(),
            mods=[secaggplus_mod],
        )
        self.grid = WireGrid(app, make_contexts(len(vectors), {}))
        num = len(vectors)
        strategy = LegacyFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=num,
            min_available_clients=num,
            initial_parameters=ndarrays_to_parameters(list(workload.initial.values())),
        )
        manager = SimpleClientManager()
        for node in self.grid.contexts:
            manager.register(GridClientProxy(node, self.grid, run_id=1))
        base = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        self.context = LegacyContext(base, ServerConfig(num_rounds=1), strategy, manager)
        self.context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(list(workload.initial.values())), keep_input=True
        )
        self.workflow = SecAggPlusWorkflow(
            num_shares=num_shares,
            reconstruction_threshold=threshold,
            max_weight=float(MAX_WEIGHT),
            timeout=TIMEOUT,
        )

    def run_round(self) -> float:
        state = self.context.state
        state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: self.server_round, WorkflowKey.START_TIME: 0.0}
        )
        state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(list(self.workload.initial.values())), keep_input=True
        )
        self.workflow(self.grid, self.context)
        record = state.array_records[MAIN_PARAMS_RECORD]
        new = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
        want = self.workload.mean_vector()  # Flower averages the returned vectors themselves
        return max(float(np.max(np.abs(a - want[n]))) for a, n in zip(new, want, strict=True))


class FedgeVariant(Variant):
    """FedgeAvg + fedge's real ClientApp; training replaced by the fixed vector."""

    secure = True

    def __init__(self, workload: Workload, num_shares: int, threshold: int) -> None:
        super().__init__(workload, num_shares, threshold)
        config = FedgeConfig.from_run_config(
            {
                "secagg": self.secure,
                "secagg-num-shares": num_shares,
                "secagg-threshold": threshold,
                "max-num-examples": MAX_WEIGHT,
            }
        )
        self.config = config
        self.grid = WireGrid(
            fedge_client_app, make_contexts(len(workload.vectors), config.to_run_config())
        )
        num = len(workload.vectors)
        self.strategy = FedgeAvg(
            secagg=SecAggSettings.from_config(config) if self.secure else None,
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num,
            min_available_nodes=num,
        )

    def run_round(self) -> float:
        arrays = to_array_record(self.workload.initial)
        with _workload_training(self.workload):
            messages = self.strategy.configure_train(
                self.server_round, arrays, ConfigRecord(), self.grid
            )
            replies = self.grid.send_and_receive(messages, timeout=TIMEOUT)
            new, _ = self.strategy.aggregate_train(self.server_round, replies)
        if new is None:
            return float("inf")
        got = from_array_record(new)
        want = self.workload.mean_vector()
        return max(
            float(np.max(np.abs(got[n].astype(np.float64) - self.workload.initial[n] - want[n])))
            for n in want
        )


class FedgeSecAgg(FedgeVariant):
    name = "fedge_secagg"
    secure = True


class FedgePlain(FedgeVariant):
    name = "fedge_plain"
    secure = False


class _workload_training:
    """Swap the torch client's `local_update` for the workload's update.

    Everything else (message routing, config parsing, clipping, SecAgg stages,
    reply records) is fedge's real ClientApp code.
    """

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.saved: Callable[..., Any] | None = None

    def __enter__(self) -> None:
        workload = self.workload

        def local_update(
            msg: Message, context: Context, config: FedgeConfig
        ) -> tuple[NamedArrays, MetricRecord]:
            node = context.node_id
            update, extra = privatize_update(
                dict(workload.update(node)), msg.content.config_records["config"]
            )
            return update, MetricRecord({WEIGHT_KEY: workload.weights[node], **extra})

        self.saved = torch_client.local_update
        torch_client.local_update = local_update  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        torch_client.local_update = self.saved  # type: ignore[assignment]


# --- protocol benchmark -------------------------------------------------------------------


def default_shares(num_clients: int) -> tuple[int, int]:
    """(num_shares, threshold) both implementations accept: an odd neighbourhood of
    about half the clients (at least 5) and fedge's default threshold (~2/3)."""
    shares = max(5, num_clients // 2)
    shares = min(shares if shares % 2 else shares + 1, num_clients)
    if shares == num_clients and shares % 2 == 0:
        shares -= 1
    return shares, max(shares // 2 + 1, -(-2 * shares // 3))


def protocol_case(
    kind: str,
    num_params: int,
    num_clients: int,
    rounds: int,
    shares: tuple[int, int] | None,
    seed: int,
) -> dict[str, Any]:
    workload = Workload.make(kind, num_params, num_clients, seed)
    num_shares, threshold = shares or default_shares(num_clients)
    variants: list[Variant] = [
        FlowerSecAgg(workload, num_shares, threshold),
        FedgeSecAgg(workload, num_shares, threshold),
        FedgePlain(workload, num_shares, threshold),
    ]
    rows: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for index in range(rounds + 1):  # round 0 of each variant is a warm-up
        order = variants[index % 3 :] + variants[: index % 3]
        for variant in order:
            row = variant.round()
            logging.info(
                "%s %s P=%s N=%s round %s: %.2f s",
                kind,
                variant.name,
                num_params,
                num_clients,
                index,
                row["round_s"],
            )
            if row["replies"] != num_clients:
                raise RuntimeError(f"{variant.name}: only {row['replies']} replies")
            if index:
                rows[variant.name].append(row)

    summary: dict[str, Any] = {
        "workload": kind,
        "params": num_params,
        "clients": num_clients,
        "num_shares": num_shares,
        "threshold": threshold,
        "timed_rounds": rounds,
        "plain_float32_update_bytes": 4 * num_params,
        "fedge_advertised_payload_bytes": upload_bytes_per_client(num_params, num_shares),
        "fedge_quantization_error_bound": quantization_error_bound(
            num_clients, MAX_WEIGHT, FedgeConfig().secagg_clip_norm
        )
        / sum(workload.weights.values()),
    }
    for name, name_rows in rows.items():
        summary[name] = {
            key: statistics.median(r[key] for r in name_rows)
            for key in (
                "round_s",
                "cpu_s",
                "parallel_round_s",
                "server_s",
                "client_s_mean",
                "upload_bytes",
                "upload_content_bytes",
                "download_bytes",
            )
        } | {
            "round_s_all": [round(r["round_s"], 3) for r in name_rows],
            "max_abs_error": max(r["max_abs_error"] for r in name_rows),
            "upload_bytes_by_exchange": name_rows[-1]["upload_bytes_by_exchange"],
            "client_s_by_exchange": {
                label: statistics.median(r["client_s_by_exchange"][label] for r in name_rows)
                for label in name_rows[-1]["client_s_by_exchange"]
            },
        }
    flower, fedge, plain = (summary[v] for v in VARIANTS)
    summary["ratios"] = {
        "bytes_fedge_secagg_over_flower": fedge["upload_bytes"] / flower["upload_bytes"],
        "bytes_fedge_secagg_over_fedge_plain": fedge["upload_bytes"] / plain["upload_bytes"],
        "bytes_fedge_secagg_over_float32_update": fedge["upload_bytes"] / (4 * num_params),
        "time_fedge_secagg_over_flower": fedge["round_s"] / flower["round_s"],
        "time_fedge_secagg_over_fedge_plain": fedge["round_s"] / plain["round_s"],
        "cpu_fedge_secagg_over_fedge_plain": fedge["cpu_s"] / plain["cpu_s"],
        "parallel_time_fedge_secagg_over_flower": fedge["parallel_round_s"]
        / flower["parallel_round_s"],
        "parallel_time_fedge_secagg_over_fedge_plain": fedge["parallel_round_s"]
        / plain["parallel_round_s"],
    }
    # Rounds with the same index ran back to back, so their ratio cancels slow load drift.
    summary["paired_ratios_median"] = {
        f"time_fedge_secagg_over_{other}": statistics.median(
            mine["round_s"] / theirs["round_s"]
            for mine, theirs in zip(rows["fedge_secagg"], rows[other], strict=True)
        )
        for other in ("flower_secagg", "fedge_plain")
    }
    summary["meets_targets"] = {
        key: summary["ratios"][key] <= target for key, target in TARGETS.items()
    }
    return summary


# --- accuracy -----------------------------------------------------------------------------


def accuracy_comparison(seed: int, pairs: int) -> dict[str, Any]:
    """fedge's default run (digits, 10 clients, 20 rounds) with and without SecAgg+."""
    from fedge.simulation import run_inprocess

    result: dict[str, Any] = {"run_config": "fedge defaults", "seed": seed, "clients": 10}
    order = [False, True, True, False] * pairs
    runs: dict[str, list[list[dict[str, Any]]]] = {"plain": [], "secagg": []}
    with tempfile.TemporaryDirectory(prefix="fedge-secagg-acc-") as root:
        for index, secagg in enumerate(order[: 2 * pairs]):
            name = "secagg" if secagg else "plain"
            run_name = f"{name}-{index}"
            config = {"secagg": secagg, "seed": seed, "output-dir": root, "run-name": run_name}
            run_inprocess(config, num_supernodes=10)
            lines = Path(root, run_name, "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            runs[name].append([json.loads(line) for line in lines if line.strip()])
            logging.info("accuracy: %s run %s done", name, index)
    for name, name_runs in runs.items():
        rows = name_runs[0]
        round_s = [r["seconds"] for run in name_runs for r in run[1:]]
        result[name] = {
            "final_test_accuracy": rows[-1]["test_accuracy"],
            "best_test_accuracy": max(r["test_accuracy"] for r in rows),
            "final_test_loss": rows[-1]["test_loss"],
            "rounds": len(rows),
            "runs": len(name_runs),
            "all_replies": all(r["num_replies"] == 10 for run in name_runs for r in run),
            "median_round_s": statistics.median(round_s),
            "median_round_s_per_run": [
                round(statistics.median(r["seconds"] for r in run[1:]), 4) for run in name_runs
            ],
        }
    gap = 100 * (result["secagg"]["final_test_accuracy"] - result["plain"]["final_test_accuracy"])
    result["final_accuracy_gap_points"] = gap
    result["within_half_point"] = abs(gap) <= 0.5
    # with real local training (3 epochs), SecAgg+'s share of a round's time
    result["median_round_s_secagg_over_plain"] = (
        result["secagg"]["median_round_s"] / result["plain"]["median_round_s"]
    )
    return result


# --- CLI ----------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    params, _, clients = text.lower().partition("x")
    return int(params), int(clients)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=[(100_000, 10), (1_000_000, 20)],
        help="PARAMSxCLIENTS cases (default: 100000x10 1000000x20)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant")
    parser.add_argument(
        "--workload",
        nargs="+",
        choices=("fixed", "training"),
        default=["fixed", "training"],
        help="client updates: fixed random vectors (protocol cost only) and/or real "
        "local training of a same-size MLP on digits (default: both)",
    )
    parser.add_argument(
        "--shares",
        nargs=2,
        type=int,
        metavar=("NUM_SHARES", "THRESHOLD"),
        help="SecAgg+ neighbourhood and threshold for both (default: see default_shares)",
    )
    parser.add_argument("--accuracy", action="store_true", help="also run the digits comparison")
    parser.add_argument(
        "--pairs", type=int, default=2, help="plain/secagg run pairs for --accuracy"
    )
    parser.add_argument("--skip-protocol", action="store_true", help="accuracy only")
    return parse_with_common_options(parser, argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)  # same for all variants
    # Server-side messages carry the ServerApp task's identity, set by Flower at runtime.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    report, started = start("secagg", "flwr", "numpy", "cryptography")
    if not args.skip_protocol:
        report["harness"] = "in-memory WireGrid (protobuf round trip per message), one process"
        report["protocol"] = [
            protocol_case(kind, params, clients, args.rounds, args.shares, args.seed)
            for kind in args.workload
            for params, clients in args.sizes
        ]
    if args.accuracy:
        report["accuracy"] = accuracy_comparison(args.seed, args.pairs)
    return finish(report, started, args.out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
