"""The Admin service: proto in, ``AdapterStore`` out. Store and registry calls block
(parsing, SQLite, materialization), so each runs in a worker thread."""

from __future__ import annotations

import asyncio

import grpc

from nolaserve.adapters.errors import LimitExceededError, short
from nolaserve.adapters.registry_rows import AdapterRecord, encode_token
from nolaserve.adapters.store import AdapterStore
from nolaserve.v1 import admin_pb2, admin_pb2_grpc

from . import convert
from .config import Config
from .engine.engine import Engine
from .metrics import Metrics
from .rpc import Gate, rpc

PAGE_SLACK_BYTES = 1024  # next_page_token, total and framing of a ListAdaptersResponse
ENTRY_OVERHEAD_BYTES = 8  # field tag and length prefix of one adapters entry


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, engine: Engine, config: Config, metrics: Metrics, gate: Gate) -> None:
        if engine.store is None:
            raise ValueError("the Admin service needs an engine with an adapter store")
        self.engine, self.config, self.metrics, self.gate = engine, config, metrics, gate
        self.max_message_bytes = config.max_message_bytes
        self.store: AdapterStore = engine.store

    async def _info_of(self, adapter_id: str) -> admin_pb2.AdapterInfo:
        return self._info(await asyncio.to_thread(self.store.get, adapter_id))

    def _info(self, record: AdapterRecord,
              pinned: frozenset[str] | None = None) -> admin_pb2.AdapterInfo:
        pinned = self.store.slot_snapshot().pinned if pinned is None else pinned
        return convert.adapter_info(record, record.id in pinned)

    @rpc
    async def RegisterAdapter(self, request: admin_pb2.RegisterAdapterRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.AdapterInfo:
        """Validate the adapter file against the base model and store it durably."""
        record = await asyncio.to_thread(self.store.register, request.adapter_id,
                                         bytes(request.data), request.replace)
        return self._info(record)

    @rpc
    async def GetAdapter(self, request: admin_pb2.AdapterRef,
                         context: grpc.aio.ServicerContext) -> admin_pb2.AdapterInfo:
        """The registered adapter's metadata; NOT_FOUND if unknown."""
        return await self._info_of(request.adapter_id)

    @rpc
    async def ListAdapters(self, request: admin_pb2.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.ListAdaptersResponse:
        """One page of adapters in id order, the next page's token and the total count."""
        records, token, total = await asyncio.to_thread(
            self.store.list_page, request.page_size, request.page_token)
        pinned = self.store.slot_snapshot().pinned
        infos, token = fit_page([self._info(r, pinned) for r in records], token,
                                self.config.max_message_bytes - PAGE_SLACK_BYTES)
        return admin_pb2.ListAdaptersResponse(adapters=infos, next_page_token=token, total=total)

    @rpc
    async def DeleteAdapter(self, request: admin_pb2.AdapterRef,
                            context: grpc.aio.ServicerContext) -> admin_pb2.DeleteAdapterResponse:
        """Delete the adapter. Requests already running on it (holding its slot) finish with its
        weights; requests still waiting for it fail; new ones get NOT_FOUND."""
        await asyncio.to_thread(self.store.delete, request.adapter_id)
        return admin_pb2.DeleteAdapterResponse()

    @rpc
    async def PinAdapter(self, request: admin_pb2.AdapterRef,
                         context: grpc.aio.ServicerContext) -> admin_pb2.AdapterInfo:
        """Materialize the adapter into a device slot and keep it there until unpinned."""
        await asyncio.to_thread(self.store.pin, request.adapter_id)  # the pool times a load
        return await self._info_of(request.adapter_id)

    @rpc
    async def UnpinAdapter(self, request: admin_pb2.AdapterRef,
                           context: grpc.aio.ServicerContext) -> admin_pb2.AdapterInfo:
        """Let the adapter's slot be evicted again (a no-op if it is not pinned)."""
        await asyncio.to_thread(self.store.unpin, request.adapter_id)
        return await self._info_of(request.adapter_id)

    @rpc
    async def BuildRmmBasis(self, request: admin_pb2.BuildRmmBasisRequest,
                            context: grpc.aio.ServicerContext
                            ) -> admin_pb2.BuildRmmBasisResponse:
        """Compress the source adapters into a K-model RMM basis plus one task per source,
        registered as ``<basis_id>`` and ``<basis_id>/<source id>``."""
        sources = list(request.source_adapter_ids)
        result = await asyncio.to_thread(self.store.build_rmm, sources, request.basis_size,
                                         request.basis_id)
        return convert.rmm_response(result, sources)

    @rpc
    async def GetServerInfo(self, request: admin_pb2.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> admin_pb2.ServerInfo:
        """The base model, its adaptable linears, capacities, limits and version."""
        return convert.server_info(self.engine, self.config)


def fit_page(infos: list[admin_pb2.AdapterInfo], token: str, budget: int
             ) -> tuple[list[admin_pb2.AdapterInfo], str]:
    """The longest prefix of ``infos`` whose encoding fits ``budget`` bytes, and the token
    that continues after it: a page never exceeds the gRPC message limit, whatever the
    registry holds (the client pages on). ``LimitExceededError`` if not even one fits."""
    size = 0
    for n, info in enumerate(infos):
        size += info.ByteSize() + ENTRY_OVERHEAD_BYTES
        if size <= budget:
            continue
        if n == 0:
            raise LimitExceededError(
                f"the listing entry of adapter {short(info.adapter_id)} has {info.ByteSize()} "
                f"bytes, more than max_message_bytes allows; raise max_message_bytes")
        return infos[:n], encode_token(infos[n - 1].adapter_id)
    return infos, token
