"""`fedge deploy local` without starting Flower: node configs, ports, connection file, cleanup."""

from __future__ import annotations

import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedge.cli import main
from fedge.deploy.flwr_config import write_connection
from fedge.deploy.local import (
    DeploymentError,
    LocalDeployment,
    format_node_config,
    parse_node_config,
)
from fedge.deploy.processes import ManagedProcess, free_port


def test_deploy_node_configs_partitions_and_edge_nodes(tmp_path: Path) -> None:
    deployment = LocalDeployment(
        4, tmp_path, port_base=0, edge_nodes=2, node_config_extra='site="lab 2" cores=4'
    )
    configs = [spec.node_config for spec in deployment.nodes]
    assert [c["partition-id"] for c in configs] == [0, 1, 2, 3]
    assert all(c["num-partitions"] == 4 for c in configs)
    assert [c.get("edge", False) for c in configs] == [False, False, True, True]
    assert all(c["site"] == "lab 2" and c["cores"] == 4 for c in configs)
    arg = deployment.nodes[3].node_config_arg
    assert arg == 'partition-id=3 num-partitions=4 edge=true site="lab 2" cores=4'


def test_deploy_node_config_round_trips_through_flowers_parser() -> None:
    from flwr.common.config import parse_config_args

    config = {"partition-id": 1, "edge": True, "lr": 0.5, "name": "pi 4", "q": 'say "hi"'}
    assert parse_config_args([format_node_config(config)]) == config
    assert parse_node_config(format_node_config(config)) == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "--nodes must be at least 1"),
        ({"nodes": 2, "edge_nodes": 3}, "--edge-nodes must be between 0 and --nodes"),
        ({"nodes": 2, "node_config_extra": "partition-id=4"}, "set per node by fedge"),
        ({"nodes": 2, "node_config_extra": "edge=true", "edge_nodes": 1}, "use one"),
        ({"nodes": 2, "node_config_extra": "oops"}, "write key=value pairs"),
        ({"nodes": 2, "port_base": 65535}, "leaves no room"),
        ({"nodes": 2, "connection": "my conn"}, "use only letters"),
    ],
)
def test_deploy_local_rejects_bad_settings(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LocalDeployment(directory=tmp_path, **kwargs)  # type: ignore[arg-type]


def test_deploy_ports(tmp_path: Path) -> None:
    fixed = LocalDeployment(3, tmp_path, port_base=18000)
    assert fixed.superlink_port == 18000
    assert [spec.port for spec in fixed.nodes] == [18001, 18002, 18003]
    assert fixed.address == "127.0.0.1:18000"
    assert fixed.fleet_address == "127.0.0.1:18004"
    free = LocalDeployment(3, tmp_path, port_base=0)
    ports = [free.superlink_port, free.fleet_port, *(spec.port for spec in free.nodes)]
    assert len(set(ports)) == 5
    LocalDeployment(3, tmp_path, port_base=65535 - 4)  # the last base that leaves room
    with pytest.raises(ValueError, match="Fleet gateway"):
        LocalDeployment(3, tmp_path, port_base=65535 - 3)


def test_deploy_run_command_and_connection_file(tmp_path: Path) -> None:
    deployment = LocalDeployment(2, tmp_path / "my dir", port_base=0)
    command = deployment.run_command(".")
    assert command == f"FLWR_HOME='{tmp_path}/my dir/flwr-home' flwr run . fedge-local --stream"


def test_deploy_connection_is_what_flwr_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        textwrap.dedent(
            """
            [superlink]
            default = "supergrid"

            [superlink.supergrid]
            address = "somewhere:443"
            """
        )
    )
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    write_connection(home, "fedge-local", "127.0.0.1:8123", root_certificates=ca)
    write_connection(home, "plain", "127.0.0.1:8124", insecure=True, make_default=False)
    monkeypatch.setenv("FLWR_HOME", str(home))
    tls = read_superlink_connection("fedge-local")
    assert tls.address == "127.0.0.1:8123"
    assert tls.root_certificates == str(ca.resolve())
    assert tls.insecure is False
    plain = read_superlink_connection("plain")
    assert plain.insecure is True
    assert read_superlink_connection(None).name == "fedge-local"  # the default
    assert read_superlink_connection("supergrid").address == "somewhere:443"  # kept


def test_deploy_local_busy_port_names_the_fix(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        deployment = LocalDeployment(1, tmp_path, port_base=port)
        with pytest.raises(DeploymentError, match="--port-base"):
            deployment.start()
    assert deployment.superlink is None  # nothing was started


def test_deploy_cli_reports_bad_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["deploy", "local", "--nodes", "2", "--edge-nodes", "3", "--dir", str(tmp_path)]
    assert main(argv) == 1
    assert "--edge-nodes must be between 0 and --nodes" in capsys.readouterr().err


SPAWNER = """
import subprocess, sys, time
# Like flower-superlink starting flower-superexec: a helper in a *new session*,
# which a process-group signal would miss.
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("children" + "-started", flush=True)  # not in the echoed command
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_deploy_managed_process_leaves_no_orphans(tmp_path: Path, how: str) -> None:
    process = ManagedProcess(
        "spawner", [sys.executable, "-c", SPAWNER], tmp_path / "spawner.log", cwd=tmp_path
    )
    process.start()
    try:
        deadline = time.monotonic() + 60
        while "children-started" not in process.tail() and time.monotonic() < deadline:
            time.sleep(0.1)
        process.track()
        pids = process.leftover_processes()
        assert len(pids) == 3, pids
        getattr(process, how)()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if _alive(pid)]
        assert process.leftover_processes() == []
    finally:
        process.kill()


def test_deploy_free_port_is_loopback_and_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
