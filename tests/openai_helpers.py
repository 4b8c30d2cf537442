"""Helpers for the OpenAI HTTP API tests: a server with both front ends on free ports,
and greedy request bodies."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import openai
from server_helpers import Client, free_port, serving

from nolaserve.server.engine.engine import Engine

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
GREEDY = {"ignore_eos": True, "return_token_ids": True}


def with_chat_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@asynccontextmanager
async def http_serving(engine: Engine, **config) -> AsyncIterator[tuple[Client, str]]:
    """``serving(engine)`` with the HTTP API on a free port; yields (client, base URL)."""
    async with serving(engine, http_port=free_port(), **config) as c:
        yield c, c.running.http_url


def openai_client(base_url: str, api_key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)


def http(base_url: str, token: str | None = None) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=base_url.removesuffix("/v1"), headers=headers,
                             timeout=30)


async def stream_events(oa: openai.AsyncOpenAI, **kw) -> tuple[list, object]:
    """A chat streamed through the official client's own accumulator
    (``chat.completions.stream``): its events, and the completion it put together."""
    async with oa.chat.completions.stream(**kw) as stream:
        events = [event async for event in stream]
        return events, await stream.get_final_completion()
