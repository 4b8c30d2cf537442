"""What ``Client`` and ``AsyncClient`` share: the channel, the stubs, the bearer metadata
and the request builders that are not in ``messages``."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import grpc
from grpc_health.v1 import health_pb2_grpc

from nolaserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc

from .messages import NolaserveError, built

DEFAULT_TARGET = "127.0.0.1:50051"
Metadata = tuple[tuple[str, str], ...]


def bearer(token: str | None) -> Metadata:
    return (("authorization", f"Bearer {token}"),) if token else ()


class Stubs:
    """A channel to ``target`` (``grpc`` or ``grpc.aio``, TLS when ``tls_root_cert`` is
    given), the three services' stubs on it, and each service's call metadata and timeout."""

    def __init__(self, channels: ModuleType, target: str, admin_token: str | None,
                 inference_token: str | None, tls_root_cert: bytes | None,
                 timeout: float | None, max_message_bytes: int) -> None:
        _check_options(target, tls_root_cert, timeout, max_message_bytes,
                       (admin_token, inference_token))
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if tls_root_cert is None:
            channel = channels.insecure_channel(target, options)
        else:
            if b"-----BEGIN CERTIFICATE-----" not in tls_root_cert:
                raise NolaserveError("INVALID_ARGUMENT", "tls_root_cert holds no PEM "
                                     "certificate (-----BEGIN CERTIFICATE-----): give the "
                                     "root certificate, not a key")
            creds = grpc.ssl_channel_credentials(root_certificates=tls_root_cert)
            channel = channels.secure_channel(target, creds, options)
        self.target = target
        self._channel = channel
        self._admin = admin_pb2_grpc.AdminStub(channel)
        self._inference = inference_pb2_grpc.InferenceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._admin_kw = {"metadata": bearer(admin_token), "timeout": timeout}
        self._inference_kw = {"metadata": bearer(inference_token), "timeout": timeout}
        self._max_message_bytes = max_message_bytes

    def _adapter_file(self, path: str | os.PathLike) -> bytes:
        """The bytes of the adapter file at ``path``, refused before reading if it is not a
        regular file or holds more than one request may carry (``/dev/zero`` grew the
        client's memory to 11 GB in 8 s)."""
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise NolaserveError("INVALID_ARGUMENT", f"{os.fspath(path)!r} is not a regular "
                                 "file: give an adapter file")
        if info.st_size > self._max_message_bytes:
            raise NolaserveError("RESOURCE_EXHAUSTED", f"{os.fspath(path)!r} is "
                                 f"{info.st_size} bytes, more than max_message_bytes "
                                 f"({self._max_message_bytes}) lets a request carry: raise it "
                                 "here and on the server")
        return Path(path).read_bytes()


def _check_options(target: object, tls_root_cert: object, timeout: object,
                   max_message_bytes: object, tokens: tuple) -> None:
    """``NolaserveError`` (INVALID_ARGUMENT) for a constructor argument that would fail
    every call later, or raise something other than ``NolaserveError``."""
    def bad(why: str) -> NolaserveError:
        return NolaserveError("INVALID_ARGUMENT", why)

    if not isinstance(target, str) or not target.strip():
        raise bad(f"target must be a HOST:PORT string, got {target!r:.40}")
    if tls_root_cert is not None and not isinstance(tls_root_cert, bytes):
        raise bad("tls_root_cert must be the PEM certificate's bytes (open(path, 'rb').read())")
    if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
        raise bad(f"timeout must be a number of seconds > 0 (or None), got {timeout!r}")
    if not (isinstance(max_message_bytes, int) and 0 < max_message_bytes < 2**31):
        raise bad(f"max_message_bytes must be in 1..2^31-1, got {max_message_bytes!r}")
    if any(t is not None and not (isinstance(t, str) and t.isprintable()) for t in tokens):
        raise bad("a token must be a string of printable characters (no newline)")


def ref(adapter_id: str) -> admin_pb2.AdapterRef:
    return built(admin_pb2.AdapterRef, adapter_id=adapter_id)


def register_request(adapter_id: str, data: bytes, replace: bool
                     ) -> admin_pb2.RegisterAdapterRequest:
    return built(admin_pb2.RegisterAdapterRequest, adapter_id=adapter_id, data=data,
                 replace=replace)


def rmm_request(source_ids: Sequence[str], basis_size: int, basis_id: str
                 ) -> admin_pb2.BuildRmmBasisRequest:
    if isinstance(source_ids, str):  # "abc" were the sources a, b and c
        raise NolaserveError("INVALID_ARGUMENT", "source_ids must be a list of adapter ids, "
                             "not one string")
    return built(admin_pb2.BuildRmmBasisRequest, source_adapter_ids=list(source_ids),
                 basis_size=basis_size, basis_id=basis_id)
