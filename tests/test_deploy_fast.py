"""`fedge deploy supernode`: Flower's SuperNode with a responsive poll and a warm worker.

The first tests are quick: the Flower internals the pull schedule patches (they fail
loudly when flwr changes), the schedule itself, the worker's private secret and the
refusals. The slow ones start a real TLS federation on 127.0.0.1 with fast SuperNodes
(LocalDeployment's default): a run completes with one warm worker per node, a stranger
without the node's secret cannot claim the node's tasks, and a worker killed between
SecAgg+ stages is restarted without losing the node's SecAgg+ state or local-DP ledger.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import (
    FlwrRun,
    app_copy,
    cmdline,
    deployment,
    node_log_since_start,
    pids_with_env_prefix,
    read_rows,
    wait_for,
)

from fedge.cli import UserError
from fedge.deploy import LocalDeployment, supernode
from fedge.deploy.supernode import (
    IDLE_SLEEP,
    REPLY_PAUSE,
    REPLY_SLEEP,
    FlowerChanged,
    PullSchedule,
    check_flower_internals,
    install_schedule,
    write_secret,
)
from fedge.deploy.worker import DONE_LINE, STARTED_LINE

NODES = 3


# --- quick: the Flower internals, the schedule, the secret -----------------------------------


def test_flower_internals_are_the_ones_the_schedule_patches() -> None:
    check_flower_internals()  # flwr 1.41: idle `time.sleep(3)`, reply wait `time.sleep(0.5)`


@pytest.mark.parametrize("change", ["version", "idle-sleep", "reply-sleep", "no-time-module"])
def test_a_changed_flower_is_refused_naming_the_fix(
    change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr
    from flwr.supernode import start_client_internal as module

    if change == "version":
        monkeypatch.setattr(flwr, "__version__", "1.42.0")
    elif change == "idle-sleep":
        monkeypatch.setattr(module, "start_client_internal", lambda: time.sleep(1))
    elif change == "reply-sleep":
        monkeypatch.setattr(module, "_push_messages", lambda: time.sleep(0.25))
    else:
        monkeypatch.setattr(module, "time", object())
    with pytest.raises(FlowerChanged, match=r"flwr==1\.41\.\*.*flower-supernode"):
        check_flower_internals()


def test_pull_schedule_backs_off_when_idle_and_starts_short_after_a_message() -> None:
    schedule = PullSchedule(first=0.05, maximum=0.2, growth=2.0)
    idle = [schedule.pause_for(IDLE_SLEEP) for _ in range(5)]
    assert idle == pytest.approx([0.05, 0.1, 0.2, 0.2, 0.2])
    assert schedule.pause_for(REPLY_SLEEP) == REPLY_PAUSE  # busy: the next idle pause is short
    assert schedule.pause_for(IDLE_SLEEP) == pytest.approx(0.05)
    assert schedule.pause_for(1.25) == 1.25  # any other pause of Flower's is kept


def test_pull_schedule_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="--poll-first"):
        PullSchedule(first=1.0, maximum=0.5)


def test_installed_schedule_is_what_flowers_loop_sleeps_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supernode import start_client_internal as module

    monkeypatch.setattr(module, "time", module.time)  # restored after the test
    schedule = PullSchedule(first=0.01, maximum=0.02)
    install_schedule(schedule)
    assert module.time.sleep == schedule.sleep
    assert module.time.monotonic is time.monotonic  # everything else is the time module
    check_flower_internals()  # still recognised once patched


def test_worker_secret_is_readable_by_this_user_only(tmp_path: Path) -> None:
    first = write_secret(tmp_path / "worker")
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700
    old = first.read_bytes()
    second = write_secret(tmp_path / "worker")  # every start: a fresh secret
    assert second == first and len(second.read_bytes()) == 32 and second.read_bytes() != old


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_another_local_user_cannot_read_the_worker_secret(tmp_path: Path) -> None:
    import subprocess

    os.chmod(tmp_path, 0o755)  # the folder above is open; the secret's own folder is not
    secret = write_secret(tmp_path / "worker")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat"]
    result = subprocess.run([*as_nobody, str(secret)], capture_output=True, check=False)
    assert result.returncode != 0 and b"Permission denied" in result.stderr
    control = subprocess.run([*as_nobody, "/etc/hostname"], capture_output=True, check=False)
    assert control.returncode == 0  # the same command reads what it may read


@pytest.mark.parametrize(
    ("flower_args", "refusal"),
    [
        (["--host", "0.0.0.0"], "must stay on 127.0.0.1"),
        (["--isolation", "subprocess"], "--isolation is set by fedge"),
        (["--superexec-auth-secret-file=x"], "--superexec-auth-secret-file is set by fedge"),
    ],
)
def test_warm_worker_refuses_a_runtime_api_others_could_reach(
    flower_args: list[str], refusal: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from flwr.supernode import start_client_internal as module

    monkeypatch.setattr(module, "time", module.time)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    options, rest = supernode.parse_args(flower_args)
    with pytest.raises(UserError, match=refusal):
        supernode.run(options, rest)
    assert not (tmp_path / "fedge-worker").exists()  # refused before anything started


def test_supernode_options_pass_flowers_own_through() -> None:
    options, rest = supernode.parse_args(
        ["--poll-max", "1", "--superlink", "h:9092", "--node-config", "partition-id=0"]
    )
    assert isinstance(options, argparse.Namespace) and options.poll_max == 1.0
    assert options.warm_worker and rest == [
        "--superlink",
        "h:9092",
        "--node-config",
        "partition-id=0",
    ]


# --- slow: a real federation with fast SuperNodes ------------------------------------------


def worker_pids(federation: LocalDeployment, index: int) -> list[int]:
    home = federation.homes_dir / federation.nodes[index].name
    pids = pids_with_env_prefix(f"FLWR_HOME={home}", whole_entry=True)
    return [pid for pid in pids if "fedge.deploy.worker" in cmdline(pid)]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    root = tmp_path_factory.mktemp("fast")
    env = dict(os.environ, FEDGE_NODE_STATE_DIR=str(root / "node-state"))
    with deployment(NODES, root / "deploy", env=env) as started:
        yield started


def run_config(out: Path, name: str, **extra: object) -> dict[str, object]:
    return {
        "num-server-rounds": 2,
        "min-available-nodes": NODES,
        "min-train-nodes": NODES,
        "dataset": "digits",
        "local-epochs": 1,
        "output-dir": str(out),
        "run-name": name,
        **extra,
    }


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_fast_deployed_run_uses_one_warm_worker_per_node(
    federation: LocalDeployment, tmp_path: Path
) -> None:
    assert federation.fast
    workers = {i: worker_pids(federation, i) for i in range(NODES)}
    assert all(len(pids) == 1 for pids in workers.values()), workers
    config = run_config(tmp_path / "out", "plain")
    with FlwrRun(federation, app_copy(tmp_path / "app"), config, tmp_path / "run.log") as run:
        assert run.wait(360) == 0, run.output()[-3000:]
    rows = read_rows(tmp_path / "out" / "plain" / "metrics.jsonl")
    assert [row["num_replies"] for row in rows] == [NODES, NODES]
    assert rows[-1]["test_accuracy"] > 0.5
    for index in range(NODES):
        log = node_log_since_start(federation, index)
        assert log.count(STARTED_LINE) >= 4  # train + evaluate, twice: all in the worker
        assert "Start `flwr-clientapp` process" not in log  # no per-message process
        assert worker_pids(federation, index) == workers[index]  # the same process throughout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_stranger_on_the_node_cannot_claim_its_tasks(federation: LocalDeployment) -> None:
    """The Runtime API port is reachable by any local user; claiming a task needs the secret."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient

    from fedge.deploy.worker import ACQUIRE_METHOD

    def acquire(secret: bytes | None) -> bool:
        """Whether a task was handed out; raises if the SuperNode refuses the caller."""
        interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if secret is not None:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=secret, protected_methods={ACQUIRE_METHOD}
                )
            )
        client = RuntimeHttpClient.from_server_address(
            server_address=f"127.0.0.1:{federation.nodes[0].port}",
            insecure=True,
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=None,  # Flower's own answers a 401 by SIGINT-ing its process
        )
        try:
            request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
            return client.AcquireTask(request).HasField("task")
        finally:
            client.close()

    with pytest.raises(Exception, match=r"401") as refused:
        acquire(None)
    with pytest.raises(type(refused.value)):
        acquire(b"a guessed secret")
    secret = federation.homes_dir / "supernode-0" / "fedge-worker" / supernode.SECRET_NAME
    assert acquire(secret.read_bytes()) is False  # the node's own secret is let in (idle: no task)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_worker_killed_between_secagg_stages_is_restarted_and_loses_nothing(
    federation: LocalDeployment, tmp_path: Path
) -> None:
    config = run_config(tmp_path / "out", "killed", secagg=True, **{"local-dp": True})
    before = worker_pids(federation, 0)
    log_path = federation.supernodes[0].log_path
    offset = log_path.stat().st_size
    with FlwrRun(federation, app_copy(tmp_path / "app"), config, tmp_path / "run.log") as run:
        # Two tasks done on node 0: round 1 is between SecAgg+ stages, its keys in
        # context.state and its ε charged to the ledger file.
        wait_for(
            lambda: log_path.read_bytes()[offset:].decode(errors="replace").count(DONE_LINE) >= 2,
            300,
            "node 0's worker to finish two tasks",
            interval=0.05,
        )
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        restarted = wait_for(lambda: worker_pids(federation, 0), 30, "a new worker")
        assert set(restarted).isdisjoint(before)
        assert run.wait(540) == 0, run.output()[-3000:]
    rows = read_rows(tmp_path / "out" / "killed" / "metrics.jsonl")
    assert [row["num_replies"] for row in rows] == [NODES, NODES]  # node 0 kept its SecAgg+ keys
    # Every node's ledger (node 0's too) charged both rounds: 1 epoch of 1/q steps each.
    ledgers = sorted(Path(federation._base_env["FEDGE_NODE_STATE_DIR"]).glob("local-dp-*.json"))
    assert len(ledgers) == NODES
    for ledger in ledgers:
        history = json.loads(ledger.read_text())["history"]
        steps = sum(entry[2] for entry in history)
        assert steps == 2 * round(1 / history[0][1]), (ledger, history)
