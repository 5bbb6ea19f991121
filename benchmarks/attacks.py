"""One malicious client among ten: final accuracy per (aggregation mode, attack).

Printed as one JSON object on stdout (logs go to stderr).

Setup: fedge's defaults on digits (CNN, Dirichlet α = 0.5, 3 local epochs) with
10 clients, all sampled every round, for `--rounds` rounds (default 5). The
node with partition-id 0 is the attacker. Every cell starts from the same
initial model; its final model is scored on the 240 held-out test digits and
compared with the clean run ("none") of the same mode.

Harness: one `fedge.simulation.run_inprocess` (Flower's Simulation Engine, the
real fedge ClientApp on every node) whose ServerApp runs the cells one after
the other, each with a fresh strategy through Flower's own `Strategy.start`.
The attacker's ClientApp wraps fedge's: it trains honestly, then rewrites its
reply; the attack name rides in the train config (a benchmark-only key that
fedge's ClientApp ignores). Under SecAgg+ it rewrites the update it encodes
and, for crafted levels and weight entries, hooks `Quantizer.encode` in its
own process only.

Modes (strategies): `plain` (fedge defaults: norm and weight bounded by the
round's medians), `plain-unbounded` (norm-bound=0 weight-bound=0: fedge before
this change), `trimmed-mean` and `median` (fedge's robust aggregators),
`central-dp` (clip C = 1, σ = 0.01: the clip check and equal weights, with
next to no noise so that 5 rounds learn), `secagg` (SecAgg+, clip 10, max
weight 1000), `secagg-central-dp`, `secagg-equal-weights` (every client
counts once and clips to 3: max-num-examples=1 secagg-clip-norm=3), and
Flower's own `flower-fedtrimmedavg` (β = 0.2) and `flower-krum` (one
malicious node assumed) as the anchor. fedge's acceptance check runs as
configured (`accept-check`: auto = on without DP; the two σ = 0.01 DP modes set
it on); `--accept-tolerance` sets its tolerance. Not in the default modes, for
honest-cost runs (`--attacks none`): `central-dp-sigma-1`,
`secagg-central-dp-sigma-1` and `secagg-distributed-dp` (fedge's default σ = 1).
Every cell is scored on the test part of the held-out split (`HeldOut`), and
lists the acceptance loss of each round's candidate model.

Attacks: `scale` (Δ × 1e6), `replace` (Δ = target − w, num-examples = 1e15;
the target predicts class 0 for everything), `sign-flip` (Δ × −10),
`at-bound` (−Δ scaled to the bound: the clip norm C under DP and SecAgg, else
norm-bound × its own norm, about the relative bound; num-examples = 1e15, which
the weight bound or the SecAgg encoder cuts to the cap), and under SecAgg+
only `levels-max` (every level at the quantizer's max), `levels-wrap` (every
level 2^31 − 1), `weight-sum-1` and `weight-sum-0` (its weight entry makes
Σn = 1 or 0). A SecAgg attacker skips the clip (`scale`, `replace`,
`sign-flip` are applied after it).

Usage: `python benchmarks/attacks.py [--rounds 5] [--modes ...] [--attacks ...]
[--out result.json]`
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedTrimmedAvg, Krum, Strategy

from fedge.client_app import app as fedge_client_app
from fedge.client_app import secure_client, torch_client
from fedge.client_app.local_data import local_data
from fedge.client_app.protocol import CLIP_KEY, REPLY_KEY, WEIGHT_KEY
from fedge.config import FedgeConfig
from fedge.models import build_model, load_numpy_state, state_to_numpy
from fedge.models.training import evaluate
from fedge.privacy.clipping import global_norm
from fedge.records import NamedArrays, from_array_record, to_array_record
from fedge.secagg import Quantizer, Stage
from fedge.server_app.acceptance import HeldOut
from fedge.server_app.app import build_strategy
from fedge.server_app.privacy import ServerPrivacy
from fedge.server_app.strategy import FedgeAvg
from fedge.simulation import run_inprocess
from fedge.task import dataset_for, model_spec_for

ATTACK_KEY = "bench-attack"
ATTACKER_PARTITION = 0
NUM_CLIENTS = 10
VISIBLE_ATTACKS = ("none", "scale", "replace", "sign-flip", "at-bound")
SECAGG_ATTACKS = (*VISIBLE_ATTACKS, "levels-max", "levels-wrap", "weight-sum-1", "weight-sum-0")
FEDGE_MODES: dict[str, dict[str, Any]] = {
    "plain": {},
    "plain-unbounded": {"norm-bound": 0.0, "weight-bound": 0.0},
    "trimmed-mean": {"aggregator": "trimmed-mean"},
    "median": {"aggregator": "median"},
    "central-dp": {"dp-mode": "central", "dp-noise-multiplier": 0.01, "accept-check": "on"},
    "secagg": {"secagg": True},
    "secagg-central-dp": {
        "secagg": True,
        "dp-mode": "central",
        "dp-noise-multiplier": 0.01,
        "accept-check": "on",
    },
    "secagg-equal-weights": {"secagg": True, "max-num-examples": 1, "secagg-clip-norm": 3.0},
    # honest-cost runs only (not in the default modes): DP with fedge's default noise
    "central-dp-sigma-1": {"dp-mode": "central"},
    "secagg-central-dp-sigma-1": {"secagg": True, "dp-mode": "central"},
    "secagg-distributed-dp": {"secagg": True, "dp-mode": "distributed"},
}
HONEST_ONLY = ("central-dp-sigma-1", "secagg-central-dp-sigma-1", "secagg-distributed-dp")
FLOWER_MODES = ("flower-fedtrimmedavg", "flower-krum")
MODES = (*FEDGE_MODES, *FLOWER_MODES)
DEFAULT_MODES = tuple(m for m in MODES if m not in HONEST_ONLY)
BASE_CONFIG: dict[str, Any] = {
    "min-available-nodes": NUM_CLIENTS,
    "min-train-nodes": 2,
    "fraction-evaluate": 0.0,
    "round-timeout": 600.0,
}
TOLERANCE_POINTS = 3.0

_RESULTS: list[dict[str, Any]] = []  # the benchmark ServerApp runs in this process
_PLAN: dict[str, Any] = {}


# --- the attacker -------------------------------------------------------------------


def _target(like: NamedArrays) -> NamedArrays:
    """A model that answers class 0 to everything: zeros, head bias +10 for class 0."""
    target = {name: np.zeros_like(value) for name, value in like.items()}
    last = list(like)[-1]
    target[last].flat[0] = 10.0
    return target


def _attacked(
    attack: str,
    update: NamedArrays,
    weight: int,
    global_arrays: NamedArrays,
    clip: float | None,
) -> tuple[NamedArrays, int]:
    """The attacker's Δ and claimed num-examples, from its honest Δ and weight."""
    if attack == "scale":
        return {n: v * 1e6 for n, v in update.items()}, weight
    if attack == "replace":
        target = _target(global_arrays)
        return {
            n: (target[n] - global_arrays[n]).astype(v.dtype) for n, v in update.items()
        }, 10**15
    if attack == "sign-flip":
        return {n: v * -10 for n, v in update.items()}, weight
    if attack == "at-bound":
        norm = global_norm(update)
        bound = clip * (1 - 1e-6) if clip is not None else FedgeConfig().norm_bound * norm
        scale = -bound / norm if norm > 0 else 0.0
        return {n: (v * scale).astype(v.dtype) for n, v in update.items()}, 10**15
    return update, weight


def _partition_sizes(config: FedgeConfig) -> tuple[int, ...]:
    """Every partition's num-examples (the attacker knows its peers' in the worst case)."""
    sizes = []
    for partition in range(NUM_CLIENTS):
        context = Context(
            0, 0, {"partition-id": partition, "num-partitions": NUM_CLIENTS}, RecordDict(), {}
        )
        sizes.append(len(local_data(config, context).y_train))
    return tuple(sizes)


_HONEST_ENCODE = Quantizer.encode


def _crafted_encode(attack: str, others_weight: int) -> Callable[..., np.ndarray]:
    """Quantizer.encode as the attacker hooks it for levels/weight-entry attacks."""

    def encode(quantizer: Quantizer, update: np.ndarray, weight: int) -> np.ndarray:
        out = _HONEST_ENCODE(quantizer, update, weight)
        if attack == "levels-max":
            out[:-1] = quantizer.max_level
        elif attack == "levels-wrap":
            out[:-1] = 2**31 - 1
        elif attack.startswith("weight-sum-"):
            target = int(attack.rsplit("-", 1)[1])
            out[-1] = (target - others_weight) % 2**32
        return out

    return encode


attacker_app = ClientApp()


def _is_attacker(context: Context) -> bool:
    return context.node_config.get("partition-id") == ATTACKER_PARTITION


def _attack_of(msg: Message) -> str:
    config = msg.content.config_records.get("config")
    return str(config.get(ATTACK_KEY, "none")) if config is not None else "none"


@attacker_app.train()
def attacker_train(msg: Message, context: Context) -> Message:
    """fedge's training, then the attacker rewrites Δ (or full weights) and its weight."""
    reply = fedge_client_app(msg, context)
    attack = _attack_of(msg)
    if not _is_attacker(context) or attack == "none" or reply.has_error():
        return reply
    global_arrays = from_array_record(msg.content.array_records["arrays"])
    arrays = from_array_record(reply.content.array_records["arrays"])
    metrics = next(iter(reply.content.metric_records.values()))
    sends_update = msg.content.config_records["config"].get(REPLY_KEY) == "update"
    update = arrays if sends_update else {n: arrays[n] - global_arrays[n] for n in arrays}
    clip = msg.content.config_records["config"].get(CLIP_KEY)
    bad, weight = _attacked(
        attack,
        update,
        int(metrics[WEIGHT_KEY]),
        global_arrays,
        None if clip is None else float(clip),
    )
    if not sends_update:
        bad = {n: (global_arrays[n] + bad[n]).astype(arrays[n].dtype) for n in bad}
    metrics = MetricRecord({**dict(metrics), WEIGHT_KEY: weight})
    tag = dict(reply.content.config_records)  # fedge's tag, if any, says what `bad` is
    content = RecordDict({"arrays": to_array_record(bad), "metrics": metrics, **tag})
    return Message(content, reply_to=msg)


@attacker_app.train(Stage.MASKED_INPUT.value)
def attacker_masked_input(msg: Message, context: Context) -> Message:
    """SecAgg+ upload: the attacked Δ, unclipped, and a hooked encoding if asked."""
    attack = _attack_of(msg)
    if not _is_attacker(context) or attack == "none":
        return fedge_client_app(msg, context)
    config = FedgeConfig.from_context(context)
    train_config = msg.content.config_records["config"]
    global_arrays = from_array_record(msg.content.array_records["arrays"])

    def local_update() -> tuple[NamedArrays | None, MetricRecord]:
        update, metrics = torch_client.local_update(msg, context, config)
        assert update is not None
        bad, weight = _attacked(
            attack,
            update,
            int(metrics[WEIGHT_KEY]),
            global_arrays,
            float(train_config[CLIP_KEY]),
        )
        return bad, MetricRecord({**dict(metrics), WEIGHT_KEY: weight})

    sizes = _partition_sizes(config)

    def hooked(quantizer: Quantizer, update: np.ndarray, weight: int) -> np.ndarray:
        cap = quantizer.max_weight
        others = sum(min(n, cap) for p, n in enumerate(sizes) if p != ATTACKER_PARTITION)
        return _crafted_encode(attack, others)(quantizer, update, weight)

    with mock.patch.object(Quantizer, "encode", hooked):
        return secure_client.masked_input(msg, context, local_update)


def attacker_honest_stage(msg: Message, context: Context) -> Message:
    """Every other SecAgg+ stage runs fedge's own handler."""
    return fedge_client_app(msg, context)


for _stage in Stage:
    if _stage is not Stage.MASKED_INPUT:
        attacker_app.train(_stage.value)(attacker_honest_stage)


# --- the benchmark ServerApp ----------------------------------------------------------


def _strategy(mode: str, config: FedgeConfig, spec: Any, bundle: Any) -> Strategy:
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 2,
        "min_available_nodes": NUM_CLIENTS,
    }
    if mode == "flower-fedtrimmedavg":
        return FedTrimmedAvg(beta=0.2, **common)
    if mode == "flower-krum":
        return Krum(num_malicious_nodes=1, **common)
    return build_strategy(config, spec, bundle, ServerPrivacy(config))


def run_cell(
    grid: Grid, mode: str, attack: str, rounds: int, base: dict[str, Any]
) -> dict[str, Any]:
    config = FedgeConfig.from_run_config({**base, **FEDGE_MODES.get(mode, {})})
    bundle = dataset_for(config)
    spec = model_spec_for(config, bundle)
    torch.manual_seed(config.seed)
    initial = state_to_numpy(build_model(spec))
    strategy = _strategy(mode, config, spec, bundle)
    skipped: dict[int, str] = {}

    accept_losses: list[float | None] = []

    def after_round(server_round: int, _arrays: Any) -> None:
        if server_round == 0 or not isinstance(strategy, FedgeAvg):
            return
        loss = strategy.report.accept_loss
        accept_losses.append(None if loss is None else round(loss, 4))
        if not strategy.report.aggregated:
            skipped[server_round] = strategy.report.skip_reason or "(no reason recorded)"

    started = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=to_array_record(initial),
        num_rounds=rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord({ATTACK_KEY: attack}),
        evaluate_fn=after_round,
    )
    model = build_model(spec)
    final = from_array_record(result.arrays) or initial  # empty: no round was aggregated
    load_numpy_state(model, final)
    held_out = HeldOut.of(bundle, config.seed)
    loss, accuracy = evaluate(model, held_out.x_test, held_out.y_test)
    row = {
        "mode": mode,
        "attack": attack,
        "final_accuracy": round(float(accuracy), 4),
        "final_loss": round(float(loss), 4) if np.isfinite(loss) else None,
        "rounds_unchanged": sorted(skipped),
        "skip_reasons": sorted(set(skipped.values())),
        "candidate_accept_losses": accept_losses,
        "seconds": round(time.perf_counter() - started, 1),
    }
    logging.info("cell %s / %s: %s", mode, attack, row)
    return row


bench_app = ServerApp()


@bench_app.main()
def bench_main(grid: Grid, context: Context) -> None:
    base = dict(_PLAN["base"])
    for mode in _PLAN["modes"]:
        attacks = SECAGG_ATTACKS if mode.startswith("secagg") else VISIBLE_ATTACKS
        for attack in attacks:
            if attack in _PLAN["attacks"]:
                _RESULTS.append(run_cell(grid, mode, attack, _PLAN["rounds"], base))


def summarize(rows: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Per cell: the gap to the mode's clean run, and whether it meets the target."""
    clean = {r["mode"]: r["final_accuracy"] for r in rows if r["attack"] == "none"}
    cells: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["attack"] == "none" or row["mode"] not in clean:
            continue
        gap = 100 * (row["final_accuracy"] - clean[row["mode"]])
        within = gap >= -TOLERANCE_POINTS
        refused_every_round = len(row["rounds_unchanged"]) == rounds and all(
            "(no reason" not in r for r in row["skip_reasons"]
        )
        if row["mode"].startswith("secagg"):
            target = "within 3 points or every round refused with a logged reason"
            met = within or refused_every_round
        else:
            target = "within 3 points of the clean run"
            met = within
        cells.setdefault(row["mode"], {})[row["attack"]] = {
            "final_accuracy": row["final_accuracy"],
            "clean_accuracy": clean[row["mode"]],
            "gap_points": round(gap, 2),
            "rounds_unchanged": row["rounds_unchanged"],
            "target": target,
            "met": met,
        }
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES)
    parser.add_argument(
        "--attacks", nargs="+", default=list(SECAGG_ATTACKS), choices=SECAGG_ATTACKS
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--accept-tolerance",
        type=float,
        default=FedgeConfig().accept_tolerance,
        help="fedge's acceptance check (0 = off)",
    )
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    base = {
        **BASE_CONFIG,
        "seed": args.seed,
        "num-server-rounds": args.rounds,
        "accept-tolerance": args.accept_tolerance,
    }
    attacks = sorted(set(args.attacks) | {"none"}, key=SECAGG_ATTACKS.index)
    _PLAN.update(base=base, modes=args.modes, attacks=attacks, rounds=args.rounds)
    started = time.perf_counter()
    run_inprocess(base, NUM_CLIENTS, server_app=bench_app, client_app=attacker_app)
    report = {
        "command": "python " + " ".join(sys.argv),
        "setup": {
            "dataset": "digits",
            "clients": NUM_CLIENTS,
            "attacker_partition": ATTACKER_PARTITION,
            "rounds": args.rounds,
            "run_config": FedgeConfig.from_run_config(base).to_run_config() | {"output-dir": "-"},
            "modes": {m: FEDGE_MODES.get(m, "Flower strategy") for m in args.modes},
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
        "runs": _RESULTS,
        "cells": summarize(_RESULTS, args.rounds),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
