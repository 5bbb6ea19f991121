"""Atomic file writes (temp file + rename), shared by the server's run folder and the
node's local-DP ledger: a crash mid-write leaves the old file, never half a new one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write` on a temp file beside `path` (creating its folder), then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
