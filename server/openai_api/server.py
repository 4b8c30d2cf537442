"""The HTTP front end's transport: a socket bound before the model loads, uvicorn served
as a task of the gRPC server's asyncio loop (its signal handling left to ``serve``), TLS
from the same ``tls_cert``/``tls_key``, and two ASGI layers in front of the app: the bearer
token, checked before the body is read, then a body limit checked before anything parses.

    app = BearerAuth(BodyLimit(fastapi_app, max_bytes), token_rules(...), metrics)

``HttpServer`` serves the socket from before the model loads, 503 until it has the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from nolaserve.adapters.errors import Status

from ..auth import check_bearer
from ..config import Config
from ..metrics import Metrics
from ..ports import bind_tcp
from .errors import HTTP_STATUS, error_body

log = logging.getLogger("nolaserve.http")
LOADING = "the model is still loading; retry when GET /health answers 200"
HEAD_TIMEOUT_S = 30.0  # for a request's head (line and headers), as nginx's header timeout
BODY_TIMEOUT_S = 120.0  # for its whole body (max_message_bytes at 0.5 MiB/s)


def bind_http(config: Config) -> socket.socket | None:
    """The listening socket of ``http_port`` (None when it is 0 = off), bound with
    ``ports.bind_tcp`` before the model loads: a port in use fails the start at once
    (``PortInUseError`` naming the address and --http-port)."""
    if not config.http_port:
        return None
    sock = bind_tcp(config.host, config.http_port, "--http-port")
    sock.setblocking(False)
    return sock


class BearerAuth:
    """ASGI middleware: a request to a path of ``rules`` (path -> (token, config key))
    without ``authorization: Bearer <token>`` gets 401 before its body is read (a client
    without the token costs no memory), counted in the request metrics."""

    def __init__(self, app, rules: dict[str, tuple[str, str]], metrics: Metrics) -> None:
        self.app, self.rules, self.metrics = app, rules, metrics
        # a rule of a route with a path parameter covers every path under its prefix
        self.prefixes = [(path.split("{")[0], route_label(path), rule)
                         for path, rule in rules.items() if "{" in path]

    def rule(self, path: str) -> tuple[str, tuple[str, str]] | None:
        """The route of a request path (its metric label: a route's, so that made-up paths
        add no series) and its token rule: the route's exact rule or a prefix's."""
        if path in self.rules:
            return path, self.rules[path]
        return next(((label, rule) for prefix, label, rule in self.prefixes
                     if path.startswith(prefix)), None)

    async def __call__(self, scope, receive, send) -> None:
        matched = self.rule(scope["path"]) if scope["type"] == "http" else None
        if matched is not None:
            route, (token, key) = matched
            metadata = [(k.decode("latin-1"), v) for k, v in scope["headers"]
                        if k == b"authorization"]
            error = check_bearer(metadata, token, f"HTTP {scope['path']}", key, "header")
            if error is not None:
                self.metrics.count_request(route, Status.UNAUTHENTICATED)
                return await send_error(send, HTTP_STATUS[Status.UNAUTHENTICATED], error)
        await self.app(scope, receive, send)


def route_label(path: str) -> str:
    """A route's metric label: its path without parameter types
    (``/v1/models/{model_id:path}`` -> ``/v1/models/{model_id}``)."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


async def send_error(send, status: int, message: str) -> None:
    """Answer ``status`` with vLLM's error body and close the connection (the request body
    may be unread)."""
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before the app sees
    it. A too-large Content-Length is refused at once; otherwise the body is read (up to
    the limit, within ``BODY_TIMEOUT_S``, else 408) and handed to the app whole."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT_S
        while more:
            try:
                message = await asyncio.wait_for(
                    receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                return await send_error(send, 408, f"the request body did not come whole "
                                                   f"in {BODY_TIMEOUT_S:g} s: send it faster")
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal body
            if body is None:
                return await receive()  # after the body: the disconnect, when it comes
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        await send_error(send, 413, f"the request body is over max_message_bytes = "
                                    f"{self.max_bytes} bytes")


class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose next request head has not come
    whole ``HEAD_TIMEOUT_S`` after it opened or its last response ended (uvicorn waits
    forever: each silent or byte-a-minute client held a file descriptor, and enough of
    them ran the server out)."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's head came
            self._cancel_head()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        self._await_head()  # before: the next, pipelined request may start in there
        super().on_response_complete()
        if self.cycle is not cycle or self.transport.is_closing():
            self._cancel_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._cancel_head()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self.transport.close)

    def _cancel_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # ``serve`` owns SIGTERM/SIGINT and stops this server itself


class HttpServer:
    """uvicorn on a pre-bound socket, in the running event loop, started before the model
    loads: until ``app`` (the ASGI application) is set, every request, ``/health`` too,
    is 503 (``LOADING``)."""

    def __init__(self, sock: socket.socket, config: Config) -> None:
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.tls = bool(config.tls_cert)
        self.app = None
        self.server = _Server(uvicorn.Config(
            self._asgi, interface="asgi3", lifespan="off", log_config=None,
            access_log=False, ssl_certfile=config.tls_cert or None,
            ssl_keyfile=config.tls_key or None, timeout_graceful_shutdown=5,
            http=HeadTimeoutH11))
        self._task: asyncio.Task | None = None

    async def _asgi(self, scope, receive, send) -> None:
        if self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await send_error(send, 503, LOADING)

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Close the listener and the idle connections (call after the drain)."""
        if self._task is None:
            self.sock.close()
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        except asyncio.TimeoutError:
            self.server.force_exit = True
            await self._task
        self.sock.close()
