"""Start and stop Flower processes so that nothing outlives its owner.

Flower's processes spawn their own helpers (`flower-superexec`, `flwr-serverapp`,
`flwr-clientapp`), and the SuperLink starts its SuperExec in a *new session*, so
signalling one process group is not enough. Each process therefore runs in its own
session, and stopping it also signals every descendant seen before and during the stop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

ProcessKey = tuple[int, str]
"""(pid, start time): a pid alone may be reused by an unrelated process."""


class ManagedProcess:
    """One long-running command with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._descendants: set[ProcessKey] = set()
        self._terminated = False

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        """Start in a new session (terminal Ctrl-C goes to us, and we stop it in order)."""
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log = self.log_path.open("ab")
        self._log.write(f"\n=== fedge: starting {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self._descendants = set()
        self._terminated = False
        self._popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def wait(self, timeout: float | None = None) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._popen.wait(timeout)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process, its group and its descendants; SIGKILL what is left."""
        stop_all([self], timeout)

    def terminate(self) -> None:
        """Ask once for a graceful exit (Flower deregisters on SIGTERM; twice may cut that)."""
        if self._popen is not None and not self._terminated:
            self._terminated = True
            self._signal_all(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL everything at once, like a power cut (no graceful deregistration)."""
        if self._popen is None:
            return
        self._signal_all(signal.SIGKILL)
        self._wait_gone(5.0)
        self._reap()
        self._close_log()

    def leftover_processes(self) -> list[int]:
        """Pids of this process or its descendants that are still running (for checks)."""
        self._remember_descendants()
        running = [pid for pid, start in self._descendants if _start_time(pid) == start]
        if self.alive() and self.pid is not None:
            running.append(self.pid)
        return running

    def tail(self, lines: int = 30) -> str:
        """The end of the log, to quote in an error message."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # --- internals --------------------------------------------------------------------

    def track(self) -> None:
        """Note the current descendants, so they are stopped even once orphaned."""
        self._remember_descendants()

    def _remember_descendants(self) -> None:
        roots = {self.pid} if self.alive() and self.pid is not None else set()
        roots |= {pid for pid, start in self._descendants if _start_time(pid) == start}
        for pid in _descendants_of(roots):
            start = _start_time(pid)
            if start is not None:
                self._descendants.add((pid, start))

    def _signal_all(self, sig: signal.Signals) -> None:
        self._remember_descendants()
        if self.pid is not None:
            # The group outlives its leader while members remain, and Linux never hands
            # out a pid that is still some group's id, so this reaches only our processes.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
        for pid, start in self._descendants:
            if _start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    def _anything_alive(self) -> bool:
        if self.alive():
            return True
        return any(_start_time(pid) == start for pid, start in self._descendants)

    def _finish(self) -> None:
        self._reap()
        self._close_log()

    def _wait_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._anything_alive():
            time.sleep(0.05)

    def _reap(self) -> None:
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=5.0)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def stop_all(processes: Sequence[ManagedProcess], timeout: float = 20.0) -> None:
    """Stop several processes in parallel: SIGTERM all, wait, SIGKILL the stragglers."""
    started = [p for p in processes if p._popen is not None]
    for process in started:
        process.terminate()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p._anything_alive() for p in started):
        for process in started:
            process._remember_descendants()
        time.sleep(0.1)
    for process in started:
        if process._anything_alive():
            process._signal_all(signal.SIGKILL)
    for process in started:
        process._wait_gone(5.0)
        process._finish()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM this child if the deploying process dies without cleaning up.

    Caveat: the kernel fires this when the *thread* that started the child exits, so
    start deployments from a thread that lives as long as they should.
    """
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


# --- /proc helpers (Linux), with a `ps` fallback elsewhere -----------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or ')'.
    return raw[raw.rfind(")") + 2 :].split()


def _start_time(pid: int) -> str | None:
    """Start time of a live (non-zombie) process, or None."""
    if Path("/proc").is_dir():
        fields = _stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return None
        return fields[19]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "?"


def _parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    if Path("/proc").is_dir():
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = _stat_fields(int(entry.name))
                if fields is not None and fields[0] not in ("Z", "X"):
                    parents[int(entry.name)] = int(fields[1])
        return parents
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=True
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                parents[int(parts[0])] = int(parts[1])
    return parents


def _descendants_of(roots: set[int]) -> set[int]:
    if not roots:
        return set()
    children: dict[int, list[int]] = {}
    for pid, ppid in _parent_map().items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and child not in roots:
                found.add(child)
                stack.append(child)
    return found


# --- Ports ------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False
