"""The `fedge` command: config check and run, export, edge runtime, certificates, deployments
and node state.

Each command group registers itself from its own module; this file only
assembles them, so installing just `fedge[edge]` still gives working edge commands.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

Command = Callable[[argparse.Namespace], int]


class UserError(Exception):
    """A problem the user can fix; its message says how (printed without a traceback)."""


def reports_errors(command: Command) -> Command:
    """Turn the errors a user can fix (bad paths, inputs, settings) into a message and exit 1.

    Their messages already say what to do; a traceback would only bury that.
    """

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (OSError, ValueError, ImportError, UserError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


COMMAND_GROUPS = (
    ("fedge.check", "register", ("check",)),
    ("fedge.flwr_run", "register", ("run",)),
    ("fedge.edge.export_command", "register_export", ("export",)),
    ("fedge.edge.commands", "register", ("edge",)),
    ("fedge.deploy.commands", "register", ("certs", "deploy")),
    ("fedge.client_app.node_commands", "register", ("node",)),
)
"""(module, its register function, the commands it adds): `fedge <command>` imports only
the module that adds <command>, so `fedge check` answers before sklearn or torch load."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command` alone when one of the groups adds it, else for all of them."""
    parser = argparse.ArgumentParser(
        prog="fedge",
        description="fedge: federated learning on Flower with SecAgg+, DP and edge export",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    known = any(command in commands for _, _, commands in COMMAND_GROUPS)
    for module_name, function, commands in COMMAND_GROUPS:
        if known and command not in commands:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # e.g. an edge-only install without torch
            logging.getLogger(__name__).debug("skipping %s: %s", module_name, exc)
            continue
        getattr(module, function)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "passes_flwr_args", False):
        args.flwr_args = argv[1:]  # verbatim: `flwr run` reads them again
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
