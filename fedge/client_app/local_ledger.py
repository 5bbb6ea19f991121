"""Where a node keeps its local DP-SGD accountant: on its own disk, keyed by its own data.

ε protects the node's *data*, so it must keep accumulating across rounds, across
a resumed run and across new runs on the same data — `context.state` lives only
as long as one run. The file sits in `$FEDGE_NODE_STATE_DIR` (default
`~/.fedge/node-state`), never on the server, and is keyed by what the node
controls: a digest of its source data's content (before any split) and its
node config's `partition-id` / `num-partitions`. Nothing the server chooses
(split fractions, dirichlet-alpha, partitioner, seed, the dataset's name) is in
the key, so every split of the same data charges the same ledger.

Fail closed: the first ledger write also records the ledger in `registry/` next
to it, so a node that finds its ledger missing although it trained before
refuses to train, as it does on a ledger it cannot read, until its operator
resets that ledger on purpose (`fedge node reset-ledger <id>`). Limit: a node
whose whole state folder is gone remembers nothing and starts again at ε = 0;
keep the folder on persistent storage and back it up with the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context

from fedge.atomic import write_atomically
from fedge.config import FedgeConfig
from fedge.task import dataset_for

STATE_DIR_ENV = "FEDGE_NODE_STATE_DIR"
REGISTRY = "registry"


class NodeLedgerError(RuntimeError):
    """The node cannot know its ε (ledger lost or unreadable); it trains no more until reset."""


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV, "~/.fedge/node-state")).expanduser()


@dataclass(frozen=True)
class NodeLedger:
    """One node's local-DP ledger file and its registry entry."""

    ledger_id: str
    identity: dict[str, Any]
    folder: Path

    @classmethod
    def for_node(cls, config: FedgeConfig, context: Context) -> NodeLedger:
        identity = {
            "data": dataset_for(config).source_digest,
            "partition-id": context.node_config.get("partition-id"),
            "num-partitions": context.node_config.get("num-partitions"),
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        return cls(digest, identity, state_dir())

    @property
    def path(self) -> Path:
        return self.folder / f"local-dp-{self.ledger_id}.json"

    @property
    def entry(self) -> Path:
        return self.folder / REGISTRY / f"{self.ledger_id}.json"

    def reset_hint(self) -> str:
        return f"fedge node reset-ledger {self.ledger_id} --state-dir {self.folder}"

    def load(self, delta: float) -> bytes | None:
        """The accountant state; None only for data this node never trained on.

        Raises `NodeLedgerError` for a ledger that is registered but missing, or unreadable.
        """
        from fedge.privacy.local_dp import local_epsilon

        if not self.path.is_file():
            if self.entry.is_file():
                raise NodeLedgerError(
                    f"this node trained on this data before, but its local-DP ledger "
                    f"{self.path} is missing, so its ε is unknown; restore the file from a "
                    f"backup, or reset its ε to 0 on purpose with `{self.reset_hint()}`"
                )
            return None
        state = self.path.read_bytes()
        try:
            local_epsilon(state, delta)
        except ValueError as error:
            raise NodeLedgerError(
                f"local-DP ledger {self.path} is unreadable ({error}); restore it from a "
                f"backup, or reset its ε to 0 on purpose with `{self.reset_hint()}`"
            ) from None
        return state

    def save(self, state: bytes) -> None:
        """Register the ledger (first time), then write it; both writes are atomic."""
        if not self.entry.is_file():
            entry = {"identity": self.identity, "created": time.time()}
            write_atomically(self.entry, lambda tmp: tmp.write_text(json.dumps(entry)))
        write_atomically(self.path, lambda tmp: tmp.write_bytes(state))


def registered_ledgers(folder: Path) -> list[tuple[str, dict[str, Any], bool]]:
    """(ledger id, identity, whether its ledger file exists) for every registry entry."""
    found = []
    for entry in sorted((folder / REGISTRY).glob("*.json")):
        try:
            identity = json.loads(entry.read_text(encoding="utf-8"))["identity"]
        except (ValueError, KeyError, TypeError):
            identity = {"unreadable entry": entry.name}
        exists = (folder / f"local-dp-{entry.stem}.json").is_file()
        found.append((entry.stem, identity, exists))
    return found


def reset_ledger(folder: Path, ledger_id: str) -> list[Path]:
    """Delete one ledger and its registry entry: that data's ε starts again at 0."""
    if not ledger_id or any(c not in "0123456789abcdef" for c in ledger_id):
        raise ValueError(f"{ledger_id!r} is not a ledger id (hex, as `fedge node ledgers` lists)")
    targets = [folder / f"local-dp-{ledger_id}.json", folder / REGISTRY / f"{ledger_id}.json"]
    removed = [path for path in targets if path.is_file()]
    if not removed:
        raise ValueError(f"no ledger {ledger_id} in {folder}; `fedge node ledgers` lists them")
    for path in removed:
        path.unlink()
    return removed
