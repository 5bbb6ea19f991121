"""Accuracy vs epsilon on digits, and the cost of an Opacus DP-SGD step.

Two measurements, printed as one JSON object on stdout:

1. **Accuracy vs epsilon** (Flower simulations, digits, IID split, `--rounds`
   rounds of `--local-epochs` local epochs, every client sampled every round):

   - `none`: no DP.
   - `clip_only`: central DP's clipping and equal weighting with σ = 1e-6
     (no meaningful privacy): separates the cost of clipping from that of noise.
   - `central`: user-level central DP (clients clip Δw to C, the server adds
     N(0, σ²C²) to the sum) at target ε ∈ `--epsilons`. σ for each target comes from
     `opacus.accountants.utils.get_noise_multiplier` for q = 1, `--rounds` steps
     and δ = 1e-5; the ε reported is privacy.json's (fedge's ledger). All central
     variants run as segments of one simulation (one Ray start): the clients only
     clip to the norm the server sends, so they need no per-variant config.
     Server noise is not seeded, so each variant runs `--repeats` times.
   - `local`: example-level DP-SGD in every client (Opacus), σ_local chosen with
     the same Opacus helper so that each client's ε after all rounds is about the
     target (q = 1/batches, steps = rounds·epochs·batches). One simulation each,
     since the noise multiplier lives in the clients' run config.
   - with `--more-clients N` (e.g. 50): `none` and `central` again on N clients,
     same rounds and σ per target (q = 1 either way), to show how user-level DP
     improves with more users.

   Central ε is *user-level* (a whole client's data), local ε *example-level*
   (one training example of one client, against the server and everyone): the
   same number is a much weaker promise for local DP.

2. **DP-SGD step time**: fedge's digits CNN, one batch of 32 digits, SGD with
   momentum; a plain step (zero_grad, forward, backward, step) vs the same step
   made private by `fedge.privacy.local_dp.make_local_dp` (per-sample gradients,
   clipping, noise), alternated, `--step-repeats` times each after a warm-up,
   in one torch thread and in torch's default threads. Target: private/plain
   median <= 2. Each step is also split into phases (zero_grad, forward, backward,
   step), with its CPU time and minor page faults. Also one client's whole local round
   (`train_locally`) with DP-SGD on vs off; with `--profile` the time per private
   step in its DP pieces (hooks, per-layer grad samplers, clipping, noise: Opacus's
   and fedge's own faster ones); and
   with `--opacus-modes` the ratio for each of Opacus's per-sample-gradient modes
   (hooks, ew, ghost, functorch).

Usage: `python benchmarks/dp.py [--rounds 10] [--epsilons 1 3 8] [--more-clients 50]
[--out result.json]` (about 10-15 minutes on 2 CPU cores; `--skip-accuracy` for the
step timing only).
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import logging
import math
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from opacus.accountants.utils import get_noise_multiplier
from report import finish, machine, with_run_config
from torch import nn

from fedge.client_app.local_data import LocalData
from fedge.client_app.local_ledger import STATE_DIR_ENV
from fedge.client_app.torch_client import train_locally
from fedge.config import FedgeConfig
from fedge.data import client_split
from fedge.models import build_model, state_to_numpy
from fedge.models.training import make_loader
from fedge.privacy.local_dp import make_local_dp
from fedge.server_app.app import main as fedge_server_main
from fedge.server_app.run_folder import RunFolder
from fedge.simulation import run_inprocess
from fedge.task import dataset_for, model_spec_for

DELTA = 1e-5
STEP_RATIO_TARGET = 2.0
CLIP_ONLY_SIGMA = 1e-6  # central DP's clipping and equal weights, with negligible noise

# The benchmark ServerApp runs in this process (Flower's simulation thread); it reads
# its segments from _PLAN and leaves one result per segment in _RESULTS.
_PLAN: list[dict[str, Any]] = []
_RESULTS: list[dict[str, Any]] = []


def noise_multiplier(target_epsilon: float, sample_rate: float, steps: int) -> float:
    """σ so that `steps` RDP-accounted steps at `sample_rate` cost at most `target_epsilon`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=DELTA,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
            )
        )


def central_sigma(target_epsilon: float, rounds: int) -> float:
    """σ so that `rounds` full-participation rounds cost at most `target_epsilon`."""
    return noise_multiplier(target_epsilon, 1.0, rounds)


def local_sigma(target_epsilon: float, batches: int, steps: int) -> float:
    """DP-SGD σ so that `steps` steps at q = 1/batches cost at most `target_epsilon`."""
    return noise_multiplier(target_epsilon, 1 / batches, steps)


def batches_per_client(run_config: dict[str, Any], clients: int) -> list[int]:
    """Local batches per epoch of every client (what Opacus's q = 1/batches uses)."""
    config = FedgeConfig.from_run_config(run_config)
    bundle = dataset_for(config)
    sizes = [
        len(
            client_split(
                bundle,
                pid,
                clients,
                config.partitioner,
                config.seed,
                config.val_fraction,
                config.dirichlet_alpha,
                config.classes_per_client,
            )[1]
        )
        for pid in range(clients)
    ]
    return [math.ceil(size / config.batch_size) for size in sizes]


def summarize_run(run_dir: Path) -> dict[str, Any]:
    rows = RunFolder(run_dir).read_metrics()
    result: dict[str, Any] = {
        "rounds_done": len(rows),
        "final_test_accuracy": rows[-1]["test_accuracy"] if rows else None,
        "best_test_accuracy": max(r["test_accuracy"] for r in rows) if rows else None,
        "final_test_loss": rows[-1]["test_loss"] if rows else None,
    }
    privacy_path = run_dir / "privacy.json"
    if privacy_path.is_file():
        privacy = json.loads(privacy_path.read_text())
        result["epsilon"] = privacy["epsilon"]
        result["noise_multiplier"] = privacy["noise_multiplier"]
    if rows and "client_epsilon_max" in rows[-1]:
        result["client_epsilon_max"] = rows[-1]["client_epsilon_max"]
        result["client_epsilon_mean"] = rows[-1]["client_epsilon_mean"]
        result["num_declined_last_round"] = rows[-1]["num_declined"]
    return result


bench_app = ServerApp()


@bench_app.main()
def bench_main(grid: Grid, context: Context) -> None:
    """fedge's own ServerApp once per planned segment, each in its own run folder."""
    for segment in _PLAN:
        run_config = {**context.run_config, **segment["overrides"], "run-name": segment["name"]}
        start = time.perf_counter()
        fedge_server_main(grid, with_run_config(context, run_config))
        run_dir = Path(run_config["output-dir"]) / segment["name"]
        result = {
            "variant": segment["variant"],
            "target_epsilon": segment.get("target_epsilon"),
            "wall_s": round(time.perf_counter() - start, 1),
            **summarize_run(run_dir),
        }
        _RESULTS.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)


def central_table(
    base: dict[str, Any], clients: int, epsilons: list[float], repeats: int, out_dir: str
) -> list[dict[str, Any]]:
    """`none` and central DP at each target ε, as segments of one simulation."""
    rounds = base["num-server-rounds"]
    _PLAN.clear()
    _RESULTS.clear()
    for rep in range(repeats):
        _PLAN.append({"variant": "none", "name": f"n{clients}-none-{rep}", "overrides": {}})
        _PLAN.append(
            {
                "variant": "clip_only",
                "name": f"n{clients}-clip-only-{rep}",
                "overrides": {
                    "dp-mode": "central",
                    "dp-noise-multiplier": CLIP_ONLY_SIGMA,
                    "dp-clipping-norm": base["dp-clipping-norm"],
                    "dp-delta": DELTA,
                },
            }
        )
        for target in epsilons:
            sigma = central_sigma(target, rounds)
            _PLAN.append(
                {
                    "variant": "central",
                    "target_epsilon": target,
                    "name": f"n{clients}-central-{target:g}-{rep}",
                    "overrides": {
                        "dp-mode": "central",
                        "dp-noise-multiplier": sigma,
                        "dp-clipping-norm": base["dp-clipping-norm"],
                        "dp-delta": DELTA,
                    },
                }
            )
    config = {**base, "output-dir": out_dir, "min-available-nodes": clients}
    run_inprocess(config, clients, server_app=bench_app)
    return list(_RESULTS)


def local_row(base: dict[str, Any], clients: int, target: float, out_dir: str) -> dict[str, Any]:
    """One simulation with Opacus DP-SGD in every client, σ_local for `target`."""
    batches = batches_per_client(base, clients)
    steps = base["num-server-rounds"] * base["local-epochs"]
    # the client with the fewest batches has the largest q, so the largest ε
    sigma = max(local_sigma(target, b, steps * b) for b in set(batches))
    name = f"n{clients}-local-{target:g}"
    config = {
        **base,
        "output-dir": out_dir,
        "run-name": name,
        "min-available-nodes": clients,
        "local-dp": True,
        "local-dp-noise-multiplier": sigma,
        "local-dp-max-grad-norm": base["dp-clipping-norm"],
        "dp-delta": DELTA,
    }
    start = time.perf_counter()
    # A node's ε carries over between runs on the same data (by design): each variant
    # gets its own ledger folder, or a later target's ε would include earlier runs' steps.
    with mock.patch.dict(os.environ, {STATE_DIR_ENV: str(Path(out_dir) / name / "node-state")}):
        run_inprocess(config, clients)
    result = {
        "variant": "local",
        "target_epsilon": target,
        "wall_s": round(time.perf_counter() - start, 1),
        "local_noise_multiplier": sigma,
        "batches_per_client": sorted(set(batches)),
        **summarize_run(Path(out_dir) / name),
    }
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def aggregate_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (variant, target): ε achieved and accuracy over repeats."""
    table = []
    keys = list(dict.fromkeys((r["variant"], r["target_epsilon"]) for r in results))
    for variant, target in keys:
        group = [r for r in results if (r["variant"], r["target_epsilon"]) == (variant, target)]
        finals = [r["final_test_accuracy"] for r in group]
        line: dict[str, Any] = {
            "variant": variant,
            "target_epsilon": target,
            "runs": len(group),
            "final_test_accuracy_mean": round(statistics.fmean(finals), 4),
            "final_test_accuracy_min_max": [round(min(finals), 4), round(max(finals), 4)],
            "best_round_test_accuracy_mean": round(
                statistics.fmean(r["best_test_accuracy"] for r in group), 4
            ),
        }
        if "epsilon" in group[0]:
            line["epsilon_achieved"] = float(f"{group[0]['epsilon']:.5g}")
            line["noise_multiplier"] = float(f"{group[0]['noise_multiplier']:.5g}")
        if "client_epsilon_max" in group[0]:
            line["client_epsilon_max"] = round(group[0]["client_epsilon_max"], 4)
            line["local_noise_multiplier"] = round(group[0]["local_noise_multiplier"], 4)
        table.append(line)
    return table


# --- DP-SGD step time -----------------------------------------------------------------


PHASES = ("zero_grad", "forward", "backward", "step")
# Functions whose cumulative time `--profile` reports, by the file they live in:
# Opacus's, and fedge's faster per-sample paths (fedge/privacy/_per_sample.py)
PROFILED = {
    "opacus": (
        "capture_activations_hook",
        "capture_backprops_hook",
        "compute_conv_grad_sample",
        "compute_group_norm_grad_sample",
        "compute_linear_grad_sample",
        "create_or_accumulate_grad_sample",
        "clip_and_accumulate",
        "add_noise",
        "scale_grad",
        "zero_grad",
    ),
    "_per_sample": (
        "_capture_and_watch",
        "capture_backprops_hook",
        "conv2d_grad_sample",
        "group_norm_grad_sample",
        "linear_grad_sample",
        "clip_and_accumulate",
        "add_noise_and_scale",
        "zero_grad",
        "_skip_batch_grads",
        "_restore_batch_grads",
    ),
}


def digits_steps(seed: int) -> tuple[Any, Any, Any]:
    """A plain and a private step on the digits CNN, one batch of 32, and a cleanup.

    Each step returns the seconds spent in each of PHASES. Both models start from
    the same weights; the private one goes through `make_local_dp`.
    """
    config = FedgeConfig.from_run_config({"seed": seed})
    bundle = dataset_for(config)
    spec = model_spec_for(config, bundle)
    x = torch.tensor(bundle.x_test[:32])
    y = torch.tensor(bundle.y_test[:32])
    criterion = nn.CrossEntropyLoss()

    torch.manual_seed(seed)
    plain = build_model(spec)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(seed)
    model = build_model(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # the loader only sets Opacus's expected batch size (32); the batch is fixed below
    loader = make_loader(bundle.x_test[:320], bundle.y_test[:320], 32, shuffle=True)
    private = make_local_dp(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)

    def step(net: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
        marks = [time.perf_counter()]
        opt.zero_grad()
        marks.append(time.perf_counter())
        loss = criterion(net(x), y)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        opt.step()
        marks.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(marks)]

    return (
        lambda: step(plain, plain_opt),
        lambda: step(private.model, private.optimizer),
        private.close,
    )


def step_timing(repeats: int, threads: int, seed: int) -> dict[str, Any]:
    """Median plain vs Opacus DP-SGD step on the digits CNN, batch 32, alternated.

    Also the median CPU time (with 2 threads it includes OpenMP's spin-waits), the
    median of each phase and the minor page faults per step, which show where the
    private step's extra time goes.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plain_step, private_step, close = digits_steps(seed)
        steps = {"plain": plain_step, "dp_sgd": private_step}
        phases: dict[str, list[list[float]]] = {"plain": [], "dp_sgd": []}
        faults: dict[str, list[int]] = {"plain": [], "dp_sgd": []}
        cpu: dict[str, list[float]] = {"plain": [], "dp_sgd": []}
        for i in range(repeats + 20):
            order = ("plain", "dp_sgd") if i % 2 == 0 else ("dp_sgd", "plain")
            for name in order:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                cpu_start = time.process_time()
                phase_times = steps[name]()
                cpu_s = time.process_time() - cpu_start
                if i >= 20:  # warm-up
                    phases[name].append(phase_times)
                    cpu[name].append(cpu_s)
                    faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        close()
        times = {name: [sum(p) for p in rows] for name, rows in phases.items()}
        plain_ms = statistics.median(times["plain"]) * 1000
        private_ms = statistics.median(times["dp_sgd"]) * 1000
        ratio = private_ms / plain_ms
        # bootstrap 90% interval of the ratio of medians
        rng = np.random.default_rng(seed)
        a, b = np.asarray(times["dp_sgd"]), np.asarray(times["plain"])
        boot = np.median(rng.choice(a, (2000, a.size)), axis=1) / np.median(
            rng.choice(b, (2000, b.size)), axis=1
        )
        low, high = np.percentile(boot, [5, 95])
        return {
            "torch_threads": threads,
            "repeats": repeats,
            "batch": 32,
            "plain_median_ms": round(plain_ms, 3),
            "dp_sgd_median_ms": round(private_ms, 3),
            "plain_p90_ms": round(float(np.percentile(b, 90)) * 1000, 3),
            "dp_sgd_p90_ms": round(float(np.percentile(a, 90)) * 1000, 3),
            "ratio": round(ratio, 3),
            "ratio_ci90": [round(float(low), 3), round(float(high), 3)],
            "target_max": STEP_RATIO_TARGET,
            "met": ratio <= STEP_RATIO_TARGET,
            # CPU time leaves out time other processes held the cores: steadier when shared
            "plain_cpu_median_ms": round(statistics.median(cpu["plain"]) * 1000, 3),
            "dp_sgd_cpu_median_ms": round(statistics.median(cpu["dp_sgd"]) * 1000, 3),
            "cpu_ratio": round(
                statistics.median(cpu["dp_sgd"]) / statistics.median(cpu["plain"]), 3
            ),
            "phase_median_ms": {
                name: dict(
                    zip(PHASES, np.round(np.median(rows, axis=0) * 1000, 3).tolist(), strict=True)
                )
                for name, rows in phases.items()
            },
            "minor_page_faults_per_step_median": {
                name: statistics.median(counts) for name, counts in faults.items()
            },
        }
    finally:
        torch.set_num_threads(previous_threads)


def private_step_profile(steps: int, seed: int) -> dict[str, float]:
    """Milliseconds per private step in each of PROFILED (cProfile, 1 thread).

    Keys are "<file>.<function>". Cumulative times, so nested entries overlap (the
    grad samplers run inside `capture_backprops_hook`); cProfile's own overhead
    inflates them a little.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, private_step, close = digits_steps(seed)
        for _ in range(20):
            private_step()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            private_step()
        profiler.disable()
        close()
    finally:
        torch.set_num_threads(previous_threads)
    totals = {f"{where}.{name}": 0.0 for where, names in PROFILED.items() for name in names}
    for (filename, _, function), (*_, cumulative, _) in pstats.Stats(profiler).stats.items():
        for where in PROFILED:
            key = f"{where}.{function}"
            if where in filename and key in totals:
                totals[key] += cumulative
    return {name: round(total / steps * 1000, 3) for name, total in totals.items() if total}


def opacus_modes(repeats: int, seed: int) -> dict[str, float]:
    """DP-SGD/plain step-time ratio for each of Opacus's per-sample-gradient modes.

    Built with Opacus's own `PrivacyEngine` (fedge's `make_local_dp` builds on `hooks`),
    same model, batch and optimizer as `step_timing`, 1 thread, alternated.
    """
    from opacus import PrivacyEngine

    config = FedgeConfig.from_run_config({"seed": seed})
    bundle = dataset_for(config)
    spec = model_spec_for(config, bundle)
    x, y = torch.tensor(bundle.x_test[:32]), torch.tensor(bundle.y_test[:32])
    criterion = nn.CrossEntropyLoss()

    def make(mode: str) -> Any:
        torch.manual_seed(seed)
        model = build_model(spec)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if mode == "plain":
            loss_fn, step_opt = criterion, optimizer
        else:
            loader = make_loader(bundle.x_test[:320], bundle.y_test[:320], 32, shuffle=True)
            engine = PrivacyEngine()
            kwargs = {"criterion": criterion} if mode == "ghost" else {}
            made = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                grad_sample_mode=mode,
                **kwargs,
            )
            model, step_opt = made[0], made[1]
            loss_fn = made[2] if mode == "ghost" else criterion

        def step() -> None:
            step_opt.zero_grad()
            loss_fn(model(x), y).backward()
            step_opt.step()

        return step

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            steps = {mode: make(mode) for mode in ("plain", "hooks", "ew", "ghost", "functorch")}
            times: dict[str, list[float]] = {mode: [] for mode in steps}
            for i in range(repeats + 10):
                for mode, step in steps.items() if i % 2 == 0 else reversed(steps.items()):
                    start = time.perf_counter()
                    step()
                    if i >= 10:
                        times[mode].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    plain = statistics.median(times["plain"])
    return {mode: round(statistics.median(t) / plain, 3) for mode, t in times.items()}


def local_round_timing(repeats: int, seed: int) -> dict[str, Any]:
    """One client's whole local round (`train_locally`, 1 epoch), DP-SGD on vs off.

    Includes what a step benchmark leaves out: Opacus's setup each round (hooks,
    Poisson loader, accountant restore) and its variable Poisson batch sizes.
    """
    base = {"seed": seed, "partitioner": "iid", "local-epochs": 1}
    configs = {
        "plain": FedgeConfig.from_run_config(base),
        "dp_sgd": FedgeConfig.from_run_config({**base, "local-dp": True}),
    }
    config = configs["plain"]
    bundle = dataset_for(config)
    spec = model_spec_for(config, bundle)
    x_train, y_train, x_val, y_val = client_split(
        bundle, 0, 10, "iid", seed, config.val_fraction, config.dirichlet_alpha, 2
    )
    data = LocalData(0, spec, x_train, y_train, x_val, y_val)
    torch.manual_seed(seed)
    global_arrays = state_to_numpy(build_model(spec))
    times: dict[str, list[float]] = {"plain": [], "dp_sgd": []}
    for i in range(repeats + 2):
        for name in ("plain", "dp_sgd") if i % 2 == 0 else ("dp_sgd", "plain"):
            start = time.perf_counter()
            train_locally(configs[name], data, global_arrays, server_round=1)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    plain_ms = statistics.median(times["plain"]) * 1000
    private_ms = statistics.median(times["dp_sgd"]) * 1000
    return {
        "torch_threads": torch.get_num_threads(),
        "client_examples": len(y_train),
        "batch": config.batch_size,
        "repeats": repeats,
        "plain_median_ms": round(plain_ms, 2),
        "dp_sgd_median_ms": round(private_ms, 2),
        "ratio": round(private_ms / plain_ms, 3),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per central variant")
    parser.add_argument("--clip", type=float, default=1.0, help="C, and DP-SGD max-grad-norm")
    parser.add_argument("--more-clients", type=int, default=0, help="also central DP on N")
    parser.add_argument("--no-local", action="store_true", help="skip the local DP runs")
    parser.add_argument("--skip-accuracy", action="store_true", help="step timing only")
    parser.add_argument("--step-repeats", type=int, default=300)
    parser.add_argument(
        "--opacus-modes", action="store_true", help="also time Opacus's other grad-sample modes"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile the private step's DP parts"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    report: dict[str, Any] = {"benchmark": "dp", "machine": machine("flwr", "torch", "opacus")}
    report["step_time"] = [
        step_timing(args.step_repeats, 1, args.seed),
        step_timing(args.step_repeats, torch.get_num_threads(), args.seed),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    report["local_round_time"] = local_round_timing(max(10, args.step_repeats // 10), args.seed)
    torch.set_num_threads(threads)
    if args.profile:
        report["private_step_profile_ms_per_step"] = private_step_profile(
            args.step_repeats, args.seed
        )
    if args.opacus_modes:
        report["opacus_mode_step_ratio"] = opacus_modes(args.step_repeats // 2, args.seed)
    if not args.skip_accuracy:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        base = {
            "dataset": "digits",
            "partitioner": "iid",
            "num-server-rounds": args.rounds,
            "local-epochs": args.local_epochs,
            "fraction-train": 1.0,
            "dp-clipping-norm": args.clip,
            "seed": args.seed,
        }
        report["setup"] = {
            **base,
            "clients": args.clients,
            "delta": DELTA,
            "sample_rate": 1.0,
            "central_noise_multipliers": {
                f"{e:g}": round(central_sigma(e, args.rounds), 4) for e in args.epsilons
            },
        }
        with tempfile.TemporaryDirectory(prefix="fedge-dp-bench-") as out_dir:
            results = central_table(base, args.clients, args.epsilons, args.repeats, out_dir)
            if not args.no_local:
                results += [local_row(base, args.clients, e, out_dir) for e in args.epsilons]
            report["accuracy_vs_epsilon"] = aggregate_table(results)
            if args.more_clients:
                more = central_table(base, args.more_clients, args.epsilons, 1, out_dir)
                report[f"accuracy_vs_epsilon_{args.more_clients}_clients"] = aggregate_table(more)
    return finish(report, started, args.out)


if __name__ == "__main__":
    main()
