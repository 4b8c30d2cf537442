"""The asyncio client of the nolaserve gRPC API: ``Client``'s methods as coroutines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Unpack

import grpc
from grpc_health.v1 import health_pb2

from nolaserve.v1 import admin_pb2

from . import messages as m
from .messages import (
    AdapterInfo,
    ChatMessage,
    GenerateResult,
    RmmResult,
    SamplingExtras,
    ServerInfo,
    StreamChunk,
)
from .stubs import DEFAULT_TARGET, Stubs, ref, register_request, rmm_request


class AsyncClient(Stubs):
    """The asyncio client (grpc.aio): ``Client``'s methods as coroutines, the iterators as
    async iterators. Use it as ``async with AsyncClient(...) as c``."""

    def __init__(self, target: str = DEFAULT_TARGET, *, admin_token: str | None = None,
                 inference_token: str | None = None, tls_root_cert: bytes | None = None,
                 timeout: float | None = None, max_message_bytes: int = 64 << 20) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # else every call would fail later, on a loop of its own
            raise RuntimeError("make the AsyncClient inside the event loop that uses it (in "
                               "an async function): grpc.aio ties its channel to the loop "
                               "it is made in") from None
        super().__init__(grpc.aio, target, admin_token, inference_token, tls_root_cert,
                         timeout, max_message_bytes)

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
                       stop: str | Sequence[str] = (), ignore_eos: bool = False,
                       request_id: str = "", **sampling: Unpack[SamplingExtras]
                 ) -> GenerateResult:
        """See ``Client.generate``."""
        req = m.generate_request(prompt, messages, adapter_id, max_tokens, temperature, top_p,
                                 top_k, seed, stop, ignore_eos, request_id, sampling)
        with m.rpc_errors():
            return m.generate_result(await self._inference.Generate(req, **self._inference_kw))

    async def generate_stream(self, prompt: str | None = None, *,
                              messages: Sequence[ChatMessage] | None = None,
                              adapter_id: str = "", max_tokens: int = 16,
                              temperature: float | None = None, top_p: float | None = None,
                              top_k: int = 0, seed: int | None = None,
                              stop: str | Sequence[str] = (), ignore_eos: bool = False,
                              request_id: str = "", **sampling: Unpack[SamplingExtras]
                              ) -> AsyncIterator[StreamChunk]:
        """See ``Client.generate_stream``."""
        req = m.generate_request(prompt, messages, adapter_id, max_tokens, temperature, top_p,
                                 top_k, seed, stop, ignore_eos, request_id, sampling)
        call = self._inference.GenerateStream(req, **self._inference_kw)
        try:
            with m.rpc_errors():
                async for response in call:
                    yield m.stream_chunk(response)
        finally:
            call.cancel()

    async def register_adapter(self, adapter_id: str, data: bytes, replace: bool = False
                               ) -> AdapterInfo:
        req = register_request(adapter_id, data, replace)
        with m.rpc_errors():
            return m.adapter_info(await self._admin.RegisterAdapter(req, **self._admin_kw))

    async def register_adapter_file(self, adapter_id: str, path: str | Path,
                                    replace: bool = False) -> AdapterInfo:
        return await self.register_adapter(adapter_id, self._adapter_file(path), replace)

    async def get_adapter(self, adapter_id: str) -> AdapterInfo:
        with m.rpc_errors():
            return m.adapter_info(await self._admin.GetAdapter(ref(adapter_id),
                                                               **self._admin_kw))

    async def list_adapters(self, page_size: int = 0, page_token: str = ""
                            ) -> tuple[list[AdapterInfo], str]:
        req = m.built(admin_pb2.ListAdaptersRequest, page_size=page_size, page_token=page_token)
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
            await self._admin.DeleteAdapter(ref(adapter_id), **self._admin_kw)

    async def pin_adapter(self, adapter_id: str) -> AdapterInfo:
        with m.rpc_errors():
            return m.adapter_info(await self._admin.PinAdapter(ref(adapter_id),
                                                               **self._admin_kw))

    async def unpin_adapter(self, adapter_id: str) -> AdapterInfo:
        with m.rpc_errors():
            return m.adapter_info(await self._admin.UnpinAdapter(ref(adapter_id),
                                                                 **self._admin_kw))

    async def build_rmm_basis(self, source_ids: Sequence[str], basis_size: int,
                              basis_id: str) -> RmmResult:
        with m.rpc_errors():
            return m.rmm_result(await self._admin.BuildRmmBasis(
                rmm_request(source_ids, basis_size, basis_id), **self._admin_kw))

    async def server_info(self) -> ServerInfo:
        with m.rpc_errors():
            return m.server_info(await self._admin.GetServerInfo(
                admin_pb2.GetServerInfoRequest(), **self._admin_kw))

    async def health(self, service: str = "") -> str:
        with m.rpc_errors():
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                            **self._inference_kw)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
