"""vLLM's ``add_special_tokens`` over HTTP (completions, chat, ``/tokenize``) and gRPC,
with vLLM's defaults (a prompt gets the tokenizer's special tokens, chat's rendered text
does not); ``cache_salt`` over HTTP, gRPC and the client; and the vLLM fields not
implemented here are 400s naming them, never silently ignored while they would change
the output."""

import asyncio
import copy

import pytest
from conftest import tiny_llama
from engine_helpers import make_engine
from openai_helpers import GREEDY, http, http_serving, with_chat_template
from tokenizers import processors

from nolaserve.clients.client import AsyncClient
from nolaserve.v1 import inference_pb2

PROMPT = "héllo wörld"
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


@pytest.fixture
def engine(model, bytebpe):
    """A tokenizer that puts <eos> (id 0) before every text, as Llama's puts BOS."""
    tok = with_chat_template(copy.deepcopy(bytebpe))
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A", special_tokens=[("<eos>", 0)])
    return make_engine(model, tok)


def test_add_special_tokens_follows_vllms_defaults_and_its_value(engine):
    text = engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    chat = engine.tokenizer(engine.tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)["input_ids"]
    base = {"max_tokens": 2, "temperature": 0, **GREEDY}

    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            got = {}
            for name, path, body in (
                    ("prompt", "/v1/completions", {"prompt": PROMPT}),
                    ("prompt_off", "/v1/completions", {"prompt": PROMPT,
                                                       "add_special_tokens": False}),
                    ("chat", "/v1/chat/completions", {"messages": MESSAGES}),
                    ("chat_on", "/v1/chat/completions", {"messages": MESSAGES,
                                                         "add_special_tokens": True})):
                r = await h.post(path, json=base | body)
                got[name] = r.json()["usage"]["prompt_tokens"]
            for name, body in (("tok", {"prompt": PROMPT}),
                               ("tok_off", {"prompt": PROMPT, "add_special_tokens": False}),
                               ("tok_chat", {"messages": MESSAGES})):
                got[name] = (await h.post("/tokenize", json=body)).json()["tokens"]
            grpc_got = [(await c.inference.Generate(inference_pb2.GenerateRequest(
                prompt=PROMPT, sampling=inference_pb2.SamplingParams(max_tokens=1),
                **flag))).usage.prompt_tokens
                for flag in ({}, {"add_special_tokens": False})]
            async with AsyncClient(f"127.0.0.1:{c.running.port}") as client:
                grpc_got += [(await client.generate(PROMPT, max_tokens=1, **flag)).prompt_tokens
                             for flag in ({}, {"add_special_tokens": False})]
            return got, grpc_got

    got, grpc_got = asyncio.run(main())
    assert got["tok"] == [0] + text and got["tok_off"] == text and got["tok_chat"] == chat
    assert (got["prompt"], got["prompt_off"]) == (len(text) + 1, len(text))
    assert (got["chat"], got["chat_on"]) == (len(chat), len(chat) + 1)
    assert grpc_got == [len(text) + 1, len(text)] * 2


def test_cache_salt_reaches_the_prefix_cache_from_every_front_end(engine):
    long = PROMPT * 6

    async def main():
        hits = []
        async with http_serving(engine) as (c, url), http(url) as h:
            async with AsyncClient(f"127.0.0.1:{c.running.port}") as client:
                for send, salt in ((_http, "a"), (_grpc, "b"), (_client, "a"), (_http, "b"),
                                   (_grpc, "a")):
                    await send(h, c, client, long, salt)
                    hits.append(engine.stats.prefix_cache.hits)
            bad = await h.post("/v1/completions", json={"prompt": long, "cache_salt": ""})
        return hits, bad

    hits, bad = asyncio.run(main())
    new = [b - a for a, b in zip([0] + hits, hits)]
    assert new[:2] == [0, 0] and all(n > 0 for n in new[2:]), new
    assert bad.status_code == 400 and "cache_salt" in bad.json()["error"]["message"]


def test_each_front_end_reports_the_prompt_tokens_the_prefix_cache_served(engine):
    """vLLM's (and OpenAI's) cached prompt tokens: none the first time, whole blocks of
    the prompt the second, the same count on every front end (HTTP usage's
    ``prompt_tokens_details`` with vLLM's ``enable_prompt_tokens_details``, the Responses
    API's ``input_tokens_details``, gRPC's and the client's usage)."""
    long = PROMPT * 6
    body = {"prompt": long, "max_tokens": 1}

    async def main():
        async with http_serving(engine, enable_prompt_tokens_details=True) as (c, url), \
                http(url) as h:
            first = (await h.post("/v1/completions", json=body)).json()["usage"]
            again = (await h.post("/v1/completions", json=body)).json()["usage"]
            grpc_usage = (await c.inference.Generate(inference_pb2.GenerateRequest(
                prompt=long, sampling=inference_pb2.SamplingParams(max_tokens=1)))).usage
            async with AsyncClient(f"127.0.0.1:{c.running.port}") as client:
                result = await client.generate(long, max_tokens=1)
            chat = {"messages": [{"role": "user", "content": long}], "max_tokens": 1}
            await h.post("/v1/chat/completions", json=chat)
            responses = (await h.post("/v1/responses", json={
                "input": long, "max_output_tokens": 1})).json()["usage"]
            responses_again = (await h.post("/v1/responses", json={
                "input": long, "max_output_tokens": 1})).json()["usage"]
        return first, again, grpc_usage, result, responses, responses_again

    first, again, grpc_usage, result, _, responses = asyncio.run(main())
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert 0 < cached < again["prompt_tokens"]
    assert cached % engine.scheduler.block_manager.block_size == 0  # whole blocks
    assert grpc_usage.cached_tokens == result.cached_tokens == cached
    assert 0 < responses["input_tokens_details"]["cached_tokens"] < responses["input_tokens"]


async def _http(h, c, client, prompt, salt):
    r = await h.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1,
                                              "cache_salt": salt})
    assert r.status_code == 200, r.text


async def _grpc(h, c, client, prompt, salt):
    await c.inference.Generate(inference_pb2.GenerateRequest(
        prompt=prompt, sampling=inference_pb2.SamplingParams(max_tokens=1, cache_salt=salt)))


async def _client(h, c, client, prompt, salt):
    await client.generate(prompt, max_tokens=1, cache_salt=salt)


REFUSED = {"return_token_offsets": True,
           "repetition_detection": {"max_pattern_size": 2},
           "thinking_token_budget": 10, "prompt_embeds": "AAAA"}
NEUTRAL = {"truncation_side": "left", "spaces_between_special_tokens": False,
           "return_tokens_as_token_ids": False, "include_reasoning": True, "session_id": "s"}


def test_vllm_fields_not_implemented_are_refused_unless_left_at_their_default(engine):
    async def main():
        async with http_serving(engine) as (_, url), http(url) as h:
            refused = {name: await h.post("/v1/completions", json={
                "prompt": PROMPT, "max_tokens": 1, name: value})
                for name, value in REFUSED.items()}
            neutral = await h.post("/v1/chat/completions", json={
                "messages": MESSAGES, "max_tokens": 1, **NEUTRAL})
            return refused, neutral

    refused, neutral = asyncio.run(main())
    for name, r in refused.items():
        assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)
        assert "not supported" in r.json()["error"]["message"]
    assert neutral.status_code == 200, neutral.text
