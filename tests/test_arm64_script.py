"""scripts/arm64-edge.sh without emulation (the emulated run itself is too slow for CI; its
output is in docs/edge.md): the script parses, binds nothing but 127.0.0.1, never gives the
chroot the host's /sys, and starts its edge SuperNode inside the arm64 root with the
deployment's own TLS certificate and key copied in."""

from __future__ import annotations

import importlib.util
import itertools
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from fedge.deploy.certs import LOOPBACK_HOSTS, create_certificates

REPO = Path(__file__).resolve().parents[1]
SHELL = REPO / "scripts" / "arm64-edge.sh"
DRIVER = REPO / "scripts" / "arm64_federation.py"
IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")


def test_the_script_parses() -> None:
    done = subprocess.run(["bash", "-n", str(SHELL)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    if shutil.which("shellcheck"):  # where installed (CI images often have it)
        done = subprocess.run(["shellcheck", str(SHELL)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("path", [SHELL, DRIVER], ids=lambda p: p.name)
def test_no_address_but_loopback(path: Path) -> None:
    text = path.read_text()
    assert set(IPV4.findall(text)) <= {"127.0.0.1"}
    assert "localhost" not in text and "::" not in text  # no IPv6 either


def test_the_chroot_never_gets_sys() -> None:
    mounts = [line for line in SHELL.read_text().splitlines() if re.search(r"\bmount\b", line)]
    assert mounts and not [line for line in mounts if "/sys" in line and "binfmt" not in line]


def _driver(monkeypatch: pytest.MonkeyPatch, root: Path) -> ModuleType:
    for key, value in {
        "FEDGE_CHECKOUT": str(REPO),
        "FEDGE_ARM64_ROOT": str(root),
        "FEDGE_ARM64_VENV": "/opt/fedge-venv",
        "FEDGE_ARM64_OUT": str(root.parent / "out"),
    }.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("arm64_federation", DRIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_edge_supernode_runs_in_the_root_on_loopback_with_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    driver = _driver(monkeypatch, root)
    federation = driver.MixedDeployment(
        3, tmp_path / "deploy", port_base=0, edge_nodes=1, fast=False
    )
    federation.certs = create_certificates(tmp_path / "certs", LOOPBACK_HOSTS, 3).certs
    key = federation.certs.node_private_key(driver.EDGE)

    x86 = federation._supernode_argv(federation.nodes[0], private_key=key)
    edge = federation._supernode_argv(federation.nodes[driver.EDGE], private_key=key)

    assert x86[0].endswith("flower-supernode") and "chroot" not in x86
    assert edge[:4] == ["chroot", str(root), "/usr/bin/env", "-i"]
    assert "/opt/fedge-venv/bin/flower-supernode" in edge
    assert not [arg for arg in edge[1:] if str(tmp_path) in arg and arg != str(root)]
    flags = dict(itertools.pairwise(edge))
    assert flags["--superlink"] == federation.fleet_address
    assert flags["--host"] == "127.0.0.1" and federation.fleet_address.startswith("127.0.0.1:")
    assert "edge=true" in flags["--node-config"] and "partition-id=2" in flags["--node-config"]
    copied = root / flags["--auth-supernode-private-key"].lstrip("/")
    assert copied.read_bytes() == key.read_bytes()
    assert (root / flags["--root-certificates"].lstrip("/")).read_bytes() == (
        federation.certs.ca_cert.read_bytes()
    )
    assert "--insecure" not in edge
