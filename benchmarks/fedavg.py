"""fedge's FedgeAvg vs Flower's stock FedAvg: same model, data and clients, one process.

Two measurements, printed as one JSON object on stdout:

1. **Rounds** (one simulation, one Ray start). A benchmark ServerApp runs
   segments of `--rounds` rounds back to back on the same 10 digits clients,
   rotating the variant each segment so slow drift on a noisy machine hits all
   of them alike:

   - `fedge`: fedge's full ServerApp (`fedge.server_app.app.main`): FedgeAvg
     (reply validation, float64 update aggregation), centralized test
     evaluation, checkpoint and metrics.jsonl row every round. Round times are
     metrics.jsonl's `seconds`.
   - `stock`: Flower's `FedAvg` with the same initial weights, run config and
     fedge ClientApp (which then replies with full weights), and an
     `evaluate_fn` doing the same centralized test evaluation and taking a
     timestamp at the same point as fedge's recorder.
   - `stock_no_eval` (only with `--no-eval-variant`): as `stock`, but the
     `evaluate_fn` only takes the timestamp. The centralized evaluation's own
     time is reported directly (`centralized_eval_median_s`) either way.

   Every segment starts from the same initial weights, so round r of every
   segment trains the same clients with the same seeds. Round 1 of each
   segment and a warm-up segment (Ray start) are not counted.

2. **aggregate_train micro-benchmark**: both strategies aggregate the same
   synthetic 10-client replies (fedge gets Δw, stock gets w + Δw) for the
   digits CNN and a 1M-parameter model, alternating calls; plus fedge's
   per-round checkpoint + metrics row write on the same arrays.

Usage: `python benchmarks/fedavg.py [--rounds 4] [--repeats 6] [--out result.json]`
"""

from __future__ import annotations

import argparse
import itertools
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from report import finish, parse_with_common_options, start, with_run_config

from fedge.client_app.protocol import UPDATE_INFO_KEY, update_tag
from fedge.config import FedgeConfig
from fedge.models import build_model, load_numpy_state, state_to_numpy
from fedge.models.training import evaluate
from fedge.records import NamedArrays, from_array_record, to_array_record
from fedge.server_app.acceptance import HeldOut
from fedge.server_app.app import main as fedge_server_main
from fedge.server_app.run_folder import Checkpoint, RunFolder
from fedge.server_app.strategy import FedgeAvg
from fedge.simulation import run_inprocess
from fedge.task import dataset_for, model_spec_for

BASE_VARIANTS = ("stock", "fedge")
TARGET_RATIO = 1.1

# The benchmark ServerApp runs in this process (Flower's simulation thread); it
# leaves its per-segment round times here for `main` to summarize.
_SEGMENTS: list[dict[str, Any]] = []
_PLAN: dict[str, Any] = {}


def seed_everything(seed: int) -> None:
    """Seed the generators exactly as fedge's ServerApp does, so initial weights match."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_stock_segment(grid: Grid, config: FedgeConfig, with_eval: bool) -> dict[str, Any]:
    """Flower's stock FedAvg for `config.num_server_rounds` rounds; per-round seconds."""
    seed_everything(config.seed)
    bundle = dataset_for(config)
    held_out = HeldOut.of(bundle, config.seed)
    spec = model_spec_for(config, bundle)
    initial = state_to_numpy(build_model(spec))
    model = build_model(spec)
    strategy = FedAvg(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=config.min_train_nodes,
        min_available_nodes=config.min_available_nodes,
    )
    stamps: list[float] = []
    accuracy: list[float] = []
    eval_seconds: list[float] = []

    def evaluate_fn(server_round: int, record: ArrayRecord) -> MetricRecord | None:
        result = None
        if with_eval:
            start = time.perf_counter()
            load_numpy_state(model, from_array_record(record))
            loss, acc = evaluate(model, held_out.x_test, held_out.y_test)  # fedge's test rows
            eval_seconds.append(time.perf_counter() - start)
            accuracy.append(acc)
            result = MetricRecord({"test-loss": loss, "test-accuracy": acc})
        # Same point in the round as fedge's RoundRecorder takes its timestamp.
        stamps.append(time.perf_counter())
        return result

    strategy.start(
        grid=grid,
        initial_arrays=to_array_record(initial),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        evaluate_fn=evaluate_fn,
    )
    return {
        "seconds": [b - a for a, b in itertools.pairwise(stamps)],
        "final_test_accuracy": accuracy[-1] if accuracy else None,
        "eval_seconds": eval_seconds,
    }


def run_fedge_segment(grid: Grid, context: Context, name: str) -> dict[str, Any]:
    """fedge's full ServerApp into a fresh run folder; per-round seconds from metrics.jsonl."""
    run_config = dict(context.run_config)
    run_config["run-name"] = name
    fedge_server_main(grid, with_run_config(context, run_config))
    config = FedgeConfig.from_run_config(run_config)
    rows = RunFolder(Path(config.output_dir) / name).read_metrics()
    return {
        "seconds": [float(row["seconds"]) for row in rows],
        "final_test_accuracy": rows[-1]["test_accuracy"] if rows else None,
    }


bench_app = ServerApp()


@bench_app.main()
def bench_main(grid: Grid, context: Context) -> None:
    """Warm-up segment, then `repeats` rotations over the variants."""
    config = FedgeConfig.from_context(context)
    warmup = FedgeConfig.from_run_config(
        {**config.to_run_config(), "num-server-rounds": _PLAN["warmup_rounds"]}
    )
    run_stock_segment(grid, warmup, with_eval=False)
    variants = _PLAN["variants"]
    for rep in range(_PLAN["repeats"]):
        shift = rep % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            start = time.perf_counter()
            if variant == "fedge":
                result = run_fedge_segment(grid, context, f"fedge-{rep}")
            else:
                result = run_stock_segment(grid, config, with_eval=variant == "stock")
            result.update(variant=variant, rep=rep, wall_s=time.perf_counter() - start)
            _SEGMENTS.append(result)


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(values),
        "median_s": round(statistics.median(values), 4),
        "mean_s": round(statistics.fmean(values), 4),
        "p10_s": round(ordered[len(ordered) // 10], 4),
        "p90_s": round(ordered[(9 * len(ordered)) // 10], 4),
    }


def bootstrap_ratio_ci(
    a: list[float], b: list[float], iterations: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """90% bootstrap interval of median(a) / median(b), resampling rounds within each."""
    rng = np.random.default_rng(seed)
    xa, xb = np.asarray(a), np.asarray(b)
    ratios = np.median(rng.choice(xa, (iterations, len(xa))), axis=1) / np.median(
        rng.choice(xb, (iterations, len(xb))), axis=1
    )
    low, high = np.percentile(ratios, [5, 95])
    return float(low), float(high)


def summarize_rounds(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-variant round-time stats over rounds 2..R, and fedge/stock ratios."""
    variants = list(dict.fromkeys(s["variant"] for s in segments))
    measured = {
        v: [t for s in segments if s["variant"] == v for t in s["seconds"][1:]] for v in variants
    }
    stats = {v: _stats(times) for v, times in measured.items()}
    # Same rep, same round index: same clients, seeds and (nearly) same weights.
    paired = [
        f / s
        for rep in {seg["rep"] for seg in segments}
        for f_seg in segments
        if f_seg["rep"] == rep and f_seg["variant"] == "fedge"
        for s_seg in segments
        if s_seg["rep"] == rep and s_seg["variant"] == "stock"
        for f, s in zip(f_seg["seconds"][1:], s_seg["seconds"][1:], strict=True)
    ]
    ratio = stats["fedge"]["median_s"] / stats["stock"]["median_s"]
    low, high = bootstrap_ratio_ci(measured["fedge"], measured["stock"])
    eval_times = [t for s in segments if s["variant"] == "stock" for t in s["eval_seconds"][1:]]
    return {
        "per_round": stats,
        "centralized_eval_median_s": round(statistics.median(eval_times), 4),
        "ratios": {
            "fedge_vs_stock_median": round(ratio, 3),
            "fedge_vs_stock_mean": round(stats["fedge"]["mean_s"] / stats["stock"]["mean_s"], 3),
            "fedge_vs_stock_paired_median": round(statistics.median(paired), 3),
            "fedge_vs_stock_median_ci90": [round(low, 3), round(high, 3)],
            **(
                {
                    "stock_vs_stock_no_eval_median": round(
                        stats["stock"]["median_s"] / stats["stock_no_eval"]["median_s"], 3
                    )
                }
                if "stock_no_eval" in stats
                else {}
            ),
        },
        "target": {
            "fedge_vs_stock_max": TARGET_RATIO,
            "met": ratio <= TARGET_RATIO,
            "met_at_ci90_upper": high <= TARGET_RATIO,
        },
        "final_test_accuracy": {
            v: [s["final_test_accuracy"] for s in segments if s["variant"] == v] for v in variants
        },
        "segments": [
            {k: s[k] for k in ("variant", "rep", "wall_s")}
            | {"seconds": [round(t, 4) for t in s["seconds"]]}
            for s in segments
        ],
    }


# --- aggregate_train micro-benchmark -------------------------------------------------


class StubGrid:
    """Just enough of a Grid for `configure_train` to sample node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def _reply(
    node_id: int, arrays: NamedArrays, num_examples: int, tag: ConfigRecord | None = None
) -> Message:
    """A train reply; `tag` marks fedge's Δw replies (stock ones carry full weights)."""
    metadata = Metadata(
        run_id=0,
        message_id=f"reply-{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"msg-{node_id}",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict(
        {
            "arrays": to_array_record(arrays),
            "metrics": MetricRecord({"train-loss": 0.5, "num-examples": num_examples}),
        }
    )
    if tag is not None:
        content[UPDATE_INFO_KEY] = tag
    return Message(content=content, metadata=metadata)


def _median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1000.0, 3)


def micro_case(global_arrays: NamedArrays, clients: int, repeats: int, seed: int) -> dict[str, Any]:
    """Median aggregate_train time of each strategy on the same synthetic replies."""
    rng = np.random.default_rng(seed)
    node_ids = list(range(1, clients + 1))
    deltas = [
        {k: (0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in global_arrays.items()}
        for _ in node_ids
    ]
    examples = [int(n) for n in rng.integers(50, 250, size=clients)]
    tag = update_tag({"server-round": 1}, global_arrays)
    fedge_replies = [
        _reply(n, d, e, tag) for n, d, e in zip(node_ids, deltas, examples, strict=True)
    ]
    stock_replies = [
        _reply(n, {k: global_arrays[k] + v for k, v in d.items()}, e)
        for n, d, e in zip(node_ids, deltas, examples, strict=True)
    ]
    grid = StubGrid(node_ids)
    record = to_array_record(global_arrays)
    fedge = FedgeAvg(min_train_nodes=2, min_available_nodes=2)
    stock = FedAvg(min_train_nodes=2, min_available_nodes=2)
    timed: dict[str, list[float]] = {"stock": [], "fedge": []}
    runners: dict[str, Callable[[], tuple[ArrayRecord | None, MetricRecord | None]]] = {
        "stock": lambda: stock.aggregate_train(1, stock_replies),
        "fedge": lambda: fedge.aggregate_train(1, fedge_replies),
    }
    results: dict[str, NamedArrays] = {}
    for i in range(repeats + 2):
        order = ("stock", "fedge") if i % 2 == 0 else ("fedge", "stock")
        for name in order:
            if name == "fedge":  # per-round state (global arrays, report), untimed
                list(fedge.configure_train(1, record, ConfigRecord(), grid))  # type: ignore[arg-type]
            start = time.perf_counter()
            arrays, _ = runners[name]()
            elapsed = time.perf_counter() - start
            if i >= 2:  # two warm-up calls each
                timed[name].append(elapsed)
            assert arrays is not None, f"{name} aggregated nothing"
            results[name] = from_array_record(arrays)
    max_diff = max(
        float(np.abs(results["fedge"][k] - results["stock"][k]).max()) for k in global_arrays
    )
    stock_ms, fedge_ms = _median_ms(timed["stock"]), _median_ms(timed["fedge"])
    return {
        "params": int(sum(v.size for v in global_arrays.values())),
        "arrays": len(global_arrays),
        "clients": clients,
        "repeats": repeats,
        "stock_ms": stock_ms,
        "fedge_ms": fedge_ms,
        "ratio": round(fedge_ms / stock_ms, 3),
        "checkpoint_and_row_ms": checkpoint_ms(global_arrays, repeats),
        "max_abs_diff_vs_stock": max_diff,
    }


def checkpoint_ms(arrays: NamedArrays, repeats: int) -> float:
    """Median time of fedge's per-round checkpoint + metrics.jsonl row for `arrays`."""
    row = {"round": 1, "test_accuracy": 0.9, "seconds": 1.0}
    times = []
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        folder = RunFolder(Path(tmp))
        for i in range(repeats + 1):
            start = time.perf_counter()
            folder.save_checkpoint(Checkpoint(i, arrays, {}, {"rng": None, "run_config": {}}))
            folder.append_metrics(row)
            if i:
                times.append(time.perf_counter() - start)
    return _median_ms(times)


def microbenchmark(repeats: int, clients: int, seed: int) -> dict[str, Any]:
    """aggregate_train for the digits CNN and a ~1M-parameter model."""
    if TaskIdentity._run_id is None:  # Messages need a task identity outside a simulation
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 0, 1
    config = FedgeConfig.from_run_config({"seed": seed})
    torch.manual_seed(seed)
    cnn = state_to_numpy(build_model(model_spec_for(config, dataset_for(config))))
    rng = np.random.default_rng(seed)
    big = {
        "fc1.weight": rng.standard_normal((1024, 784)).astype(np.float32),
        "fc1.bias": np.zeros(1024, np.float32),
        "fc2.weight": rng.standard_normal((256, 1024)).astype(np.float32),
        "fc2.bias": np.zeros(256, np.float32),
        "head.weight": rng.standard_normal((10, 256)).astype(np.float32),
        "head.bias": np.zeros(10, np.float32),
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)  # same silence for both; logging isn't measured
    try:
        return {
            "digits_cnn": micro_case(cnn, clients, repeats, seed),
            "mlp_1m": micro_case(big, clients, max(5, repeats // 3), seed),
        }
    finally:
        flwr_logger.setLevel(level)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=4, help="rounds per segment (first not counted)"
    )
    parser.add_argument("--repeats", type=int, default=6, help="rotations over the variants")
    parser.add_argument(
        "--no-eval-variant", action="store_true", help="also run stock FedAvg without evaluation"
    )
    parser.add_argument("--warmup-rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--micro-repeats", type=int, default=30)
    parser.add_argument("--skip-rounds", action="store_true", help="micro-benchmark only")
    return parse_with_common_options(parser, argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report, started = start("fedavg", "flwr", "torch")
    report["aggregate_train"] = microbenchmark(args.micro_repeats, args.clients, args.seed)
    if not args.skip_rounds:
        with tempfile.TemporaryDirectory(prefix="fedge-bench-") as out_dir:
            run_config = {
                "num-server-rounds": args.rounds,
                "min-available-nodes": args.clients,
                "seed": args.seed,
                "output-dir": out_dir,
            }
            variants = (*BASE_VARIANTS, "stock_no_eval") if args.no_eval_variant else BASE_VARIANTS
            _PLAN.update(repeats=args.repeats, warmup_rounds=args.warmup_rounds, variants=variants)
            _SEGMENTS.clear()
            run_inprocess(run_config, args.clients, server_app=bench_app, client_app=None)
            report["setup"] = {
                "dataset": "digits",
                "clients": args.clients,
                "rounds_per_segment": args.rounds,
                "counted_rounds_per_segment": args.rounds - 1,
                "repeats": args.repeats,
                "run_config": FedgeConfig.from_run_config(run_config).to_run_config()
                | {"output-dir": "<tmp>"},
            }
            report["rounds"] = summarize_rounds(_SEGMENTS)
    return finish(report, started, args.out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
