"""`fedge deploy supernode`: Flower 1.41's own SuperNode, made quick to answer.

Flower's SuperNode is run unchanged (its protocol, TLS and node authentication are
Flower's) with two changes at its seams:

- **A responsive pull schedule.** Flower 1.41 sleeps a fixed 3 s whenever a pull from the
  SuperLink finds no message, and 0.5 s between checks for the ClientApp's reply
  (`flwr/supernode/start_client_internal.py`). Here the idle pause starts at
  `--poll-first` after each message and grows to `--poll-max`, and the reply check
  waits `REPLY_PAUSE`. Flower is pinned: `check_flower_internals` refuses to start when
  the code this relies on is not the one it was written against.
- **A warm ClientApp worker** (`fedge.deploy.worker`): the SuperNode runs with
  `--isolation process` and one long-lived worker process, restarted if it dies, runs
  every message of the app it first loaded, so torch, the model code and the node's
  partition stay loaded. It claims tasks from the SuperNode's Runtime API (127.0.0.1)
  with Flower's SuperExec HMAC auth, keyed by a secret in a file only this user can read:
  another local user can reach the port but cannot claim a task.

`--no-warm-worker` keeps Flower's one `flwr-clientapp` process per message.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from fedge.cli import UserError

logger = logging.getLogger(__name__)

PINNED_FLOWER = "1.41."
LOOPBACK = "127.0.0.1"
IDLE_SLEEP = 3  # Flower's pause after an empty pull
REPLY_SLEEP = 0.5  # Flower's pause between checks for the ClientApp's reply
REPLY_PAUSE = 0.02  # a local, in-memory check: cheap
SECRET_NAME = "superexec-auth.secret"
OBJECT_PULL_BACKOFF = {"initial_backoff": 0.01, "backoff_cap": 0.25}
RESTART_PAUSES = (0.5, 1.0, 2.0, 5.0)  # a worker that keeps dying is restarted less eagerly


class FlowerChanged(UserError):
    """The installed Flower is not the one whose SuperNode internals this wraps."""


class Backoff:
    """Pauses that start at `first` after activity and grow by `growth` up to `maximum`."""

    def __init__(self, first: float = 0.05, maximum: float = 0.5, growth: float = 1.5) -> None:
        if not 0 < first <= maximum:
            raise ValueError(
                f"--poll-first ({first}) must be > 0 and at most --poll-max ({maximum})"
            )
        if growth < 1:
            raise ValueError(f"growth must be at least 1, got {growth}")
        self.first, self.maximum, self.growth = first, maximum, growth
        self._next = first

    def next(self) -> float:
        pause, self._next = self._next, min(self.maximum, self._next * self.growth)
        return pause

    def reset(self) -> None:
        self._next = self.first


class PullSchedule(Backoff):
    """Flower's SuperNode pauses, made responsive.

    Stands in for Flower's `time.sleep` inside start_client_internal: the fixed idle sleep
    becomes the next backoff pause, the reply wait becomes `REPLY_PAUSE` (and marks the
    node busy, so the next idle pause starts short again); any other pause is kept.
    """

    def pause_for(self, seconds: float) -> float:
        """What to sleep instead of Flower's `seconds`."""
        if seconds == IDLE_SLEEP:
            return self.next()
        if seconds == REPLY_SLEEP:
            self.reset()
            return REPLY_PAUSE
        return seconds

    def sleep(self, seconds: float) -> None:
        time.sleep(self.pause_for(seconds))


class _ScheduledTime:
    """The `time` module as start_client_internal sees it, with the schedule's sleep."""

    def __init__(self, schedule: PullSchedule) -> None:
        self.sleep = schedule.sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _internals() -> ModuleType:
    from flwr.supernode import start_client_internal

    return start_client_internal


def check_flower_internals() -> None:
    """Fail loudly unless Flower's SuperNode loop is the 1.41 one this module patches."""
    import flwr

    version = getattr(flwr, "__version__", "?")
    module = _internals()
    problems = []
    if not version.startswith(PINNED_FLOWER):
        problems.append(f"flwr {version} is installed, this was written for {PINNED_FLOWER}x")
    if getattr(module, "time", None) is not time and not isinstance(
        getattr(module, "time", None), _ScheduledTime
    ):
        problems.append("start_client_internal no longer imports the `time` module")
    loop = inspect.getsource(module.start_client_internal)
    if f"time.sleep({IDLE_SLEEP})" not in loop:
        problems.append(f"its idle pause is no longer `time.sleep({IDLE_SLEEP})`")
    if f"time.sleep({REPLY_SLEEP})" not in inspect.getsource(module._push_messages):
        problems.append(f"its reply wait is no longer `time.sleep({REPLY_SLEEP})`")
    problems += _backoff_problems(module, "pull_objects", "_pull_and_store_message")
    from flwr.supernode.runtime import run_clientapp

    problems += _backoff_problems(
        run_clientapp, "pull_and_inflate_object_from_tree", "pull_task_input"
    )
    if problems:
        raise FlowerChanged(
            "fedge deploy supernode cannot patch this Flower's SuperNode: "
            + "; ".join(problems)
            + ". Install flwr==1.41.* (fedge's pin), or run Flower's own `flower-supernode`."
        )


def _backoff_problems(module: ModuleType, function: str, caller: str) -> list[str]:
    """Whether `module.caller` still pulls objects through `module.function(..., backoff)`."""
    pulls = getattr(module, function, None)
    if isinstance(pulls, functools.partial):
        pulls = pulls.func
    if pulls is None or not set(OBJECT_PULL_BACKOFF) <= inspect.signature(pulls).parameters.keys():
        return [f"{module.__name__}.{function} no longer takes {sorted(OBJECT_PULL_BACKOFF)}"]
    if f"{function}(" not in inspect.getsource(getattr(module, caller)):
        return [f"{module.__name__}.{caller} no longer calls {function}"]
    return []


def install_schedule(schedule: PullSchedule) -> None:
    """Make Flower's SuperNode loop in this process use `schedule` for its pauses.

    Also its object pulls: the SuperLink lists a message before the ServerApp has pushed
    all of its objects, and Flower retries a missing object after 1 s, 2 s, 4 s ...;
    here after `OBJECT_PULL_BACKOFF` (10 ms, doubling up to 0.25 s).
    """
    check_flower_internals()
    module = _internals()
    module.time = _ScheduledTime(schedule)  # type: ignore[attr-defined]
    if not isinstance(module.pull_objects, functools.partial):
        module.pull_objects = functools.partial(module.pull_objects, **OBJECT_PULL_BACKOFF)


def write_secret(directory: Path) -> Path:
    """A fresh SuperExec auth secret in `directory` (made 0700), readable by this user only."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    path = directory / SECRET_NAME
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    return path


class WorkerSupervisor(threading.Thread):
    """Keep one warm ClientApp worker running next to this SuperNode; restart it if it dies."""

    def __init__(self, runtime_api_address: str, secret_file: Path) -> None:
        super().__init__(name="fedge-worker-supervisor", daemon=True)
        self.argv = [sys.executable, "-m", "fedge.deploy.worker"]
        self.argv += ["--runtime-api-address", runtime_api_address]
        self.argv += ["--superexec-auth-secret-file", str(secret_file)]
        self.argv += ["--parent-pid", str(os.getpid())]
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def run(self) -> None:
        quick_deaths = 0
        while True:
            started = time.monotonic()
            self.starts += 1
            self.process = subprocess.Popen(self.argv)
            code = self.process.wait()
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < 10 else 0
            pause = RESTART_PAUSES[min(quick_deaths, len(RESTART_PAUSES) - 1)]
            logger.warning("fedge worker exited (%s); restarting it in %.1f s", code, pause)
            time.sleep(pause)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """fedge's own options, and the rest for Flower's `flower-supernode`."""
    parser = argparse.ArgumentParser(
        prog="fedge deploy supernode",
        description="Flower's flower-supernode with a responsive pull schedule and a warm "
        "ClientApp worker; every other option is Flower's (see flower-supernode --help).",
    )
    add_options(parser)
    return parser.parse_known_args(list(argv))


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--poll-first",
        type=float,
        default=0.05,
        help="seconds before the first re-pull after a message (default: %(default)s)",
    )
    parser.add_argument(
        "--poll-max",
        type=float,
        default=0.5,
        help="longest idle pause between pulls; Flower's own is 3 (default: %(default)s)",
    )
    parser.add_argument(
        "--no-warm-worker",
        dest="warm_worker",
        action="store_false",
        help="one flwr-clientapp process per message, as Flower does",
    )


def run(args: argparse.Namespace, flower_args: Sequence[str]) -> None:
    """Start Flower's SuperNode in this process (it runs until stopped)."""
    install_schedule(PullSchedule(args.poll_first, args.poll_max))  # first: Flower pinned?
    flower_args = list(flower_args)
    if args.warm_worker:
        for option in ("--isolation", "--superexec-auth-secret-file"):
            if any(arg == option or arg.startswith(option + "=") for arg in flower_args):
                raise UserError(
                    f"{option} is set by fedge's warm worker; drop it or pass --no-warm-worker"
                )
        known, _ = _runtime_address_parser().parse_known_args(flower_args)
        if known.host is None:
            flower_args += ["--host", LOOPBACK]
        elif known.host not in (LOOPBACK, "localhost"):
            raise UserError(
                f"--host {known.host}: the warm worker's Runtime API must stay on {LOOPBACK} "
                "(it is this node's private channel); drop --host or pass --no-warm-worker"
            )
        home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
        secret = write_secret(home / "fedge-worker")
        flower_args += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
        WorkerSupervisor(f"{LOOPBACK}:{known.port}", secret).start()
    quiet_logs()
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


def quiet_logs() -> None:
    """Flower logs to its own handler; keep fedge's root handler from repeating every
    DEBUG line and httpx's line per HTTP request (several a second while polling)."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("flwr").propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _runtime_address_parser() -> argparse.ArgumentParser:
    """Where Flower's SuperNode serves its Runtime API (its default port)."""
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=SUPERNODE_UVICORN_DEFAULT_PORT)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args, flower_args = parse_args(sys.argv[1:] if argv is None else argv)
    run(args, flower_args)


if __name__ == "__main__":
    main()
