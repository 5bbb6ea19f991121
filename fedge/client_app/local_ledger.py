"""Where a node keeps its local DP-SGD accountant: on its own disk, per dataset.

ε protects the node's *data*, so it must keep accumulating across rounds, across
a resumed run and across new runs on the same data — `context.state` lives only
as long as one run. The file sits in `$FEDGE_NODE_STATE_DIR` (default
`~/.fedge/node-state`), never on the server, and is named after the data's
identity (dataset, split settings, partition), so another dataset starts fresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from flwr.app import Context

from fedge.config import FedgeConfig

STATE_DIR_ENV = "FEDGE_NODE_STATE_DIR"


def ledger_path(config: FedgeConfig, context: Context) -> Path:
    identity = {
        "dataset": config.dataset,
        "partitioner": config.partitioner,
        "dirichlet-alpha": config.dirichlet_alpha,
        "classes-per-client": config.classes_per_client,
        "test-fraction": config.test_fraction,
        "val-fraction": config.val_fraction,
        "seed": config.seed,
        "partition-id": context.node_config.get("partition-id"),
        "num-partitions": context.node_config.get("num-partitions"),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    base = Path(os.environ.get(STATE_DIR_ENV, "~/.fedge/node-state")).expanduser()
    return base / f"local-dp-{digest}.json"


def load_ledger(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def save_ledger(path: Path, state: bytes) -> None:
    """Atomic, so a crash mid-write never resets the node's ε."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(state)
    os.replace(tmp, path)
