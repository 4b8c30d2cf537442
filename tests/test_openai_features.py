"""The OpenAI request and response shapes of issue #30 item 1, driven by the official
``openai`` client (vLLM's extension fields through ``extra_body`` or raw httpx): ``n``,
batched prompts, ``echo``, completions and chat logprobs, ``logit_bias``, penalties and
``min_tokens``, whole and streamed; and ``Fanout``, which runs a request's choices."""

import asyncio
import json

import openai
import pytest
import torch
from conftest import tiny_llama
from engine_helpers import make_engine, run
from openai_helpers import GREEDY, http, http_serving, openai_client, with_chat_template
from server_helpers import slow_down, wait_idle

from nolaserve.adapters.nola import random_nola
from nolaserve.server.engine.engine_types import RequestOutput
from nolaserve.server.engine.sequence import SamplingParams
from nolaserve.server.fanout import Fanout
from nolaserve.server.openai_api.logprobs import LOWEST

PROMPT = "héllo wörld"
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


@pytest.fixture
def engine(model, bytebpe):
    return make_engine(model, with_chat_template(bytebpe))


def serve(engine, fn):
    """Run ``fn(openai client, httpx client)`` against a server on ``engine``."""
    async def main():
        async with http_serving(engine) as (_, url), http(url) as h:
            return await fn(openai_client(url), h)
    return asyncio.run(main())


async def chunks_of(stream) -> list:
    return [chunk async for chunk in stream]


def by_index(chunks, chat: bool = False) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            piece = (c.delta.content or "") if chat else c.text
            texts[c.index] = texts.get(c.index, "") + piece
    return texts


def test_n_choices_are_seeded_seed_plus_j_with_usage_counting_the_prompt_once(engine):
    async def fn(oa, h):
        kw = dict(model="", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=5,
                  extra_body=GREEDY)
        whole = await oa.completions.create(n=3, **kw)
        singles = [await oa.completions.create(**kw | {"seed": 5 + j}) for j in range(3)]
        stream = await chunks_of(await oa.completions.create(
            n=3, stream=True, stream_options={"include_usage": True}, **kw))
        return whole, singles, stream

    whole, singles, stream = serve(engine, fn)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.token_ids for c in whole.choices] == [s.choices[0].token_ids for s in singles]
    assert len({tuple(c.token_ids) for c in whole.choices}) > 1  # the seeds differ
    prompt_tokens = singles[0].usage.prompt_tokens
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 18)
    *body, last = stream
    assert by_index(body) == {c.index: c.text for c in whole.choices}
    assert {c.choices[0].finish_reason for c in body if c.choices[0].finish_reason} == {"length"}
    assert last.choices == [] and last.usage.total_tokens == prompt_tokens + 18


def test_a_negative_seed_is_a_seed_as_in_vllm(engine):
    """vLLM takes any 64-bit signed seed (clients send -1): the same tokens each time, as
    torch seeds a generator with it; 2^63 is a 400 naming the field. Choice j's seed + j
    wraps around: 2^63 - 1 is a seed with any n (it was a 400 naming 2^63 with n = 2)."""
    async def fn(oa, h):
        kw = dict(model="", prompt=PROMPT, max_tokens=6, temperature=1.0, extra_body=GREEDY)
        runs = [await oa.completions.create(seed=-1, **kw) for _ in range(2)]
        other = await oa.completions.create(seed=-2**63, **kw)
        wraps = await oa.completions.create(seed=2**63 - 1, n=2, **kw)
        bad = await h.post("/v1/completions", json={"prompt": PROMPT, "seed": 2**63})
        return runs, other, wraps, bad

    runs, other, wraps, bad = serve(engine, fn)
    assert runs[0].choices[0].token_ids == runs[1].choices[0].token_ids
    assert other.choices[0].finish_reason == "length"
    assert wraps.choices[1].token_ids == other.choices[0].token_ids
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "seed"


def test_continuous_usage_stats_give_each_chunk_its_choices_usage_so_far(engine):
    """vLLM's ``stream_options.continuous_usage_stats``: every chunk's usage is its own
    choice's prompt and the tokens streamed so far (the chat role chunk's 0), two prompts
    of different lengths with ``n = 2``; without it, chunks have ``usage: null``."""
    prompts = [PROMPT, PROMPT * 3]
    options = {"include_usage": True, "continuous_usage_stats": True}

    async def fn(oa, h):
        kw = dict(model="", max_tokens=5, temperature=1.0, seed=5, stream=True,
                  extra_body=GREEDY)
        completion = await chunks_of(await oa.completions.create(
            prompt=prompts, n=2, stream_options=options, **kw))
        chat = await chunks_of(await oa.chat.completions.create(
            messages=MESSAGES, stream_options=options, **kw))
        plain = await chunks_of(await oa.completions.create(
            prompt=PROMPT, stream_options={"include_usage": True}, **kw))
        return completion, chat, plain

    completion, chat, plain = serve(engine, fn)
    lengths = [len(engine.tokenizer(p)["input_ids"]) for p in prompts]
    *body, last = completion
    seen = {}
    for chunk in body:
        c = chunk.choices[0]
        seen[c.index] = seen.get(c.index, 0) + len(c.token_ids or [])
        assert chunk.usage.prompt_tokens == lengths[c.index // 2]
        assert chunk.usage.completion_tokens == seen[c.index]
        assert chunk.usage.total_tokens == lengths[c.index // 2] + seen[c.index]
    assert seen == dict.fromkeys(range(4), 5)
    assert last.usage.prompt_tokens == sum(lengths) and last.usage.completion_tokens == 20
    role, *rest, final = chat
    assert role.usage.completion_tokens == 0 and role.usage.prompt_tokens > 0
    assert [c.usage.completion_tokens for c in rest] == list(range(1, 6))
    assert final.usage.completion_tokens == 5
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage.completion_tokens == 5


def test_chat_n_streams_a_role_chunk_per_choice(engine):
    async def fn(oa, h):
        kw = dict(model="", messages=MESSAGES, max_tokens=4, n=2, seed=1, extra_body=GREEDY)
        whole = await oa.chat.completions.create(**kw)
        stream = await chunks_of(await oa.chat.completions.create(stream=True, **kw))
        return whole, stream

    whole, stream = serve(engine, fn)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.usage.completion_tokens == 8
    roles = [c.choices[0].index for c in stream if c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]
    assert by_index(stream, chat=True) == {c.index: c.message.content for c in whole.choices}


def test_a_batch_of_prompts_is_indexed_prompt_major(engine):
    prompts = [PROMPT, "café", "naïve"]

    async def fn(oa, h):
        batch = await oa.completions.create(model="", prompt=prompts, n=2, max_tokens=4,
                                            temperature=0, extra_body=GREEDY)
        singles = [await oa.completions.create(model="", prompt=p, max_tokens=4,
                                               temperature=0, extra_body=GREEDY)
                   for p in prompts]
        ids = [[5, 6, 7], [8, 9]]
        streamed = await chunks_of(await oa.completions.create(
            model="", prompt=ids, max_tokens=3, temperature=0, stream=True,
            extra_body=GREEDY))
        return batch, singles, streamed

    batch, singles, streamed = serve(engine, fn)
    assert [c.index for c in batch.choices] == list(range(6))
    for i, single in enumerate(singles):
        for j in range(2):
            assert batch.choices[i * 2 + j].token_ids == single.choices[0].token_ids
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == 6 * 4
    assert set(by_index(streamed)) == {0, 1}


def test_n_and_batch_bounds_and_best_of_are_checked(engine):
    async def fn(oa, h):
        body = {"prompt": PROMPT, "max_tokens": 2}
        return {label: await h.post("/v1/completions", json=body | extra) for label, extra in [
            ("n0", {"n": 0}), ("n17", {"n": 17}), ("batch", {"prompt": ["a"] * 17, "n": 4}),
            ("best_of", {"n": 2, "best_of": 3}), ("best_of_n", {"n": 2, "best_of": 2})]}

    r = serve(engine, fn)
    for label, param in [("n0", "n"), ("n17", "n"), ("batch", "prompt"),
                         ("best_of", "best_of")]:
        assert r[label].status_code == 400, label
        error = r[label].json()["error"]
        assert error["param"] == param and error["type"] == "BadRequestError", error
    assert "between 1 and 16" in r["n17"].json()["error"]["message"]
    assert "split the batch" in r["batch"].json()["error"]["message"]
    assert len(r["best_of_n"].json()["choices"]) == 2


def test_a_bad_prompt_in_a_batch_fails_the_request_with_no_child_left(engine):
    async def fn(oa, h):
        results = []
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as err:
                out = await oa.completions.create(
                    model="", prompt=[[5, 6], [5, 999]], n=3, max_tokens=50,
                    stream=stream, extra_body=GREEDY)
                await chunks_of(out) if stream else None
            results.append(err.value)
        await wait_idle(engine)
        return results

    for err in serve(engine, fn):
        assert "999" in err.body["message"]
    assert not engine.has_unfinished()


def test_a_client_that_goes_away_aborts_every_choice(engine):
    slow_down(engine, 0.02)

    async def fn(oa, h):
        body = {"prompt": [PROMPT, "café"], "n": 3, "max_tokens": 200, "stream": True,
                "ignore_eos": True}
        async with h.stream("POST", "/v1/completions", json=body) as r:
            first = await anext(r.aiter_lines())
            running = len(engine.requests)
        await wait_idle(engine)
        return first, running

    first, running = serve(engine, fn)
    assert first.startswith("data: ") and running == 6
    assert not engine.has_unfinished()


def check_completion_logprobs(lp, num_tokens: int, k: int) -> None:
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == num_tokens
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert LOWEST <= value <= 0 and token in top and len(top) <= k + 1
        assert value == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the argmax


def test_completions_logprobs_whole_and_streamed(engine):
    async def fn(oa, h):
        kw = dict(model="", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                  extra_body=GREEDY)
        whole = await oa.completions.create(**kw)
        stream = await chunks_of(await oa.completions.create(stream=True, **kw))
        return whole, stream

    whole, stream = serve(engine, fn)
    lp = whole.choices[0].logprobs
    check_completion_logprobs(lp, 5, 3)
    assert any(len(top) == 4 for top in lp.top_logprobs) or len(set(lp.tokens)) < 5
    streamed = [t for c in stream if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens
    offsets = [o for c in stream if c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_chat_logprobs_whole_and_streamed(engine):
    async def fn(oa, h):
        kw = dict(model="", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                  top_logprobs=2, extra_body=GREEDY)
        whole = await oa.chat.completions.create(**kw)
        stream = await chunks_of(await oa.chat.completions.create(stream=True, **kw))
        plain = await oa.chat.completions.create(**kw | {"top_logprobs": None})
        bad = {}
        for label, extra in [("without", {"logprobs": False}), ("k", {"top_logprobs": 21})]:
            with pytest.raises(openai.BadRequestError) as err:
                await oa.chat.completions.create(**kw | extra)
            bad[label] = err.value.body
        return whole, stream, plain, bad

    whole, stream, plain, bad = serve(engine, fn)
    content = whole.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    streamed = [e for c in stream[1:] if c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert bad["without"]["param"] == bad["k"]["param"] == "top_logprobs"
    assert "logprobs" in bad["without"]["message"] and "20" in bad["k"]["message"]


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(engine):
    """vLLM's ``return_tokens_as_token_ids``: every token of the logprobs is
    ``"token_id:<id>"`` with the same values; as in vLLM, completions' offsets count the
    placeholders and a chat token's own ``bytes`` stay its text's."""
    label = "token_id:{}".format
    ids = {"return_tokens_as_token_ids": True}

    async def fn(oa, h):
        kw = dict(model="", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
        chat = dict(model="", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                    top_logprobs=2)
        return [await oa.completions.create(**kw, extra_body=GREEDY | f) for f in ({}, ids)] \
            + [await oa.chat.completions.create(**chat, extra_body=GREEDY | f)
               for f in ({}, ids)]

    text, by_id, chat, chat_by_id = serve(engine, fn)
    tokens = by_id.choices[0].token_ids
    lp, plain = by_id.choices[0].logprobs, text.choices[0].logprobs
    assert lp.tokens == [label(t) for t in tokens] and lp.token_logprobs == plain.token_logprobs
    for top, text_top in zip(lp.top_logprobs, plain.top_logprobs):  # texts may collide,
        assert set(text_top.values()) <= set(top.values()) and len(top) in (2, 3)  # ids not
    assert all(k.startswith("token_id:") for top in lp.top_logprobs for k in top)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for got, want, token in zip(chat_by_id.choices[0].logprobs.content,
                                chat.choices[0].logprobs.content,
                                chat_by_id.choices[0].token_ids):
        assert (got.token, got.logprob, got.bytes) == (label(token), want.logprob, want.bytes)
        assert [t.logprob for t in got.top_logprobs] == [t.logprob for t in want.top_logprobs]
        assert all(t.token.startswith("token_id:") and t.bytes == list(t.token.encode())
                   for t in got.top_logprobs)


def test_echo_puts_the_prompt_and_its_logprobs_first(engine):
    ids = engine.tokenizer(PROMPT)["input_ids"]

    async def fn(oa, h):
        kw = dict(model="", max_tokens=3, temperature=0, echo=True, extra_body=GREEDY)
        text = await oa.completions.create(prompt=PROMPT, **kw)
        tokens = await oa.completions.create(prompt=ids, logprobs=1, **kw)
        stream = await chunks_of(await oa.completions.create(prompt=PROMPT, stream=True,
                                                             **kw))
        with pytest.raises(openai.BadRequestError) as chat:
            await oa.chat.completions.create(model="", messages=MESSAGES,
                                             extra_body={"echo": True})
        return text, tokens, stream, chat.value.body

    text, tokens, stream, chat = serve(engine, fn)
    assert text.choices[0].text.startswith(PROMPT)
    assert len(text.choices[0].text) > len(PROMPT)
    choice = tokens.choices[0]
    assert choice.text.startswith(engine.tokenizer.decode(ids))
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 3 == tokens.usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert stream[0].choices[0].text.startswith(PROMPT)
    assert by_index(stream)[0] == text.choices[0].text
    assert chat["param"] == "echo"


def test_echo_with_max_tokens_0_scores_the_prompt_and_null_is_a_fields_default(engine):
    """``echo`` with ``max_tokens`` 0 (vLLM and OpenAI's legacy API): the prompt alone,
    with its logprobs, whole and streamed, no completion token counted. A null ``stream``
    or ``echo`` (OpenAI's nullable fields; clients that send every field send it) is the
    default: both were 400s."""
    ids = engine.tokenizer(PROMPT)["input_ids"]

    async def fn(oa, h):
        kw = dict(model="", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
        whole = await oa.completions.create(**kw)
        stream = await chunks_of(await oa.completions.create(stream=True, **kw))
        nulls = [await h.post("/v1/completions", json={
                     "prompt": PROMPT, "max_tokens": 2, "stream": None, "echo": None}),
                 await h.post("/v1/chat/completions", json={
                     "messages": MESSAGES, "max_tokens": 2, "stream": None})]
        return whole, stream, nulls

    whole, stream, nulls = serve(engine, fn)
    choice = whole.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(ids) and choice.logprobs.token_logprobs[0] is None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), 0)
    assert by_index(stream) == {0: PROMPT}
    assert [t for c in stream for t in c.choices[0].logprobs.tokens] == choice.logprobs.tokens
    assert [r.status_code for r in nulls] == [200, 200]
    assert "choices" in nulls[0].json() and "choices" in nulls[1].json()


def ranks_around(row: torch.Tensor, token: int, tol: float = 1e-4) -> range:
    """The ranks ``token`` may have in ``row`` when logits within ``tol`` could swap."""
    return range(int((row > row[token] + tol).sum()) + 1, int((row > row[token] - tol).sum()) + 2)


def test_prompt_logprobs_in_vllms_shape(engine, model):
    """vLLM's prompt_logprobs: each prompt position after the first maps the prompt token
    and the k most likely to ``{logprob, rank, decoded_token}``, held to transformers'
    ``log_softmax``; chat puts them on the response; streaming refuses them, as vLLM."""
    ids = engine.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)

    async def fn(oa, h):
        comp = await h.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1,
                                                      "prompt_logprobs": 2})
        chat = await h.post("/v1/chat/completions", json={
            "messages": MESSAGES, "max_tokens": 1, "prompt_logprobs": 0, "n": 2})
        streamed = await h.post("/v1/completions", json={"prompt": PROMPT, "stream": True,
                                                          "prompt_logprobs": 1})
        return comp.json(), chat.json(), streamed

    comp, chat, streamed = serve(engine, fn)
    got = comp["choices"][0]["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    for pos, entry in enumerate(got[1:]):  # the logits at pos give token pos + 1
        row, token = ref[pos], ids[pos + 1]
        mine = entry[str(token)]
        assert mine["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
        assert mine["rank"] in ranks_around(row, token)
        assert mine["decoded_token"] == engine.tokenizer.decode([token])
        top = row.topk(2).indices.tolist()
        assert {int(t) for t in entry} == {token, *top}
        assert [entry[str(t)]["rank"] for t in top if t != token] == \
            [r for r, t in enumerate(top, 1) if t != token]
    assert "prompt_logprobs" not in chat["choices"][0]
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert chat["prompt_logprobs"][0] is None
    assert all(len(e) == 1 for e in chat["prompt_logprobs"][1:])  # k = 0: the token alone
    assert streamed.status_code == 400
    assert streamed.json()["error"]["param"] == "prompt_logprobs"


def test_logit_bias_and_min_tokens_reach_the_engine(engine):
    eos = engine.tokenizer.eos_token_id

    async def fn(oa, h):
        kw = dict(model="", prompt=PROMPT, max_tokens=6, temperature=0)
        forced = await oa.completions.create(logit_bias={"7": 100}, extra_body=GREEDY, **kw)
        stops = await oa.completions.create(logit_bias={str(eos): 100}, **kw)
        held = await oa.completions.create(logit_bias={str(eos): 100},
                                           extra_body={"min_tokens": 4}, **kw)
        bad = [await h.post("/v1/completions", json={"prompt": PROMPT, "logit_bias": b})
               for b in ({"x": 1}, {"7": 101}, {"300": 1})]
        return forced, stops, held, bad

    forced, stops, held, bad = serve(engine, fn)
    assert forced.choices[0].token_ids == [7] * 6
    assert stops.choices[0].finish_reason == "stop" and stops.usage.completion_tokens == 1
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"
    assert [r.status_code for r in bad] == [400, 400, 400]
    assert bad[0].json()["error"]["param"] == "logit_bias"


def test_min_p_and_stop_token_ids_reach_the_engine(engine):
    """vLLM's min_p and stop_token_ids, as the official client sends them (extra_body):
    the engine's tokens for the same seeded request; bad values are 400s naming them."""
    ids = engine.tokenizer(PROMPT)["input_ids"]
    sampled = dict(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    free = run(engine, {"f": (ids, SamplingParams(**sampled), None)})["f"]
    cases = {"min_p": {"min_p": 0.9}, "stop": {"stop_token_ids": [free[2]]}}
    want = {name: run(engine, {name: (ids, SamplingParams(**sampled | f), None)})[name]
            for name, f in cases.items()}

    async def fn(oa, h):
        got = {name: await oa.completions.create(
            model="", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5,
            extra_body=GREEDY | f) for name, f in cases.items()}
        bad = [await h.post("/v1/completions", json={"prompt": PROMPT, **b})
               for b in ({"min_p": 2}, {"stop_token_ids": [300]}, {"stop_token_ids": "x"})]
        return got, bad

    got, bad = serve(engine, fn)
    assert {name: out.choices[0].token_ids for name, out in got.items()} == want
    assert want["stop"] == free[: free.index(free[2]) + 1] and want["min_p"] != free
    assert got["stop"].choices[0].finish_reason == "stop"
    assert got["stop"].choices[0].model_extra["stop_reason"] == free[2]  # vLLM's
    assert got["min_p"].choices[0].model_extra["stop_reason"] is None  # by length
    assert [r.status_code for r in bad] == [400, 400, 400]
    assert "min_p must be in [0, 1]" in bad[0].json()["error"]["message"]
    assert "stop_token_ids entry 300" in bad[1].json()["error"]["message"]


def test_include_stop_str_and_special_tokens_shape_the_text(engine):
    """vLLM's include_stop_str_in_output (the text ends after the stop string) and
    skip_special_tokens false (a special token's text kept: EOS's while it is ignored; an
    EOS that ends the request is not output), as the official client sends them."""
    tok, eos = engine.tokenizer, engine.tokenizer.eos_token_id

    async def fn(oa, h):
        kw = dict(model="", prompt=PROMPT, max_tokens=12, temperature=0)
        free = await oa.completions.create(extra_body=GREEDY, **kw)
        stop = free.choices[0].text[4:6]
        cut = {inc: await oa.completions.create(
            stop=[stop], extra_body=GREEDY | {"include_stop_str_in_output": inc}, **kw)
            for inc in (False, True)}
        special = {skip: await oa.completions.create(  # EOS ignored: text, not an end
            logit_bias={str(eos): 100}, extra_body=GREEDY | {"skip_special_tokens": skip},
            **kw) for skip in (True, False)}
        ended = await oa.completions.create(logit_bias={str(eos): 100}, extra_body={
            "skip_special_tokens": False, "return_token_ids": True}, **kw)
        return free, stop, cut, special, ended

    free, stop, cut, special, ended = serve(engine, fn)
    text = free.choices[0].text
    assert cut[False].choices[0].text == text[: text.index(stop)]
    assert cut[True].choices[0].text == text[: text.index(stop) + len(stop)]
    assert {c.choices[0].model_extra["stop_reason"] for c in cut.values()} == {stop}
    ids = special[True].choices[0].token_ids
    assert ids == special[False].choices[0].token_ids == [eos] * 12
    assert special[True].choices[0].text == ""
    assert special[False].choices[0].text == tok.decode(ids, skip_special_tokens=False)
    # EOS that ends the request: its text is not output, as vLLM does
    assert ended.choices[0].token_ids == [eos] and ended.choices[0].text == ""


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(model, bytebpe):
    """vLLM's truncate_prompt_tokens: the last k prompt tokens (the engine's tokens for
    them; the first k with ``truncation_side: right``), -1 as many as a prompt may have,
    so an over-long prompt is served, not refused; 0 is a 400 naming it."""
    engine = make_engine(model, with_chat_template(bytebpe), max_prompt_tokens=12)
    ids = engine.tokenizer(PROMPT * 8)["input_ids"]
    assert len(ids) > 12
    want = [run(engine, {"r": (part, SamplingParams(max_tokens=4, temperature=0,
                                                    ignore_eos=True), None)})["r"]
            for part in (ids[-5:], ids[:5])]

    async def fn(oa, h):
        kw = dict(model="", prompt=PROMPT * 8, max_tokens=4, temperature=0)
        kept = [await oa.completions.create(extra_body=GREEDY | {
            "truncate_prompt_tokens": 5, **side}, **kw)
            for side in ({}, {"truncation_side": "right"})]
        fit = await oa.completions.create(extra_body=GREEDY | {"truncate_prompt_tokens": -1},
                                          **kw)
        bad = [await h.post("/v1/completions", json={"prompt": PROMPT * 8, **b})
               for b in ({"truncate_prompt_tokens": 0}, {},
                         {"truncate_prompt_tokens": 5, "truncation_side": "middle"})]
        return kept, fit, bad

    kept, fit, bad = serve(engine, fn)
    assert [k.choices[0].token_ids for k in kept] == want and want[0] != want[1]
    assert kept[0].usage.prompt_tokens == kept[1].usage.prompt_tokens == 5
    assert fit.usage.prompt_tokens == 12
    assert [r.status_code for r in bad] == [400] * 3  # untruncated: over max_prompt_tokens
    assert bad[0].json()["error"]["param"] == "truncate_prompt_tokens"
    assert "truncation_side must be left" in bad[2].json()["error"]["message"]


def test_penalties_reach_the_engine_as_sampling_params(engine):
    ids = engine.tokenizer(PROMPT)["input_ids"]
    fields = {"presence_penalty": 1.5, "frequency_penalty": 2.0, "repetition_penalty": 1.3}
    want = {}
    for name, value in fields.items():
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, **{name: value})
        want[name] = run(engine, {name: (ids, params, None)})[name]
    plain = run(engine, {"p": (ids, SamplingParams(max_tokens=8, temperature=0,
                                                     ignore_eos=True), None)})["p"]

    async def fn(oa, h):
        return {name: await oa.completions.create(
            model="", prompt=PROMPT, max_tokens=8, temperature=0,
            extra_body=GREEDY | {name: value}) for name, value in fields.items()}

    got = serve(engine, fn)
    assert {name: out.choices[0].token_ids for name, out in got.items()} == want
    assert any(w != plain for w in want.values())  # the penalties do change the output


def test_choices_keep_their_fields_inside_a_mixed_adapter_batch(engine):
    engine.store.register("a", random_nola(engine.store.spec, seed=1, rank=4,
                                           num_basis=16).to_bytes())
    slow_down(engine, 0.01)  # so that the requests share steps

    async def fn(oa, h):
        kw = dict(prompt=PROMPT, max_tokens=6, temperature=0, extra_body=GREEDY)
        solo = await oa.completions.create(model="", **kw)
        together = await asyncio.gather(
            oa.completions.create(model="a", n=2, logit_bias={"7": 100}, logprobs=2, **kw),
            oa.completions.create(model="", **kw),
            oa.completions.create(model="a", **kw))
        return solo, together

    solo, (forced, base, adapted) = serve(engine, fn)
    assert [c.token_ids for c in forced.choices] == [[7] * 6] * 2
    assert all(len(c.logprobs.tokens) == 6 for c in forced.choices)
    assert base.choices[0].token_ids == solo.choices[0].token_ids
    assert adapted.choices[0].token_ids != [7] * 6


async def _child(outputs: list[RequestOutput], closed: list[str], name: str,
                 fail_after: int | None = None):
    try:
        for i, out in enumerate(outputs):
            if i == fail_after:
                raise ValueError(f"{name} failed")
            yield out
            await asyncio.sleep(0)
        await asyncio.Event().wait()  # never finishes unless closed
    finally:
        closed.append(name)


def test_fanout_merges_children_and_closes_all_when_one_fails():
    def outs(rid: str, n: int) -> list[RequestOutput]:
        return [RequestOutput(rid, str(i), [i]) for i in range(n)]

    async def main():
        closed: list[str] = []
        fan = Fanout([_child(outs("a", 3), closed, "a"),
                      _child(outs("b", 5), closed, "b", fail_after=2)], [[1], [2]])
        await fan.start()
        got = []
        with pytest.raises(ValueError, match="b failed"):
            async for index, out in fan:
                got.append((index, out.text))
        return closed, got

    closed, got = asyncio.run(main())
    assert sorted(closed) == ["a", "b"]
    assert got[:2] == [(0, "0"), (1, "0")]  # every child's first output comes first
    assert [t for i, t in got if i == 1] == ["0", "1"]


def test_return_token_ids_gives_the_prompts_too_as_vllm_does(engine):
    """vLLM's ``return_token_ids`` also returns the prompt's token ids (RL clients read
    both): on each completions choice (streamed: its first chunk), on the chat response
    (streamed: the first chunk)."""
    ids = engine.tokenizer(PROMPT)["input_ids"]
    chat_ids = engine.tokenizer(engine.tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )["input_ids"]
    body = {"max_tokens": 3, "temperature": 0, "ignore_eos": True, "return_token_ids": True}

    async def fn(oa, h):
        comp = (await h.post("/v1/completions", json={
            "prompt": [PROMPT, "x"], "n": 2, **body})).json()
        chat = (await h.post("/v1/chat/completions", json={"messages": MESSAGES,
                                                           **body})).json()
        streams = []
        for path, extra in (("/v1/completions", {"prompt": PROMPT, "n": 2}),
                            ("/v1/chat/completions", {"messages": MESSAGES})):
            r = await h.post(path, json={**body, **extra, "stream": True})
            streams.append([json.loads(x[6:]) for x in r.text.split("\n\n")
                            if x.startswith("data: {")])
        return comp, chat, streams

    comp, chat, (comp_stream, chat_stream) = serve(engine, fn)
    x_ids = engine.tokenizer("x")["input_ids"]
    assert [c["prompt_token_ids"] for c in comp["choices"]] == [ids, ids, x_ids, x_ids]
    assert chat["prompt_token_ids"] == chat_ids
    assert "prompt_token_ids" not in chat["choices"][0]
    firsts = [c["choices"][0] for c in comp_stream if "prompt_token_ids" in c["choices"][0]]
    assert sorted(c["index"] for c in firsts) == [0, 1]
    assert all(c["prompt_token_ids"] == ids for c in firsts)
    assert [c.get("prompt_token_ids") for c in chat_stream][:2] == [chat_ids, None]


def test_cached_tokens_of_n_choices_are_those_cached_before_the_prompt_came():
    """Over HTTP the n choices arrive as n requests: whichever computed the prompt's
    blocks reported 0, the others the blocks they shared, and usage took choice 0's, so
    the same request reported 0 or 48 at random (an outside probe). Each prompt now
    counts its choices' least."""
    from nolaserve.server.engine.sequence import FinishReason
    from nolaserve.server.openai_api.completion_bodies import CompletionBodies, Shape

    bodies = CompletionBodies(Shape(chat=False, model="m", request_id="r", n=3,
                                    cached_details=True))
    for index, cached in enumerate((48, 0, 48, 16, 32, 16)):  # two prompts, 3 choices each
        bodies.add(index, RequestOutput(f"r-{index}", "a", [5], True, FinishReason.LENGTH,
                                        50, 1, cached_tokens=cached))
    usage = bodies.complete()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0 + 16}
    assert usage["prompt_tokens"] == 100
