"""Hostile input, round 2 (issue #29), over the HTTP API of a tiny server: token ids out
of the vocabulary, huge or negative top_k, lone surrogates, unauthenticated bodies (401
before the body is read), adapter ids that shadow model names, and clients that leave
mid-request (counted CANCELLED, no traceback)."""

import asyncio
import json
import logging

import pytest
import torch
from conftest import tiny_llama
from engine_helpers import make_engine
from openai_helpers import http, http_serving, with_chat_template
from server_helpers import assert_no_leaks, request, slow_down, until, wait_idle

from nolaserve.adapters.errors import InvalidAdapterIdError
from nolaserve.adapters.nola import random_nola
from nolaserve.server.config import Config
from nolaserve.server.engine.sampler import Sampler
from nolaserve.server.engine.sequence import SamplingParams
from nolaserve.server.generation import resolve_adapter
from nolaserve.server.metrics import Metrics
from nolaserve.server.openai_api.admin import AdapterEndpoints
from nolaserve.server.openai_api.calls import Endpoints
from nolaserve.server.openai_api.errors import error_body
from nolaserve.server.openai_api.routes import build_app, token_rules
from nolaserve.server.openai_api.server import BearerAuth
from nolaserve.server.rpc import Gate

VOCAB = 300
BASE = "Tiny-1"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def model():
    model = tiny_llama(vocab_size=VOCAB)
    model.name_or_path = BASE  # the base model's id, as a hub id would name it
    return model


@pytest.fixture
def engine(model, bytebpe):
    return make_engine(model, with_chat_template(bytebpe))


def nola(engine, seed: int) -> bytes:
    return random_nola(engine.store.spec, seed=seed, rank=4, num_basis=16).to_bytes()


def requests_counted(metrics: Metrics, rpc: str, code: str) -> float:
    return metrics.registry.get_sample_value("nolaserve_requests_total",
                                             {"rpc": rpc, "code": code}) or 0.0


def test_prompt_token_ids_outside_the_vocabulary_are_refused_before_queueing(engine, caplog):
    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            bad = {t: await h.post("/v1/completions", json={"prompt": [5, t], "max_tokens": 2})
                   for t in (VOCAB, -1, 2**63)}
            good = await h.post("/v1/completions", json={"prompt": [5, VOCAB - 1],
                                                         "max_tokens": 2})
            return bad, good

    with caplog.at_level(logging.ERROR):
        bad, good = asyncio.run(main())
    for token, r in bad.items():
        assert r.status_code == 400, (token, r.text)
        assert f"token id {token} is out of range" in r.json()["error"]["message"]
        assert f"0 to {VOCAB - 1}" in r.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2
    assert "engine step failed" not in caplog.text  # nothing reached the model
    assert_no_leaks(engine)


def test_huge_top_k_means_every_token_and_negative_top_k_is_refused(engine):
    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            body = {"prompt": "héllo", "max_tokens": 3, "temperature": 1.0, "seed": 7}
            return {k: await h.post("/v1/completions", json=body | {"top_k": k})
                    for k in (2**64, VOCAB, -1, 0, -2)}

    out = asyncio.run(main())
    assert out[2**64].status_code == 200, out[2**64].text
    tokens = {k: out[k].json()["choices"][0]["text"] for k in (2**64, VOCAB, -1, 0)}
    assert len(set(tokens.values())) == 1, tokens  # all mean "every token"
    assert out[-2].status_code == 400 and "top_k must be >= 0" in out[-2].json()["error"][
        "message"]


def test_the_sampler_clamps_top_k_to_the_vocabulary():
    logits = torch.randn(1, 50).repeat(2, 1)
    params = [SamplingParams(top_k=2**64, seed=1), SamplingParams(top_k=0, seed=1)]
    probs = Sampler().probabilities(logits, params)
    assert torch.equal(probs[0], probs[1])


def test_lone_surrogates_are_refused_naming_the_field(engine):
    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            # json.dumps escapes the surrogate as \ud800, which JSON decodes back to it
            prompt = await h.post("/v1/completions", headers=JSON, content=json.dumps(
                {"prompt": "a\ud800", "max_tokens": 2}))
            chat = await h.post("/v1/chat/completions", headers=JSON, content=json.dumps(
                {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"},
                                               {"role": "user", "content": "b\udfff"}]}))
            fine = await h.post("/v1/completions", json={"prompt": "a\u00e9", "max_tokens": 2})
            model = await h.post("/v1/completions", headers=JSON, content=json.dumps(
                {"model": "\ud800", "prompt": "a", "max_tokens": 2}))
            unload = await h.post("/v1/unload_lora_adapter", headers=JSON,
                                  content=json.dumps({"lora_name": "\ud800"}))
            stop = await h.post("/v1/completions", headers=JSON, content=json.dumps(
                {"prompt": "a", "max_tokens": 2, "stop": ["ok", "x\udc80"]}))
            return prompt, chat, fine, model, unload, stop

    prompt, chat, fine, model, unload, stop = asyncio.run(main())
    for r in (model, unload):  # no adapter has that name (it was the driver's codec error)
        assert r.status_code == 404 and "no adapter" in r.json()["error"]["message"], r.text
    assert prompt.status_code == 400, prompt.text
    assert "prompt is not valid Unicode" in prompt.json()["error"]["message"]
    assert chat.status_code == 400, chat.text
    assert "messages[1].content is not valid Unicode" in chat.json()["error"]["message"]
    assert "U+DFFF" in chat.json()["error"]["message"]
    assert fine.status_code == 200
    assert stop.status_code == 400, stop.text  # it was taken, and could never match
    assert stop.json()["error"]["param"] == "stop"
    assert "stop[1] is not valid Unicode" in stop.json()["error"]["message"]


UNPARSABLE = [  # (body, what the message says): each got Starlette's bare "There was an
    # error parsing the body", which says nothing of what to fix
    (b'{"prompt": "\xff\xfe", "max_tokens": 2}', "not valid UTF-8 (invalid start byte at byte 12)"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests arrays or objects too deep"),
    (b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", "a number of more than 4300 digits"),
    (b"[1, 2]", "the request body must be a JSON object"),
    (b"", "the request body is empty"),
]


def test_bodies_the_parser_cannot_read_get_a_message_that_says_why(engine):
    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            return [await h.post("/v1/completions", headers=JSON, content=body)
                    for body, _ in UNPARSABLE]

    for r, (_, says) in zip(asyncio.run(main()), UNPARSABLE):
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_a_content_part_without_its_text_is_named_not_called_unsupported(engine):
    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            chat = await h.post("/v1/chat/completions", json={
                "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text"}]}]})
            responses = await h.post("/v1/responses", json={"max_output_tokens": 2, "input": [
                {"role": "user", "content": [{"type": "input_text"}]}]})
            image = await h.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
            return chat, responses, image

    chat, responses, image = (r.json()["error"] for r in asyncio.run(main()))
    assert 'part of type "text" needs its text' in chat["message"]
    assert 'part of type "input_text" needs its text' in responses["message"]
    assert "type 'image_url' is not supported: send parts of type text" in image["message"]
    assert (chat["param"], responses["param"]) == ("messages", "input")


def test_unauthenticated_requests_get_401_before_their_body_is_read():
    metrics = Metrics()

    async def app(scope, receive, send):
        raise AssertionError("the app must not see an unauthenticated request")

    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"{" * 1024, "more_body": True}

    async def send(message):
        sent.append(message)

    guard = BearerAuth(app, token_rules("inf", "adm"), metrics)
    for headers in ([], [(b"authorization", b"Bearer adm")], [(b"authorization", b"inf")]):
        scope = {"type": "http", "path": "/v1/completions",
                 "headers": [(b"content-length", b"60000000"), *headers]}
        asyncio.run(guard(scope, receive, send))
    assert reads == []
    assert [m["status"] for m in sent if "status" in m] == [401, 401, 401]
    assert requests_counted(metrics, "/v1/completions", "UNAUTHENTICATED") == 3


def test_refused_requests_count_under_their_route_not_their_path():
    """Each made-up ``/v1/models/<name>`` without a token added a series of its own: anyone
    who reached the port could grow /metrics without bound (an outside probe)."""
    metrics = Metrics()
    sent = []

    async def send(message):
        sent.append(message)

    guard = BearerAuth(None, token_rules("inf", "adm"), metrics)
    for i in range(50):
        scope = {"type": "http", "path": f"/v1/models/x{i}/y", "headers": []}
        asyncio.run(guard(scope, None, send))
    assert [m["status"] for m in sent if "status" in m] == [401] * 50
    assert requests_counted(metrics, "/v1/models/{model_id}", "UNAUTHENTICATED") == 50
    labels = {s.labels["rpc"] for family in metrics.registry.collect()
              for s in family.samples if s.name == "nolaserve_requests_total"}
    assert labels == {"/v1/models/{model_id}"}


def test_every_route_but_health_and_metrics_needs_a_token():
    app = build_app(Endpoints(None, Metrics(), Gate()),
                    AdapterEndpoints(None, Config(), 0, 0.0))
    paths = {route.path for route in app.routes}
    assert paths - {"/health", "/metrics"} == set(token_rules("inf", "adm"))
    assert token_rules("", "") == {}  # no token configured: open


def test_an_unauthenticated_malformed_body_gets_401_not_400(engine):
    async def main():
        async with http_serving(engine, inference_token="inf", admin_token="adm") as (c, url):
            async with http(url) as anon, http(url, "inf") as user:
                got = {p: await anon.post(p, content=b"{") for p in (
                    "/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/adapters")}
                models = await anon.get("/v1/models")
                as_user = await user.post("/v1/completions", content=b"{")
                health = await anon.get("/health")
            return got, models, as_user, health, c.running.metrics

    got, models, as_user, health, metrics = asyncio.run(main())
    for path, r in got.items():
        assert r.status_code == 401, (path, r.text)
    assert "needs the header 'authorization: Bearer <token>' with the server's inference_token" \
        in got["/v1/completions"].json()["error"]["message"]  # "metadata" is gRPC's word
    assert "admin_token" in got["/v1/adapters"].json()["error"]["message"]
    assert models.status_code == 401 and health.status_code == 200
    assert as_user.status_code == 400  # with the token, the body is parsed
    assert requests_counted(metrics, "/v1/completions", "UNAUTHENTICATED") == 1


def test_model_names_resolve_to_the_adapter_registered_under_them():
    registered = {f"{BASE}:x", "x", BASE}.__contains__
    assert resolve_adapter(f"{BASE}:x", BASE, registered) == f"{BASE}:x"
    assert resolve_adapter("x", BASE, registered) == "x"
    assert resolve_adapter(f"{BASE}:y", BASE, registered) == "y"
    assert resolve_adapter(f"{BASE}:{BASE}", BASE, registered) == BASE
    assert resolve_adapter(BASE, BASE, registered) is None
    assert resolve_adapter("", BASE, registered) is None


def test_ids_that_shadow_model_names_are_refused_and_old_ones_still_served(engine):
    store = engine.store
    for bad in (BASE, f"{BASE}:x"):
        with pytest.raises(InvalidAdapterIdError, match="base model's id"):
            store.register(bad, nola(engine, 1))
    for bad in ("a/../../tmp/evil", "x/", "a//b", "a/./b"):  # a path, but not a plain one
        with pytest.raises(InvalidAdapterIdError, match="'..' part"):
            store.register(bad, nola(engine, 1))
    assert not store.registry.contains(BASE)
    store.register("x", nola(engine, 1))
    store.register("org/name.v2", nola(engine, 1))
    # registered before the checks existed: straight into the registry
    store.registry.register(f"{BASE}:x", "nola", nola(engine, 2))
    store.registry.register(BASE, "nola", nola(engine, 3))
    store.registry.register("a/../b", "nola", nola(engine, 4))
    served = []
    add_request = engine.add_request

    def spy(request_id, prompt, params, adapter_id=None, **kw):
        served.append(adapter_id)
        return add_request(request_id, prompt, params, adapter_id, **kw)

    engine.add_request = spy

    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            for name in (f"{BASE}:x", "x", f"{BASE}:{BASE}", BASE, "a/../b"):
                r = await h.post("/v1/completions", json={"model": name, "prompt": "hi",
                                                          "max_tokens": 1})
                assert r.status_code == 200, (name, r.text)
            grpc_out = await c.inference.Generate(request(max_tokens=1,
                                                          adapter=f"{BASE}:x"))
            models = (await h.get("/v1/models")).json()
            return grpc_out, [m["id"] for m in models["data"]]

    grpc_out, ids = asyncio.run(main())
    assert served == [f"{BASE}:x", "x", BASE, None, "a/../b", f"{BASE}:x"]
    assert len(grpc_out.token_ids) == 1
    assert sorted(ids) == sorted([BASE, f"{BASE}:x", "x", f"{BASE}:{BASE}", "a/../b",
                                  "org/name.v2"])


def test_error_bodies_take_statuses_that_http_has_no_name_for():
    assert error_body(499, "gone")["error"]["type"] == "CancelledError"
    assert error_body(422, "no")["error"]["type"] == "UnprocessableEntityError"
    assert error_body(599, "odd")["error"] == {"message": "odd", "type": "Error",
                                               "param": None, "code": 599}


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_is_counted_cancelled_without_a_traceback(engine, caplog,
                                                                       stream):
    slow_down(engine, 0.02)

    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            body = {"prompt": "héllo", "max_tokens": 200, "ignore_eos": True,
                    "stream": stream}
            call = asyncio.create_task(h.post("/v1/completions", json=body))
            await until(engine.has_unfinished, "the request to reach the engine")
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            await wait_idle(engine)
            metrics = c.running.metrics
            await until(lambda: requests_counted(metrics, "/v1/completions", "CANCELLED"),
                        "the cancelled request to be counted")
            return metrics

    with caplog.at_level(logging.WARNING):
        metrics = asyncio.run(main())
    assert requests_counted(metrics, "/v1/completions", "CANCELLED") == 1
    assert requests_counted(metrics, "/v1/completions", "INTERNAL") == 0
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert "HTTPStatus" not in caplog.text
    assert_no_leaks(engine)
