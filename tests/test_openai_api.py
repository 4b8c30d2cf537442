"""The OpenAI HTTP API in-process over a tiny model, driven by the official ``openai``
client: the same tokens as gRPC Generate, streaming with usage, model naming, errors in
vLLM's shape, refused fields, /health and /metrics. Auth, adapter paths, body limits and
disconnects: test_openai_admin.py. SmolLM2 end to end: test_e2e_openai.py."""

import asyncio
import logging

import openai
import pytest
from conftest import tiny_llama
from engine_helpers import make_engine
from openai_helpers import GREEDY, http, http_serving, openai_client, with_chat_template
from server_helpers import request

from nolaserve.adapters.errors import Status
from nolaserve.adapters.nola import random_nola
from nolaserve.server.engine.sequence import SamplingParams
from nolaserve.server.metrics import LORA_LABEL_CHARS, lora_requests_info
from nolaserve.server.openai_api import HTTP_STATUS
from nolaserve.v1 import inference_pb2

PROMPT = "héllo wörld"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


@pytest.fixture
def engine(model, bytebpe):
    engine = make_engine(model, with_chat_template(bytebpe))
    engine.store.register("n", random_nola(engine.store.spec, seed=1, rank=4,
                                           num_basis=16).to_bytes())
    return engine


async def grpc_tokens(c, adapter: str, max_tokens: int, chat: bool = False) -> list[int]:
    req = request(PROMPT, max_tokens=max_tokens, adapter=adapter)
    if chat:
        req.ClearField("prompt")
        req.messages.messages.extend(inference_pb2.ChatMessage(**m) for m in MESSAGES)
    return list((await c.inference.Generate(req)).token_ids)


def test_completions_match_grpc_whole_and_streamed(engine):
    async def main():
        async with http_serving(engine) as (c, url):
            oa = openai_client(url)
            want = {a: await grpc_tokens(c, a, 10) for a in ("", "n")}
            base = engine.runner.spec.name
            got = {}
            for model in ("", base, "n", f"{base}:n"):
                out = await oa.completions.create(model=model, prompt=PROMPT, max_tokens=10,
                                                  temperature=0, extra_body=GREEDY)
                got[model] = out
            stream = await oa.completions.create(
                model="n", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body=GREEDY)
            chunks = [chunk async for chunk in stream]
            return want, got, chunks, base

    want, got, chunks, base = asyncio.run(main())
    for model, out in got.items():
        adapter = "n" if model in ("n", f"{base}:n") else ""
        choice = out.choices[0]
        assert choice.token_ids == want[adapter], model
        assert choice.finish_reason == "length" and out.object == "text_completion"
        assert (out.usage.completion_tokens, out.model) == (10, model)
    assert want[""] != want["n"]
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert all(c.usage is None for c in body) and body[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in body) == got["n"].choices[0].text
    assert [t for c in body for t in c.choices[0].token_ids] == want["n"]


def test_chat_matches_grpc_messages(engine):
    async def main():
        async with http_serving(engine) as (c, url):
            oa = openai_client(url)
            want = await grpc_tokens(c, "n", 8, chat=True)
            whole = await oa.chat.completions.create(
                model="n", messages=MESSAGES, max_completion_tokens=8, temperature=0,
                extra_body=GREEDY)
            stream = await oa.chat.completions.create(
                model="n", messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body=GREEDY)
            return want, whole, [chunk async for chunk in stream]

    want, whole, chunks = asyncio.run(main())
    assert whole.choices[0].token_ids == want and whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-2].choices[0].finish_reason == "length"


def test_models_list_and_unknown_model(engine):
    engine.store.register("a/b", random_nola(engine.store.spec, seed=2, rank=4,
                                             num_basis=16).to_bytes())

    async def main():
        async with http_serving(engine) as (c, url):
            oa = openai_client(url)
            models = await oa.models.list()
            with pytest.raises(openai.NotFoundError) as err:
                await oa.completions.create(model="nope", prompt="hi", max_tokens=2)
            with pytest.raises(openai.NotFoundError):
                await oa.chat.completions.create(model="nope", messages=MESSAGES,
                                                 stream=True)
            async with http(url) as h:
                page = (await h.get("/v1/models", params={"limit": 1})).json()
                rest = (await h.get("/v1/models", params={
                    "limit": 2, "page_token": page["next_page_token"]})).json()
                wrong = [await h.get("/v1/nothing"), await h.get("/v1/completions"),
                         await h.post("/v1/completions", content=b"{bad json",
                                      headers={"content-type": "application/json"}),
                         await h.get("/v1/models", params={"limit": "x"}),
                         await h.post("/v1/completions", json={"prompt": "x"},
                                      headers={"x-request-id": "x" * 129})]
            return models, err.value, page, rest, wrong

    models, err, page, rest, wrong = asyncio.run(main())
    base = engine.runner.spec.name
    ids = [m.id for m in models.data]
    assert ids == [base, "a/b", "n"]
    card = models.data[1]
    assert (card.object, card.owned_by, card.root, card.parent) == ("model", "nolaserve",
                                                                  base, base)
    assert err.status_code == 404 and err.body["type"] == "NotFoundError"
    assert "nope" in err.body["message"] and err.body["code"] == 404
    assert [m["id"] for m in page["data"]] == [base] and page["has_more"]  # limit 1: 1 model
    assert [m["id"] for m in rest["data"]] == ["a/b", "n"] and not rest["has_more"]
    # every answer, a wrong path, method or body too, has the one error shape
    errors = [r.json()["error"] for r in wrong]
    assert [(r.status_code, e["param"]) for r, e in zip(wrong, errors)] == [
        (404, None), (405, None), (400, None), (400, "limit"), (400, "x-request-id")]
    assert "x-request-id is 129 bytes; the limit is 128" in errors[4]["message"]  # as gRPC's
    assert "no endpoint GET /v1/nothing" in errors[0]["message"]
    assert "use POST" in errors[1]["message"] and wrong[1].headers["allow"] == "POST"
    assert "not valid JSON" in errors[2]["message"]


REFUSED = [("suffix", {"suffix": "x"}), ("use_beam_search", {"use_beam_search": True}),
           ("best_of", {"best_of": 3}), ("n", {"n": 17}),
           ("prompt", {"prompt": ["a"] * 65})]


def test_unsupported_fields_are_refused_and_unknown_ones_ignored(engine, caplog):
    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            body = {"prompt": PROMPT, "max_tokens": 2}
            results = {}
            for label, extra in REFUSED + [
                    ("top_p", {"top_p": 1.5}), ("max_tokens", {"max_tokens": "x"}),
                    ("temperature", {"temperature": -1}), ("logprobs", {"logprobs": 30}),
                    ("large max_tokens", {"max_tokens": 10**6}),
                    ("unknown", {"frobnicate": 1}),
                    ("neutral", {"presence_penalty": 0, "user": "me", "stop": "\n"})]:
                r = await h.post("/v1/completions", json=body | extra)
                results[label] = (r.status_code, r.json())
            chat = await h.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
            long = await h.post("/v1/chat/completions", json={
                "messages": MESSAGES, "max_completion_tokens": 10**6})
            return results, chat, long.json()["error"]

    with caplog.at_level(logging.WARNING, "nolaserve.http"):
        results, chat, long = asyncio.run(main())
    for field, _ in REFUSED:
        status, body = results[field]
        assert status == 400 and body["error"]["param"] == field, (field, body)
        assert body["error"]["type"] == "BadRequestError"
    assert results["top_p"][0] == 400 and "top_p" in results["top_p"][1]["error"]["message"]
    for field, label in (("top_p", "top_p"), ("temperature", "temperature"),
                         ("logprobs", "logprobs"), ("max_tokens", "large max_tokens")):
        assert results[label][1]["error"]["param"] == field, label  # named, as vLLM's
    assert results["max_tokens"][0] == 400
    assert results["unknown"][0] == 200 and "frobnicate" in caplog.text
    assert results["neutral"][0] == 200 and "presence_penalty" not in caplog.text
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    assert long["param"] == "max_completion_tokens"  # the field sent, not the engine's name
    assert long["message"].startswith("max_completion_tokens must be between 1 and ")


def test_health_metrics_and_the_status_table(engine):
    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            health = await h.get("/health")
            await h.post("/v1/completions", json={"model": "n", "prompt": PROMPT,
                                                  "max_tokens": 2})
            metrics = (await h.get("/metrics")).text
            open_metrics = await h.get("/metrics", headers={
                "accept": "application/openmetrics-text; version=1.0.0"})
            assert open_metrics.headers["content-type"].startswith("application/openmetrics")
            assert open_metrics.text.endswith("# EOF\n")
            c.running.gate.draining = True
            draining = await h.get("/health")
            refused = await h.post("/v1/completions", json={"prompt": PROMPT})
            c.running.gate.draining = False
            return health, metrics, draining, refused

    health, metrics, draining, refused = asyncio.run(main())
    assert health.status_code == 200 and draining.status_code == 503
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert 'vllm:lora_requests_info{max_lora="' in metrics
    assert "vllm:num_requests_waiting" in metrics
    assert 'nolaserve_requests_total{code="OK",rpc="/v1/completions"} 1.0' in metrics
    assert HTTP_STATUS[Status.NOT_FOUND] == 404
    assert HTTP_STATUS[Status.RESOURCE_EXHAUSTED] == 429


def test_lora_requests_info_lists_running_and_waiting_adapters_capped():
    waiting = [f"w{i}" for i in range(10)]
    (sample,) = lora_requests_info(["a", "b", "a"], waiting, max_lora=4).samples
    assert sample.name == "vllm:lora_requests_info" and sample.value > 1e9
    assert sample.labels == {"max_lora": "4", "running_lora_adapters": "a,b",
                             "waiting_lora_adapters": "w0,w1,w2,w3"}
    long_ids = [f"{i:03d}" + "x" * 125 for i in range(64)]
    (sample,) = lora_requests_info(long_ids, [], max_lora=64).samples
    running = sample.labels["running_lora_adapters"]
    assert len(running) <= LORA_LABEL_CHARS and running.split(",") == long_ids[:31]


def test_engine_stats_name_the_adapters_of_running_and_waiting_requests(engine):
    engine.add_request("r1", [1, 2, 3], SamplingParams(max_tokens=4), "n")
    engine.add_request("r2", [1, 2, 3], SamplingParams(max_tokens=4), None)
    stats = engine.stats
    assert stats.waiting_adapters == ("n",) and stats.running_adapters == ()
    while not engine.stats.running_adapters:
        engine.step()
    assert engine.stats.running_adapters == ("n",)
    for request_id in ("r1", "r2"):
        engine.abort(request_id)
