"""The run's output folder: metrics.jsonl, checkpoints, privacy report, final model, plot.

Writes are atomic (temp file + rename) so an interrupted run never leaves a
half-written checkpoint; resume reads the last complete one.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log

from fedge.config import ConfigError, FedgeConfig, resolve_path
from fedge.records import NamedArrays

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
PRIVACY_REPORT = "privacy.json"


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to continue a run at `round + 1`."""

    round: int
    arrays: NamedArrays
    strategy_arrays: dict[str, NamedArrays]
    state: dict[str, Any]


def _write_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """Python's `random` (node sampling) and numpy's global generator, JSON-ready."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


class RunFolder:
    """`<output-dir>/<run-name>/`, created (or reopened for resume) from the config."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metrics_path = path / METRICS
        self.checkpoint_path = path / CHECKPOINT

    @classmethod
    def for_config(cls, config: FedgeConfig) -> RunFolder:
        if config.resume and not config.run_name:
            raise ConfigError("resume=true needs the run-name of the run to continue")
        name = config.run_name or time.strftime("%Y%m%d-%H%M%S")
        folder = cls(resolve_path(config.output_dir) / name)
        if config.resume and not folder.checkpoint_path.is_file():
            raise ConfigError(
                f"resume=true but {folder.checkpoint_path} does not exist; "
                "check output-dir and run-name, or set resume=false"
            )
        if not config.resume and folder.checkpoint_path.exists():
            raise ConfigError(
                f"{folder.path} already holds a run; set resume=true to continue it "
                "or choose another run-name (nothing was overwritten)"
            )
        folder.path.mkdir(parents=True, exist_ok=True)
        log(INFO, "fedge outputs: %s", folder.path)
        return folder

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        payload = {f"global/{k}": v for k, v in checkpoint.arrays.items()}
        for group, arrays in checkpoint.strategy_arrays.items():
            payload.update({f"{group}/{k}": v for k, v in arrays.items()})
        state = dict(checkpoint.state, round=checkpoint.round)
        payload["__state__"] = np.array(json.dumps(state))

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **payload)

        _write_atomically(self.checkpoint_path, write)

    def load_checkpoint(self) -> Checkpoint:
        with np.load(self.checkpoint_path, allow_pickle=False) as archive:
            state = json.loads(str(archive["__state__"]))
            groups: dict[str, NamedArrays] = {}
            for key in archive.files:
                if key == "__state__":
                    continue
                group, name = key.split("/", 1)
                groups.setdefault(group, {})[name] = archive[key]
        arrays = groups.pop("global")
        return Checkpoint(int(state.pop("round")), arrays, groups, state)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        with open(self.metrics_path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def keep_metrics_through(self, last_round: int) -> None:
        """Drop rows a crashed run wrote after its last checkpoint."""
        rows = [row for row in self.read_metrics() if row["round"] <= last_round]

        def write(tmp: Path) -> None:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

        _write_atomically(self.metrics_path, write)

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        path = self.path / name
        _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
        return path
