"""The run's output folder: metrics.jsonl, checkpoints, privacy report, final model, plot.

Writes are atomic (temp file + rename) so an interrupted run never leaves a
half-written checkpoint; resume reads the last complete one. metrics.jsonl is
appended to, so a run killed mid-append leaves a torn last line, which a read drops.
A run holds an exclusive lock on its folder for its whole life, so two runs with
the same run-name never interleave their files.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import time
import zipfile
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
from flwr.common.logger import log

from fedge.atomic import write_atomically
from fedge.config import ConfigError, FedgeConfig, resolve_path
from fedge.records import NamedArrays

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
PRIVACY_REPORT = "privacy.json"
FAILURE_REPORT = "failure.json"  # why the run stopped before its last round
LOCK = ".lock"


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to continue a run at `round + 1`."""

    round: int
    arrays: NamedArrays
    strategy_arrays: dict[str, NamedArrays]
    state: dict[str, Any]


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
        self._lock: IO[str] | None = None

    @classmethod
    def for_config(cls, config: FedgeConfig) -> RunFolder:
        if config.resume and not config.run_name:
            raise ConfigError("resume=true needs the run-name of the run to continue")
        name = config.run_name or time.strftime("%Y%m%d-%H%M%S")
        folder = cls(resolve_path(config.output_dir) / name)
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.lock()
        try:
            folder.check_state(config.resume)
        except ConfigError:
            folder.unlock()
            raise
        log(INFO, "fedge outputs: %s", folder.path)
        return folder

    def check_state(self, resume: bool) -> None:
        """A resume needs a checkpoint; a new run must not overwrite one."""
        if resume and not self.checkpoint_path.is_file():
            raise ConfigError(
                f"resume=true but {self.checkpoint_path} does not exist; "
                "check output-dir and run-name, or set resume=false"
            )
        if not resume and self.checkpoint_path.exists():
            raise ConfigError(
                f"{self.path} already holds a run; set resume=true to continue it "
                "or choose another run-name (nothing was overwritten)"
            )

    def lock(self) -> None:
        """Hold an exclusive lock on the folder until `unlock`, failing fast if taken.

        An flock belongs to the open file: the kernel drops it when the process
        dies, however it dies, so a killed run leaves no stale lock behind.
        """
        handle = open(self.path / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held open)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            handle.close()
            raise ConfigError(
                f"{self.path} is in use by another fedge run ({holder}); wait for it to "
                "finish or choose another run-name"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.unlock()

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        payload = {f"global/{k}": v for k, v in checkpoint.arrays.items()}
        for group, arrays in checkpoint.strategy_arrays.items():
            payload.update({f"{group}/{k}": v for k, v in arrays.items()})
        state = dict(checkpoint.state, round=checkpoint.round)
        payload["__state__"] = np.array(json.dumps(state))

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **payload)

        write_atomically(self.checkpoint_path, write)

    def load_checkpoint(self) -> Checkpoint:
        try:
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
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            raise ConfigError(
                f"{self.checkpoint_path} is unreadable ({error!r}); restore it from a backup "
                "or start a new run with another run-name"
            ) from error

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows; a torn last line (a run killed while appending it) is dropped and logged."""
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("round"), int):
                rows.append(row)
            elif number == len(lines):
                log(
                    WARNING, "fedge: dropped a torn last line of %s: %.60r", self.metrics_path, line
                )
            else:
                raise ConfigError(
                    f"{self.metrics_path} line {number} is not a metrics row: {line[:60]!r}; "
                    "the file is damaged: restore it or delete that line"
                )
        return rows

    def keep_metrics_through(self, last_round: int) -> None:
        """Drop rows a crashed run wrote after its last checkpoint."""
        rows = [row for row in self.read_metrics() if row["round"] <= last_round]

        def write(tmp: Path) -> None:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

        write_atomically(self.metrics_path, write)

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        path = self.path / name
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))
        return path
