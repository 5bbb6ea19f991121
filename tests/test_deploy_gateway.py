"""The fleet gateway without Flower processes: what it refuses, forwards and caps (fast).

The gateway is driven as the ASGI app uvicorn runs; the upstream, where one is needed,
is a plain HTTP server on 127.0.0.1 that records what reached it. The real SuperLink
behind the gateway is tests/test_deploy_control_api.py's.
"""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from fedge.cli import main
from fedge.deploy.commands import security_banner
from fedge.deploy.gateway import REFUSAL, FleetGateway, Upstream, fleet_routes
from fedge.deploy.local import LocalDeployment

ROUTE = "/v1/fleet/pull-messages"


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("content-type", "application/protobuf")
        self.send_header("content-length", "5")
        self.end_headers()
        self.wfile.write(b"reply")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _call(
    gateway: FleetGateway,
    method: str,
    path: str,
    *,
    raw_path: bytes | None = None,
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    chunks: list[bytes] = (),  # type: ignore[assignment]
) -> tuple[int, dict[bytes, bytes], bytes, int]:
    """One request through the app, with lifespan start/stop; returns (status, headers,
    body, body messages the app read)."""
    sent: list[dict[str, Any]] = []
    reads = 0

    async def run() -> None:
        nonlocal reads
        lifespan: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        started = asyncio.Event()
        await lifespan.put({"type": "lifespan.startup"})

        async def lifespan_send(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.complete":
                started.set()

        task = asyncio.create_task(gateway({"type": "lifespan"}, lifespan.get, lifespan_send))
        await started.wait()
        messages = [
            {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
            for i, chunk in enumerate(chunks or [b""])
        ]

        async def receive() -> dict[str, Any]:
            nonlocal reads
            reads += 1
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "raw_path": raw_path if raw_path is not None else path.encode(),
            "query_string": b"",
            "headers": list(headers),
            "client": ("127.0.0.1", 5555),
        }
        await gateway(scope, receive, send)
        await lifespan.put({"type": "lifespan.shutdown"})
        await task

    asyncio.run(run())
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body, reads


def _gateway(address: str = "127.0.0.1:9", max_body: int = 1 << 20) -> FleetGateway:
    return FleetGateway(Upstream(address, None), max_body=max_body)


def test_gateway_routes_are_flowers_fleet_router() -> None:
    from flwr.superlink.routers.fleet.router import router

    assert fleet_routes() == {route.path for route in router.routes}  # type: ignore[attr-defined]
    assert all(path.startswith("/v1/fleet/") for path in fleet_routes())


@pytest.mark.parametrize(
    ("method", "path", "raw_path"),
    [
        ("POST", "/v1/control/register-node", None),
        ("POST", "/v1/control/start-run", None),
        ("POST", "/v1/control/list-runs", None),
        ("POST", "/v1/runtime/pull-task-input", None),
        ("GET", ROUTE, None),
        ("PUT", ROUTE, None),
        ("POST", "/v1/fleet/../control/list-runs", None),
        ("POST", ROUTE, b"/v1/fleet/pull%2Dmessages"),  # decodes to a route, raw does not
        ("POST", "/v1/fleet/", None),
        ("POST", "/docs", None),
    ],
)
def test_gateway_refuses_before_reading_the_body(
    method: str, path: str, raw_path: bytes | None
) -> None:
    status, _, body, reads = _call(_gateway(), method, path, raw_path=raw_path, chunks=[b"x"])
    assert (status, body) == (404, REFUSAL)
    assert reads == 0, "a refused request's body was read"


def test_gateway_forwards_fleet_calls_with_node_auth_headers(upstream: str) -> None:
    headers = [
        (b"content-type", b"application/protobuf"),
        (b"flwr-public-key", b"cHVi"),
        (b"flwr-signature", b"c2ln"),
        (b"flwr-timestamp", b"2026-01-01T00:00:00+00:00"),
        (b"connection", b"keep-alive, x-secret"),
        (b"host", b"evil.example"),
        (b"content-length", b"7"),
    ]
    status, reply_headers, body, _ = _call(
        _gateway(upstream), "POST", ROUTE, headers=headers, chunks=[b"abc", b"defg"]
    )
    assert (status, body) == (200, b"reply")
    assert reply_headers[b"content-type"] == b"application/protobuf"
    [(path, seen, payload)] = _Recorder.seen
    assert (path, payload) == (ROUTE, b"abcdefg")
    for name in ("flwr-public-key", "flwr-signature", "flwr-timestamp", "content-type"):
        assert seen[name] == dict((k.decode(), v.decode()) for k, v in headers)[name]
    assert seen["host"] == upstream  # not the client's Host


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_gateway_caps_the_body(upstream: str, declared: bool) -> None:
    limit = 1000
    chunks = [b"a" * 600, b"b" * 600]
    headers = [(b"content-length", b"1200")] if declared else []
    status, _, _, reads = _call(
        _gateway(upstream, max_body=limit), "POST", ROUTE, headers=headers, chunks=chunks
    )
    assert status == 413
    assert reads == (0 if declared else 2)
    assert all(len(payload) <= limit for _, _, payload in _Recorder.seen)


def test_gateway_upstream_down_is_a_502_not_a_crash() -> None:
    status, _, body, _ = _call(_gateway("127.0.0.1:9"), "POST", ROUTE, chunks=[b"x"])
    assert status == 502 and b"unreachable" in body


@pytest.mark.parametrize(
    "extra",
    [
        [],  # neither TLS files nor --insecure
        ["--insecure", "--ssl-certfile", "server.pem"],
        ["--ssl-certfile", "server.pem", "--ssl-keyfile", "server.key"],  # no CA
    ],
)
def test_gateway_cli_needs_tls_on_both_sides_or_insecure(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["deploy", "fleet-gateway", "--listen", "127.0.0.1:0", "--superlink", "127.0.0.1:1"]
    assert main([*argv, *extra]) == 1
    assert "--root-certificates (TLS), or --insecure" in capsys.readouterr().err


def test_deploy_banner_says_what_is_and_is_not_enforced(tmp_path: Path) -> None:
    secure = security_banner(LocalDeployment(2, tmp_path, port_base=18000))
    assert "Fleet API   127.0.0.1:18003" in secure and "Control API 127.0.0.1:18000" in secure
    assert "registered through 127.0.0.1:18000" in secure
    assert "NOT enforced: the Control API has no login" in secure
    assert "stolen node key" in secure
    insecure = security_banner(LocalDeployment(2, tmp_path, port_base=18000, insecure=True))
    assert "TLS and SuperNode auth are off" in insecure
    assert "TLS + SuperNode auth" not in secure + insecure  # the old, overclaiming banner
