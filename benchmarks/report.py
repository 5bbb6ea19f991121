"""What every benchmark takes as options, records about the machine, and how it emits its JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict


def with_run_config(context: Context, run_config: dict[str, Any]) -> Context:
    """The ServerApp's context with another run config and fresh state: one more run of
    fedge's ServerApp main inside a benchmark's own ServerApp."""
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=RecordDict(),
        run_config=run_config,
    )


def machine(*packages: str) -> dict[str, Any]:
    """CPU, Python, the named packages' versions and the load when the run starts.

    The load average matters: these machines are shared, so ratios measured in
    one run are what to compare, not absolute seconds.
    """
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        **{package: version(package) for package in packages},
        "loadavg_1_5_15_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def parse_with_common_options(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """Add the `--seed` and `--out` options every benchmark takes, then parse `argv`."""
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args(argv)


def start(benchmark: str, *packages: str) -> tuple[dict[str, Any], float]:
    """A report naming the benchmark and `machine(*packages)`, and the start time for `finish`."""
    started = time.perf_counter()
    return {"benchmark": benchmark, "machine": machine(*packages)}, started


def finish(report: dict[str, Any], started: float, out: Path | None) -> dict[str, Any]:
    """Add the end load and wall time, print the JSON, and save it to `out` if given."""
    report["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
    return report
