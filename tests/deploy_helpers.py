"""Helpers shared by the real-deployment tests (tests/test_deploy_*.py) and benchmarks.

Everything here drives real Flower 1.41 processes on 127.0.0.1: a `LocalDeployment`
whose teardown proves nothing survived, a copy of the project for `flwr run` (which
would otherwise rewrite pyproject.toml), and `FlwrRun`, a `flwr run --stream` running
in the background so a test can act (kill a node, kill the ServerApp) mid-round.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from fedge.deploy import LocalDeployment
from fedge.server_app.run_folder import Checkpoint, RunFolder

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


# --- processes ------------------------------------------------------------------------------


def pids_with_env_prefix(prefix: str, *, whole_entry: bool = False) -> list[int]:
    """Live processes whose environment has an entry starting with `prefix` (or equal to it,
    with `whole_entry`); children inherit the environment, so helpers are found too."""
    wanted = prefix.encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        entries = environ.split(b"\0")
        found = wanted in entries if whole_entry else any(e.startswith(wanted) for e in entries)
        if state not in ("Z", "X") and found:
            pids.append(int(proc.name))
    return pids


def kill_leftovers(prefix: str) -> list[int]:
    """Last resort after a failed stop: SIGKILL what is left, and say what it was."""
    leftovers = pids_with_env_prefix(prefix)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def processes_running(name: str, env_prefix: str) -> list[int]:
    """Pids whose command line runs the script `name` and whose env starts with `env_prefix`."""
    found = []
    for pid in pids_with_env_prefix(env_prefix):
        argv = cmdline(pid)
        if any(Path(part).name == name for part in argv[:2]):
            found.append(pid)
    return found


@contextlib.contextmanager
def deployment(nodes: int, directory: Path, **kwargs: Any) -> Iterator[LocalDeployment]:
    """A started LocalDeployment; on exit everything is stopped and nothing may survive."""
    federation = LocalDeployment(
        nodes, directory, port_base=0, workdir=directory, startup_timeout=300, **kwargs
    )
    try:
        federation.start()
        yield federation
    finally:
        federation.stop()
        stragglers = federation.leftover_processes()
        leaked = kill_leftovers(f"FLWR_HOME={directory}")
        assert not stragglers and not leaked, f"processes survived stop(): {stragglers} {leaked}"


# --- the app and its outputs -----------------------------------------------------------------


def app_copy(dest: Path) -> Path:
    """The project's pyproject.toml without `[tool.flwr.federations]`, which `flwr run` would
    migrate (rewriting the file). fedge itself is imported from this environment."""
    dest.mkdir(parents=True)
    kept, skipping = [], False
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        header = re.match(r"\s*\[([^\]]+)\]", line)
        if header:
            skipping = header.group(1).strip().startswith("tool.flwr.federations")
        if not skipping:
            kept.append(line)
    (dest / "pyproject.toml").write_text("\n".join(kept) + "\n")
    return dest


def read_rows(metrics: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as dicts; a half-written last line (mid-append) is left out."""
    if not metrics.is_file():
        return []
    rows = []
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if line.strip():
                rows.append(json.loads(line))
    return rows


def saved_checkpoint(folder: Path, at_least: int = 1) -> Checkpoint | None:
    """The run's checkpoint once it holds round `at_least` or later, else None.

    Checkpoints are replaced atomically, so one that exists is complete.
    """
    run = RunFolder(folder)
    if not run.checkpoint_path.is_file():
        return None
    checkpoint = run.load_checkpoint()
    return checkpoint if checkpoint.round >= at_least else None


def log_since(path: Path, offset: int) -> str:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def wait_exit(process: Callable[[], int | None], timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = process()
        if code is not None:
            return code
        time.sleep(0.5)
    return None


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# --- `flwr run` in the background -----------------------------------------------------------


def run_config_arg(config: dict[str, Any]) -> str:
    """A `--run-config` string: strings single-quoted, booleans lower-case."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = f"'{value}'"
        else:
            text = repr(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class FlwrRun:
    """`flwr run <app copy> <connection> --stream --run-config ...` as a background process.

    Its output goes to `log_path`. `stop()` ends the CLI (only a log follower once the run
    has started); the run itself lives in the SuperLink.
    """

    def __init__(
        self,
        federation: LocalDeployment,
        app: Path,
        run_config: dict[str, Any],
        log_path: Path,
    ) -> None:
        self.federation = federation
        self.log_path = log_path
        self.argv = [
            _flwr_executable(),
            "run",
            str(app),
            federation.connection,
            "--stream",
            "--run-config",
            run_config_arg(run_config),
        ]
        self._log: IO[bytes] = log_path.open("wb")
        self.process = subprocess.Popen(
            self.argv,
            cwd=federation.directory,  # never in a project: flwr may rewrite pyproject.toml
            env=federation.flwr_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def run_id(self) -> int | None:
        found = re.search(r"Successfully started run (\d+)", self.output())
        return int(found.group(1)) if found else None

    def wait(self, timeout: float) -> int:
        """The CLI's exit code; fails (after stopping it) if it is still running."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"`flwr run` still running after {timeout:.0f}s:\n{self.output()[-3000:]}"
            ) from None

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()

    def __enter__(self) -> FlwrRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _flwr_executable() -> str:
    """The `flwr` next to this interpreter (the right Flower version), else the one on PATH."""
    beside = Path(sys.executable).parent / "flwr"
    return str(beside) if beside.is_file() else (shutil.which("flwr") or "flwr")


def node_log_since_start(federation: LocalDeployment, index: int) -> str:
    """SuperNode `index`'s log since ManagedProcess last started it."""
    text = federation.supernodes[index].log_path.read_text(errors="replace")
    return text.rsplit("=== fedge: starting", 1)[-1]


def use_nodes(federation: LocalDeployment, indices: Sequence[int], timeout: float = 240) -> None:
    """Exactly SuperNodes `indices` running and online; the others stopped gracefully.

    A graceful stop deregisters at once, so the ServerApp sees only `indices`. Call it from
    the test's own thread: a SuperNode gets SIGTERM when the thread that started it exits.
    """
    wanted = set(indices)
    for index, process in enumerate(federation.supernodes):
        if index not in wanted and process.alive():
            federation.stop_node(index)
    starting = [i for i in sorted(wanted) if not federation.supernodes[i].alive()]
    for index in starting:
        federation.supernodes[index].start()
    federation.wait_for_nodes(sorted(wanted), timeout=timeout)
    expected = {federation.node_ids[i] for i in wanted}
    wait_for(
        lambda: federation.online_node_ids() == expected,
        60,
        f"exactly nodes {sorted(wanted)} online",
        interval=1.0,
    )
