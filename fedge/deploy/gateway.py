"""A Fleet-only front door for a Flower 1.41 SuperLink: what devices may reach.

Why it exists (checked against the flwr 1.41 sources): `flower-superlink` serves the
Fleet (`/v1/fleet/*`), Control (`/v1/control/*`) and Runtime (`/v1/runtime/*`) APIs on
ONE HTTP listener (`--host/--port`). `--control-api-address` and `--fleet-api-address`
are deprecated and only place legacy gRPC servers that start only when
`FLWR_INTERNAL_GRPC_CONTROL_API` / `FLWR_INTERNAL_GRPC_FLEET_API` are set. The open-source
Control API authenticates nobody (`NoOpControlAuthnPlugin`), and with
`--enable-supernode-auth` a key can be registered only through it
(`/v1/control/register-node`; the Fleet route refuses). So anyone who reaches that one
listener with `ca.crt` can register a key, come online, list and start runs.

fedge therefore binds the SuperLink to loopback and gives devices this gateway. It
forwards exactly the routes of Flower's own Fleet router (taken from that router, POST
only, path matched byte for byte) and answers everything else with 404 before reading
a byte of the body. Node authentication stays with the SuperLink: the signed headers are
passed through unchanged. The request body is capped (`max_body`), which the SuperLink
itself does not do.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY = 64 << 20
"""Bytes per request. Flower sends arrays in chunks of 5 MB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)."""

REFUSAL = (
    b"fedge fleet gateway: only the Flower Fleet API (POST /v1/fleet/...) is served on this "
    b"address. The Control API (flwr ls/run, flwr supernode register) listens on the "
    b"SuperLink's loopback address; run flwr on the server.\n"
)
HEALTH_PATH = "/health"
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "host",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def fleet_routes() -> frozenset[str]:
    """The POST paths of Flower's Fleet router: the only ones a SuperNode uses."""
    from flwr.superlink.routers.fleet.router import router

    paths = {
        route.path
        for route in router.routes
        if getattr(route, "methods", None) == {"POST"} and route.path.startswith("/v1/fleet/")
    }
    if not paths:  # fail closed: an empty allow-list would mean a Flower we do not know
        raise RuntimeError("flwr's Fleet router has no POST routes; is this Flower 1.41?")
    return frozenset(paths)


@dataclass(frozen=True)
class Upstream:
    """Where the SuperLink listens and how to trust it."""

    address: str  # host:port, e.g. 127.0.0.1:8000
    root_certificates: Path | None  # None: plain HTTP (only with --insecure)

    @property
    def base_url(self) -> str:
        scheme = "http" if self.root_certificates is None else "https"
        return f"{scheme}://{self.address}"

    def verify(self) -> ssl.SSLContext | bool:
        if self.root_certificates is None:
            return False
        return ssl.create_default_context(cafile=str(self.root_certificates))


class FleetGateway:
    """ASGI app: forward Fleet API calls to the SuperLink, refuse everything else."""

    def __init__(self, upstream: Upstream, *, max_body: int = DEFAULT_MAX_BODY) -> None:
        if max_body < 1:
            raise ValueError(f"max_body must be positive, got {max_body}")
        self.upstream = upstream
        self.max_body = max_body
        self.routes = fleet_routes()
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._client = httpx.AsyncClient(
                    base_url=self.upstream.base_url,
                    verify=self.upstream.verify(),
                    timeout=httpx.Timeout(300.0, connect=10.0),
                    follow_redirects=False,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        raw_path = scope.get("raw_path") or path.encode()
        if method in ("GET", "HEAD") and raw_path == HEALTH_PATH.encode():
            await _respond(send, 200, b"ok\n")
            return
        # Byte-for-byte: no percent-encoding, dot segments or query can reach the SuperLink.
        if method != "POST" or path not in self.routes or raw_path != path.encode():
            logger.warning(
                "refused %s %r from %s: not a Fleet API route", method, path, _peer(scope)
            )
            await _respond(send, 404, REFUSAL)
            return
        headers = _forwardable(scope["headers"])
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            await _respond(send, 413, b"request body too large for the fleet gateway\n")
            return
        body = _BoundedBody(receive, self.max_body)
        assert self._client is not None, "lifespan startup did not run"
        try:
            request = self._client.build_request("POST", path, headers=headers, content=body)
            response = await self._client.send(request, stream=True)
        except _BodyTooLarge:
            await _respond(send, 413, b"request body too large for the fleet gateway\n")
            return
        except httpx.HTTPError as exc:
            logger.error("SuperLink at %s unreachable: %s", self.upstream.address, exc)
            await _respond(send, 502, b"fedge fleet gateway: the SuperLink is unreachable\n")
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (key.encode("latin-1"), value.encode("latin-1"))
                        for key, value in response.headers.multi_items()
                        if key.lower() not in _HOP_BY_HOP
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


class _BodyTooLarge(Exception):
    """The client sent more than `max_body` bytes, or left mid-body: stop the upstream call."""


class _BoundedBody:
    """The request body as an async iterator that stops the request past `limit` bytes."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _BodyTooLarge("client disconnected")  # abort the upstream request
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                raise _BodyTooLarge(f"more than {self.limit} bytes")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


def _forwardable(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Request headers minus hop-by-hop ones (the signed node-auth headers pass)."""
    headers: dict[str, str] = {}
    for key, value in raw:
        name = key.decode("latin-1").lower()
        if name not in _HOP_BY_HOP:
            headers[name] = value.decode("latin-1")
    return headers


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def serve(
    listen: str,
    upstream: Upstream,
    *,
    ssl_certfile: Path | None,
    ssl_keyfile: Path | None,
    max_body: int = DEFAULT_MAX_BODY,
) -> None:
    """Run the gateway until SIGINT/SIGTERM (uvicorn, as the SuperLink itself uses)."""
    import uvicorn
    from flwr.supercore.address import parse_address

    parsed = parse_address(listen)
    if parsed is None:
        raise ValueError(f"--listen {listen!r} is not host:port, e.g. 0.0.0.0:9092")
    host, port, _ = parsed
    if (ssl_certfile is None) != (upstream.root_certificates is None):
        raise ValueError("TLS must be on for both sides (give all three files) or for neither")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # uvicorn's access log says enough
    uvicorn.run(
        FleetGateway(upstream, max_body=max_body),
        host=host,
        port=port,
        ssl_certfile=None if ssl_certfile is None else str(ssl_certfile),
        ssl_keyfile=None if ssl_keyfile is None else str(ssl_keyfile),
        ws="none",
        lifespan="on",
        log_level="info",
        access_log=True,
    )
