"""`fedge run`: `flwr run` with an exit status scripts and CI can trust.

`flwr run` exits 0 once it has submitted a run, whatever becomes of the run. `fedge run`
checks the config first (`fedge check`, exit 2, nothing started), then runs `flwr run`
with the same arguments, shows its output, and asks the SuperLink for the run's final
status (`flwr ls --run-id N --format json`): 0 for finished:completed, 1 otherwise.
Without `--stream` it waits for the run to finish.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

from fedge.check import CONFIG_REFUSED, FlwrRunArgs, add_flwr_run_arguments, checked
from fedge.cli import reports_errors

RUN_FAILED = 1
INTERRUPTED = 130
COMPLETED = "finished:completed"
FIRST_POLL_SECONDS, MAX_POLL_SECONDS = 1.0, 16.0
"""A streamed run has finished by the first poll; each `flwr ls` costs about a CPU second."""
_RUN_ID = re.compile(r'Successfully started run (\d+)|"run-id": "(\d+)"')


class RunStatusError(RuntimeError):
    """The SuperLink could not say how the run ended."""


def run_id_in(line: str) -> int | None:
    """The run id `flwr run` prints (plain or `--format json`)."""
    found = _RUN_ID.search(line)
    return int(found.group(1) or found.group(2)) if found else None


def run_status(flwr: str, run_id: int, superlink: str | None) -> tuple[str, str]:
    """(status, details) of a run as `flwr ls` reports it, e.g. ("finished:failed", "...")."""
    from fedge.deploy.local import _json_from

    argv = [flwr, "ls", *([superlink] if superlink else []), "--run-id", str(run_id)]
    result = subprocess.run(
        [*argv, "--format", "json"], capture_output=True, text=True, check=False, timeout=120
    )
    payload = _json_from(result.stdout)
    runs = payload.get("runs") or []
    if not payload.get("success") or not runs:
        reason = payload.get("error-message") or (result.stdout + result.stderr).strip()[-300:]
        raise RunStatusError(f"`{' '.join(argv)}` did not report the run: {reason}")
    return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


def final_status(flwr: str, run_id: int, superlink: str | None) -> tuple[str, str]:
    """Wait until the run has finished (a streamed run has; a detached one may take hours)."""
    delay = FIRST_POLL_SECONDS
    while True:
        status, details = run_status(flwr, run_id, superlink)
        if status.startswith("finished"):
            return status, details
        time.sleep(delay)
        delay = min(2 * delay, MAX_POLL_SECONDS)


def stream_flwr_run(flwr: str, argv: list[str]) -> tuple[int, int | None]:
    """Run `flwr run ARGV`, echoing its output; returns its exit code and the run id."""
    run_id = None
    with subprocess.Popen(
        [flwr, "run", *argv], stdout=subprocess.PIPE, text=True, errors="replace", bufsize=1
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            run_id = run_id or run_id_in(line)
        return process.wait(), run_id


@reports_errors
def run_command(args: argparse.Namespace) -> int:
    from fedge.deploy.local import _executable

    parsed = FlwrRunArgs.parse(args.flwr_args)
    if parsed.remote:
        print(f"fedge run: {parsed.app} is a remote app; its config is not checked here")
    elif checked(parsed) is None:
        return CONFIG_REFUSED
    flwr = _executable("flwr")
    run_id = None
    try:
        code, run_id = stream_flwr_run(flwr, list(args.flwr_args))
        if code != 0:
            print(f"error: `flwr run` exited with status {code}", file=sys.stderr)
            return code
        if run_id is None:
            print(
                "error: `flwr run` printed no run id; the run's status is unknown", file=sys.stderr
            )
            return RUN_FAILED
        status, details = final_status(flwr, run_id, parsed.superlink)
    except KeyboardInterrupt:
        after = f"; run {run_id} goes on in the SuperLink (`flwr stop {run_id}` ends it)"
        print(f"fedge run: interrupted{after if run_id else ''}", file=sys.stderr)
        return INTERRUPTED
    except RunStatusError as error:
        print(f"error: {error}", file=sys.stderr)
        return RUN_FAILED
    if status == COMPLETED:
        print(f"fedge run: run {run_id} {status}", file=sys.stderr)
        return 0
    print(f"error: run {run_id} {status}: {details}", file=sys.stderr)
    return RUN_FAILED


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run",
        help="`fedge check`, then `flwr run` with the same arguments; exits non-zero "
        "unless the run completed",
        description="Exit status: 0 = the run completed, 1 = it failed or was stopped, "
        "2 = the config was refused before anything started, else `flwr run`'s own.",
    )
    add_flwr_run_arguments(run)
    run.set_defaults(func=run_command, passes_flwr_args=True)
