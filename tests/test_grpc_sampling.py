"""The OpenAI sampling features over gRPC (parity with HTTP, issue #30's fields): logprobs
and prompt logprobs equal to the engine's, logit bias / penalties / min_tokens giving the
engine's tokens, structured JSON output, INVALID_ARGUMENT naming each bad field, old
requests unchanged, an oversized response counted as the client saw it, and ``n``."""

import asyncio
import json
import math
import re
import struct

import grpc
import jsonschema
import pytest
from conftest import tiny_llama
from engine_helpers import make_engine, run
from openai_helpers import http, http_serving
from server_helpers import BackgroundServer, expect_code, request, serving

from nolaserve.clients.client import AsyncClient, Client
from nolaserve.server.convert import sampling_params
from nolaserve.server.engine.sequence import SamplingParams, StructuredSpec
from nolaserve.v1 import inference_pb2

Code = grpc.StatusCode
PROMPT = "héllo wörld"
SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "color": {"enum": ["red", "green"]}},
    "required": ["ok", "n", "color"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model():
    # EOS 0 is the tokenizer's <eos> (structured output ends on it)
    return tiny_llama(vocab_size=300, eos_token_id=0)


@pytest.fixture
def engine(model, bytebpe):
    return make_engine(model, bytebpe)


def offline(model, tokenizer, params: SamplingParams):
    """The engine's outputs for PROMPT with ``params``, stepped directly."""
    engine = make_engine(model, tokenizer)
    engine.add_request("r", tokenizer(PROMPT)["input_ids"], params, None)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == "r"]
    return outs


def entries(messages) -> list[tuple]:
    """Engine ``TokenLogprob``s or their proto messages as comparable tuples (float32, as
    the proto carries them)."""
    def f32(x: float) -> float:
        return struct.unpack("f", struct.pack("f", x))[0]

    def pair(t) -> tuple[int, float]:
        return (t[0], f32(t[1])) if isinstance(t, tuple) else (t.token_id, f32(t.logprob))

    return [(e.token_id, f32(e.logprob), [pair(t) for t in e.top], e.rank) for e in messages]


def test_logprobs_and_prompt_logprobs_equal_the_engines(model, bytebpe, engine):
    outs = offline(model, bytebpe, SamplingParams(max_tokens=6, temperature=0.0,
                                                  ignore_eos=True, logprobs=3,
                                                  prompt_logprobs=2))
    want = entries([e for o in outs for e in o.logprobs])
    want_prompt = entries(outs[0].prompt_logprobs[1:])

    async def main():
        async with serving(engine) as c:
            req = request(PROMPT, max_tokens=6, logprobs=3, prompt_logprobs=2)
            one = await c.inference.Generate(req)
            stream = [m async for m in c.inference.GenerateStream(req)]
            async with AsyncClient(f"127.0.0.1:{c.running.port}") as client:
                got = await client.generate(PROMPT, max_tokens=6, temperature=0.0,
                                            ignore_eos=True, logprobs=3, prompt_logprobs=2)
            return one, stream, got

    one, stream, got = asyncio.run(main())
    assert [e[0] for e in want] == list(one.token_ids) and len(want) == 6
    assert entries(one.logprobs) == want and entries(one.prompt_logprobs) == want_prompt
    assert all(len(e.top) == 3 and e.rank == 1 for e in one.logprobs)  # greedy: the likeliest
    assert entries([e for m in stream for e in m.logprobs]) == want
    assert entries(stream[0].prompt_logprobs) == want_prompt
    assert not any(m.prompt_logprobs for m in stream[1:])
    assert entries(got.logprobs) == want and entries(got.prompt_logprobs) == want_prompt


PROCESSED = [
    dict(logit_bias={7: 100.0}),
    dict(presence_penalty=2.0, frequency_penalty=1.5),
    dict(repetition_penalty=3.0),
    dict(min_tokens=5, max_tokens=8),
]


@pytest.mark.parametrize("fields", PROCESSED)
def test_bias_penalties_and_min_tokens_give_the_engines_tokens(model, bytebpe, engine, fields):
    plain = dict(max_tokens=8, temperature=0.0)
    params = plain | fields
    want = [t for o in offline(model, bytebpe, SamplingParams(**params)) for t in o.token_ids]
    default = [t for o in offline(model, bytebpe, SamplingParams(**plain)) for t in o.token_ids]

    async def main():
        async with serving(engine) as c:
            return await c.inference.Generate(inference_pb2.GenerateRequest(
                prompt=PROMPT, sampling=inference_pb2.SamplingParams(**params)))

    assert list(asyncio.run(main()).token_ids) == want
    assert want != default or "min_tokens" in fields  # the field changes the tokens
    if "logit_bias" in fields:
        assert set(want) == {7}
    if "min_tokens" in fields:
        assert len(want) >= 5


def test_min_p_and_stop_token_ids_give_the_engines_tokens(model, bytebpe, engine):
    """vLLM's min_p, stop_token_ids and truncate_prompt_tokens over gRPC: the offline
    engine's tokens for the same seeded request (the last 3 prompt tokens for the third,
    the first 3 for the fourth), and a stop token ends it with STOP, the token kept."""
    sampled = dict(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    free = [t for o in offline(model, bytebpe, SamplingParams(**sampled)) for t in o.token_ids]
    cases = [dict(min_p=0.9), dict(stop_token_ids=[free[2]]), dict(truncate_prompt_tokens=3),
             dict(truncate_prompt_tokens=3, truncation_side="right")]
    want = [[t for o in offline(model, bytebpe, SamplingParams(**sampled | f)) for t in o.token_ids]
            for f in cases[:2]]
    ids = bytebpe(PROMPT)["input_ids"]
    want += [run(make_engine(model, bytebpe), {"r": (part, SamplingParams(**sampled), None)})["r"]
             for part in (ids[-3:], ids[:3])]

    async def main():
        async with serving(engine) as c:
            raw = [await c.inference.Generate(inference_pb2.GenerateRequest(
                prompt=PROMPT, sampling=inference_pb2.SamplingParams(**sampled | f)))
                for f in cases]
            async with AsyncClient(f"127.0.0.1:{c.running.port}") as client:
                typed = [await client.generate(PROMPT, **sampled | f) for f in cases]
            return raw, typed

    got, typed = asyncio.run(main())
    assert [list(g.token_ids) for g in got] == want == [t.token_ids for t in typed]
    assert got[2].usage.prompt_tokens == 3
    assert want[1] == free[: free.index(free[2]) + 1] and want[0] != free
    assert got[1].finish_reason == inference_pb2.FINISH_REASON_STOP
    assert got[1].stop_token_id == free[2] == typed[1].stop_reason  # vLLM's stop_reason
    assert got[0].WhichOneof("stop_reason") is None and typed[0].stop_reason is None


def test_stop_string_and_special_token_text_fields_give_the_engines_text(model, bytebpe,
                                                                         engine):
    """include_stop_str_in_output and skip_special_tokens (unset = true) over gRPC: the
    offline engine's text for the same request."""
    free = "".join(o.text for o in offline(model, bytebpe, SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True)))
    cases = [dict(stop=[free[4:6]], include_stop_str_in_output=True),
             dict(logit_bias={0: 100.0}, skip_special_tokens=False, ignore_eos=True),
             dict(logit_bias={0: 100.0}, ignore_eos=True)]
    plain = dict(max_tokens=12, temperature=0.0)
    want = ["".join(o.text for o in offline(model, bytebpe, SamplingParams(**plain | f)))
            for f in cases]

    async def main():
        async with serving(engine) as c:
            whole = [await c.inference.Generate(inference_pb2.GenerateRequest(
                prompt=PROMPT, sampling=inference_pb2.SamplingParams(**plain | f)))
                for f in cases]
            streamed = [m async for m in c.inference.GenerateStream(inference_pb2.GenerateRequest(
                prompt=PROMPT, sampling=inference_pb2.SamplingParams(**plain | cases[0])))]
            return whole, streamed

    whole, streamed = asyncio.run(main())
    got = [g.text for g in whole]
    assert got == want and want[0].endswith(free[4:6]) and want[1] != want[2]
    assert whole[0].stop_string == free[4:6] == streamed[-1].stop_string


def test_min_tokens_holds_back_eos(model, bytebpe, engine):
    """With token 0 (EOS) pushed up by a bias, the request ends at once, unless
    min_tokens holds it back."""
    async def main(**fields):
        async with serving(engine) as c:
            return await c.inference.Generate(request(
                PROMPT, max_tokens=8, ignore_eos=False, logit_bias={0: 100.0}, **fields))

    plain = asyncio.run(main())
    assert plain.finish_reason == inference_pb2.FINISH_REASON_EOS
    assert plain.usage.completion_tokens < 4
    held = asyncio.run(main(min_tokens=4))
    assert held.usage.completion_tokens >= 4
    assert held.finish_reason == inference_pb2.FINISH_REASON_EOS


def test_structured_output_is_valid_json(engine):
    async def main():
        async with serving(engine) as c:
            schema = await c.inference.Generate(request(
                PROMPT, max_tokens=60, ignore_eos=False, temperature=1.0, seed=3,
                structured=inference_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA))))
            # a '"' and '}' bias keeps the random model's keys short (as over HTTP)
            quote, close = engine.tokenizer.convert_tokens_to_ids(['"', "}"])
            stream = [m async for m in c.inference.GenerateStream(request(
                PROMPT, max_tokens=150, ignore_eos=False, temperature=1.0, seed=3,
                logit_bias={quote: 6.0, close: 4.0},
                structured=inference_pb2.StructuredOutput(json_object=True)))]
            async with AsyncClient(f"127.0.0.1:{c.running.port}") as client:
                got = await client.generate(PROMPT, max_tokens=60, temperature=0.5, seed=1,
                                            json_schema=SCHEMA)
            assert stream[-1].finish_reason == inference_pb2.FINISH_REASON_EOS  # the EOS it sampled
            return schema, "".join(m.text for m in stream), got.text

    schema, any_object, client_text = asyncio.run(main())
    jsonschema.validate(json.loads(schema.text), SCHEMA)
    assert isinstance(json.loads(any_object), dict)
    jsonschema.validate(json.loads(client_text), SCHEMA)


BAD = [
    (dict(logprobs=21), "logprobs must be between 0 and 20"),
    (dict(prompt_logprobs=50), "prompt_logprobs must be between 0 and 20"),
    (dict(logit_bias={100000: 1.0}), "logit_bias token id 100000 is out of range"),
    (dict(logit_bias={5: 500.0}), "logit_bias for token 5 must be in [-100, 100]"),
    (dict(presence_penalty=3.0), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=math.nan), "frequency_penalty must be in [-2, 2]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(min_tokens=9), "min_tokens must be between 0 and max_tokens (8)"),
    (dict(min_p=1.5), "min_p must be in [0, 1]"),
    (dict(stop_token_ids=[100000]), "stop_token_ids entry 100000 is out of range"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens must be >= 1"),
    (dict(structured=inference_pb2.StructuredOutput()), "sampling.structured asks for nothing"),
    (dict(structured=inference_pb2.StructuredOutput(json_object=False)),
     "sampling.structured asks for nothing"),
    (dict(structured=inference_pb2.StructuredOutput(json_schema="{not json")), "JSON schema"),
    (dict(structured=inference_pb2.StructuredOutput(regex="(a")), "the regex cannot be"),
    (dict(structured=inference_pb2.StructuredOutput(choice=inference_pb2.Choices())),
     "choice must be a list of non-empty strings"),
]


def test_bad_fields_are_invalid_argument_naming_the_field(engine):
    async def main():
        async with serving(engine) as c:
            for fields, message in BAD:
                for call in (c.inference.Generate, c.inference.GenerateStream):
                    await expect_code(Code.INVALID_ARGUMENT, call(request(**fields)), message)
            # the server is still fine
            return await c.inference.Generate(request(max_tokens=3))

    assert len(asyncio.run(main()).token_ids) == 3


def test_a_request_without_the_new_fields_is_unchanged(model, bytebpe, engine):
    """Bytes an older client sends (fields 1-7 only) parse as before: no logprobs, no
    penalties, default repetition_penalty (an unset optional, not 0)."""
    old = inference_pb2.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    sampling = sampling_params(old)
    assert sampling == SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = [t for o in offline(model, bytebpe, sampling) for t in o.token_ids]

    async def main():
        async with serving(engine) as c:
            return await c.inference.Generate(inference_pb2.GenerateRequest.FromString(
                inference_pb2.GenerateRequest(prompt=PROMPT, sampling=old).SerializeToString()))

    got = asyncio.run(main())
    assert list(got.token_ids) == want and not got.logprobs and not got.prompt_logprobs


def test_structured_spec_is_passed_as_the_engine_takes_it():
    p = inference_pb2.SamplingParams(structured=inference_pb2.StructuredOutput(
        json_schema='{"type": "object"}'))
    assert sampling_params(p).structured == StructuredSpec('{"type": "object"}')
    p = inference_pb2.SamplingParams(structured=inference_pb2.StructuredOutput(json_object=True))
    assert sampling_params(p).structured == StructuredSpec()
    p = inference_pb2.SamplingParams(structured=inference_pb2.StructuredOutput(regex="a+"))
    assert sampling_params(p).structured == StructuredSpec(regex="a+")
    p = inference_pb2.SamplingParams(structured=inference_pb2.StructuredOutput(
        choice=inference_pb2.Choices(values=["x", "y"])))
    assert sampling_params(p).structured == StructuredSpec(choice=("x", "y"))


def test_regex_choice_and_grammar_over_grpc_and_the_client(engine):
    grammar = 'root ::= "n=" [0-9]{1,2}'

    async def main():
        async with serving(engine) as c:
            regex = await c.inference.Generate(request(
                PROMPT, max_tokens=20, temperature=1.0, seed=2,
                structured=inference_pb2.StructuredOutput(regex="[0-9]{2}x")))
            ebnf = await c.inference.Generate(request(
                PROMPT, max_tokens=20, temperature=1.0, seed=3,
                structured=inference_pb2.StructuredOutput(grammar=grammar)))
            async with AsyncClient(f"127.0.0.1:{c.running.port}") as client:
                choice = await client.generate(PROMPT, max_tokens=20, temperature=1.0,
                                               seed=5, choice=["oui", "non merci"])
                typed = await client.generate(PROMPT, max_tokens=20, temperature=1.0,
                                              seed=4, grammar=grammar)
                with pytest.raises(TypeError, match="pass one of them"):
                    await client.generate(PROMPT, regex="a", choice=["a"])
            return regex.text, choice.text, ebnf.text, typed.text

    regex, choice, ebnf, typed = asyncio.run(main())
    assert re.fullmatch("[0-9]{2}x", regex) and choice in ("oui", "non merci")
    assert re.fullmatch("n=[0-9]{1,2}", ebnf) and re.fullmatch("n=[0-9]{1,2}", typed)


def test_a_response_too_large_to_send_is_counted_as_the_client_got_it(engine):
    """Top-20 prompt logprobs make the first message larger than max_message_bytes: the client gets
    RESOURCE_EXHAUSTED saying what to change, and the metrics count that, not OK."""
    def counted(c, method: str, code: str) -> float:
        return c.running.metrics.registry.get_sample_value(
            "nolaserve_requests_total", {"rpc": method, "code": code}) or 0.0

    async def main():
        async with serving(engine, max_message_bytes=2000) as c:
            big = request(PROMPT * 20, max_tokens=2, prompt_logprobs=20)  # on message 1
            for call in (c.inference.Generate, c.inference.GenerateStream):
                await expect_code(Code.RESOURCE_EXHAUSTED, call(big),
                                  "more than max_message_bytes (2000)")
            small = await c.inference.Generate(request(max_tokens=2))
            return small, {(m, code): counted(c, m, code)
                           for m in ("Generate", "GenerateStream")
                           for code in ("OK", "RESOURCE_EXHAUSTED")}

    small, counts = asyncio.run(main())
    assert len(small.token_ids) == 2
    assert counts == {("Generate", "OK"): 1, ("Generate", "RESOURCE_EXHAUSTED"): 1,
                      ("GenerateStream", "OK"): 0, ("GenerateStream", "RESOURCE_EXHAUSTED"): 1}


def test_the_blocking_client_streams_logprobs_and_checks_its_keywords(model, bytebpe, engine):
    outs = offline(model, bytebpe, SamplingParams(max_tokens=4, temperature=0.0,
                                                  ignore_eos=True, logprobs=1,
                                                  prompt_logprobs=0, logit_bias={5: 3.0}))
    server = BackgroundServer(engine)
    try:
        with Client(f"127.0.0.1:{server.port}") as c:
            chunks = list(c.generate_stream(PROMPT, max_tokens=4, temperature=0.0,
                                            ignore_eos=True, logprobs=1, prompt_logprobs=0,
                                            logit_bias={5: 3.0}))
            with pytest.raises(TypeError, match="unknown sampling arguments \\['top_logprobs'\\]"):
                c.generate(PROMPT, top_logprobs=2)
    finally:
        server.close()
    assert entries([e for ch in chunks for e in ch.logprobs]) == entries(
        [e for o in outs for e in o.logprobs])
    want_prompt = entries(outs[0].prompt_logprobs[1:])
    assert entries(chunks[0].prompt_logprobs) == want_prompt and len(want_prompt) == 2


def test_n_completions_over_grpc_are_the_http_choices(engine):
    """``sampling.n``: Generate answers every completion as a choice (completion j seeded
    seed + j, so each equals a request of its own with that seed, and the HTTP API's
    choice j); the usage counts the prompt once; GenerateStream interleaves their messages
    by ``index``; the client shows both; over 16 is INVALID_ARGUMENT naming n."""
    sampled = dict(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)

    async def main():
        async with http_serving(engine) as (c, url), http(url) as h:
            whole = await c.inference.Generate(request(n=3, **sampled))
            alone = [await c.inference.Generate(request(**(sampled | {"seed": 5 + j})))
                     for j in range(3)]
            streamed = [m async for m in c.inference.GenerateStream(request(n=3, **sampled))]
            body = (await h.post("/v1/completions", json={
                "prompt": PROMPT, "n": 3, **sampled, "return_token_ids": True})).json()
            async with AsyncClient(f"127.0.0.1:{c.running.port}") as client:
                result = await client.generate(PROMPT, n=2, **sampled)
                chunks = [x async for x in client.generate_stream(PROMPT, n=2, **sampled)]
            await expect_code(Code.INVALID_ARGUMENT, c.inference.Generate(request(n=17)),
                              "sampling.n = 17")
            return whole, alone, streamed, body, result, chunks

    whole, alone, streamed, body, result, chunks = asyncio.run(main())
    assert whole.text == "" and [c.index for c in whole.choices] == [0, 1, 2]
    tokens = [list(c.token_ids) for c in whole.choices]
    assert tokens == [list(a.token_ids) for a in alone]
    assert tokens == [c["token_ids"] for c in body["choices"]]
    assert len(set(map(tuple, tokens))) > 1  # the seeds differ
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        alone[0].usage.prompt_tokens, 18)
    by_index = {j: [t for m in streamed if m.index == j for t in m.token_ids] for j in range(3)}
    assert [by_index[j] for j in range(3)] == tokens
    lasts = [m for m in streamed if m.finish_reason]
    assert sorted(m.index for m in lasts) == [0, 1, 2]
    assert all(m.usage.completion_tokens == 6 for m in lasts)
    assert [c.token_ids for c in result.choices] == tokens[:2]
    assert [[t for x in chunks if x.index == j for t in x.token_ids] for j in (0, 1)] == \
        tokens[:2]


def test_stream_interval_over_http_and_grpc(engine):
    """vLLM's ``stream_interval``, the request's (HTTP field, gRPC ``sampling``) or the
    server's config (the least either gets): a stream's messages carry that many tokens,
    the first and last at once; the text is the same."""
    async def main():
        out = {}
        for server in (1, 3):
            async with http_serving(engine, stream_interval=server) as (c, url), \
                    http(url) as h:
                r = await h.post("/v1/completions", json={
                    "prompt": PROMPT, "max_tokens": 9, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_interval": 4, "return_token_ids": True})
                chunks = [json.loads(x[6:]) for x in r.text.split("\n\n")
                          if x.startswith("data: {")]
                out[server, "http"] = [c["choices"][0]["token_ids"] for c in chunks]
                out[server, "grpc"] = [list(m.token_ids) async for m in c.inference
                                       .GenerateStream(request(max_tokens=9))]
                out[server, "grpc 2"] = [list(m.token_ids) async for m in c.inference
                                         .GenerateStream(request(max_tokens=9,
                                                                 stream_interval=2))]
        return out

    out = asyncio.run(main())
    assert [len(ids) for ids in out[1, "http"]] == [1, 4, 4] == [
        len(ids) for ids in out[3, "http"]]  # the request's 4 over the server's 3
    assert [len(ids) for ids in out[1, "grpc"]] == [1] * 9
    assert [len(ids) for ids in out[3, "grpc"]] == [1, 3, 3, 2] == [
        len(ids) for ids in out[3, "grpc 2"]]
    assert [len(ids) for ids in out[1, "grpc 2"]] == [1, 2, 2, 2, 2]
    tokens = [t for ids in out[1, "grpc"] for t in ids]
    assert all([t for ids in v for t in ids] == tokens for v in out.values())
