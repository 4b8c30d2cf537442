"""vLLM's ``logprob_token_ids``: with logprobs asked, each position reports the logprobs
of these token ids (in their order) instead of the k likeliest, for scoring a fixed label
set; held to transformers' ``log_softmax``, over the engine, HTTP (completions and chat,
as the official client sends it), gRPC and the client, and in the vLLM backend's
mapping."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama
from engine_helpers import greedy, make_engine, step_all
from openai_helpers import GREEDY, http, http_serving, openai_client, with_chat_template

from nolaserve.adapters.errors import InvalidRequestError
from nolaserve.clients.client import AsyncClient
from nolaserve.server.engine.engine_types import EngineLimits, check_limits
from nolaserve.server.engine.sequence import SamplingParams
from nolaserve.server.engine.vllm_args import token_logprob
from nolaserve.v1 import inference_pb2

PROMPT = [5, 17, 99, 3, 250, 42, 8]
LABELS = [40, 5, 299]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


@pytest.mark.parametrize(("fields", "message"), [
    ({"logprob_token_ids": [3]}, "needs logprobs set"),
    ({"logprobs": 0, "logprob_token_ids": []}, "needs logprobs set and at least one"),
    ({"logprobs": 0, "logprob_token_ids": [32]}, "logprob_token_ids entry 32 is out of range"),
    ({"logprobs": 0, "logprob_token_ids": [1] * 129}, "at most 128"),
])
def test_bad_values_say_what_to_fix(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        check_limits(EngineLimits(100, 50, 200, 10, vocab_size=32), [1, 2],
                     SamplingParams(**fields))


def test_each_position_reports_the_named_tokens_as_transformers_computes_them(model, bytebpe):
    engine = make_engine(model, bytebpe)
    engine.add_request("named", PROMPT, greedy(5, logprobs=1, logprob_token_ids=LABELS))
    engine.add_request("top", PROMPT, greedy(5, logprobs=2))
    outs = step_all(engine)
    named = [lp for o in outs["named"] for lp in o.logprobs]
    tokens = [t for o in outs["named"] for t in o.token_ids]
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT + tokens])).logits[0].float().log_softmax(dim=-1)
    for j, lp in enumerate(named):
        row = ref[len(PROMPT) - 1 + j]
        assert [t for t, _ in lp.top] == LABELS
        assert [v for _, v in lp.top] == pytest.approx(row[LABELS].tolist(), abs=1e-4)
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
    top = [lp for o in outs["top"] for lp in o.logprobs]
    assert [len(lp.top) for lp in top] == [2] * 5  # the row beside it keeps its top k
    assert [lp.token_id for lp in top] == tokens


def test_http_grpc_and_the_client_report_the_named_tokens(model, bytebpe):
    engine = make_engine(model, with_chat_template(bytebpe))
    text = "héllo"
    ids = engine.tokenizer(text)["input_ids"]
    engine.add_request("ref", ids, greedy(3, logprobs=0, logprob_token_ids=LABELS))
    want = [v for o in step_all(engine)["ref"] for lp in o.logprobs for _, v in lp.top]
    pieces = [bytebpe.decode([t]) for t in LABELS]
    named = {"logprob_token_ids": LABELS}

    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            oa = openai_client(url)
            completion = await oa.completions.create(
                model="", prompt=text, max_tokens=3, temperature=0, logprobs=0,
                extra_body=GREEDY | named)
            chat = await oa.chat.completions.create(
                model="", messages=[{"role": "user", "content": text}], max_tokens=3,
                temperature=0, logprobs=True, extra_body=GREEDY | named)
            bad = await h.post("/v1/completions", json={"prompt": text} | named)
            raw = await c.inference.Generate(inference_pb2.GenerateRequest(
                prompt=text, sampling=inference_pb2.SamplingParams(
                    max_tokens=3, temperature=0, ignore_eos=True, logprobs=0,
                    logprob_token_ids=LABELS)))
            async with AsyncClient(f"127.0.0.1:{c.running.port}") as client:
                typed = await client.generate(text, max_tokens=3, temperature=0,
                                              ignore_eos=True, logprobs=0, **named)
            return completion, chat, bad, raw, typed

    completion, chat, bad, raw, typed = asyncio.run(main())
    for top in completion.choices[0].logprobs.top_logprobs:
        assert set(pieces) <= set(top)  # and the sampled token's
    for entry in chat.choices[0].logprobs.content:
        assert [t.token for t in entry.top_logprobs] == pieces
    assert [t.logprob for lp in raw.logprobs for t in lp.top] == pytest.approx(want)
    assert [[t.token_id for t in lp.top] for lp in raw.logprobs] == [LABELS] * 3
    assert [v for lp in typed.logprobs for _, v in lp.top] == pytest.approx(want)
    assert bad.status_code == 400 and "needs logprobs set" in bad.json()["error"]["message"]


def test_the_vllm_backend_asks_vllm_for_them_and_reads_them_in_order():
    position = {t: SimpleNamespace(logprob=-float(t), rank=r)
                for r, t in enumerate([7, *LABELS, 1], start=1)}
    got = token_logprob(7, position, 1, LABELS)
    assert got.top == tuple((t, -float(t)) for t in LABELS) and got.logprob == -7.0
    assert token_logprob(7, position, 2).top == ((1, -1.0), (5, -5.0))
