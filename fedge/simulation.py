"""Run a fedge federation in this process (tests, benchmarks, notebooks).

`NodeGrid` is the base of in-process Grids that deliver messages themselves.

`flwr run . --stream` is the user-facing way; it starts a background SuperLink
and Ray, which costs about a minute on a small machine. This helper runs the
same ServerApp and ClientApp through Flower's Simulation Engine directly, with
the run config passed in as a dict and every node seeing the same config, just
as `flwr run --run-config` would give them.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tomli_w
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.telemetry import EventType

from fedge.config import FedgeConfig


def run_inprocess(
    run_config: dict[str, Any],
    num_supernodes: int = 10,
    server_app: ServerApp | None = None,
    client_app: ClientApp | None = None,
    num_cpus_per_client: float = 1.0,
    ray_address: str | None = None,
) -> Context:
    """Simulate `num_supernodes` nodes; returns the ServerApp's final context.

    Unknown or invalid keys fail here, before Ray starts. `ray_address`
    ("host:port" of a running cluster's head, as `ray start --head` prints it)
    puts the ClientApp actors on that cluster's nodes instead of a private Ray
    started for this run; Flower's Ray backend hands it to `ray.init(address=...)`.
    """
    if server_app is None or client_app is None:
        from fedge.client_app import app as default_client_app
        from fedge.server_app import app as default_server_app

        server_app = server_app or default_server_app
        client_app = client_app or default_client_app
    full_config = FedgeConfig.from_run_config(run_config).to_run_config()
    if ray_address is not None:
        _check_ray_head(ray_address)
    server_context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=full_config
    )
    with tempfile.TemporaryDirectory(prefix="fedge-sim-") as app_dir:
        # The Simulation Engine builds each node's run config from an app folder.
        pyproject = {
            "project": {"name": "fedge-inprocess", "version": "0.0.0"},
            "tool": {
                "flwr": {
                    "app": {
                        "publisher": "fedge",
                        "components": {
                            "serverapp": "fedge.server_app:app",
                            "clientapp": "fedge.client_app:app",
                        },
                        "config": full_config,
                    }
                }
            },
        }
        Path(app_dir, "pyproject.toml").write_text(tomli_w.dumps(pyproject))
        result = _run_simulation(
            num_supernodes=num_supernodes,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_config=_backend_config(num_cpus_per_client, ray_address),
            server_app_context=server_context,
            app_dir=app_dir,
            is_app=True,
        )
    return result.context


def _check_ray_head(ray_address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds: `ray.init` retries a head that does not answer for minutes."""
    host, _, port = ray_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"ray_address={ray_address!r} is not host:port; pass the address that "
            "`ray start --head` printed, e.g. '10.0.0.1:6379'"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise ConnectionError(
            f"no Ray head answers at {ray_address} ({err}); start one with "
            "`ray start --head --port=PORT` and pass its host:PORT, or leave ray_address "
            "unset for a private single-machine Ray"
        ) from err


def _backend_config(num_cpus_per_client: float, ray_address: str | None) -> dict[str, Any]:
    """Flower's Ray backend config; `init_args` go to `ray.init` unchanged.

    Without an address, `ray.init` joins the cluster named by RAY_ADDRESS or by the
    last `ray start --head` in Ray's default temp dir, if any; else a private one starts.
    """
    config: dict[str, Any] = {"client_resources": {"num_cpus": num_cpus_per_client}}
    if ray_address is not None:
        config["init_args"] = {"address": ray_address}
    return config


class NodeGrid(Grid):
    """A Grid that knows its node ids; subclasses decide how messages reach them."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def set_run(self, run):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError
