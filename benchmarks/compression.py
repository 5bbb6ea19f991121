"""Compressed uploads side by side: bytes per client upload and final accuracy vs float32.

Every variant runs fedge's full ServerApp (`fedge.server_app.app.main`: reply gate,
influence bound, acceptance check, centralized test evaluation) on the same
clients, data split and seed, with a Grid that hands each message to fedge's
ClientApp in this process (no Ray: exactly reproducible) and counts the bytes of
every training reply's Arrays (npy headers included: what Flower serializes).
Variants: `none` (float32), `int8`, `int4`, each also with `update-rotation`, and
`topk` at fractions 0.05 and 0.01 (error feedback). Variants run in parallel worker
processes (`--jobs`), one torch thread each; the results do not depend on timing.

Targets (issue 14, without SecAgg): int8 <= 0.27x float32 bytes, int4 <= 0.15x,
top-k(1 %) <= 0.03x, each within 0.5 pt of float32's final accuracy.

Usage: `python benchmarks/compression.py [--rounds 20] [--clients 10] [--jobs 4] [--out r.json]`
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from report import finish, parse_with_common_options, start

from fedge.client_app import app as client_app
from fedge.config import FedgeConfig
from fedge.server_app.app import main as server_main
from fedge.simulation import NodeGrid

VARIANTS: dict[str, dict[str, Any]] = {
    "none": {},
    "int8": {"update-compression": "int8"},
    "int8-rotated": {"update-compression": "int8", "update-rotation": True},
    "int4": {"update-compression": "int4"},
    "int4-rotated": {"update-compression": "int4", "update-rotation": True},
    "topk-0.05": {"update-compression": "topk", "topk-fraction": 0.05},
    "topk-0.01": {"update-compression": "topk", "topk-fraction": 0.01},
}
TARGET_RATIO = {"int8": 0.27, "int4": 0.15, "topk-0.01": 0.03}
TARGET_ACCURACY_PTS = 0.5


class CountingGrid(NodeGrid):
    """Runs fedge's ClientApp for each message in this process (partition i on the
    i-th node, as Flower's simulation numbers them) and records the byte size of
    every training reply's Arrays."""

    def __init__(self, run_config: dict[str, Any], num_nodes: int) -> None:
        ids = list(range(100, 100 + num_nodes))
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, node in enumerate(ids)
        }
        super().__init__(ids)
        self.upload_bytes: list[int] = []

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies: list[Message] = []
        for message in messages:
            reply = client_app(message, self.contexts[message.metadata.dst_node_id])
            if message.metadata.message_type == "train":
                for record in reply.content.array_records.values():
                    self.upload_bytes.append(sum(len(a.data) for a in record.values()))
            replies.append(reply)
        return replies


def run_variant(name: str, rounds: int, clients: int, seed: int, dataset: str) -> dict[str, Any]:
    """One federation of fedge's ServerApp under VARIANTS[name]; its bytes and accuracy."""
    torch.set_num_threads(1)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    with tempfile.TemporaryDirectory(prefix="fedge-compression-") as out:
        config = FedgeConfig.from_run_config(
            {
                "num-server-rounds": rounds,
                "min-train-nodes": 2,
                "min-available-nodes": 2,
                "seed": seed,
                "dataset": dataset,
                "output-dir": out,
                "run-name": name,
                **VARIANTS[name],
            }
        ).to_run_config()
        grid = CountingGrid(config, clients)
        context = Context(
            run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config
        )
        server_main(grid, context)
        lines = (Path(out) / name / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return {
        "settings": VARIANTS[name],
        "upload_bytes_mean": statistics.fmean(grid.upload_bytes),
        "uploads": len(grid.upload_bytes),
        "final_accuracy": rows[-1]["test_accuracy"],
        "accuracy_by_round": [round(r["test_accuracy"], 4) for r in rows],
        "rejected": sum(r["num_rejected"] for r in rows),
        "rounds_refused": sum(1 for r in rows if r.get("skip_reason")),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=1, help="variants run in parallel")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parse_with_common_options(parser, argv)
    report, started = start("compression", "flwr", "torch", "numpy")
    report["settings"] = {
        "rounds": args.rounds,
        "clients": args.clients,
        "seed": args.seed,
        "dataset": args.dataset,
        "grid": "in-process (fedge ServerApp main + ClientApp, no Ray)",
    }
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            name: pool.submit(run_variant, name, args.rounds, args.clients, args.seed, args.dataset)
            for name in args.variants
        }
        results = {name: future.result() for name, future in futures.items()}
    report["variants"] = compare(results)
    return finish(report, started, args.out)


def compare(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each variant's bytes and accuracy against float32's (`none`), with the targets."""
    base = results.get("none")
    for name, result in results.items():
        if base is None or name == "none":
            continue
        ratio = result["upload_bytes_mean"] / base["upload_bytes_mean"]
        drop = 100 * (base["final_accuracy"] - result["final_accuracy"])
        result["bytes_ratio_vs_float32"] = round(ratio, 4)
        result["accuracy_drop_pts"] = round(drop, 2)
        if name in TARGET_RATIO:
            result["target_bytes_ratio_max"] = TARGET_RATIO[name]
            result["meets_bytes_target"] = ratio <= TARGET_RATIO[name]
        result["meets_accuracy_target"] = drop <= TARGET_ACCURACY_PTS
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
