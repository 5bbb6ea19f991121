"""`flwr run . --stream` end to end, the way a user starts fedge.

`flwr run` starts a detached local SuperLink (which then runs the ServerApp and
Ray) and, on first use, migrates `[tool.flwr.federations]` out of the
project's pyproject.toml. The test therefore runs on a copy of the project
with its own FLWR_HOME and ports, and stops every process that inherited
that FLWR_HOME afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import tomllib
from importlib.metadata import metadata
from pathlib import Path

import pytest
from deploy_helpers import pids_with_env_prefix
from packaging.specifiers import SpecifierSet

from fedge.deploy.processes import free_port

REPO = Path(__file__).resolve().parents[1]


def test_requires_python_admits_no_python_that_flwr_rejects() -> None:
    # The SuperLink installs an app's dependencies with `uv sync` by default; uv
    # refuses to resolve when the project allows Pythons that flwr does not.
    with open(REPO / "pyproject.toml", "rb") as handle:
        ours = SpecifierSet(tomllib.load(handle)["project"]["requires-python"])
    flwr = SpecifierSet(metadata("flwr")["Requires-Python"])
    for minor in range(8, 16):
        version = f"3.{minor}"
        if version in ours:
            assert version in flwr, f"requires-python {ours} allows {version}; flwr needs {flwr}"


def _stop(entry: str) -> list[int]:
    """SIGTERM, then SIGKILL, every process started with `entry`; returns survivors."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in pids_with_env_prefix(entry, whole_entry=True):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids_with_env_prefix(entry, whole_entry=True) and time.monotonic() < deadline:
            time.sleep(0.5)
    return pids_with_env_prefix(entry, whole_entry=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_flwr_run_stream_completes_two_rounds(tmp_path: Path) -> None:
    flwr = shutil.which("flwr")
    if flwr is None:
        pytest.skip("the flwr CLI is not installed")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / "fedge", project / "fedge", ignore=shutil.ignore_patterns("__pycache__"))
    repo_pyproject = (REPO / "pyproject.toml").read_bytes()

    flwr_home = tmp_path / "flwr-home"
    out = tmp_path / "outputs"
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        # our own SuperLink, never one another project left running on the defaults
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        # dependencies are installed already, and CI machines may be offline
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    marker = f"FLWR_HOME={flwr_home}"
    try:
        result = subprocess.run(
            [
                flwr,
                "run",
                ".",
                "--stream",
                "--run-config",
                f"num-server-rounds=2 output-dir='{out}' run-name='smoke'",
                "--federation-config",
                "num-supernodes=3",
            ],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        survivors = _stop(marker)
    log = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, log
    # `flwr run` exits 0 even when the run fails, so the outputs are the real check
    metrics = out / "smoke" / "metrics.jsonl"
    assert metrics.is_file(), log
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    assert [row["round"] for row in rows] == [1, 2], log
    assert all(row["num_replies"] == 3 and row["num_rejected"] == 0 for row in rows)
    assert (out / "smoke" / "final_model.pt").is_file()
    assert (REPO / "pyproject.toml").read_bytes() == repo_pyproject
    assert not survivors, f"processes left running: {survivors}"
