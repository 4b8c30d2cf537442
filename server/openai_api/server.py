"""The HTTP front end's transport: a socket bound before the model loads, uvicorn served
as a task of the gRPC server's asyncio loop (its signal handling left to ``serve``), TLS
from the same ``tls_cert``/``tls_key``, and a body limit checked before anything parses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket

import uvicorn

from ..config import Config
from .errors import error_body

log = logging.getLogger("nolaserve.http")


def bind_http(config: Config) -> socket.socket | None:
    """The listening socket of ``http_port`` (None when it is 0 = off). Bound early, so a
    port in use fails the start before the model loads."""
    if not config.http_port:
        return None
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.http_port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind the HTTP port {config.host}:{config.http_port} ({e}); "
                      "is it in use? set http_port (0 = off)") from None
    sock.setblocking(False)
    return sock


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before the app sees
    it. A too-large Content-Length is refused at once; otherwise the body is read (up to
    the limit) and handed to the app whole."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
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
        body = json.dumps(error_body(413, f"the request body is over max_message_bytes = "
                                          f"{self.max_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # ``serve`` owns SIGTERM/SIGINT and stops this server itself


class HttpServer:
    """uvicorn over ``app`` on a pre-bound socket, in the running event loop."""

    def __init__(self, app, sock: socket.socket, config: Config) -> None:
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.tls = bool(config.tls_cert)
        self.server = _Server(uvicorn.Config(
            BodyLimit(app, config.max_message_bytes), lifespan="off", log_config=None,
            access_log=False, ssl_certfile=config.tls_cert or None,
            ssl_keyfile=config.tls_key or None, timeout_graceful_shutdown=5))
        self._task: asyncio.Task | None = None

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
