"""`fedge node ledgers` and `fedge node reset-ledger`: a node operator's local-DP ledgers.

A node refuses to train when a ledger it registered is missing or unreadable
(see `fedge.client_app.local_ledger`); resetting one is the operator's deliberate
decision that this data's ε starts again at 0, so it names the ledger exactly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedge.cli import reports_errors
from fedge.client_app.local_ledger import STATE_DIR_ENV, registered_ledgers, reset_ledger, state_dir


def _folder(args: argparse.Namespace) -> Path:
    return args.state_dir or state_dir()


@reports_errors
def _ledgers(args: argparse.Namespace) -> int:
    folder = _folder(args)
    found = registered_ledgers(folder)
    if not found:
        print(f"no local-DP ledgers registered in {folder}")
    for ledger_id, identity, exists in found:
        status = "ok" if exists else "MISSING (the node refuses to train on this data)"
        print(f"{ledger_id}  {status}  {identity}")
    return 0


@reports_errors
def _reset(args: argparse.Namespace) -> int:
    folder = _folder(args)
    for path in reset_ledger(folder, args.ledger_id):
        print(f"removed {path}")
    print(f"ledger {args.ledger_id}: ε starts again at 0 the next time this node trains")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    node = subparsers.add_parser("node", help="a SuperNode's own state (local-DP ledgers)")
    commands = node.add_subparsers(dest="node_command", required=True)
    state_help = f"the node's state folder (default: ${STATE_DIR_ENV} or ~/.fedge/node-state)"
    listing = commands.add_parser(
        "ledgers",
        help="list this node's local-DP ledgers",
        description="List the local-DP ledgers this node registered: id, status and the "
        "data they protect (source-data digest, partition-id, num-partitions).",
    )
    listing.add_argument("--state-dir", type=Path, default=None, help=state_help)
    listing.set_defaults(func=_ledgers)
    reset = commands.add_parser(
        "reset-ledger",
        help="forget one ledger on purpose: that data's local ε starts again at 0",
        description="Delete one local-DP ledger and its registry entry. Only for a ledger "
        "that is lost or damaged beyond restoring from a backup: afterwards this node "
        "reports ε from 0 again for that data, although it has already spent privacy on it.",
    )
    reset.add_argument("ledger_id", help="the id from the node's error or `fedge node ledgers`")
    reset.add_argument("--state-dir", type=Path, default=None, help=state_help)
    reset.set_defaults(func=_reset)
