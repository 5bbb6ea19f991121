"""docker/: compose.yaml and the Dockerfiles refer only to files that exist (or that
`fedge certs` makes), pass Flower 1.41's own argument parsers, and keep keys scoped.

No Docker engine runs here, so this is static validation; docs/deployment.md says so.
PyYAML comes with flwr (a dependency of fedge), so no extra test dependency is needed.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedge.deploy.certs import create_certificates, load_server_hosts

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
CERTS_COMMAND = "fedge certs docker/certs --hosts superlink fleet-gateway --nodes 3"
SUPERNODES = ("supernode-0", "supernode-1", "supernode-2")
GATEWAY = "fleet-gateway"
TLS_TERMINATORS = {"superlink", GATEWAY}  # the only services that may see server.key
MADE_BY_USER = {"outputs"}  # `mkdir -p docker/outputs`, as compose.yaml's header says


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def generated_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What CERTS_COMMAND writes to docker/certs/."""
    argv = shlex.split(CERTS_COMMAND)
    hosts = argv[argv.index("--hosts") + 1 : argv.index("--nodes")]
    directory = tmp_path_factory.mktemp("certs")
    create_certificates(directory, hosts, int(argv[argv.index("--nodes") + 1]))
    return directory


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def _ignored(patterns: list[str], path: str) -> bool:
    """Enough of .dockerignore semantics for an allowlist: last matching rule wins."""
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def _dockerignore(dockerfile: Path) -> list[str]:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} missing: the whole repo (and any keys) would be sent"
    lines = [line.strip() for line in ignore.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _build(service: dict[str, Any]) -> tuple[Path, Path]:
    build = service["build"]
    context = (DOCKER / build["context"]).resolve()
    return context, context / build["dockerfile"]


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def _flags(command: list[str]) -> dict[str, str]:
    flags = {}
    for arg in command:
        key, _, value = arg.partition("=")
        flags[key] = value
    return flags


def test_compose_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"superlink", GATEWAY, "register", *SUPERNODES}
    for name, service in compose["services"].items():
        assert "build" in service, f"{name}: without a build section compose would pull {name}"
        assert service["image"].endswith(":local"), name


def test_compose_build_contexts_and_dockerfiles(compose: dict[str, Any]) -> None:
    used = set()
    for name, service in compose["services"].items():
        context, dockerfile = _build(service)
        assert context == REPO, name
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        used.add(dockerfile.name)
    assert used == {"Dockerfile.superlink", "Dockerfile.supernode", "Dockerfile.edge"}


@pytest.mark.parametrize("name", ["superlink", "supernode", "edge"])
def test_dockerfile_copies_exist_and_are_in_context(name: str) -> None:
    dockerfile = DOCKER / f"Dockerfile.{name}"
    patterns = _dockerignore(dockerfile)
    assert patterns[0] == "*", "the build context must be an allowlist"
    assert _ignored(patterns, "docker/certs/ca.key")
    assert _ignored(patterns, "docker/certs/supernode-0.key")
    assert _ignored(patterns, ".git/config")
    instructions = _dockerfile_instructions(dockerfile)
    copies = [args.split() for op, args in instructions if op in ("COPY", "ADD")]
    assert copies, dockerfile
    for *sources, _dest in copies:
        for source in sources:
            assert not source.startswith("--"), "COPY --from/--chown not expected here"
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
            assert not _ignored(patterns, source.rstrip("/")), f"{source} is .dockerignored"
    froms = [args for op, args in instructions if op == "FROM"]
    assert froms == ["python:3.11-slim"]  # multi-arch (amd64, arm64): builds on a Pi
    assert ("USER", "1000") in instructions, "run as non-root"


def test_dockerfiles_install_the_right_extras() -> None:
    with (REPO / "pyproject.toml").open("rb") as handle:
        extras = tomllib.load(handle)["project"]["optional-dependencies"]
    texts = {
        name: (DOCKER / f"Dockerfile.{name}").read_text()
        for name in ("superlink", "supernode", "edge")
    }
    for name, text in texts.items():
        for group in re.findall(r'pip install "?\.\[([\w,]+)\]', text):
            for extra in group.split(","):
                assert extra in extras, f"Dockerfile.{name} installs missing extra [{extra}]"
    assert 'pip install ".[train]"' in texts["superlink"]  # the ServerApp evaluates with torch
    assert 'pip install ".[train]"' in texts["supernode"]
    assert 'pip install ".[edge,data]"' in texts["edge"]  # compose's edge node partitions
    assert "torch" not in re.sub(r"#.*", "", texts["edge"]), "the edge image must stay torch-free"
    for name in ("superlink", "supernode"):
        assert "download.pytorch.org/whl/cpu" in texts[name], "CPU wheels, not CUDA"
    entrypoints = {
        name: re.search(r'ENTRYPOINT \["([^"]+)"', text).group(1)  # type: ignore[union-attr]
        for name, text in texts.items()
    }
    assert entrypoints == {
        "superlink": "flower-superlink",
        "supernode": "flower-supernode",
        "edge": "flower-supernode",
    }


def test_compose_mounts_exist_or_come_from_fedge_certs(
    compose: dict[str, Any], generated_certs: Path
) -> None:
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in named, f"{name}: volume {source} not declared"
                continue
            relative = Path(source).relative_to(".")
            if relative.parts[0] == "certs":
                made = generated_certs / Path(*relative.parts[1:])
                assert made.is_file(), f"{name}: `{CERTS_COMMAND}` does not make {source}"
            elif relative.parts[0] in MADE_BY_USER:
                continue
            else:
                assert (DOCKER / relative).exists(), f"{name}: {source} does not exist"


def test_compose_keys_are_scoped(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        sources = [source for source, _ in _bind_mounts(service)]
        assert "./certs/ca.key" not in sources, f"{name} must not see the CA key"
        if name not in TLS_TERMINATORS:
            assert "./certs/server.key" not in sources, f"{name} must not see the server key"
    for index, name in enumerate(SUPERNODES):
        keys = [s for s, _ in _bind_mounts(services[name]) if s.endswith(".key")]
        assert keys == [f"./certs/supernode-{index}.key"], f"{name} mounts {keys}"
    registered = [s for s, _ in _bind_mounts(services["register"]) if s.endswith(".pub")]
    assert registered == [f"./certs/supernode-{i}.pub" for i in range(len(SUPERNODES))]


def test_compose_commands_parse_with_flowers_own_parsers(compose: dict[str, Any]) -> None:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    services = compose["services"]
    link = _parse_args_run_superlink().parse_args(services["superlink"]["command"])
    assert not link.insecure and link.enable_supernode_auth
    assert (link.ssl_ca_certfile, link.ssl_certfile, link.ssl_keyfile) == (
        "/certs/ca.crt",
        "/certs/server.pem",
        "/certs/server.key",
    )
    assert link.host == "0.0.0.0" and link.port == 8000
    assert not link.runtime_dependency_install  # no `uv sync` from inside the container
    targets = {target for _, target in _bind_mounts(services["superlink"])}
    assert {"/certs/ca.crt", "/certs/server.pem", "/certs/server.key"} <= targets
    gateway = _gateway_args(services[GATEWAY])
    assert gateway.superlink == f"superlink:{link.port}" and not gateway.insecure
    mounted = {target for _, target in _bind_mounts(services[GATEWAY])}
    assert {str(gateway.ssl_certfile), str(gateway.ssl_keyfile)} <= mounted
    assert str(gateway.root_certificates) in mounted
    for name in SUPERNODES:
        node = _parse_args_run_supernode().parse_args(services[name]["command"])
        assert not node.insecure
        assert node.superlink == f"{GATEWAY}:{gateway.listen.rsplit(':', 1)[1]}"
        mounted = {target for _, target in _bind_mounts(services[name])}
        assert {node.root_certificates, node.auth_supernode_private_key} <= mounted


def _gateway_args(service: dict[str, Any]) -> Any:
    """The gateway's command, parsed by fedge's own CLI parser."""
    from fedge.cli import build_parser

    assert service["entrypoint"] == ["fedge", "deploy", "fleet-gateway"]
    args = build_parser().parse_args([*service["entrypoint"][1:], *service["command"]])
    assert args.func.__name__ == "_fleet_gateway"
    return args


def test_compose_supernodes_cannot_reach_the_control_api(compose: dict[str, Any]) -> None:
    """The SuperLink serves Fleet, Control and Runtime on one port: no SuperNode may share a
    network with it; they reach only the gateway, which forwards the Fleet API alone."""
    services = compose["services"]
    networks = {name: set(service.get("networks", [])) for name, service in services.items()}
    assert set(compose["networks"]) == {"control", "fleet"}
    assert networks["superlink"] == {"control"}
    assert networks["register"] == {"control"}
    assert networks[GATEWAY] == {"control", "fleet"}
    for name in SUPERNODES:
        assert networks[name] == {"fleet"}, f"{name} is on {networks[name]}"
        assert not networks[name] & networks["superlink"]
    for name, service in services.items():
        assert "network_mode" not in service, f"{name}: network_mode bypasses the networks"
        environment = service.get("environment") or {}
        assert not any(key.startswith("FLWR_INTERNAL_GRPC") for key in environment), name
    link_ports = [str(port) for port in services["superlink"].get("ports", [])]
    assert link_ports == ["127.0.0.1:8000:8000"], "the Control API must stay on loopback"


def test_compose_node_configs(compose: dict[str, Any]) -> None:
    from flwr.common.config import parse_config_args

    services = compose["services"]
    partitions = []
    for name in SUPERNODES:
        config = parse_config_args([_flags(services[name]["command"])["--node-config"]])
        assert config["num-partitions"] == len(SUPERNODES)
        partitions.append(config["partition-id"])
        is_edge_image = services[name]["build"]["dockerfile"].endswith("Dockerfile.edge")
        # The torch-free image must run the edge learner, and only it.
        assert config.get("edge", False) is is_edge_image, name
    assert sorted(partitions) == list(range(len(SUPERNODES)))


def test_server_certificate_covers_every_address_used(
    compose: dict[str, Any], generated_certs: Path
) -> None:
    hosts = set(load_server_hosts(generated_certs / "server.pem"))
    for name in SUPERNODES:
        address = _flags(compose["services"][name]["command"])["--superlink"]
        assert address.rsplit(":", 1)[0] in hosts, name
    upstream = _gateway_args(compose["services"][GATEWAY]).superlink
    assert upstream.rsplit(":", 1)[0] in hosts  # the gateway verifies the SuperLink too
    register = compose["services"]["register"]["environment"]["SUPERLINK_ADDRESS"]
    assert register.rsplit(":", 1)[0] in hosts
    assert {"localhost", "127.0.0.1"} <= hosts  # healthcheck, `flwr run` from the host
    health = " ".join(compose["services"]["superlink"]["healthcheck"]["test"])
    assert "https://localhost:8000/health" in health and "/certs/ca.crt" in health
    health = " ".join(compose["services"][GATEWAY]["healthcheck"]["test"])
    assert "https://localhost:9092/health" in health and "/certs/ca.crt" in health


def test_compose_publishes_only_on_loopback(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"


def test_register_script_matches_compose(compose: dict[str, Any]) -> None:
    service = compose["services"]["register"]
    script = service["entrypoint"][-1]
    mounted = dict((target, source) for source, target in _bind_mounts(service))
    assert (DOCKER / Path(mounted[script]).relative_to(".")).is_file()
    text = (DOCKER / "register-supernodes.sh").read_text()
    assert "flwr supernode register" in text and "/certs/supernode-*.pub" in text
    assert CERTS_COMMAND in text
    depends = service["depends_on"]["superlink"]["condition"]
    assert depends == "service_healthy"
    for name in SUPERNODES:
        condition = compose["services"][name]["depends_on"]["register"]["condition"]
        assert condition == "service_completed_successfully"
        condition = compose["services"][name]["depends_on"][GATEWAY]["condition"]
        assert condition == "service_healthy"


def test_docs_describe_the_docker_path_and_say_it_is_not_run_here() -> None:
    docs = (REPO / "docs" / "deployment.md").read_text()
    assert CERTS_COMMAND in docs
    assert "docker compose -f docker/compose.yaml up --build" in docs
    assert "not run" in docs.lower() or "not been run" in docs.lower()
    assert CERTS_COMMAND in COMPOSE.read_text()
