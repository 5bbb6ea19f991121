"""A real federation on 127.0.0.1: flower-superlink + 3 flower-supernode, TLS and auth on.

One module-scoped deployment serves the tests in file order (refusals, garbage,
then full runs), which saves a minute of start-up per test. Node crashes and restarts
are tests/test_deploy_faults.py's (a SuperNode killed mid-round rejoins). Everything
listens on 127.0.0.1 only, on ports the OS reports free, and teardown checks that
no process started here survives (by FLWR_HOME in each process's environment).
`flwr run` gets a copy of the project: it would otherwise rewrite pyproject.toml.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import (
    HOST,
    REPO,
    app_copy,
    deployment,
    kill_leftovers,
    log_since,
    pids_with_env_prefix,
    wait_exit,
)

from fedge.deploy import LocalDeployment
from fedge.deploy.certs import create_certificates, generate_node_keypair

NODES = 3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc"),
]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    with deployment(NODES, tmp_path_factory.mktemp("deploy")) as started:
        yield started


# --- (b) SuperNodes the SuperLink must refuse ---------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", ["unregistered-key", "no-key", "untrusted-ca"])
def test_deploy_refuses_unauthenticated_supernode(
    federation: LocalDeployment, tmp_path: Path, case: str
) -> None:
    assert federation.superlink is not None and federation.certs is not None
    members = set(federation.node_ids.values())
    offset = federation.superlink.log_path.stat().st_size
    root = None
    if case == "no-key":
        key = None  # Flower makes up a key and asks to self-register
    else:
        key, pub = tmp_path / "intruder.key", tmp_path / "intruder.pub"
        generate_node_keypair(key, pub)
    if case == "untrusted-ca":
        root = create_certificates(tmp_path / "other-ca").certs.ca_cert

    intruder = federation.start_extra_supernode(
        f"intruder-{case}",
        private_key=key,
        node_config={"partition-id": 0, "num-partitions": NODES},
        root_certificates=root,
        max_retries=1,
    )
    code = wait_exit(lambda: intruder.returncode, 150)
    node_log = intruder.log_path.read_text(errors="replace")
    link_log = log_since(federation.superlink.log_path, offset)
    assert code is not None, f"the intruder is still running:\n{node_log[-2000:]}"
    assert code != 0
    # A node id is only logged once the SuperLink has let a node in (then it pulls messages).
    assert "SuperNode ID" not in node_log
    if case == "unregistered-key":
        assert "Failed to activate SuperNode" in node_log
        assert "No SuperNode found with the given public key" in link_log
    elif case == "no-key":
        assert "All SuperNodes must be registered via the CLI" in node_log
        assert "/v1/fleet/register-node" in link_log
    else:
        assert "CERTIFICATE_VERIFY_FAILED" in node_log or "certificate verify" in node_log
        assert "/v1/fleet/" not in link_log  # TLS failed before any request was made
    online = federation.online_node_ids()
    assert online == members, f"intruder changed the federation: {online} vs {members}"


# --- (c) garbage, oversized and half-open connections -------------------------------------


class Attacker:
    """Bounded abuse of one HTTPS port on 127.0.0.1; every socket has a timeout."""

    def __init__(self, port: int, ca_cert: Path) -> None:
        self.port = port
        self.ca_cert = ca_cert
        self.context = ssl.create_default_context(cafile=str(ca_cert))
        self.rng = random.Random(1234)
        self.statuses: dict[str, list[int]] = {}

    def tcp(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection((HOST, self.port), timeout=timeout)

    def tls(self, alpn: list[str] | None = None, timeout: float = 10.0) -> ssl.SSLSocket:
        context = self.context
        if alpn:
            context = ssl.create_default_context(cafile=str(self.ca_cert))
            context.set_alpn_protocols(alpn)
        return context.wrap_socket(self.tcp(timeout), server_hostname=HOST)

    def noise(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def send(self, sock: socket.socket, data: bytes) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)

    def exchange(
        self, label: str, data: bytes, *, alpn: list[str] | None = None, wait: float = 10.0
    ) -> None:
        """Send `data` over a fresh TLS connection; note the HTTP status (0: none in `wait` s)."""
        try:
            sock = self.tls(alpn)
        except (OSError, ssl.SSLError):
            self.statuses.setdefault(label, []).append(-1)
            return
        with sock:
            self.send(sock, data)
            sock.settimeout(wait)
            reply = b""
            with contextlib.suppress(OSError, ssl.SSLError):
                while len(reply) < 65536:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
        match = re.match(rb"HTTP/1\.[01] (\d{3})", reply)
        self.statuses.setdefault(label, []).append(int(match.group(1)) if match else 0)

    def post(self, path: str, body: bytes, content_type: str = "application/protobuf") -> bytes:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        return head.encode() + body


ROUTES = [
    "/v1/fleet/register-node",
    "/v1/fleet/activate-node",
    "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages",
    "/v1/fleet/push-object",
    "/v1/fleet/get-fab",
    "/v1/control/start-run",
    "/v1/control/list-runs",
    "/v1/control/register-node",
    "/v1/runtime/pull-task-input",
    "/v1/runtime/push-task-output",
    "/no/such/route",
]


@pytest.mark.timeout(300)
def test_deploy_superlink_survives_garbage(federation: LocalDeployment) -> None:
    """Garbage at the address devices get: the Fleet gateway, and the SuperLink behind it."""
    assert federation.superlink is not None and federation.certs is not None
    members = set(federation.node_ids.values())
    attacker = Attacker(federation.fleet_port, federation.certs.ca_cert)

    # 1. Raw bytes where a TLS handshake belongs, incl. a fake record header.
    for size in (1, 5, 517, 4096, 65536):
        with contextlib.closing(attacker.tcp()) as sock:
            attacker.send(sock, attacker.noise(size))
        with contextlib.closing(attacker.tcp()) as sock:
            attacker.send(sock, b"\x16\x03\x01\xff\xff" + attacker.noise(size))

    # 2. Half-open connections held while the SuperLink must keep serving others.
    held: list[socket.socket] = []
    try:
        for _ in range(48):
            held.append(attacker.tcp())  # TCP only, no TLS handshake
        for _ in range(16):
            sock = attacker.tls()
            attacker.send(sock, attacker.post("/v1/fleet/pull-messages", b"")[:-4])  # no end
            held.append(sock)
        for _ in range(8):
            sock = attacker.tls()
            head = attacker.post("/v1/fleet/push-object", b"")
            head = head.replace(b"Content-Length: 0", b"Content-Length: 1000000000")
            attacker.send(sock, head + attacker.noise(1 << 16))  # then stall
            held.append(sock)
        assert federation.healthy(timeout=30), "SuperLink stopped answering while held open"
        assert federation.healthy(timeout=30, port=federation.fleet_port), "gateway stopped"
    finally:
        for sock in held:
            sock.close()

    # 3. Random bytes inside TLS, and malformed HTTP/1.1.
    for size in (1, 100, 10_000):
        attacker.exchange("tls-noise", attacker.noise(size))
    attacker.exchange("bad-request-line", b"\x00\xffGARBAGE \x01 HTTP/9.9\r\n\r\n")
    attacker.exchange("huge-header", b"GET /health HTTP/1.1\r\nX-Junk: " + b"a" * (1 << 20))
    attacker.exchange(
        "bad-chunked",
        b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/protobuf\r\n\r\nzzzz\r\n" + attacker.noise(300),
    )
    attacker.exchange(
        "lying-length",
        attacker.post("/v1/fleet/push-object", b"")[:-4].replace(
            b"Content-Length: 0", b"Content-Length: 9999999999"
        )
        + b"\r\n\r\n"
        + attacker.noise(1 << 20),
        wait=3.0,
    )

    # 4. Well-formed HTTP with garbage or oversized protobuf bodies on every API.
    for route in ROUTES:
        for size in (0, 7, 4096):
            attacker.exchange(f"{route} {size}B", attacker.post(route, attacker.noise(size)))
    attacker.exchange("oversized", attacker.post("/v1/fleet/push-object", attacker.noise(32 << 20)))
    forged = (
        f"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: {HOST}\r\n"
        "Content-Type: application/protobuf\r\nContent-Length: 3\r\nConnection: close\r\n"
        f"flwr-public-key: {base64.b64encode(attacker.noise(120)).decode()}\r\n"
        f"flwr-signature: {base64.b64encode(attacker.noise(96)).decode()}\r\n"
        "flwr-timestamp: 2020-01-01T00:00:00+00:00\r\n\r\n"
    ).encode() + b"\x0a\x01\x00"
    attacker.exchange("forged-node-auth", forged)

    # 5. HTTP/2 and gRPC framing the SuperLink does not speak (it serves HTTP/1.1).
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    frames = b"\x00\x00\x12\x04\x00\x00\x00\x00\x00" + attacker.noise(18)  # bogus SETTINGS
    frames += b"\xff\xff\xff\x01\x05\x7f\xff\xff\xff" + attacker.noise(2000)  # huge HEADERS
    attacker.exchange("h2-preface", preface + frames, alpn=["h2"])
    grpc_body = b"\x00" + (10_000_000).to_bytes(4, "big") + attacker.noise(500)
    attacker.exchange(
        "grpc-frame", attacker.post("/flwr.proto.Fleet/PullMessages", grpc_body, "application/grpc")
    )

    # 6. A bounded burst from several threads at once.
    def burst() -> None:
        for _ in range(15):
            attacker.exchange("burst", attacker.post("/v1/fleet/pull-messages", b"\x0a\x05junk"))

    threads = [threading.Thread(target=burst) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    # The SuperLink and gateway are up, the Control API answers, every SuperNode is still in.
    assert federation.superlink.alive(), federation.superlink.tail()
    assert federation.gateway is not None and federation.gateway.alive()
    assert federation.healthy(timeout=30)
    assert federation.healthy(timeout=30, port=federation.fleet_port)
    runs = federation.flwr("ls", federation.connection, "--format", "json")
    assert json.loads(runs.stdout[runs.stdout.index("{") :])["success"] is True
    assert federation.online_node_ids() == members
    server_errors = {
        label: codes
        for label, codes in attacker.statuses.items()
        if any(code >= 500 for code in codes)
    }
    assert not server_errors, f"5xx answers to garbage: {server_errors}"
    # Every protobuf request reached the HTTP layer and got an answer (not just a TLS drop).
    answered = {label: codes for label, codes in attacker.statuses.items() if label[0] == "/"}
    assert len(answered) == 3 * len(ROUTES)
    assert all(codes and codes[0] > 0 for codes in answered.values()), answered


# --- (a) the fedge app on the deployed federation --------------------------------------------

# (rounds, extra run-config, accuracy the last round must beat); chance is 0.1 on digits.
# Add a privacy mode with one line, e.g. pytest.param(1, "dp-mode='central'", 0.3, id="dp").
# Each entry costs ~1 minute per round on 2 busy cores (a flwr-clientapp per message).
RUN_CONFIGS = [
    pytest.param(2, "", 0.7, id="fedavg"),
    pytest.param(1, "secagg=true", 0.7, id="secagg"),
]


@pytest.mark.timeout(420)
@pytest.mark.parametrize(("rounds", "extra", "min_accuracy"), RUN_CONFIGS)
def test_deploy_tls_auth_run_learns(
    federation: LocalDeployment, tmp_path: Path, rounds: int, extra: str, min_accuracy: float
) -> None:
    pyproject = (REPO / "pyproject.toml").read_bytes()
    app = app_copy(tmp_path / "app")
    out = tmp_path / "out"
    run_config = (
        f"num-server-rounds={rounds} output-dir='{out}' run-name='x' local-epochs=2 "
        f"min-available-nodes={NODES} min-train-nodes={NODES} fraction-evaluate=0.0 {extra}"
    )
    result = federation.flwr(
        "run",
        str(app),
        federation.connection,
        "--stream",
        "--run-config",
        run_config.strip(),
        timeout=360,
        check=False,
    )
    assert (REPO / "pyproject.toml").read_bytes() == pyproject, "flwr rewrote pyproject.toml"
    metrics = out / "x" / "metrics.jsonl"
    assert result.returncode == 0 and metrics.exists(), (
        f"flwr run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
    )
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    assert [row["round"] for row in rows] == list(range(1, rounds + 1))
    assert all(row["num_replies"] == NODES for row in rows), rows
    assert rows[-1]["test_accuracy"] > min_accuracy, rows


# --- the CLI: Ctrl-C / SIGTERM stop everything --------------------------------------------------


@pytest.mark.timeout(300)
def test_deploy_cli_sigterm_stops_everything(tmp_path: Path) -> None:
    directory = tmp_path / "cli"
    argv = [sys.executable, "-m", "fedge.cli", "deploy", "local", "--nodes", "1"]
    argv += ["--insecure", "--port-base", "0", "--dir", str(directory), "--timeout", "240"]
    process = subprocess.Popen(
        argv,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        command = None
        assert process.stdout is not None
        deadline = time.monotonic() + 260
        while command is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if " flwr run . fedge-local --stream" in line:
                command = line.strip()
        output = "".join(lines)
        assert command == f"FLWR_HOME={directory}/flwr-home flwr run . fedge-local --stream", output
        running = pids_with_env_prefix(f"FLWR_HOME={directory}")
        assert len(running) >= 2, running  # SuperLink, SuperNode and their helpers

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0
        rest, _ = process.communicate(timeout=10)
        assert "stopping" in rest
        assert pids_with_env_prefix(f"FLWR_HOME={directory}") == []
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        leaked = kill_leftovers(f"FLWR_HOME={directory}")
        assert not leaked, f"left running: {leaked}"
