"""fedge at many clients: round time and ServerApp memory at 10, 100 and 1,000 sampled clients.

Printed as one JSON object on stdout (logs go to stderr).

1. **Protocol** (default). 1,000 nodes are connected; each round samples
   10, 100 or 1,000 of them (`fraction-train` = sampled / connected, Flower's
   own sampling). Variants, all on the same harness, updates and weights:

   - `fedge_plain`: `FedgeAvg` + fedge's real ClientApp, plain float32 updates.
   - `fedge_secagg`: the same with SecAgg+ at fedge's default neighbourhood
     (`secagg-num-shares=0`: the complete graph over the sampled clients).
   - `fedge_secagg_k`: SecAgg+ with `secagg-num-shares` = k, the odd number
     nearest 2·log2(n) (n = sampled), i.e. a sparse graph.
   - `flower_secagg` / `flower_secagg_k`: Flower's legacy `SecAggPlusWorkflow`
     and `secaggplus_mod` (the anchor) with the same two shapes, sampling by
     `fraction_fit` over the same 1,000 registered nodes.

   The model is a fixed-size update vector (`--params`, default 10,000 float32):
   local training is replaced by a fixed random vector per node (protocol cost
   only), exactly as `benchmarks/secagg.py --workload fixed`, whose in-memory
   `WireGrid` (one process, every message through Flower's protobuf wire
   format, clients run one after the other) this reuses.

   Each cell (variant × sampled size) runs in its own subprocess, killed after
   `--cap` seconds and then reported as "did not finish in N s"; a variant that
   did not finish is not run again at larger sizes (said so in its cells). A
   cell runs one warm-up round (10 sampled), `--rounds` timed rounds and one
   memory round. Every
   round is checked: the new model must equal the weighted mean of the
   *sampled* nodes' vectors (`max_abs_error`). Reported per cell (medians):

   - `round_s`: wall time of a round, all clients run one after the other in
     this process; `server_s`: `round_s` minus the clients' own time (their
     ClientApp calls and their messages' wire round trips), i.e. the
     ServerApp side (strategy, protocol, aggregation, building messages).
   - `server_peak_bytes`: the ServerApp side's peak Python-heap memory during
     the memory round above its level at the round's start, by `tracemalloc`
     (numpy's buffers included). The clients run in the same process, so the
     memory they keep in their own state is metered per call and subtracted,
     and peaks are read only while server code runs (see `MeteredGrid`). The
     memory round is not timed (tracemalloc slows allocation). `max_rss_bytes`
     is the whole subprocess's peak RSS (clients included), for context.

2. **Digits** (`--digits`): 1,000 simulated nodes, 100 sampled per round,
   5 rounds of fedge's full ServerApp and real ClientApp (training on digits,
   IID: 1-2 rows each) through `fedge.simulation.run_inprocess`, with and
   without SecAgg+ (and with the sparse k), each in its own capped subprocess.

Usage: `python benchmarks/scale.py [--sampled 10 100 1000] [--connected 1000]
[--variants ...] [--rounds 1] [--cap 200] [--digits] [--skip-protocol] [--out FILE]`
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.serde import message_from_proto, message_to_proto
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
from secagg import (
    MAX_WEIGHT,
    NODE0,
    TIMEOUT,
    Exchange,
    WireGrid,
    Workload,
    _scaled_to_update_norm,
    _workload_training,
    make_contexts,
)

from fedge.client_app import app as fedge_client_app
from fedge.config import FedgeConfig
from fedge.records import from_array_record, to_array_record
from fedge.server_app.secure_round import SecAggSettings
from fedge.server_app.strategy import FedgeAvg

VARIANTS = ("fedge_plain", "fedge_secagg", "fedge_secagg_k", "flower_secagg", "flower_secagg_k")
TARGET_SECAGG_OVER_PLAIN = 1.3


def sparse_shares(num_sampled: int) -> int:
    """The odd k nearest 2·log2(n), at most n (Bell et al.'s O(log n) neighbourhood)."""
    k = 2 * math.log2(num_sampled)
    odd = 2 * round((k - 1) / 2) + 1
    return min(max(odd, 3), num_sampled if num_sampled % 2 else num_sampled - 1)


def shape(variant: str, num_sampled: int) -> tuple[int, int]:
    """(num_shares, threshold) of a variant at `num_sampled`: fedge's own rule
    (`SecAggSettings.shape`) for both implementations, so both run the same graph."""
    num_shares = sparse_shares(num_sampled) if variant.endswith("_k") else 0
    settings = SecAggSettings(num_shares, 0, MAX_WEIGHT, FedgeConfig().secagg_clip_norm, TIMEOUT)
    return settings.shape(num_sampled)


def make_workload(num_params: int, connected: int, seed: int) -> Workload:
    """A fixed random update of norm 1 and a weight in 1..100 for every connected node."""
    rows = num_params // 1000 - 1
    shapes = {"fc.weight": (rows, 1000), "fc.bias": (num_params - rows * 1000,)}
    rng = np.random.default_rng(seed)
    initial = {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in shapes.items()}
    vectors = {
        NODE0 + i: _scaled_to_update_norm({n: rng.normal(size=s) for n, s in shapes.items()})
        for i in range(connected)
    }
    weights = {NODE0 + i: 1 + i % 100 for i in range(connected)}
    return Workload("fixed", shapes, initial, vectors, weights)


def mean_of(workload: Workload, nodes: Iterable[int]) -> dict[str, np.ndarray]:
    """Σ n_k Δ_k / Σ n_k over `nodes`, in float64."""
    nodes = list(nodes)
    total = sum(workload.weights[k] for k in nodes)
    return {
        name: sum(workload.weights[k] * workload.vectors[k][name].astype(np.float64) for k in nodes)
        / total
        for name in workload.shapes
    }


# --- memory -------------------------------------------------------------------------------


class MeteredGrid(WireGrid):
    """`WireGrid` that, while `metering`, keeps the ServerApp side's tracemalloc peak.

    Server and clients share this process. Each client call's net allocation
    (what the client keeps in its context state) is added to `client_kept`, and
    the traced peak is read (then reset) only at the end of each stretch of
    server code, minus `client_kept`. So `server_peak` is the most memory the
    ServerApp side held at once, clients' own state left out.
    """

    def __init__(self, app: ClientApp, contexts: dict[int, Context]) -> None:
        super().__init__(app, contexts)
        self.metering = False
        self.client_kept = 0
        self.server_peak = 0

    def begin(self) -> int:
        """Start metering a round; returns the traced level it starts from."""
        self.metering, self.client_kept, self.server_peak = True, 0, 0
        tracemalloc.reset_peak()
        return tracemalloc.get_traced_memory()[0]

    def end(self, base: int) -> int:
        """Stop metering; the server side's peak above `base`."""
        self.server_mark()
        self.metering = False
        return self.server_peak - base

    def server_mark(self) -> None:
        if self.metering:
            peak = tracemalloc.get_traced_memory()[1] - self.client_kept
            self.server_peak = max(self.server_peak, peak)

    def send_and_receive(  # type: ignore[override]
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        if not self.metering:
            return super().send_and_receive(messages, timeout=timeout)
        messages = list(messages)
        exchange = Exchange("metered")
        self.exchanges.append(exchange)
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            received = message_from_proto(
                ProtoMessage.FromString(message_to_proto(message).SerializeToString())
            )
            self.server_mark()
            before = tracemalloc.get_traced_memory()[0]
            reply = self.app(received, self.contexts[node])
            up = message_to_proto(reply).SerializeToString()
            del reply
            self.client_kept += tracemalloc.get_traced_memory()[0] - before - sys.getsizeof(up)
            tracemalloc.reset_peak()
            replies.append(message_from_proto(ProtoMessage.FromString(up)))
            exchange.up_bytes[node] = len(up)
            exchange.node_s[node] = 0.0
        return replies


# --- variants -----------------------------------------------------------------------------


class Cell:
    """One variant over `connected` nodes, `sampled` of them per round."""

    def __init__(self, variant: str, workload: Workload, sampled: int) -> None:
        self.variant = variant
        self.workload = workload
        self.sampled = sampled
        self.connected = len(workload.vectors)
        self.num_shares, self.threshold = shape(variant, sampled)
        self.server_round = 0
        self.grid: MeteredGrid

    def round(self, metered: bool = False) -> dict[str, Any]:
        """One round: its times (or, if `metered`, its server-side peak) and its error."""
        self.server_round += 1
        first = len(self.grid.exchanges)
        base = self.grid.begin() if metered else 0
        began = time.perf_counter()
        nodes, new = self.run_round()
        round_s = time.perf_counter() - began
        peak = self.grid.end(base) if metered else None
        exchanges = self.grid.exchanges[first:]
        client_s = sum(sum(e.node_s.values()) for e in exchanges)
        want = mean_of(self.workload, nodes)
        error = max(
            float(np.max(np.abs(new[n] - self.workload.initial[n] - want[n]))) for n in want
        )
        return {
            "round_s": round_s,
            "server_s": round_s - client_s,
            "server_peak_bytes": peak,
            "sampled": len(nodes),
            "replies": min(len(e.up_bytes) for e in exchanges),
            "exchanges": len(exchanges),
            "max_abs_error": error,
        }

    def sampled_nodes(self, first: int) -> list[int]:
        """The nodes of this round's first exchange: the sample."""
        return list(self.grid.exchanges[first].up_bytes)

    def run_round(self) -> tuple[list[int], dict[str, np.ndarray]]:
        """One round; returns the sampled nodes and the new model (float64)."""
        raise NotImplementedError


class FedgeCell(Cell):
    def __init__(self, variant: str, workload: Workload, sampled: int) -> None:
        super().__init__(variant, workload, sampled)
        secure = variant != "fedge_plain"
        config = FedgeConfig.from_run_config(
            {
                "secagg": secure,
                "secagg-num-shares": self.num_shares if variant.endswith("_k") else 0,
                "max-num-examples": MAX_WEIGHT,
            }
        )
        self.grid = MeteredGrid(
            fedge_client_app, make_contexts(self.connected, config.to_run_config())
        )
        self.strategy = FedgeAvg(
            secagg=SecAggSettings.from_config(config) if secure else None,
            fraction_train=sampled / self.connected,
            fraction_evaluate=0.0,
            min_train_nodes=sampled,
            min_available_nodes=self.connected,
        )

    def run_round(self) -> tuple[list[int], dict[str, np.ndarray]]:
        first = len(self.grid.exchanges)
        with _workload_training(self.workload):
            messages = self.strategy.configure_train(
                self.server_round, to_array_record(self.workload.initial), ConfigRecord(), self.grid
            )
            replies = self.grid.send_and_receive(messages, timeout=TIMEOUT)
            new, _ = self.strategy.aggregate_train(self.server_round, replies)
            self.grid.server_mark()
        if new is None:
            raise RuntimeError(f"{self.variant}: round {self.server_round} did not aggregate")
        arrays = from_array_record(new)
        return self.sampled_nodes(first), {n: a.astype(np.float64) for n, a in arrays.items()}


class FlowerCell(Cell):
    """Flower's legacy SecAgg+ workflow; its FedAvg samples `fraction_fit` of the nodes."""

    def __init__(self, variant: str, workload: Workload, sampled: int) -> None:
        super().__init__(variant, workload, sampled)
        vectors, weights, names = workload.vectors, workload.weights, list(workload.shapes)

        class WorkloadClient(NumPyClient):
            def __init__(self, node: int) -> None:
                self.node = node

            def fit(self, parameters, config):  # type: ignore[no-untyped-def]
                return [vectors[self.node][n] for n in names], weights[self.node], {}

        app = ClientApp(
            client_fn=lambda context: WorkloadClient(context.node_id).to_client(),
            mods=[secaggplus_mod],
        )
        self.grid = MeteredGrid(app, make_contexts(self.connected, {}))
        self.initial = ndarrays_to_parameters(list(workload.initial.values()))
        strategy = LegacyFedAvg(
            fraction_fit=sampled / self.connected,
            fraction_evaluate=0.0,
            min_fit_clients=sampled,
            min_available_clients=self.connected,
            initial_parameters=self.initial,
        )
        manager = SimpleClientManager()
        for node in self.grid.contexts:
            manager.register(GridClientProxy(node, self.grid, run_id=1))
        base = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        self.context = LegacyContext(base, ServerConfig(num_rounds=1), strategy, manager)
        self.workflow = SecAggPlusWorkflow(
            num_shares=self.num_shares,
            reconstruction_threshold=self.threshold,
            max_weight=float(MAX_WEIGHT),
            timeout=TIMEOUT,
        )

    def run_round(self) -> tuple[list[int], dict[str, np.ndarray]]:
        first = len(self.grid.exchanges)
        state = self.context.state
        state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: self.server_round, WorkflowKey.START_TIME: 0.0}
        )
        state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            self.initial, keep_input=True
        )
        self.workflow(self.grid, self.context)
        self.grid.server_mark()
        record = state.array_records[MAIN_PARAMS_RECORD]
        new = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
        # Flower averages the returned vectors themselves: add back the initial model
        arrays = {
            n: a.astype(np.float64) + self.workload.initial[n]
            for a, n in zip(new, self.workload.shapes, strict=True)
        }
        return self.sampled_nodes(first), arrays


def run_cell(
    variant: str, sampled: int, connected: int, params: int, rounds: int, seed: int
) -> dict[str, Any]:
    """Warm-up, `rounds` timed rounds and one metered round of one variant."""
    workload = make_workload(params, connected, seed)
    cls = FlowerCell if variant.startswith("flower") else FedgeCell
    cell = cls(variant, workload, sampled)
    cls(variant, workload, min(sampled, 10)).round()  # warm-up: imports, first-call costs
    rows = []
    for index in range(rounds):
        rows.append(cell.round())
        logging.info("%s n=%s round %s: %.2f s", variant, sampled, index + 1, rows[-1]["round_s"])
    tracemalloc.start()
    memory = cell.round(metered=True)
    tracemalloc.stop()
    for row in [*rows, memory]:
        if row["replies"] != sampled or row["sampled"] != sampled:
            raise RuntimeError(f"{variant}: {row['replies']} replies of {sampled} sampled")
    return {
        "variant": variant,
        "sampled": sampled,
        "connected": connected,
        "num_shares": cell.num_shares if variant != "fedge_plain" else None,
        "threshold": cell.threshold if variant != "fedge_plain" else None,
        "finished": True,
        "round_s": statistics.median(r["round_s"] for r in rows),
        "server_s": statistics.median(r["server_s"] for r in rows),
        "round_s_all": [round(r["round_s"], 3) for r in rows],
        "exchanges_per_round": rows[-1]["exchanges"],
        "server_peak_bytes": memory["server_peak_bytes"],
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "max_abs_error": max(r["max_abs_error"] for r in [*rows, memory]),
    }


def capped(args: list[str], cap: float, label: str) -> dict[str, Any]:
    """Run `scale.py args` in a subprocess; its JSON, or what stopped it."""
    command = [sys.executable, str(Path(__file__)), *args]
    began = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=cap, check=False)
    except subprocess.TimeoutExpired:
        logging.info("%s: did not finish in %s s", label, cap)
        return {"finished": False, "note": f"did not finish in {cap:g} s"}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        return {"finished": False, "note": f"failed (exit {done.returncode})", "stderr": tail}
    result = json.loads(done.stdout)
    result["cell_wall_s"] = round(time.perf_counter() - began, 1)
    return result


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    cells: dict[str, dict[str, Any]] = {}
    given_up: dict[str, str] = {}  # variants that did not finish at a smaller size
    for sampled in sorted(args.sampled):
        for variant in args.variants:
            if variant in given_up:
                note = f"not run: {given_up[variant]}"
                cells[f"{variant}@{sampled}"] = {"finished": False, "note": note}
                continue
            cell = [variant, str(sampled), str(args.connected), str(args.params)]
            options = ["--rounds", str(args.rounds), "--seed", str(args.seed)]
            label = f"{variant} n={sampled}"
            result = capped(["--cell", *cell, *options], args.cap, label)
            result.setdefault("variant", variant)
            result.setdefault("sampled", sampled)
            cells[f"{variant}@{sampled}"] = result
            if not result["finished"]:
                given_up[variant] = f"{result['note']} at {sampled} sampled"
            logging.info("%s: %s", label, result.get("round_s", result.get("note")))
    ratios: dict[str, dict[str, float | None]] = {}
    for sampled in args.sampled:
        plain = cells.get(f"fedge_plain@{sampled}", {})
        for variant in args.variants:
            if variant == "fedge_plain":
                continue
            cell = cells[f"{variant}@{sampled}"]
            both = cell.get("finished") and plain.get("finished")
            ratios.setdefault(f"{variant}_over_fedge_plain", {})[str(sampled)] = (
                cell["round_s"] / plain["round_s"] if both else None
            )
    return {
        "harness": "in-memory WireGrid (protobuf round trip per message), one process per cell",
        "model": f"fixed update vector, {args.params} float32 parameters",
        "connected": args.connected,
        "cap_s": args.cap,
        "cells": cells,
        "round_time_ratios": ratios,
        "target_secagg_over_plain": TARGET_SECAGG_OVER_PLAIN,
    }


# --- digits, fedge's full ServerApp ---------------------------------------------------------


def digits_run(
    secagg: bool, num_shares: int, nodes: int, sampled: int, rounds: int
) -> dict[str, Any]:
    """fedge's ServerApp and ClientApp on digits through Flower's simulation engine."""
    from fedge.simulation import run_inprocess

    with tempfile.TemporaryDirectory(prefix="fedge-scale-") as root:
        config = {
            "num-server-rounds": rounds,
            "fraction-train": sampled / nodes,
            "fraction-evaluate": 0.0,
            "min-train-nodes": sampled,
            "min-available-nodes": nodes,
            "partitioner": "iid",
            "secagg": secagg,
            "secagg-num-shares": num_shares,
            "output-dir": root,
            "run-name": "scale",
        }
        began = time.perf_counter()
        run_inprocess(config, num_supernodes=nodes)
        wall = time.perf_counter() - began
        text = Path(root, "scale", "metrics.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {
        "finished": True,
        "secagg": secagg,
        "secagg_num_shares": num_shares,
        "nodes": nodes,
        "sampled": sampled,
        "rounds": len(rows),
        "wall_s": round(wall, 1),
        "round_s": [round(r["seconds"], 2) for r in rows],
        "num_replies": [r["num_replies"] for r in rows],
        "test_accuracy": [r["test_accuracy"] for r in rows],
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def digits(args: argparse.Namespace) -> dict[str, Any]:
    nodes, sampled = args.digits_nodes, args.digits_sampled
    runs = {}
    for label, secagg, shares in (
        ("plain", False, 0),
        ("secagg", True, 0),
        ("secagg_k", True, sparse_shares(sampled)),
    ):
        if label not in args.digits_variants:
            continue
        run = ["--digits-run", str(int(secagg)), str(shares), str(nodes), str(sampled)]
        runs[label] = capped(run, args.digits_cap, f"digits {label}")
        logging.info("digits %s: %s", label, runs[label].get("round_s", runs[label].get("note")))
    return {
        "engine": "fedge.simulation.run_inprocess (Flower's simulation engine on Ray)",
        "data": "digits, iid, 1-2 training rows per node",
        "cap_s": args.digits_cap,
        "runs": runs,
    }


# --- CLI ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampled", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--connected", type=int, default=1000)
    parser.add_argument("--params", type=int, default=10_000, help="update vector size")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per cell")
    parser.add_argument("--cap", type=float, default=200.0, help="seconds per protocol cell")
    parser.add_argument("--digits", action="store_true", help="also run the digits runs")
    parser.add_argument("--digits-nodes", type=int, default=1000)
    parser.add_argument("--digits-sampled", type=int, default=100)
    parser.add_argument(
        "--digits-variants",
        nargs="+",
        choices=("plain", "secagg", "secagg_k"),
        default=["plain", "secagg", "secagg_k"],
    )
    parser.add_argument("--digits-cap", type=float, default=600.0)
    parser.add_argument("--skip-protocol", action="store_true")
    parser.add_argument("--cell", nargs=4, metavar=("VARIANT", "SAMPLED", "CONNECTED", "PARAMS"))
    parser.add_argument("--digits-run", nargs=4, metavar=("SECAGG", "SHARES", "NODES", "SAMPLED"))
    return parse_with_common_options(parser, argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    # Server-side messages carry the ServerApp task's identity, set by Flower at runtime.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    if args.cell:  # one protocol cell, in a subprocess of the run below
        variant, sampled, connected, params = args.cell
        result = run_cell(
            variant, int(sampled), int(connected), int(params), args.rounds, args.seed
        )
        print(json.dumps(result))
        return result
    if args.digits_run:
        secagg, shares, nodes, sampled = (int(x) for x in args.digits_run)
        result = digits_run(bool(secagg), shares, nodes, sampled, rounds=5)
        print(json.dumps(result))
        return result
    report, started = start("scale", "flwr", "numpy", "cryptography")
    if not args.skip_protocol:
        report["protocol"] = protocol(args)
    if args.digits:
        report["digits"] = digits(args)
    return finish(report, started, args.out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
