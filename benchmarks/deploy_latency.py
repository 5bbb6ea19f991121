"""Deployment vs simulation: round latency of the same fedge run both ways.

Printed as one JSON object on stdout (logs go to stderr).

The same run config (digits, seed 42, fedge defaults otherwise: 3 local epochs,
federated evaluation on every node) runs

- `sim`: through Flower's Simulation Engine in this process
  (`fedge.simulation.run_inprocess`, `--nodes` virtual SuperNodes on Ray), and
- `deploy`: on a real local deployment (`fedge.deploy.LocalDeployment`: one
  `flower-superlink` and `--nodes` SuperNodes on 127.0.0.1, TLS and SuperNode
  authentication on) through `flwr run <project copy> fedge-local --stream`, with
  fedge's SuperNodes (`fedge deploy supernode`: responsive pulls, a warm ClientApp
  worker), and
- `deploy_stock`: the same with Flower's own `flower-supernode` (3 s idle poll, one
  `flwr-clientapp` process per message), side by side in the same run
  (`--supernodes fast stock`).

Node i trains on partition i of `--nodes` both ways. Round latency is metrics.jsonl's
`seconds` (the ServerApp's time from one round's centralized evaluation to the next).
For each variant (`plain`; `secagg`, which adds SecAgg+'s three extra exchanges) the
report has per-round seconds, medians over all rounds and over rounds 2+ (round 1 also
pays for Ray's actors or for each SuperNode fetching and installing the app), the
deploy/sim ratio of medians, and each run's wall time.

While `flwr run` runs, a thread tails every SuperNode log (they carry no timestamps)
and stamps each line as it appears (50 ms poll), to split a message's life on a node:
`pickup` (the SuperNode's "Receiving" -> the new `flwr-clientapp` process's first log
line, or the warm worker's "start ClientApp task": pulling the message, the task poll,
and for `flwr-clientapp` starting Python and importing Flower's CLI), `clientapp`
(-> the SuperNode's "Sending": loading fedge's ClientApp, the handler, including
importing torch and training for train/evaluate messages, handing the reply back, and
the SuperNode's reply poll) and `gap` (the node's previous reply sent -> this message
received: the stage's slowest node, the ServerApp's reply poll, its own work and the
SuperNode's idle poll). `cold_import_s` times a
bare interpreter importing what a ClientApp process imports (fedge's ClientApp; plus
torch for train/evaluate messages), and `tls_health_check_ms` one HTTPS request to the
SuperLink on a fresh TLS connection.

Usage: `python benchmarks/deploy_latency.py [--rounds 3] [--nodes 3]
[--variants plain secagg] [--supernodes fast stock] [--out result.json]`
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from deploy_helpers import app_copy, read_rows, run_config_arg  # noqa: E402
from report import finish, parse_with_common_options, start  # noqa: E402

from fedge.deploy import LocalDeployment  # noqa: E402
from fedge.deploy.worker import STARTED_LINE  # noqa: E402

logger = logging.getLogger("deploy_latency")

SUPERNODES = {"fast": "deploy", "stock": "deploy_stock"}  # -> the result's key

LINE = re.compile(
    r"(Receiving|Sending): (\S+) message|Start `flwr-clientapp` process|"
    + re.escape(STARTED_LINE)
    + "|Sent succ"
)


class LogStamps(threading.Thread):
    """Tail SuperNode logs and stamp each event line with the time it was seen (50 ms poll)."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__(daemon=True)
        self.paths = paths
        self.offsets = {path: path.stat().st_size if path.exists() else 0 for path in paths}
        self.partial = dict.fromkeys(paths, b"")
        self.events: list[tuple[float, int, str, str]] = []  # (t, node, event, message type)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.poll()
            time.sleep(0.05)
        self.poll()

    def poll(self) -> None:
        now = time.monotonic()
        for node, path in enumerate(self.paths):
            try:
                with path.open("rb") as handle:
                    handle.seek(self.offsets[path])
                    chunk = handle.read()
            except OSError:
                continue
            self.offsets[path] += len(chunk)
            *lines, self.partial[path] = (self.partial[path] + chunk).split(b"\n")
            for raw in lines:
                match = LINE.search(raw.decode(errors="replace"))
                if match is None:
                    continue
                if match.group(1):
                    event, kind = match.group(1).lower(), match.group(2)
                elif match.group(0) != "Sent succ":
                    event, kind = "start", ""
                else:
                    event, kind = "sent", ""
                self.events.append((now, node, event, kind))


def breakdown(events: list[tuple[float, int, str, str]]) -> dict[str, Any]:
    """Median seconds per message type of pickup, clientapp and the gap before it."""
    per_node: dict[int, list[tuple[float, str, str]]] = defaultdict(list)
    for t, node, event, kind in events:
        per_node[node].append((t, event, kind))
    parts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for stream in per_node.values():
        received: tuple[float, str] | None = None
        started: float | None = None
        last_sent: float | None = None
        for t, event, kind in stream:
            if event == "receiving":
                received, started = (t, kind), None
                if last_sent is not None:
                    parts[kind]["gap"].append(t - last_sent)
            elif event == "start" and received is not None:
                started = t
                parts[received[1]]["pickup"].append(t - received[0])
            elif event == "sending" and started is not None:
                parts[kind]["clientapp"].append(t - started)
            elif event == "sent":
                last_sent = t
    return {
        kind: {name: round(statistics.median(values), 2) for name, values in times.items()}
        | {"count": len(times["clientapp"])}
        for kind, times in parts.items()
    }


def cold_import_s(code: str, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter running `code` (what each ClientApp pays)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 2)


def tls_health_check_ms(federation: LocalDeployment, repeats: int = 20) -> float:
    """Median of GET /health over a fresh TLS connection to the SuperLink (handshake included)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        assert federation.healthy()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 1)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [float(row["seconds"]) for row in rows]
    return {
        "round_s": seconds,
        "median_s": round(statistics.median(seconds), 2),
        "median_after_round_1_s": round(statistics.median(seconds[1:]), 2)
        if len(seconds) > 1
        else None,
        "final_accuracy": rows[-1]["test_accuracy"],
        "num_replies": [row["num_replies"] for row in rows],
    }


def run_config(variant: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    return {
        "num-server-rounds": args.rounds,
        "min-available-nodes": args.nodes,
        "min-train-nodes": args.nodes,
        "seed": args.seed,
        "dataset": "digits",
        "secagg": variant == "secagg",
        "output-dir": str(out),
        "run-name": variant,
    }


def run_sim(variant: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from fedge.simulation import run_inprocess

    started = time.perf_counter()
    run_inprocess(run_config(variant, args, out), num_supernodes=args.nodes)
    wall = time.perf_counter() - started
    return summarize(read_rows(out / variant / "metrics.jsonl")) | {"wall_s": round(wall, 1)}


def run_deploy(
    federation: LocalDeployment, app: Path, variant: str, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    stamps = LogStamps([process.log_path for process in federation.supernodes])
    stamps.start()
    argv = [str(Path(sys.executable).parent / "flwr"), "run", str(app), federation.connection]
    argv += ["--stream", "--run-config", run_config_arg(run_config(variant, args, out))]
    started, t0 = time.perf_counter(), time.monotonic()
    result = subprocess.run(
        argv,
        cwd=federation.directory,  # never in a project: flwr may rewrite pyproject.toml
        env=federation.flwr_env(),
        capture_output=True,
        text=True,
        timeout=args.timeout,
        check=False,
    )
    wall = time.perf_counter() - started
    stamps.done.set()
    stamps.join()
    if result.returncode != 0:
        raise RuntimeError(f"flwr run failed:\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}")
    first = min((t for t, _, event, _ in stamps.events if event == "receiving"), default=None)
    report = summarize(read_rows(out / variant / "metrics.jsonl"))
    report["wall_s"] = round(wall, 1)
    report["first_message_after_s"] = None if first is None else round(first - t0, 1)
    report["per_message"] = breakdown(stamps.events)
    return report


def ratio(numerator: dict[str, Any], denominator: dict[str, Any], key: str) -> float | None:
    if not numerator.get(key) or not denominator.get(key):
        return None
    return round(numerator[key] / denominator[key], 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["plain", "secagg"])
    parser.add_argument(
        "--supernodes",
        nargs="+",
        choices=SUPERNODES,
        default=["fast", "stock"],
        help="fast: `fedge deploy supernode` (the default of LocalDeployment); "
        "stock: Flower's own flower-supernode, for comparison",
    )
    parser.add_argument("--timeout", type=float, default=1200, help="per `flwr run`, seconds")
    return parse_with_common_options(parser, argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    report, started = start("deploy_latency", "flwr", "torch")
    report["setup"] = {"rounds": args.rounds, "nodes": args.nodes, "dataset": "digits"}
    report["cold_import_s"] = {
        "fedge_clientapp": cold_import_s("import flwr.clientapp, fedge.client_app.app"),
        "fedge_clientapp_with_torch": cold_import_s(
            "import flwr.clientapp, fedge.client_app.app, fedge.client_app.torch_client"
        ),
    }
    results: dict[str, dict[str, Any]] = {variant: {} for variant in args.variants}
    with tempfile.TemporaryDirectory(prefix="fedge-latency-") as tmp:
        root = Path(tmp)
        for variant in args.variants:
            logger.info("simulation: %s", variant)
            results[variant]["sim"] = run_sim(variant, args, root / "sim")
        app = app_copy(root / "app")
        for supernodes in args.supernodes:
            key = SUPERNODES[supernodes]
            deploy_started = time.perf_counter()
            with LocalDeployment(
                args.nodes,
                root / key,
                port_base=0,
                workdir=root,
                startup_timeout=300,
                fast=supernodes == "fast",
            ) as federation:
                report[f"{key}_start_s"] = round(time.perf_counter() - deploy_started, 1)
                report["tls_health_check_ms"] = tls_health_check_ms(federation)
                for variant in args.variants:
                    logger.info("deployment (%s SuperNodes): %s", supernodes, variant)
                    results[variant][key] = run_deploy(
                        federation, app, variant, args, root / f"{key}-out"
                    )
    for result in results.values():
        for key in (SUPERNODES[supernodes] for supernodes in args.supernodes):
            result[f"{key}_ratio_of_medians"] = ratio(result[key], result["sim"], "median_s")
            result[f"{key}_ratio_of_medians_after_round_1"] = ratio(
                result[key], result["sim"], "median_after_round_1_s"
            )
        if {"deploy", "deploy_stock"} <= result.keys():
            result["stock_over_fast"] = ratio(result["deploy_stock"], result["deploy"], "median_s")
    report["variants"] = results
    return finish(report, started, args.out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
