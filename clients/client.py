"""Python clients of the nolaserve gRPC API: ``Client`` (blocking) and ``AsyncClient``
(grpc.aio), with the same methods. Imports neither torch nor the server.

    with Client("127.0.0.1:50051", admin_token="s3cret") as c:
        c.register_adapter_file("support-bot", "support.safetensors")
        print(c.generate("Hello", adapter_id="support-bot", max_tokens=32).text)

Tokens travel as ``authorization: Bearer <token>`` metadata: the admin token on Admin
calls, the inference token on Inference (and health) calls. A failed RPC raises
``NolaserveError`` (``str(e)`` is ``"NOT_FOUND: adapter 'x' is not registered"``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nolaserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc

from . import messages as m
from .messages import (
    AdapterInfo,
    ChatMessage,
    GenerateResult,
    ModuleShape,
    NolaserveError,
    RmmResult,
    RmmTask,
    ServerInfo,
    StreamChunk,
    Usage,
)

__all__ = ["AdapterInfo", "AsyncClient", "ChatMessage", "Client", "GenerateResult",
           "ModuleShape", "NolaserveError", "RmmResult", "RmmTask", "ServerInfo",
           "StreamChunk", "Usage"]

DEFAULT_TARGET = "127.0.0.1:50051"
Metadata = tuple[tuple[str, str], ...]


def _bearer(token: str | None) -> Metadata:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


class _Stubs:
    """The stubs, call metadata and timeout shared by both clients."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel, admin_token: str | None,
                 inference_token: str | None, timeout: float | None) -> None:
        self._channel = channel
        self._admin = admin_pb2_grpc.AdminStub(channel)
        self._inference = inference_pb2_grpc.InferenceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._admin_kw = {"metadata": _bearer(admin_token), "timeout": timeout}
        self._inference_kw = {"metadata": _bearer(inference_token), "timeout": timeout}


class Client(_Stubs):
    """Blocking client. ``timeout`` (seconds) bounds every call, a stream as a whole."""

    def __init__(self, target: str = DEFAULT_TARGET, *, admin_token: str | None = None,
                 inference_token: str | None = None, tls_root_cert: bytes | None = None,
                 timeout: float | None = None, max_message_bytes: int = 64 << 20) -> None:
        options = _options(max_message_bytes)
        if tls_root_cert is None:
            channel = grpc.insecure_channel(target, options)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_root_cert)
            channel = grpc.secure_channel(target, creds, options)
        super().__init__(channel, admin_token, inference_token, timeout)
        self.target = target

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompt: str | None = None, *,
                 messages: Sequence[ChatMessage] | None = None, adapter_id: str = "",
                 max_tokens: int = 16, temperature: float | None = None,
                 top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                 stop: Sequence[str] = (), ignore_eos: bool = False,
                 request_id: str = "") -> GenerateResult:
        """The whole completion of ``prompt`` or chat ``messages`` (exactly one of them);
        ``adapter_id=""`` is the base model, ``temperature=0`` greedy."""
        req = m.generate_request(prompt, messages, adapter_id, max_tokens, temperature, top_p,
                                 top_k, seed, stop, ignore_eos, request_id)
        with m.rpc_errors():
            return m.generate_result(self._inference.Generate(req, **self._inference_kw))

    def generate_stream(self, prompt: str | None = None, *,
                        messages: Sequence[ChatMessage] | None = None, adapter_id: str = "",
                        max_tokens: int = 16, temperature: float | None = None,
                        top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                        stop: Sequence[str] = (), ignore_eos: bool = False,
                        request_id: str = "") -> Iterator[StreamChunk]:
        """Chunks as they are produced (arguments as ``generate``); closing the iterator
        early cancels the request on the server."""
        req = m.generate_request(prompt, messages, adapter_id, max_tokens, temperature, top_p,
                                 top_k, seed, stop, ignore_eos, request_id)
        call = self._inference.GenerateStream(req, **self._inference_kw)
        try:
            with m.rpc_errors():
                for response in call:
                    yield m.stream_chunk(response)
        finally:
            call.cancel()

    def register_adapter(self, adapter_id: str, data: bytes, replace: bool = False
                         ) -> AdapterInfo:
        """Register adapter file bytes (NOLA, LoRA, RMM basis or RMM task format)."""
        req = admin_pb2.RegisterAdapterRequest(adapter_id=adapter_id, data=data,
                                               replace=replace)
        with m.rpc_errors():
            return m.adapter_info(self._admin.RegisterAdapter(req, **self._admin_kw))

    def register_adapter_file(self, adapter_id: str, path: str | Path, replace: bool = False
                              ) -> AdapterInfo:
        return self.register_adapter(adapter_id, Path(path).read_bytes(), replace)

    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        with m.rpc_errors():
            return m.adapter_info(self._admin.GetAdapter(_ref(adapter_id), **self._admin_kw))

    def list_adapters(self, page_size: int = 0, page_token: str = ""
                      ) -> tuple[list[AdapterInfo], str]:
        """One page (``page_size=0``: the server's default) and the next page's token
        (``""`` on the last page)."""
        req = admin_pb2.ListAdaptersRequest(page_size=page_size, page_token=page_token)
        with m.rpc_errors():
            resp = self._admin.ListAdapters(req, **self._admin_kw)
        return [m.adapter_info(a) for a in resp.adapters], resp.next_page_token

    def iter_adapters(self, page_size: int = 0) -> Iterator[AdapterInfo]:
        """Every registered adapter, walking all pages."""
        token = None
        while token != "":
            page, token = self.list_adapters(page_size, token or "")
            yield from page

    def delete_adapter(self, adapter_id: str) -> None:
        """In-flight requests finish with the adapter; new ones get NOT_FOUND."""
        with m.rpc_errors():
            self._admin.DeleteAdapter(_ref(adapter_id), **self._admin_kw)

    def pin_adapter(self, adapter_id: str) -> AdapterInfo:
        """Keep the adapter in a device slot until unpinned."""
        with m.rpc_errors():
            return m.adapter_info(self._admin.PinAdapter(_ref(adapter_id), **self._admin_kw))

    def unpin_adapter(self, adapter_id: str) -> AdapterInfo:
        with m.rpc_errors():
            return m.adapter_info(self._admin.UnpinAdapter(_ref(adapter_id), **self._admin_kw))

    def build_rmm_basis(self, source_ids: Sequence[str], basis_size: int, basis_id: str
                        ) -> RmmResult:
        """Compress registered adapters into ``basis_size`` basis models; the tasks are
        registered as ``<basis_id>/<source id>``."""
        with m.rpc_errors():
            return m.rmm_result(self._admin.BuildRmmBasis(
                _rmm_request(source_ids, basis_size, basis_id), **self._admin_kw))

    def server_info(self) -> ServerInfo:
        with m.rpc_errors():
            return m.server_info(self._admin.GetServerInfo(
                admin_pb2.GetServerInfoRequest(), **self._admin_kw))

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name: ``"SERVING"``, ``"NOT_SERVING"``, ..."""
        with m.rpc_errors():
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                      **self._inference_kw)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class AsyncClient(_Stubs):
    """The asyncio client (grpc.aio): ``Client``'s methods as coroutines, the iterators as
    async iterators. Use it as ``async with AsyncClient(...) as c``."""

    def __init__(self, target: str = DEFAULT_TARGET, *, admin_token: str | None = None,
                 inference_token: str | None = None, tls_root_cert: bytes | None = None,
                 timeout: float | None = None, max_message_bytes: int = 64 << 20) -> None:
        options = _options(max_message_bytes)
        if tls_root_cert is None:
            channel = grpc.aio.insecure_channel(target, options)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_root_cert)
            channel = grpc.aio.secure_channel(target, creds, options)
        super().__init__(channel, admin_token, inference_token, timeout)
        self.target = target

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generate(self, prompt: str | None = None, *,
                       messages: Sequence[ChatMessage] | None = None, adapter_id: str = "",
                       max_tokens: int = 16, temperature: float | None = None,
                       top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                       stop: Sequence[str] = (), ignore_eos: bool = False,
                       request_id: str = "") -> GenerateResult:
        """See ``Client.generate``."""
        req = m.generate_request(prompt, messages, adapter_id, max_tokens, temperature, top_p,
                                 top_k, seed, stop, ignore_eos, request_id)
        with m.rpc_errors():
            return m.generate_result(await self._inference.Generate(req, **self._inference_kw))

    async def generate_stream(self, prompt: str | None = None, *,
                              messages: Sequence[ChatMessage] | None = None,
                              adapter_id: str = "", max_tokens: int = 16,
                              temperature: float | None = None, top_p: float | None = None,
                              top_k: int = 0, seed: int | None = None,
                              stop: Sequence[str] = (), ignore_eos: bool = False,
                              request_id: str = "") -> AsyncIterator[StreamChunk]:
        """See ``Client.generate_stream``."""
        req = m.generate_request(prompt, messages, adapter_id, max_tokens, temperature, top_p,
                                 top_k, seed, stop, ignore_eos, request_id)
        call = self._inference.GenerateStream(req, **self._inference_kw)
        try:
            with m.rpc_errors():
                async for response in call:
                    yield m.stream_chunk(response)
        finally:
            call.cancel()

    async def register_adapter(self, adapter_id: str, data: bytes, replace: bool = False
                               ) -> AdapterInfo:
        req = admin_pb2.RegisterAdapterRequest(adapter_id=adapter_id, data=data,
                                               replace=replace)
        with m.rpc_errors():
            return m.adapter_info(await self._admin.RegisterAdapter(req, **self._admin_kw))

    async def register_adapter_file(self, adapter_id: str, path: str | Path,
                                    replace: bool = False) -> AdapterInfo:
        return await self.register_adapter(adapter_id, Path(path).read_bytes(), replace)

    async def get_adapter(self, adapter_id: str) -> AdapterInfo:
        with m.rpc_errors():
            return m.adapter_info(await self._admin.GetAdapter(_ref(adapter_id),
                                                               **self._admin_kw))

    async def list_adapters(self, page_size: int = 0, page_token: str = ""
                            ) -> tuple[list[AdapterInfo], str]:
        req = admin_pb2.ListAdaptersRequest(page_size=page_size, page_token=page_token)
        with m.rpc_errors():
            resp = await self._admin.ListAdapters(req, **self._admin_kw)
        return [m.adapter_info(a) for a in resp.adapters], resp.next_page_token

    async def iter_adapters(self, page_size: int = 0) -> AsyncIterator[AdapterInfo]:
        token = None
        while token != "":
            page, token = await self.list_adapters(page_size, token or "")
            for info in page:
                yield info

    async def delete_adapter(self, adapter_id: str) -> None:
        with m.rpc_errors():
            await self._admin.DeleteAdapter(_ref(adapter_id), **self._admin_kw)

    async def pin_adapter(self, adapter_id: str) -> AdapterInfo:
        with m.rpc_errors():
            return m.adapter_info(await self._admin.PinAdapter(_ref(adapter_id),
                                                               **self._admin_kw))

    async def unpin_adapter(self, adapter_id: str) -> AdapterInfo:
        with m.rpc_errors():
            return m.adapter_info(await self._admin.UnpinAdapter(_ref(adapter_id),
                                                                 **self._admin_kw))

    async def build_rmm_basis(self, source_ids: Sequence[str], basis_size: int,
                              basis_id: str) -> RmmResult:
        with m.rpc_errors():
            return m.rmm_result(await self._admin.BuildRmmBasis(
                _rmm_request(source_ids, basis_size, basis_id), **self._admin_kw))

    async def server_info(self) -> ServerInfo:
        with m.rpc_errors():
            return m.server_info(await self._admin.GetServerInfo(
                admin_pb2.GetServerInfoRequest(), **self._admin_kw))

    async def health(self, service: str = "") -> str:
        with m.rpc_errors():
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                            **self._inference_kw)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _ref(adapter_id: str) -> admin_pb2.AdapterRef:
    return admin_pb2.AdapterRef(adapter_id=adapter_id)


def _rmm_request(source_ids: Sequence[str], basis_size: int, basis_id: str
                 ) -> admin_pb2.BuildRmmBasisRequest:
    return admin_pb2.BuildRmmBasisRequest(source_adapter_ids=list(source_ids),
                                          basis_size=basis_size, basis_id=basis_id)
