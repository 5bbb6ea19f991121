"""`fedge check`: refuse a bad run config in milliseconds, before any engine starts.

A run config goes wrong in one of two places: Flower refuses an override key the
app does not declare (`[code: 15] Invalid run configuration.`, without the key),
and fedge's ServerApp refuses a value only after the SuperLink, the simulation
engine and Ray have started. This module builds the run config exactly as Flower
will (its own parser for `--run-config`, its flattening of the app's
`[tool.flwr.app.config]`) and validates it through `FedgeConfig`, the one place
the rules live. It imports neither torch nor Flower's simulation engine.

The ServerApp's first act is the same validation (`server_config`), and a config
it refuses is logged as one line instead of Flower's traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.cli import reports_errors
from fedge.config import ConfigError, FedgeConfig, did_you_mean

if TYPE_CHECKING:
    from flwr.app import Context

PYPROJECT = "pyproject.toml"
CONFIG_REFUSED = 2
"""Exit status of `fedge check` and `fedge run` for a config refused before anything started."""


@dataclass(frozen=True)
class FlwrRunArgs:
    """What fedge reads from `flwr run`'s arguments; anything else is Flower's business."""

    app: str = "."
    superlink: str | None = None
    run_config: list[str] = field(default_factory=list)
    federation: str | None = None
    federation_config: list[str] = field(default_factory=list)

    @property
    def remote(self) -> bool:
        """`@account/app`: the app's defaults live on the SuperLink, not here."""
        return self.app.startswith("@")

    @classmethod
    def parse(cls, argv: Sequence[str]) -> FlwrRunArgs:
        namespace, _ = _flwr_run_parser().parse_known_intermixed_args(list(argv))
        return cls(
            namespace.app,
            namespace.superlink,
            namespace.run_config,
            namespace.federation,
            namespace.federation_config,
        )

    def num_supernodes(self) -> int | None:
        """The simulated federation's size: `--federation-config`, else the app's
        federation in pyproject.toml; None when neither says (e.g. a deployment)."""
        size = parse_overrides(self.federation_config).get("num-supernodes")
        if size is None:
            federations = _project(Path(self.app) / PYPROJECT)
            federations = federations.get("tool", {}).get("flwr", {}).get("federations", {})
            name = self.federation or federations.get("default")
            options = federations.get(name, {}) if isinstance(name, str) else {}
            size = options.get("options", {}).get("num-supernodes")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
            raise ConfigError(f"num-supernodes must be an integer, got {size!r}")
        return size


def add_flwr_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`flwr run`'s positional arguments and the options whose values fedge must skip."""
    parser.add_argument("app", nargs="?", default=".", help="the Flower app (default: .)")
    parser.add_argument("superlink", nargs="?", help="the SuperLink connection (flwr's default)")
    parser.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help='"key=value ..." or a .toml file, exactly as `flwr run` takes it',
    )
    parser.add_argument("--federation-config", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--federation", help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)


def _flwr_run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_flwr_run_arguments(parser)
    return parser


_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")
"""Flower 1.41's `key=value` pattern (flwr.common.config.parse_config_args)."""


def flatten(table: dict[str, Any], parent: str = "") -> dict[str, Any]:
    """Nested TOML tables as dotted keys, as Flower's `flatten_dict` makes them."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{parent}.{key}" if parent else key
        flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


def _project(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"no {PYPROJECT} in {path.parent}: give the app's folder") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The app's `[tool.flwr.app.config]`, flattened as Flower flattens it."""
    project = _project(app_dir / PYPROJECT)
    return flatten(project.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def parse_overrides(run_config: Sequence[str]) -> dict[str, Any]:
    """`--run-config` values as `flwr run` parses them: one .toml file, or "key=value ..."
    strings read as TOML values. The same as Flower's parser (a test compares them), which
    is not imported: importing Flower alone took 0.5 to 1 s on a busy machine.

    Text that is not `key=value`, which Flower drops without a word, is refused.
    """
    if len(run_config) == 1 and run_config[0].endswith(".toml"):
        path = Path(run_config[0]).expanduser()
        try:
            with path.open("rb") as handle:
                return flatten(tomllib.load(handle))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"--run-config {path}: {error}") from None
    overrides: dict[str, Any] = {}
    for text in run_config:
        if text.endswith(".toml"):
            raise ConfigError("--run-config: a .toml file cannot come with key=value pairs")
        stray = _PAIR.sub(" ", text).split()
        if stray:
            raise ConfigError(f"--run-config: {stray[0]!r} is not key=value (Flower ignores it)")
        pairs = "\n".join(f"{key} = {value}" for key, value in _PAIR.findall(text))
        try:
            overrides.update(tomllib.loads(pairs))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(
                f"--run-config {text!r}: {error}; strings need quotes: key='text'"
            ) from None
    return flatten(overrides)


def check_run_config(app_dir: Path, run_config: Sequence[str] = ()) -> FedgeConfig:
    """The config `flwr run <app_dir> --run-config ...` would give the ServerApp, validated.

    Raises ConfigError naming the first offending key, with a "did you mean" for a typo.
    """
    defaults = app_defaults(app_dir)
    overrides = parse_overrides(run_config)
    config = FedgeConfig.from_run_config({**defaults, **overrides})
    # Flower refuses to override a key the app does not declare, even one fedge knows.
    undeclared = [key for key in overrides if key not in defaults]
    if undeclared:
        key = undeclared[0]
        raise ConfigError(
            f"--run-config key {key!r} is not in {app_dir / PYPROJECT} [tool.flwr.app.config], "
            f"so Flower refuses it; {did_you_mean(key, defaults)}"
        )
    return config


class OneLineConfigErrors(logging.Filter):
    """Flower logs a failed ServerApp with its traceback; for a refused config the message
    is the whole story, so it is logged as one line (the run still ends as failed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ConfigError):
            record.msg = f"{record.getMessage()}: {error}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def server_config(context: Context) -> FedgeConfig:
    """The ServerApp's first act: the same validation as `fedge check`, failing in one line."""
    flower_logger = logging.getLogger("flwr")
    if not any(isinstance(f, OneLineConfigErrors) for f in flower_logger.filters):
        flower_logger.addFilter(OneLineConfigErrors())
    return FedgeConfig.from_context(context)


def check_data_plan(parsed: FlwrRunArgs, config: FedgeConfig) -> None:
    """A simulated federation's partitioning, run once here as each client would run it.

    Only where the federation's size is known; this loads the data stack (about 2 s).
    """
    clients = parsed.num_supernodes()
    if clients is None:
        return
    from fedge.task import check_data_plan as check_plan
    from fedge.task import dataset_for

    check_plan(config, dataset_for(config), clients)


def checked(parsed: FlwrRunArgs) -> FedgeConfig | None:
    """Validate what `flwr run` would submit; a refusal is printed as one line (None)."""
    try:
        config = check_run_config(Path(parsed.app), parsed.run_config)
        check_data_plan(parsed, config)
        return config
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


@reports_errors
def check_command(args: argparse.Namespace) -> int:
    parsed = FlwrRunArgs.parse(args.flwr_args)
    if parsed.remote:
        print(f"fedge check: {parsed.app} is a remote app; its defaults are not here to check")
        return 0
    config = checked(parsed)
    if config is None:
        return CONFIG_REFUSED
    print(
        f"fedge check: ok ({config.num_server_rounds} rounds on {config.dataset!r}, "
        f"dp-mode={config.dp_mode!r}, secagg={str(config.secagg).lower()})"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser(
        "check",
        help="validate the run config `flwr run` would submit, before anything starts "
        "(exit 2 if refused)",
        description="Takes `flwr run`'s arguments; reads the app's pyproject.toml and the "
        "--run-config overrides as Flower does and validates them as the ServerApp will.",
    )
    add_flwr_run_arguments(check)
    check.set_defaults(func=check_command, passes_flwr_args=True)
