"""The same simulation on an existing two-node Ray cluster (`ray start`, loopback only).

A head and a worker are started as separate `ray start --block` processes, each
with one CPU, so Flower's actor pool (one CPU per ClientApp) holds one actor per
node. A recording ClientApp, which hands every message to fedge's real ClientApp,
notes the Ray node that ran it: the cluster run must show both nodes, the
single-machine run one. Stopping a `ray start --block` process stops its node;
`ray stop` is never used, as it would kill every Ray process on the machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import ray
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedge.client_app import app as fedge_client_app
from fedge.simulation import run_inprocess

LOOPBACK = "127.0.0.1"
CONFIG = {
    "partitioner": "iid",
    "seed": 11,
    "num-server-rounds": 3,
    "fraction-evaluate": 0.0,
    "local-epochs": 1,
}
NODES = 4
START_TIMEOUT_S = 180


class NodeRecordingClientApp(ClientApp):
    """fedge's ClientApp, plus a file per message naming the Ray node that ran it."""

    def __init__(self, record_dir: Path) -> None:
        super().__init__()
        self.record_dir = record_dir

    def __call__(self, message: Message, context: Context) -> Message:
        node_id = ray.get_runtime_context().get_node_id()
        kind = message.metadata.message_type
        (self.record_dir / f"{uuid.uuid4().hex}.json").write_text(
            json.dumps({"node": node_id, "type": kind})
        )
        return fedge_client_app(message, context)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _ray_start(args: list[str], temp_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    """One Ray node in the foreground (`--block`), in its own process group."""
    temp_dir.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(temp_dir)}
    env.pop("RAY_ADDRESS", None)
    with log.open("wb") as out:
        return subprocess.Popen(
            [shutil.which("ray") or "ray", "start", "--block", "--disable-usage-stats", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _wait_started(proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while b"Ray runtime started" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start did not come up:\n{log.read_text(errors='replace')}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM lets `ray start --block` stop its node; then its group, by id."""
    if proc.poll() is None:
        proc.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def two_node_cluster() -> Iterator[str]:
    """A head and a worker, one CPU each, addressed on 127.0.0.1; yields the head's address."""
    # Ray's socket paths must stay short, so not pytest's deep tmp_path.
    root = Path(tempfile.mkdtemp(prefix="fedge-ray-", dir="/tmp"))
    address = f"{LOOPBACK}:{_free_port()}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        head_log, worker_log = root / "head.log", root / "worker.log"
        head_args = ["--head", f"--node-ip-address={LOOPBACK}", f"--port={address.split(':')[1]}"]
        head_args += ["--num-cpus=1", "--include-dashboard=false", f"--temp-dir={root / 'head'}"]
        procs.append(_ray_start(head_args, root / "head", head_log))
        _wait_started(procs[0], head_log)
        worker_args = [f"--address={address}", f"--node-ip-address={LOOPBACK}", "--num-cpus=1"]
        procs.append(_ray_start(worker_args, root / "worker", worker_log))
        _wait_started(procs[1], worker_log)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


Rows = list[dict[str, Any]]


def _run(tmp_path: Path, name: str, ray_address: str | None) -> tuple[Rows, Counter[str]]:
    """One run; returns its metrics rows and how many train messages each Ray node ran."""
    record_dir = tmp_path / f"{name}-calls"
    record_dir.mkdir()
    run_inprocess(
        {**CONFIG, "output-dir": str(tmp_path), "run-name": name},
        num_supernodes=NODES,
        client_app=NodeRecordingClientApp(record_dir),
        ray_address=ray_address,
    )
    lines = (tmp_path / name / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    calls = [json.loads(path.read_text()) for path in record_dir.iterdir()]
    trains = Counter(call["node"] for call in calls if call["type"] == "train")
    return [json.loads(line) for line in lines if line.strip()], trains


@pytest.mark.slow
def test_ray_cluster_run_matches_the_single_machine_run(tmp_path: Path) -> None:
    single_rows, single_nodes = _run(tmp_path, "single", ray_address=None)
    with two_node_cluster() as address:
        cluster_rows, cluster_nodes = _run(tmp_path, "cluster", ray_address=address)

    # The recorder tells nodes apart: one private Ray node, then both cluster nodes.
    assert len(single_nodes) == 1 and sum(single_nodes.values()) == 3 * NODES
    assert len(cluster_nodes) == 2 and sum(cluster_nodes.values()) == 3 * NODES
    assert single_nodes.keys().isdisjoint(cluster_nodes.keys())

    assert [row["round"] for row in cluster_rows] == [1, 2, 3]
    for row in cluster_rows:
        assert (row["num_replies"], row["num_rejected"]) == (NODES, 0)
    # Same seed, same partitions, same arithmetic: where a client ran does not matter.
    for row, ref in zip(cluster_rows, single_rows, strict=True):
        assert row["test_accuracy"] == ref["test_accuracy"], row["round"]
        for key in ("test_loss", "train_loss"):
            assert math.isclose(row[key], ref[key], rel_tol=1e-6), (row["round"], key)
    assert cluster_rows[-1]["test_accuracy"] > 0.5  # chance is 0.1


@pytest.mark.timeout(60)
def test_an_address_where_no_ray_head_answers_fails_in_seconds(tmp_path: Path) -> None:
    # Unchecked, ray.init would retry this address for minutes (measured: over 300 s).
    closed = f"{LOOPBACK}:{_free_port()}"
    with pytest.raises(ConnectionError, match="ray start --head"):
        run_inprocess({**CONFIG, "output-dir": str(tmp_path)}, ray_address=closed)
    with pytest.raises(ValueError, match="host:port"):
        run_inprocess({**CONFIG, "output-dir": str(tmp_path)}, ray_address="auto")
    assert not ray.is_initialized() and not any(tmp_path.iterdir())
