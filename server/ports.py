"""Bind every listening port before the model loads.

A port that is taken must fail at once, naming the address and the flag that changes it,
not after a minute of model loading. Nor may a port ever be shared silently: gRPC sets
``SO_REUSEPORT`` by default, which lets a second server bind an address in use and take
half of its connections (two different models behind one address); ``GRPC_OPTIONS``
turns it off. ``bind_tcp`` sets only ``SO_REUSEADDR`` (restart while old connections sit
in TIME_WAIT), never ``SO_REUSEPORT``.

    sock = bind_tcp(host, port, "--metrics-port")          # listening, or PortInUseError
    port = add_grpc_port(server, host, port, "--port", creds)   # bound now, served at start

Adding a port (an HTTP front end, say): bind it with ``bind_tcp`` in ``app.start`` next to
the others, before the engine is built, and hand the socket to its server (uvicorn:
``await uvicorn.Server(config).serve(sockets=[sock])``; close it if startup fails).
"""

from __future__ import annotations

import errno
import socket

import grpc

GRPC_OPTIONS = [("grpc.so_reuseport", 0)]
__all__ = ["GRPC_OPTIONS", "PortInUseError", "add_grpc_port", "bind_tcp", "format_address"]


class PortInUseError(OSError):
    """A listening address cannot be bound at start; the message names the address and
    the flag to change. A startup error of the server, raised before the model loads and
    never by a request (so no ``ServingError``)."""

    def __init__(self, address: str, flag: str, reason: str) -> None:
        key = flag.removeprefix("--").replace("-", "_")
        other = "" if flag == "--host" else " or stop the process using it"
        super().__init__(f"cannot listen on {address}: {reason}; pass another {flag} "
                         f"(config key {key}){other}")
        self.address, self.flag = address, flag


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _resolve(host: str, port: int) -> list:
    """``getaddrinfo`` of a listening address; an unknown host raises ``PortInUseError``
    naming --host."""
    try:
        return socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise PortInUseError(format_address(host, port), "--host",
                             f"unknown host: {e.strerror}") from None


def bind_tcp(host: str, port: int, flag: str) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening (port 0 picks a free one).
    Raises ``PortInUseError`` naming the address and ``flag`` when it cannot bind."""
    address = format_address(host, port)
    family, kind, proto, _, sockaddr = _resolve(host, port)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise PortInUseError(address, "--host" if e.errno == errno.EADDRNOTAVAIL else flag,
                             e.strerror or str(e)) from None
    return sock


def add_grpc_port(server: grpc.aio.Server, host: str, port: int, flag: str,
                  credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind ``host:port`` on a gRPC server made with ``GRPC_OPTIONS`` (gRPC binds at this
    call and serves from ``server.start()``); returns the bound port."""
    address = format_address(host, port)
    _resolve(host, port)  # gRPC's own error does not tell an unknown host from a used port
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError:
        bound = 0
    if bound == 0:
        bind_tcp(host, 0, flag).close()  # a host that is not local names --host
        raise PortInUseError(address, flag, "address already in use")
    return bound
