"""vLLM's token utilities and version: ``POST /tokenize``, ``POST /detokenize``,
``GET /version``, over the engine's own tokenizer and the same checks as generation (the
model name must serve, prompt size, UTF-8, token ids in the vocabulary)."""

from __future__ import annotations

import asyncio
from importlib import metadata

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from nolaserve.adapters.errors import AdapterNotFoundError, InvalidRequestError, short

from ..generation import (
    GenerateRequest,
    Generation,
    check_prompt_size,
    prompt_token_ids,
    registered_in,
    resolve_adapter,
)
from .protocol import ChatFields, ChatMessageIn


class TokenizeRequest(ChatFields):
    """vLLM's ``/tokenize``: a ``prompt`` or chat ``messages`` (rendered as chat does)."""

    model: str = ""
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool | None = None  # None: vLLM's default (chat False, else True)

    def generate_request(self) -> GenerateRequest:
        messages = None if self.messages is None else \
            [m.message() for m in self.messages]
        return GenerateRequest(self.model, prompt=self.prompt, messages=messages,
                               chat=self.chat_options(),
                               add_special_tokens=self.add_special_tokens)


class DetokenizeRequest(BaseModel):
    model: str = ""
    tokens: list[int]


def version() -> str:
    """The installed nolaserve's version."""
    return metadata.version("nolaserve")


class TokenEndpoints:
    """The handlers, bound to the shared ``Generation`` (its engine's tokenizer)."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation

    async def tokenize(self, body: TokenizeRequest) -> JSONResponse:
        """``{"count", "max_model_len", "tokens", "token_strs"}`` as vLLM answers."""
        engine = self.generation.engine
        request = body.generate_request()
        check_prompt_size(request, engine.max_prompt_tokens)
        ids = await asyncio.to_thread(self._tokenize, body, request)
        return JSONResponse({"count": len(ids), "max_model_len": engine.limits.max_model_len,
                             "tokens": ids, "token_strs": None})

    async def detokenize(self, body: DetokenizeRequest) -> JSONResponse:
        vocab = self.generation.engine.limits.vocab_size
        bad = next((t for t in body.tokens if t < 0 or 0 < vocab <= t), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {short(bad)} is out of range: token ids are "
                                      f"0 to {vocab - 1}")
        await asyncio.to_thread(self._check_model, body.model)
        text = await asyncio.to_thread(self.generation.engine.tokenizer.decode, body.tokens)
        return JSONResponse({"prompt": text})

    def _tokenize(self, body: TokenizeRequest, request) -> list[int]:
        self._check_model(body.model)
        tokenizer = self.generation.engine.tokenizer
        return prompt_token_ids(tokenizer, request)  # every check generation makes

    def _check_model(self, model: str) -> None:
        """``AdapterNotFoundError`` unless ``model`` names the base model or a registered
        adapter (this reads the registry: call it off the event loop)."""
        store = self.generation.engine.store
        adapter = resolve_adapter(model, self.generation.base_model, registered_in(store))
        if adapter is not None and (store is None or not registered_in(store)(adapter)):
            raise AdapterNotFoundError(f"model {short(model)} does not exist: GET /v1/models "
                                       "lists what this server serves")
