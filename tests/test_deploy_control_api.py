"""A device holding `ca.crt` cannot reach the Control API of `fedge deploy local`.

Real processes on 127.0.0.1 (flower-superlink, the fleet gateway, flower-supernode, the
`flwr` CLI), TLS and SuperNode auth on, FLWR_HOME in temp dirs. The intruder gets what a
device gets: `ca.crt` and the Fleet address. Each refusal is shown to come from the
gateway (its log names the refused route, and the same request to the SuperLink's own
loopback address is served), not from a typo in the test.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import HOST, app_copy, deployment, log_since, wait_exit, wait_for

from fedge.deploy import LocalDeployment
from fedge.deploy.certs import generate_node_keypair
from fedge.deploy.flwr_config import write_connection
from fedge.deploy.gateway import DEFAULT_MAX_BODY, REFUSAL, fleet_routes
from fedge.deploy.local import _executable, _json_from

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc"),
]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    with deployment(1, tmp_path_factory.mktemp("control")) as started:
        yield started


def _cli(home: Path, address: str, ca: Path, *args: str) -> tuple[dict[str, Any], str]:
    """`flwr ARGS` with a connection `c` to `address` in a fresh FLWR_HOME."""
    write_connection(home, "c", address, root_certificates=ca)
    result = subprocess.run(
        [_executable("flwr"), *args],
        cwd=home,
        env={**os.environ, "FLWR_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    return _json_from(result.stdout), result.stdout + result.stderr


def _post(
    federation: LocalDeployment, port: int, path: str, method: str = "POST"
) -> tuple[int, bytes]:
    assert federation.certs is not None
    context = ssl.create_default_context(cafile=str(federation.certs.ca_cert))
    connection = http.client.HTTPSConnection(HOST, port, timeout=30, context=context)
    try:
        connection.request(method, path, body=b"", headers={"content-type": "application/protobuf"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _gateway_log(federation: LocalDeployment, offset: int) -> str:
    assert federation.gateway is not None
    return log_since(federation.gateway.log_path, offset)


# --- what each listener is bound to ----------------------------------------------------------


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of TCP sockets in LISTEN state held by `pids` (from /proc)."""
    inodes = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir() if fd_dir.is_dir() else []:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw_ip, raw_port = fields[1].split(":")
            found.add((_ip(raw_ip, v6), int(raw_port, 16)))
    return found


def _ip(raw: str, v6: bool) -> str:
    import ipaddress

    data = bytes.fromhex(raw)
    # /proc prints each 32-bit word in host (little-endian) order.
    words = b"".join(data[i : i + 4][::-1] for i in range(0, len(data), 4))
    return str(ipaddress.IPv6Address(words) if v6 else ipaddress.IPv4Address(words))


def test_control_api_listens_on_loopback_only(federation: LocalDeployment) -> None:
    assert federation.superlink is not None and federation.gateway is not None
    link_pids = {federation.superlink.pid, *federation.superlink.leftover_processes()}
    link = _listening({pid for pid in link_pids if pid is not None})
    # The SuperLink and its helpers hold one listener: Control + Runtime + Fleet, on loopback.
    # No legacy gRPC Control/Fleet server (Flower's defaults would be 0.0.0.0:9091/9093).
    assert link == {("127.0.0.1", federation.superlink_port)}, link
    gateway = _listening({pid for pid in federation.gateway.leftover_processes()})
    assert gateway == {("127.0.0.1", federation.fleet_port)}, gateway
    # The SuperNode was given the gateway, never the SuperLink's address.
    argv = federation.supernodes[0].argv
    assert argv[argv.index("--superlink") + 1] == federation.fleet_address


# --- the intruder: ca.crt and the Fleet address -------------------------------------------


def test_intruder_cannot_register_a_key(federation: LocalDeployment, tmp_path: Path) -> None:
    assert federation.certs is not None and federation.gateway is not None
    members = federation.online_node_ids()
    key, pub = tmp_path / "intruder.key", tmp_path / "intruder.pub"
    generate_node_keypair(key, pub)
    offset = federation.gateway.log_path.stat().st_size
    register = ("supernode", "register", str(pub), "c", "--format", "json")

    payload, text = _cli(
        tmp_path / "intruder", federation.fleet_address, federation.certs.ca_cert, *register
    )
    assert payload.get("success") is False, text
    url = f"https://{federation.fleet_address}/v1/control/register-node"
    assert "404" in payload["error-message"] and url in payload["error-message"], text
    assert "refused POST '/v1/control/register-node'" in _gateway_log(federation, offset)

    # Its SuperNode, started against the Fleet address, is refused: the key is unknown.
    intruder = federation.start_extra_supernode(
        "intruder-selfreg", private_key=key, node_config={"partition-id": 0, "num-partitions": 1}
    )
    assert wait_exit(lambda: intruder.returncode, 150) not in (None, 0)
    assert "Failed to activate SuperNode" in intruder.log_path.read_text(errors="replace")
    assert federation.online_node_ids() == members

    # The operator path: the same command on the loopback Control address registers the key,
    # and a SuperNode with it then joins through the gateway.
    payload, text = _cli(
        tmp_path / "operator", federation.address, federation.certs.ca_cert, *register
    )
    assert payload.get("success") is True, text
    admitted = federation.start_extra_supernode(
        "operator-registered",
        private_key=key,
        node_config={"partition-id": 0, "num-partitions": 1},
        max_retries=None,
    )
    node_id = int(payload["node-id"])
    wait_for(
        lambda: node_id in federation.online_node_ids(), 120, "the registered node online", 1.0
    )
    admitted.stop()
    federation.flwr("supernode", "unregister", str(node_id), federation.connection)
    wait_for(lambda: federation.online_node_ids() == members, 120, "the node gone", 1.0)


@pytest.mark.parametrize(
    ("args", "route"),
    [
        (("ls", "c", "--format", "json"), "list-runs"),
        (("supernode", "ls", "c", "--format", "json"), "list-nodes"),
        (("run", "{app}", "c", "--format", "json"), "start-run"),
    ],
    ids=["list-runs", "list-nodes", "start-run"],
)
def test_intruder_cannot_list_or_start_runs(
    federation: LocalDeployment, tmp_path: Path, args: tuple[str, ...], route: str
) -> None:
    assert federation.certs is not None and federation.gateway is not None
    app = str(app_copy(tmp_path / "app"))
    argv = [arg.replace("{app}", app) for arg in args]
    offset = federation.gateway.log_path.stat().st_size

    payload, text = _cli(
        tmp_path / "intruder", federation.fleet_address, federation.certs.ca_cert, *argv
    )
    assert payload.get("success") is False, text
    assert f"https://{federation.fleet_address}/v1/control/{route}" in payload["error-message"]
    assert "404" in payload["error-message"], text
    assert f"refused POST '/v1/control/{route}'" in _gateway_log(federation, offset)
    runs = federation.flwr("ls", federation.connection, "--format", "json")
    assert json.loads(runs.stdout[runs.stdout.index("{") :])["runs"] == [], "a run was started"

    if route != "start-run":  # the same command works on the Control address (no typo)
        payload, text = _cli(
            tmp_path / "operator", federation.address, federation.certs.ca_cert, *argv
        )
        assert payload.get("success") is True, text


CONTROL_AND_RUNTIME = [
    "/v1/control/register-node",
    "/v1/control/start-run",
    "/v1/control/list-runs",
    "/v1/runtime/pull-task-input",
]
TRICKS = [
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/pull-messages/../../control/list-runs",
    "/v1/fleet//pull-messages",
    "/v1/fleet/pull-messages%00",
    "/V1/FLEET/pull-messages",
    "/docs",
    "/openapi.json",
]


def test_gateway_serves_only_fleet_routes(federation: LocalDeployment) -> None:
    for path in CONTROL_AND_RUNTIME:
        status, body = _post(federation, federation.fleet_port, path)
        assert (status, body) == (404, REFUSAL), path
        upstream, _ = _post(federation, federation.superlink_port, path)
        assert upstream != 404, f"{path} does not exist on the SuperLink: the test is wrong"
    for path in TRICKS:
        status, body = _post(federation, federation.fleet_port, path)
        assert (status, body) == (404, REFUSAL), path
    for path in sorted(fleet_routes()):
        status, _ = _post(federation, federation.fleet_port, path, method="GET")
        assert status == 404, path
        status, body = _post(federation, federation.fleet_port, path)  # empty, unsigned
        assert status != 404 and body != REFUSAL, f"{path} not forwarded: {status}"
    assert {"/v1/fleet/pull-messages", "/v1/fleet/activate-node"} <= fleet_routes()


def test_gateway_caps_the_body(federation: LocalDeployment) -> None:
    assert federation.certs is not None and federation.superlink is not None
    context = ssl.create_default_context(cafile=str(federation.certs.ca_cert))
    declared = http.client.HTTPSConnection(HOST, federation.fleet_port, timeout=30, context=context)
    declared.putrequest("POST", "/v1/fleet/push-object")
    declared.putheader("content-length", str(DEFAULT_MAX_BODY + 1))
    declared.endheaders()
    assert declared.getresponse().status == 413
    declared.close()

    chunked = http.client.HTTPSConnection(HOST, federation.fleet_port, timeout=60, context=context)
    block = b"\0" * (1 << 20)
    chunks = (block for _ in range(DEFAULT_MAX_BODY // len(block) + 2))
    try:
        chunked.request("POST", "/v1/fleet/push-object", body=chunks, encode_chunked=True)
        status = chunked.getresponse().status
    except (ConnectionError, ssl.SSLError):
        status = 0  # closed while we still sent: also a refusal
    finally:
        chunked.close()
    assert status in (413, 0), status
    assert federation.healthy(port=federation.fleet_port) and federation.healthy()
