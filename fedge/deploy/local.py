"""A real Flower 1.41 federation on this machine: one SuperLink and N SuperNodes.

Everything listens on 127.0.0.1 only. TLS and SuperNode authentication are on unless
`insecure=True`, so the local path exercises the same flags as a server with
Raspberry Pi SuperNodes (see docs/deployment.md). Flower 1.41 serves the Fleet, Control
and Runtime APIs on one listener and its Control API authenticates nobody, so the
SuperLink is the operator's (loopback) address and SuperNodes get a Fleet-only gateway
(fedge/deploy/gateway.py). The commands used:

    flower-superlink --host 127.0.0.1 --port P            (Control + Runtime + Fleet)
        --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
        --enable-supernode-auth --disable-runtime-dependency-installation
    fedge deploy fleet-gateway --listen 127.0.0.1:F --superlink 127.0.0.1:P
        --ssl-certfile server.pem --ssl-keyfile server.key --root-certificates ca.crt
    flwr supernode register supernode-i.pub <connection>  (Control API: P)
    fedge deploy supernode --superlink 127.0.0.1:F --root-certificates ca.crt
        --auth-supernode-private-key supernode-i.key
        --node-config "partition-id=i num-partitions=N" --host 127.0.0.1 --port Q_i

Q_i is each SuperNode's own Runtime API port (what older Flower called the
ClientAppIo address); two SuperNodes on one host must not share it.
`fedge deploy supernode` is Flower's SuperNode with a responsive poll and a warm
ClientApp worker (fedge/deploy/supernode.py); `fast=False` runs `flower-supernode`.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fedge.cli import UserError
from fedge.client_app.protocol import EDGE_NODE_KEY
from fedge.deploy.certs import LOOPBACK_HOSTS, CertificateSet, create_certificates
from fedge.deploy.flwr_config import write_connection
from fedge.deploy.processes import ManagedProcess, free_port, port_in_use, stop_all

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_CONNECTION = "fedge-local"
DEFAULT_DIR = ".fedge-deploy"
RESERVED_NODE_KEYS = ("partition-id", "num-partitions")
# Would start Flower's legacy gRPC Control/Fleet servers (default 0.0.0.0): never inherit.
LEGACY_GRPC_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")

ConfigValue = bool | int | float | str
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")  # the pattern flwr itself uses


class DeploymentError(UserError):
    """A local deployment could not start or answer; the message says what to check."""


@dataclass(frozen=True)
class NodeSpec:
    """One SuperNode: its partition, its node config and its own Runtime API port."""

    index: int
    node_config: dict[str, ConfigValue]
    port: int

    @property
    def name(self) -> str:
        return f"supernode-{self.index}"

    @property
    def node_config_arg(self) -> str:
        return format_node_config(self.node_config)


def format_node_config(config: Mapping[str, ConfigValue]) -> str:
    """Render a dict as the `key=value ...` string `--node-config` parses."""
    return " ".join(f"{key}={_format_value(key, value)}" for key, value in config.items())


def parse_node_config(text: str) -> dict[str, ConfigValue]:
    """Parse `key=value ...` the way Flower does, but reject what Flower would drop silently."""
    leftover = _PAIR.sub("", text).strip()
    if leftover:
        raise ValueError(
            f"cannot read {leftover!r} in the node config {text!r}; write key=value pairs "
            "separated by spaces and quote strings with spaces, e.g. 'edge=true site=\"lab 2\"'"
        )
    import tomli

    values: dict[str, ConfigValue] = {}
    for key, raw in _PAIR.findall(text):
        try:
            values[key] = tomli.loads(f"v = {raw}")["v"]
        except tomli.TOMLDecodeError:
            # Flower would reject this too; a bare word is what people mean by a string.
            values[key] = raw
        if not isinstance(values[key], (bool, int, float, str)):
            raise ValueError(f"node config {key}={raw} must be a bool, number or string")
    return values


def _format_value(key: str, value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise ValueError(f"node config {key}: a string cannot hold both ' and \" for Flower")


def node_threads(num_nodes: int) -> int:
    """Cores each of `num_nodes` local SuperNodes may use for torch/OpenMP."""
    return max(1, (os.cpu_count() or 1) // num_nodes)


class LocalDeployment:
    """Start, watch and stop a SuperLink and N SuperNodes on 127.0.0.1.

    Use as a context manager (or call `stop()` in a `finally`): every process, including
    the helpers Flower spawns, is stopped on exit. Files live under `directory`:
    `certs/`, `flwr-home/config.toml` (the connection `flwr run` uses), `logs/` and
    `homes/` (each process's FLWR_HOME, where Flower installs the app it runs).
    """

    def __init__(
        self,
        nodes: int = 2,
        directory: str | os.PathLike[str] = DEFAULT_DIR,
        *,
        insecure: bool = False,
        port_base: int | None = None,
        edge_nodes: int = 0,
        node_config_extra: Mapping[str, ConfigValue] | str | None = None,
        connection: str = DEFAULT_CONNECTION,
        workdir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 180.0,
        env: Mapping[str, str] | None = None,
        fast: bool = True,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"--nodes must be at least 1, got {nodes}")
        if not 0 <= edge_nodes <= nodes:
            raise ValueError(
                f"--edge-nodes must be between 0 and --nodes ({nodes}), got {edge_nodes}"
            )
        if not re.fullmatch(r"[A-Za-z0-9_-]+", connection):
            raise ValueError(
                f"connection name {connection!r} may use only letters, digits, - and _"
            )
        self.directory = Path(directory).resolve()
        self.insecure = insecure
        self.connection = connection
        self.workdir = Path(workdir).resolve() if workdir is not None else Path.cwd()
        self.startup_timeout = startup_timeout
        self.fast = fast
        self.certs: CertificateSet | None = None
        self.flwr_home = self.directory / "flwr-home"
        self.logs_dir = self.directory / "logs"
        self.homes_dir = self.directory / "homes"
        self._base_env = dict(os.environ if env is None else env)

        extra = _extra_config(node_config_extra)
        if edge_nodes and EDGE_NODE_KEY in extra:
            raise ValueError(
                f"'{EDGE_NODE_KEY}' is set both by --edge-nodes and --node-config-extra; use one"
            )
        self.superlink_port, self.fleet_port, node_ports = _choose_ports(port_base, nodes)
        self.nodes: list[NodeSpec] = []
        for index in range(nodes):
            config: dict[str, ConfigValue] = {"partition-id": index, "num-partitions": nodes}
            if index >= nodes - edge_nodes:
                config[EDGE_NODE_KEY] = True
            config.update(extra)
            self.nodes.append(NodeSpec(index, config, node_ports[index]))

        self.superlink: ManagedProcess | None = None
        self.gateway: ManagedProcess | None = None
        self.supernodes: list[ManagedProcess] = []
        self.extra_processes: list[ManagedProcess] = []
        self.node_ids: dict[int, int] = {}

    # --- public API -------------------------------------------------------------------

    @property
    def address(self) -> str:
        """host:port of the SuperLink itself: the operator's Control API (loopback only)."""
        return f"{HOST}:{self.superlink_port}"

    @property
    def fleet_address(self) -> str:
        """host:port of the Fleet-only gateway: the one address SuperNodes get."""
        return f"{HOST}:{self.fleet_port}"

    def run_command(self, app: str = ".") -> str:
        """The shell command that runs a Flower app on this federation."""
        return (
            f"FLWR_HOME={shlex.quote(str(self.flwr_home))} "
            f"flwr run {shlex.quote(app)} {self.connection} --stream"
        )

    def flwr_env(self) -> dict[str, str]:
        """Environment for `flwr` commands aimed at this deployment."""
        env = self._process_env(self.flwr_home)
        env.pop("FEDGE_WORKDIR", None)
        return env

    def start(self) -> LocalDeployment:
        """Start everything and return once all SuperNodes are online."""
        if self.superlink is not None and self.superlink.alive():
            raise DeploymentError(f"already running on {self.address}; call stop() first")
        self.supernodes, self.extra_processes, self.node_ids = [], [], {}
        deadline = time.monotonic() + self.startup_timeout
        try:
            self._prepare_files()
            self._start_superlink(deadline)
            self._start_gateway(deadline)
            if not self.insecure:
                self._register_nodes()
            for spec in self.nodes:
                self.supernodes.append(self._supernode_process(spec))
                self.supernodes[-1].start()
            self.wait_for_nodes(timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Stop SuperNodes first (they deregister through the gateway), then the rest."""
        stop_all([*self.supernodes, *self.extra_processes], timeout)
        stop_all([p for p in (self.gateway, self.superlink) if p is not None], timeout)

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def kill_node(self, index: int) -> None:
        """SIGKILL SuperNode `index` and its helpers, like pulling a Pi's power cord."""
        self._node_process(index).kill()

    def stop_node(self, index: int, timeout: float = 20.0) -> None:
        """Stop SuperNode `index` gracefully (it tells the SuperLink it is leaving)."""
        self._node_process(index).stop(timeout)

    def restart_node(self, index: int, *, wait: bool = True, timeout: float = 120.0) -> None:
        """Stop SuperNode `index` if it runs, start it again with the same key and config."""
        process = self._node_process(index)
        if process.alive():
            process.stop()
        if self.insecure:  # a fresh random key, so a fresh node id
            self.node_ids.pop(index, None)
        process.start()
        if wait:
            self.wait_for_nodes([index], timeout=timeout)

    def start_extra_supernode(
        self,
        name: str,
        *,
        private_key: Path | None,
        node_config: Mapping[str, ConfigValue] | None = None,
        root_certificates: Path | None = None,
        max_retries: int | None = 2,
    ) -> ManagedProcess:
        """Start a SuperNode this deployment did not register (to test that it is refused).

        It is stopped with the deployment. `private_key=None` lets Flower make up a key.
        """
        index = len(self.nodes) + len(self.extra_processes)
        spec = NodeSpec(index, dict(node_config or {}), free_port(HOST))
        argv = self._supernode_argv(spec, private_key=private_key, root=root_certificates)
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        process = ManagedProcess(
            name,
            argv,
            self.logs_dir / f"{name}.log",
            env=self._node_env(self.homes_dir / name),
            cwd=self.directory,
        )
        self.extra_processes.append(process)
        process.start()
        return process

    def flwr(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the `flwr` CLI against this deployment.

        It runs inside `directory`: `flwr` rewrites a `pyproject.toml` it finds in its
        working directory (moving `[tool.flwr.federations]` out), so never in a project.
        """
        result = subprocess.run(
            [_executable("flwr"), *args],
            cwd=self.directory,
            env=self.flwr_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise DeploymentError(
                f"`flwr {' '.join(args)}` failed ({result.returncode}):\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        return result

    def list_nodes(self) -> list[dict[str, Any]]:
        """`flwr supernode ls` as dicts (keys include node-id and status)."""
        result = self.flwr("supernode", "ls", self.connection, "--format", "json", timeout=60)
        payload = _json_from(result.stdout)
        if not payload.get("success"):  # flwr exits 0 even then
            message = payload.get("error-message") or result.stdout[-500:] + result.stderr[-500:]
            raise DeploymentError(f"`flwr supernode ls` failed: {message}")
        return [node for node in payload.get("nodes", []) if isinstance(node, dict)]

    def online_node_ids(self) -> set[int]:
        return {
            int(node["node-id"]) for node in self.list_nodes() if node.get("status") == "online"
        }

    def wait_for_nodes(
        self, indices: Sequence[int] | None = None, timeout: float | None = None
    ) -> None:
        """Block until the given SuperNodes (default: all) have connected and show online.

        A SuperNode that died without saying goodbye stays "online" at the SuperLink until
        its heartbeat lapses (up to ~60 s in Flower 1.41); starting it again meanwhile is
        refused and it exits. Such a node is started again here until it gets in.
        """
        wanted = list(range(len(self.nodes)) if indices is None else indices)
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        last_error = ""
        while True:
            if self.superlink is None or not self.superlink.alive():
                log = self.superlink.log_path if self.superlink else self.logs_dir
                raise DeploymentError(f"the SuperLink is not running; see {log}")
            pending = [index for index in wanted if not self._node_connected(index, deadline)]
            if not pending:
                try:
                    if {self.node_ids[i] for i in wanted} <= self.online_node_ids():
                        return
                except (DeploymentError, subprocess.TimeoutExpired) as exc:
                    last_error = f" ({exc})"
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"SuperNodes {pending or wanted} are not online in time{last_error}; see "
                    f"{self.logs_dir} (a busy machine starts slowly: raise the timeout)"
                )
            time.sleep(1.0)

    def healthy(self, timeout: float = 5.0, port: int | None = None) -> bool:
        """Whether the SuperLink (or the gateway at `port`) answers GET /health."""
        port = self.superlink_port if port is None else port
        if self.insecure:
            connection: http.client.HTTPConnection = http.client.HTTPConnection(
                HOST, port, timeout=timeout
            )
        else:
            assert self.certs is not None
            context = ssl.create_default_context(cafile=str(self.certs.ca_cert))
            connection = http.client.HTTPSConnection(HOST, port, timeout=timeout, context=context)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def problems(self) -> list[str]:
        """Processes that exited although they should run (for a watchdog loop)."""
        found = []
        for process in [self.superlink, self.gateway, *self.supernodes]:
            if process is not None:
                process.track()
                if process.returncode is not None:
                    found.append(
                        f"{process.name} exited ({process.returncode}); see {process.log_path}"
                    )
        return found

    def leftover_processes(self) -> list[int]:
        """Pids still running from any process this deployment started."""
        processes = [self.superlink, self.gateway, *self.supernodes, *self.extra_processes]
        return [pid for p in processes if p is not None for pid in p.leftover_processes()]

    # --- internals --------------------------------------------------------------------

    def _prepare_files(self) -> None:
        for path in (self.directory, self.logs_dir, self.homes_dir):
            path.mkdir(parents=True, exist_ok=True)
        if self.insecure:
            write_connection(self.flwr_home, self.connection, self.address, insecure=True)
            return
        report = create_certificates(self.directory / "certs", LOOPBACK_HOSTS, len(self.nodes))
        self.certs = report.certs
        write_connection(
            self.flwr_home, self.connection, self.address, root_certificates=self.certs.ca_cert
        )

    def _start_superlink(self, deadline: float) -> None:
        for port in [self.superlink_port, self.fleet_port, *(spec.port for spec in self.nodes)]:
            if port_in_use(port, HOST):
                raise DeploymentError(
                    f"port {port} on {HOST} is in use (another SuperLink?); stop it, pass "
                    "--port-base with a free range, or --port-base 0 to pick free ports"
                )
        argv = [_executable("flower-superlink"), "--host", HOST, "--port", str(self.superlink_port)]
        argv += ["--disable-runtime-dependency-installation"]  # use this env, no `uv sync`
        if self.insecure:
            argv += ["--insecure"]
        else:
            assert self.certs is not None
            argv += [
                "--ssl-ca-certfile",
                str(self.certs.ca_cert),
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
                "--enable-supernode-auth",
            ]
        env = self._process_env(self.homes_dir / "superlink")
        for switch in LEGACY_GRPC_SWITCHES:
            env.pop(switch, None)
        env.setdefault("FEDGE_WORKDIR", str(self.workdir))  # relative output-dir lands here
        self.superlink = ManagedProcess(
            "superlink", argv, self.logs_dir / "superlink.log", env=env, cwd=self.workdir
        )
        logger.info("starting SuperLink on %s (logs: %s)", self.address, self.superlink.log_path)
        self.superlink.start()
        self._wait_healthy(self.superlink, self.superlink_port, deadline)

    def _start_gateway(self, deadline: float) -> None:
        """The Fleet-only gateway SuperNodes connect to (fedge/deploy/gateway.py)."""
        argv = [sys.executable, "-m", "fedge.cli", "deploy", "fleet-gateway"]
        argv += ["--listen", self.fleet_address, "--superlink", self.address]
        if self.insecure:
            argv += ["--insecure"]
        else:
            assert self.certs is not None
            argv += ["--ssl-certfile", str(self.certs.server_cert)]
            argv += ["--ssl-keyfile", str(self.certs.server_key)]
            argv += ["--root-certificates", str(self.certs.ca_cert)]
        self.gateway = ManagedProcess(
            "fleet-gateway",
            argv,
            self.logs_dir / "fleet-gateway.log",
            env=self._process_env(self.homes_dir / "fleet-gateway"),
            cwd=self.directory,
        )
        logger.info("starting the Fleet gateway on %s", self.fleet_address)
        self.gateway.start()
        self._wait_healthy(self.gateway, self.fleet_port, deadline)

    def _wait_healthy(self, process: ManagedProcess, port: int, deadline: float) -> None:
        while not self.healthy(timeout=2.0, port=port):
            if not process.alive():
                raise DeploymentError(
                    f"{process.name} exited ({process.returncode}):\n"
                    f"{process.tail()}\n(full log: {process.log_path})"
                )
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"{process.name} did not answer on {HOST}:{port} within "
                    f"{self.startup_timeout:.0f}s; see {process.log_path}"
                )
            time.sleep(0.5)

    def _register_nodes(self) -> None:
        """`flwr supernode register` each public key (in parallel: each CLI call takes ~2s)."""
        assert self.certs is not None
        logger.info("registering %d SuperNode public keys", len(self.nodes))
        running = [
            (
                spec.index,
                subprocess.Popen(
                    [
                        _executable("flwr"),
                        "supernode",
                        "register",
                        str(self.certs.node_public_key(spec.index)),
                        self.connection,
                        "--name",
                        spec.name,
                        "--format",
                        "json",
                    ],
                    cwd=self.directory,
                    env=self.flwr_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
            for spec in self.nodes
        ]
        failures = []
        for index, process in running:
            try:
                out, err = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
            payload = _json_from(out)
            if process.returncode == 0 and payload.get("success"):
                self.node_ids[index] = int(payload["node-id"])
            else:
                failures.append(f"supernode-{index}: {out[-500:]}{err[-500:]}")
        if failures:
            raise DeploymentError("registering SuperNode keys failed:\n" + "\n".join(failures))

    def _supernode_process(self, spec: NodeSpec) -> ManagedProcess:
        key = None if self.insecure else self.certs.node_private_key(spec.index)  # type: ignore[union-attr]
        return ManagedProcess(
            spec.name,
            self._supernode_argv(spec, private_key=key),
            self.logs_dir / f"{spec.name}.log",
            env=self._node_env(self.homes_dir / spec.name),
            cwd=self.directory,
        )

    def _supernode_argv(
        self, spec: NodeSpec, *, private_key: Path | None, root: Path | None = None
    ) -> list[str]:
        if self.fast:  # Flower's SuperNode, responsive and warm (fedge/deploy/supernode.py)
            argv = [sys.executable, "-m", "fedge.cli", "deploy", "supernode"]
        else:
            argv = [_executable("flower-supernode")]
        argv += ["--superlink", self.fleet_address]
        if self.insecure:
            argv += ["--insecure"]
        else:
            assert self.certs is not None
            argv += ["--root-certificates", str(root or self.certs.ca_cert)]
            if private_key is not None:
                argv += ["--auth-supernode-private-key", str(private_key)]
        if spec.node_config:
            argv += ["--node-config", spec.node_config_arg]
        return [*argv, "--host", HOST, "--port", str(spec.port)]

    def _process_env(self, flwr_home: Path) -> dict[str, str]:
        env = dict(self._base_env)
        env["FLWR_HOME"] = str(flwr_home)
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # no network call at start-up
        env["PYTHONUNBUFFERED"] = "1"
        # SuperExec polls its SuperNode for tasks every 1 s by default: up to 1 s per message.
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
        return env

    def _node_env(self, flwr_home: Path) -> dict[str, str]:
        """A SuperNode's environment: its share of this machine's cores for torch/OpenMP.

        N SuperNodes on one host each default to every core, so N trainers at once
        oversubscribe the CPU (as Ray avoids in simulation by giving an actor 1 CPU).
        """
        env = self._process_env(flwr_home)
        env.setdefault("OMP_NUM_THREADS", str(node_threads(len(self.nodes))))
        return env

    def _node_process(self, index: int) -> ManagedProcess:
        if not 0 <= index < len(self.supernodes):
            raise IndexError(f"no SuperNode {index}; this deployment has {len(self.supernodes)}")
        return self.supernodes[index]

    def _node_connected(self, index: int, deadline: float) -> bool:
        """Whether SuperNode `index` got in since its last start; restart it if refused."""
        process = self._node_process(index)
        text = _since_last_start(process.log_path)
        found = re.findall(r"SuperNode ID: (\d+)", text)
        if found:
            node_id = int(found[-1])
            registered = self.node_ids.get(index)
            if not self.insecure and registered is not None and registered != node_id:
                raise DeploymentError(
                    f"{process.name} joined as node {node_id}, but its key was registered as "
                    f"{registered}; is another SuperLink using {self.address}?"
                )
            self.node_ids[index] = node_id
            return True
        if process.alive():
            return False
        if "Failed to activate SuperNode" in text and time.monotonic() + 5.0 < deadline:
            logger.info("%s was refused (still marked online); retrying in 5 s", process.name)
            time.sleep(5.0)
            process.start()
            return False
        raise DeploymentError(
            f"{process.name} exited ({process.returncode}):\n{process.tail()}\n"
            f"(full log: {process.log_path})"
        )


def _since_last_start(log_path: Path) -> str:
    """The part of a log written since ManagedProcess last started the command."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    return text.rsplit("=== fedge: starting", 1)[-1]


def _extra_config(extra: Mapping[str, ConfigValue] | str | None) -> dict[str, ConfigValue]:
    values = parse_node_config(extra) if isinstance(extra, str) else dict(extra or {})
    for key in RESERVED_NODE_KEYS:
        if key in values:
            raise ValueError(f"{key} is set per node by fedge; remove it from --node-config-extra")
    for key, value in values.items():
        _format_value(key, value)  # fail now, not when a SuperNode starts
    return values


def _choose_ports(port_base: int | None, nodes: int) -> tuple[int, int, list[int]]:
    """(SuperLink, Fleet gateway, SuperNode i): base, base+1+N, base+1+i; or free ports."""
    if not port_base:
        ports: list[int] = []
        while len(ports) < nodes + 2:
            port = free_port(HOST)
            if port not in ports:
                ports.append(port)
        return ports[0], ports[-1], ports[1:-1]
    if not 1024 <= port_base <= 65535 - nodes - 1:
        raise ValueError(
            f"--port-base {port_base} leaves no room for {nodes} SuperNode ports and the "
            f"Fleet gateway; use 1024..{65535 - nodes - 1}, or 0 to pick free ports"
        )
    return port_base, port_base + 1 + nodes, [port_base + 1 + i for i in range(nodes)]


def _executable(name: str) -> str:
    """Prefer the script next to this interpreter, so the right Flower version runs."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(
            f"`{name}` is not on PATH; install fedge (it pulls in flwr 1.41) in this "
            "environment or activate the virtualenv that has it"
        )
    return found


def _json_from(text: str) -> dict[str, Any]:
    """The JSON object in `flwr ... --format json` output (which may print other lines)."""
    start = text.find("{")
    if start < 0:
        return {}
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
