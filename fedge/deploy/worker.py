"""The warm ClientApp worker of `fedge deploy supernode` (one per SuperNode).

Flower's `flwr-clientapp` runs one message and exits, so each message pays for a fresh
Python, torch and the data stack. This worker claims the SuperNode's tasks the way
Flower's SuperExec does (`AcquireTask`, authenticated with the SuperExec secret), and
runs each through Flower's own task steps (`pull_task_input`, the ClientApp,
`push_message`, `push_task_output`) in this one process, keeping the loaded ClientApp,
and with it fedge's per-process data and partition caches, across messages.

What must survive a crash does not live here: `context.state` (SecAgg+ keys and shares)
is pulled from and pushed back to the SuperNode with every task, as with
`flwr-clientapp`, and the local-DP ledger is a file. A worker killed mid-task leaves the
task to Flower's expiry (the SuperNode answers with an error reply); its supervisor starts
a new worker. Only the app this worker loaded first runs warm: a task of another app
(another FAB) is handed to Flower's `flwr-clientapp`, as Flower would run it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import subprocess
import sys
import time
from pathlib import Path

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedge.deploy.supernode import (
    OBJECT_PULL_BACKOFF,
    Backoff,
    check_flower_internals,
    quiet_logs,
)

logger = logging.getLogger("fedge.worker")

ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
STARTED_LINE = "fedge worker: start ClientApp task"  # benchmarks/deploy_latency.py reads it
DONE_LINE = "fedge worker: task done"  # its reply and context are with the SuperNode


def quick_object_pulls() -> None:
    """Retry a message's not-yet-stored objects after 10 ms, not Flower's 1, 2, 4 ... s.

    The SuperNode hands out a task before it has pulled the message's objects from the
    SuperLink; a cold `flwr-clientapp` starts slowly enough not to notice, a warm worker
    asks at once and would sleep out Flower's 1 s first backoff and more.
    """
    check_flower_internals()
    inflate = run_clientapp.pull_and_inflate_object_from_tree
    if not isinstance(inflate, functools.partial):
        run_clientapp.pull_and_inflate_object_from_tree = functools.partial(  # type: ignore[assignment]
            inflate, **OBJECT_PULL_BACKOFF
        )


class Worker:
    """Claims this node's ClientApp tasks and runs them in this process."""

    def __init__(self, runtime_api_address: str, secret: bytes) -> None:
        self.address = runtime_api_address
        self.poll = Backoff(first=0.01, maximum=0.25)
        self.warm_fab: str | None = None
        self.app: ClientApp | None = None
        self.client = self._client(
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods=frozenset({ACQUIRE_METHOD})
            ),
        )

    def _client(self, *interceptors: object) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,  # 127.0.0.1 only; the secret, not TLS, keeps other users out
            root_certificates=None,
            interceptors=list(interceptors),
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def serve_forever(self) -> None:
        while True:
            if self.serve_one():
                self.poll.reset()
            else:
                time.sleep(self.poll.next())

    def serve_one(self) -> bool:
        """Claim and run one task if there is one; whether there was."""
        response = self.client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        )
        if not (response.HasField("task") and response.token):
            return False
        if self.warm_fab not in (None, response.task.fab_hash):
            self._hand_to_flower(response.token)
        else:
            self.run_task(response.token)
        return True

    def run_task(self, token: str) -> None:
        """Flower's flwr-clientapp steps for one task, with the ClientApp kept loaded."""
        print(STARTED_LINE, flush=True)
        client = self._client(
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context, reply = None, None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client)
            try:
                reply = self._load(run, fab)(message=message, context=context)
                sub_status, details = SubStatus.COMPLETED, ""
            except Exception as ex:  # the node answers with an error, as flwr-clientapp does
                logger.exception("ClientApp raised an exception")
                code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
                details = f"{type(ex)}:<'{ex}'>"
                if isinstance(ex, LoadClientAppError):
                    code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                    details = "An exception was raised when attempting to load `ClientApp`"
                reply = Message(Error(code=code, reason=details), reply_to=message)
            push_message(client, reply, context)
        finally:
            push_task_output(client, context, sub_status, details)
            heartbeat.stop()
            client.close()
        print(DONE_LINE, flush=True)

    def _load(self, run: object, fab: object) -> ClientApp:
        fab_hash = fab.hash_str  # type: ignore[attr-defined]
        if self.app is None:
            install_from_fab(fab.content, skip_prompt=True)  # type: ignore[attr-defined]
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.app = load(run.fab_id, run.fab_version, fab_hash)  # type: ignore[attr-defined]
            self.warm_fab = fab_hash
        return self.app

    def _hand_to_flower(self, token: str) -> None:
        """Another app than the warm one: run it as Flower would, in its own process."""
        flwr_clientapp = Path(sys.executable).parent / "flwr-clientapp"
        argv = [str(flwr_clientapp), "--runtime-api-address", self.address]
        subprocess.run([*argv, "--token", token, "--insecure"], check=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedge.deploy.worker")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--superexec-auth-secret-file", required=True)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_logs()
    quick_object_pulls()
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
    assert secret is not None
    Worker(args.runtime_api_address, secret).serve_forever()


if __name__ == "__main__":
    main()
