"""``/v1/models`` and adapter management like vLLM's runtime LoRA API, over the same
``AdapterStore`` (and the same typed errors) as the gRPC Admin service:

    POST /v1/load_lora_adapter   {"lora_name", "lora_path"}  a path under adapter_dirs
    POST /v1/unload_lora_adapter {"lora_name"}
    POST /v1/adapters?adapter_id=ID[&replace=true]  raw adapter file bytes (RegisterAdapter)
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict

from nolaserve.adapters.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    InvalidRequestError,
    short,
)
from nolaserve.adapters.registry import MAX_PAGE_SIZE
from nolaserve.adapters.registry_rows import AdapterRecord, encode_token
from nolaserve.adapters.sources import read_adapter_source
from nolaserve.adapters.store import AdapterStore

from .. import convert
from ..config import Config
from ..generation import registered_in, resolve_adapter
from .calls import Endpoints
from .completion_bodies import adapter_card, model_card

ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/adapters")


class LoadLoraRequest(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's: replace an adapter of that name


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str


class AdapterEndpoints:
    def __init__(self, store: AdapterStore, config: Config, max_model_len: int,
                 started: float) -> None:
        self.store, self.config = store, config
        self.max_model_len, self.started = max_model_len, started

    def add_routes(self, app: FastAPI, endpoints: Endpoints) -> None:
        """The routes; their tokens are checked before them (``routes.token_rules``)."""
        @app.get("/v1/models")
        async def models(limit: int | None = None, page_token: str = "") -> Response:
            return await endpoints.unary("/v1/models",
                                         lambda: self.models(endpoints, limit, page_token))

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str) -> Response:
            return await endpoints.unary("/v1/models/{model_id}",
                                         lambda: self.model(endpoints, model_id))

        @app.post("/v1/load_lora_adapter")
        async def load(body: LoadLoraRequest) -> Response:
            return await endpoints.unary("/v1/load_lora_adapter", lambda: self.load(body))

        @app.post("/v1/unload_lora_adapter")
        async def unload(body: UnloadLoraRequest) -> Response:
            return await endpoints.unary("/v1/unload_lora_adapter", lambda: self.unload(body))

        @app.post("/v1/adapters")
        async def register(request: Request, adapter_id: str, replace: bool = False
                           ) -> Response:
            return await endpoints.unary(
                "/v1/adapters", lambda: self.register(request, adapter_id, replace))

    async def models(self, endpoints: Endpoints, limit: int | None, page_token: str
                     ) -> Response:
        """The base model and every registered adapter but RMM bases (their tasks are the
        models), as vLLM lists them; with ``limit``
        (or ``page_token``) one page of ``limit`` models (``_page``).
        Each adapter is under the name that serves it: one registered under the base
        model's id (refused now, kept if registered before) is ``<base id>:<base id>``."""
        if limit is None and not page_token:
            records, token = await asyncio.to_thread(self._all_records), ""
        else:
            records, token = await asyncio.to_thread(self._page, limit, page_token)
        base = endpoints.generation.base_model
        data = [] if page_token else [model_card(base, self.started, None, base,
                                                 self.max_model_len)]
        data += [adapter_card(r, base, f"{base}:{base}" if r.id == base else r.id)
                 for r in records]
        return JSONResponse({"object": "list", "data": data, "has_more": bool(token),
                             "next_page_token": token or None})

    async def model(self, endpoints: Endpoints, model_id: str) -> Response:
        """``/v1/models/{id}``: the card of the base model or of the adapter that the name
        serves (``AdapterNotFoundError``, 404, for any other name)."""
        base = endpoints.generation.base_model
        if model_id == base:
            return JSONResponse(model_card(base, self.started, None, base, self.max_model_len))
        registered = registered_in(self.store)
        adapter = await asyncio.to_thread(resolve_adapter, model_id, base, registered)
        record = await asyncio.to_thread(self.store.get, adapter)
        if record.kind == "rmm-basis":
            raise AdapterNotFoundError(f"{short(model_id)} is an RMM basis, not a model: "
                                       "its tasks are, as '<basis id>/<source id>'")
        return JSONResponse(adapter_card(record, base, model_id))

    def _page(self, limit: int | None, page_token: str) -> tuple[list[AdapterRecord], str]:
        """The adapters of a page of ``limit`` models (default and at most
        ``MAX_PAGE_SIZE``) and the next page's token: the first page's first model is the
        base model; with ``limit`` 1 it is alone, and its token starts the adapters."""
        if limit is not None and not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidRequestError(f"limit must be 1..{MAX_PAGE_SIZE}, got {limit}",
                                      "limit")
        size = (MAX_PAGE_SIZE if limit is None else limit) - (not page_token)
        if size == 0:
            return [], encode_token("") if self.store.list_page(1, "")[0] else ""
        records, token = [], page_token
        while True:  # RMM bases are no models: a page is filled past them
            page, token, _ = self.store.list_page(size - len(records), token)
            records += [r for r in page if r.kind != "rmm-basis"]
            if len(records) == size or not token:
                return records, token

    def _all_records(self) -> list:
        records, token = [], ""
        while True:
            page, token, _ = self.store.list_page(MAX_PAGE_SIZE, token)
            records += [r for r in page if r.kind != "rmm-basis"]  # no model: its tasks are
            if not token:
                return records

    async def load(self, body: LoadLoraRequest) -> Response:
        """Read a PEFT LoRA directory or an adapter file under ``adapter_dirs`` (nothing
        outside them is opened) and register it (``load_inplace``: replacing one of that
        name, as vLLM's)."""
        data = await asyncio.to_thread(read_adapter_source, body.lora_path,
                                       list(self.config.adapter_dirs),
                                       self.config.max_message_bytes)
        try:
            await asyncio.to_thread(self.store.register, body.lora_name, data,
                                    body.load_inplace)
        except AdapterExistsError as e:
            if body.load_inplace:  # the id is another base model's
                raise
            raise AdapterExistsError(f"adapter {short(body.lora_name)} is already loaded: "
                                     "set load_inplace to true to replace it") from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added "
                                 "successfully.")

    async def unload(self, body: UnloadLoraRequest) -> Response:
        await asyncio.to_thread(self.store.delete, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed "
                                 "successfully.")

    async def register(self, request: Request, adapter_id: str, replace: bool) -> Response:
        """RegisterAdapter over HTTP: the body is the adapter file; the reply is the same
        AdapterInfo as the gRPC one, as JSON."""
        data = await request.body()
        record = await asyncio.to_thread(self.store.register, adapter_id, data, replace)
        info = convert.adapter_info(record, record.id in self.store.slot_snapshot().pinned)
        return JSONResponse({f.name: _plain(getattr(info, f.name))
                             for f in info.DESCRIPTOR.fields})


def _plain(value):
    """A proto field's value as JSON (repeated fields as lists; int64 stays a number)."""
    return value if isinstance(value, (str, int, float, bool)) else list(value)
