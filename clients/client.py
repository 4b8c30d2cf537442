"""Python clients of the nolaserve gRPC API: ``Client`` (blocking, here) and ``AsyncClient``
(grpc.aio, ``async_client.py``, importable from here too), with the same methods. Imports
neither torch nor the server.

    with Client("127.0.0.1:50051", admin_token="s3cret") as c:
        c.register_adapter_file("support-bot", "support.safetensors")
        print(c.generate("Hello", adapter_id="support-bot", max_tokens=32).text)

Tokens travel as ``authorization: Bearer <token>`` metadata: the admin token on Admin
calls, the inference token on Inference (and health) calls. A failed RPC raises
``NolaserveError`` (``str(e)`` is ``"NOT_FOUND: adapter 'x' is not registered"``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Unpack

import grpc
from grpc_health.v1 import health_pb2

from nolaserve.v1 import admin_pb2

from . import messages as m
from .async_client import AsyncClient
from .messages import (
    AdapterInfo,
    ChatMessage,
    GenerateResult,
    ModuleShape,
    NolaserveError,
    RmmResult,
    RmmTask,
    SamplingExtras,
    ServerInfo,
    StreamChunk,
    TokenLogprob,
    Usage,
)
from .stubs import DEFAULT_TARGET, Stubs, ref, register_request, rmm_request

__all__ = ["AdapterInfo", "AsyncClient", "ChatMessage", "Client", "GenerateResult",
           "ModuleShape", "NolaserveError", "RmmResult", "RmmTask", "SamplingExtras",
           "ServerInfo", "StreamChunk", "TokenLogprob", "Usage"]

class Client(Stubs):
    """Blocking client. ``timeout`` (seconds) bounds every call, a stream as a whole."""

    def __init__(self, target: str = DEFAULT_TARGET, *, admin_token: str | None = None,
                 inference_token: str | None = None, tls_root_cert: bytes | None = None,
                 timeout: float | None = None, max_message_bytes: int = 64 << 20) -> None:
        super().__init__(grpc, target, admin_token, inference_token, tls_root_cert, timeout,
                         max_message_bytes)

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
                 stop: str | Sequence[str] = (), ignore_eos: bool = False,
                 request_id: str = "", **sampling: Unpack[SamplingExtras]
                 ) -> GenerateResult:
        """The whole completion of ``prompt`` or chat ``messages`` (exactly one of them);
        ``adapter_id=""`` is the base model, ``temperature=0`` greedy. ``sampling``:
        logprobs, prompt_logprobs, logit_bias, presence/frequency/repetition_penalty,
        min_tokens, json_schema, json_object, regex or choice (``SamplingExtras``), as over HTTP."""
        req = m.generate_request(prompt, messages, adapter_id, max_tokens, temperature, top_p,
                                 top_k, seed, stop, ignore_eos, request_id, sampling)
        with m.rpc_errors():
            return m.generate_result(self._inference.Generate(req, **self._inference_kw))

    def generate_stream(self, prompt: str | None = None, *,
                        messages: Sequence[ChatMessage] | None = None, adapter_id: str = "",
                        max_tokens: int = 16, temperature: float | None = None,
                        top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                        stop: str | Sequence[str] = (), ignore_eos: bool = False,
                        request_id: str = "", **sampling: Unpack[SamplingExtras]
                        ) -> Iterator[StreamChunk]:
        """Chunks as they are produced (arguments as ``generate``); closing the iterator
        early cancels the request on the server."""
        req = m.generate_request(prompt, messages, adapter_id, max_tokens, temperature, top_p,
                                 top_k, seed, stop, ignore_eos, request_id, sampling)
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
        req = register_request(adapter_id, data, replace)
        with m.rpc_errors():
            return m.adapter_info(self._admin.RegisterAdapter(req, **self._admin_kw))

    def register_adapter_file(self, adapter_id: str, path: str | Path, replace: bool = False
                              ) -> AdapterInfo:
        return self.register_adapter(adapter_id, self._adapter_file(path), replace)

    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        with m.rpc_errors():
            return m.adapter_info(self._admin.GetAdapter(ref(adapter_id), **self._admin_kw))

    def list_adapters(self, page_size: int = 0, page_token: str = ""
                      ) -> tuple[list[AdapterInfo], str]:
        """One page (``page_size=0``: the server's default) and the next page's token
        (``""`` on the last page)."""
        req = m.built(admin_pb2.ListAdaptersRequest, page_size=page_size, page_token=page_token)
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
            self._admin.DeleteAdapter(ref(adapter_id), **self._admin_kw)

    def pin_adapter(self, adapter_id: str) -> AdapterInfo:
        """Keep the adapter in a device slot until unpinned."""
        with m.rpc_errors():
            return m.adapter_info(self._admin.PinAdapter(ref(adapter_id), **self._admin_kw))

    def unpin_adapter(self, adapter_id: str) -> AdapterInfo:
        with m.rpc_errors():
            return m.adapter_info(self._admin.UnpinAdapter(ref(adapter_id), **self._admin_kw))

    def build_rmm_basis(self, source_ids: Sequence[str], basis_size: int, basis_id: str
                        ) -> RmmResult:
        """Compress registered adapters into ``basis_size`` basis models; the tasks are
        registered as ``<basis_id>/<source id>``."""
        with m.rpc_errors():
            return m.rmm_result(self._admin.BuildRmmBasis(
                rmm_request(source_ids, basis_size, basis_id), **self._admin_kw))

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
