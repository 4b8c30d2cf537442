"""Structured output over the OpenAI HTTP API (issue #30 item 2), driven by the official
``openai`` client and LangChain: ``response_format`` json_object / json_schema on chat and
completions, ``tools`` with a required or named ``tool_choice`` as OpenAI ``tool_calls``
(whole and streamed), refusals that say what to send, and tool messages in a chat. The
random model only picks among the tokens the grammar allows: every output must parse."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from engine_helpers import make_engine
from openai_helpers import http_serving, openai_client, stream_events, with_chat_template
from pydantic import BaseModel, Field
from test_structured_output import ADAPTERS, SCHEMAS, model  # noqa: F401 (fixture)

from nolaserve.adapters.nola import random_nola
from nolaserve.server.chat import ChatMessage
from nolaserve.server.generation import GenerateRequest, prompt_token_ids
from nolaserve.server.openai_api.protocol import ChatCompletionRequest

MESSAGES = [{"role": "user", "content": "héllo"}]
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Answer(BaseModel):
    ok: bool
    color: Literal["red", "green"]
    n: int = Field(ge=0, le=9)


@pytest.fixture
def engine(model, bytebpe):  # noqa: F811
    engine = make_engine(model, with_chat_template(bytebpe))
    for seed, name in enumerate(ADAPTERS[1:]):
        engine.store.register(name, random_nola(engine.store.spec, seed=seed + 1, rank=4,
                                                num_basis=16).to_bytes())
    return engine


def serve(engine, test):
    async def main():
        async with http_serving(engine) as (_, url):
            await test(openai_client(url), url)

    asyncio.run(main())


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema,
                                                   "strict": True}}


def test_json_schema_chat_and_completions_parse_and_match(engine):
    async def test(oa, _):
        for i, schema in enumerate(SCHEMAS):
            for adapter in ADAPTERS:
                chat = await oa.chat.completions.create(
                    model=adapter or "", messages=MESSAGES, max_tokens=150, seed=i,
                    response_format=json_schema(schema))
                assert chat.choices[0].finish_reason == "stop"
                jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
                done = await oa.completions.create(
                    model=adapter or "", prompt="héllo", max_tokens=150, seed=i,
                    extra_body={"response_format": json_schema(schema)})
                assert done.choices[0].finish_reason == "stop"
                jsonschema.validate(json.loads(done.choices[0].text), schema)
        parsed = await oa.chat.completions.parse(model="a", messages=MESSAGES, max_tokens=60,
                                                 seed=1, response_format=Answer)
        assert isinstance(parsed.choices[0].message.parsed, Answer)

    serve(engine, test)


def test_json_object_streams_a_json_object(engine):
    quote, close = engine.tokenizer.convert_tokens_to_ids(['"', "}"])

    async def test(oa, _):
        stream = await oa.chat.completions.create(
            model="b", messages=MESSAGES, max_tokens=150, seed=3, stream=True,
            response_format={"type": "json_object"}, logit_bias={quote: 6, close: 4})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert isinstance(json.loads(text), dict)
        assert chunks[-1].choices[0].finish_reason == "stop"

    serve(engine, test)


def check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def argument_deltas(events) -> dict[int, list[str]]:
    """The arguments pieces of each call, as the client's stream events gave them."""
    out: dict[int, list[str]] = {}
    for e in events:
        if e.type == "tool_calls.function.arguments.delta":
            out.setdefault(e.index, []).append(e.arguments_delta)
    return out


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "add"}}])
def test_tool_calls_whole_and_streamed(engine, choice):
    """Whole, and streamed as the calls are written: each call's id and name first, then
    its arguments piece by piece (the official client's accumulator puts them together),
    which make the whole response's arguments."""
    names = {"weather", "add"} if choice == "required" else {"add"}

    async def test(oa, _):
        for seed, adapter in enumerate(ADAPTERS):
            kw = dict(model=adapter or "", messages=MESSAGES, max_tokens=200, seed=seed,
                      temperature=0, tools=TOOLS, tool_choice=choice,
                      parallel_tool_calls=False)
            out = (await oa.chat.completions.create(**kw)).choices[0]
            assert out.finish_reason == "tool_calls" and out.message.content is None, out
            check_calls(out.message.tool_calls, names)
            events, got = await stream_events(oa, **kw)
            streamed = got.choices[0]
            assert streamed.finish_reason == "tool_calls"
            check_calls(streamed.message.tool_calls, names)
            assert [(c.function.name, c.function.arguments)
                    for c in streamed.message.tool_calls] == [
                (c.function.name, c.function.arguments) for c in out.message.tool_calls]
            pieces = argument_deltas(events)
            assert len(pieces[0]) > 1, pieces  # piece by piece, not whole at the end
            assert "".join(pieces[0]) == out.message.tool_calls[0].function.arguments

    serve(engine, test)


def streamed_calls(chunks) -> tuple[list[tuple[str, str]], str, list[str]]:
    """A raw chat stream's calls (name, arguments), finish reason and logprob tokens."""
    calls: dict[int, list[str]] = {}
    finish, tokens = None, []
    for chunk in chunks:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, [d.function.name, ""])
                call[1] += d.function.arguments or ""
            tokens += [e.token for e in (c.logprobs.content if c.logprobs else None) or []]
            finish = c.finish_reason or finish
    return [tuple(calls[i]) for i in sorted(calls)], finish, tokens


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "add"}}])
def test_a_tool_response_says_what_its_stream_says_cut_or_not_with_logprobs(engine, choice):
    """Cut at ``max_tokens`` (finish ``length``) a whole response has the calls as far as
    written, as its stream: a call complete exactly at ``max_tokens`` came back as raw
    JSON content, with no ``tool_calls``. The stream carries every token's logprobs, as
    the whole response does (its chunks had none)."""
    names = {"weather", "add"} if choice == "required" else {"add"}

    async def test(oa, _):
        kw = dict(model="", messages=MESSAGES, temperature=0, tools=TOOLS, tool_choice=choice,
                  parallel_tool_calls=False, logprobs=True, top_logprobs=1)
        n = (await oa.chat.completions.create(max_tokens=200, **kw)).usage.completion_tokens
        for cut in (n - 1, n // 2, 200):
            out = (await oa.chat.completions.create(max_tokens=cut, **kw)).choices[0]
            chunks = [c async for c in await oa.chat.completions.create(
                max_tokens=cut, stream=True, **kw)]
            calls, finish, tokens = streamed_calls(chunks)
            assert [(c.function.name, c.function.arguments)
                    for c in out.message.tool_calls or []] == calls
            assert out.finish_reason == finish == ("tool_calls" if cut == 200 else "length")
            assert [e.token for e in out.logprobs.content] == tokens
            assert len(tokens) == min(cut, n)
            if cut != n // 2:
                check_calls(out.message.tool_calls, names)

    serve(engine, test)


GUIDED = [({"structured_outputs": {"choice": ["oui", "non merci"]}}, ("oui", "non merci")),
          ({"guided_choice": ["oui", "non merci"]}, ("oui", "non merci")),
          ({"structured_outputs": {"regex": "[a-c]{2,3}", "disable_any_whitespace": True}},
           r"[a-c]{2,3}"),
          ({"guided_regex": "[a-c]{2,3}"}, r"[a-c]{2,3}"),
          ({"structured_outputs": {"json": {"type": "integer"}}}, {"type": "integer"}),
          ({"guided_json": '{"type": "integer"}'}, {"type": "integer"}),
          ({"structured_outputs": {"grammar": 'root ::= "ab" [0-9]{1,2}'}}, r"ab[0-9]{1,2}"),
          ({"guided_grammar": 'root ::= "ab" [0-9]{1,2}'}, r"ab[0-9]{1,2}"),
          ({"structured_outputs": {"grammar": 'start: "ab" /[0-9]{1,2}/'}}, r"ab[0-9]{1,2}")]


@pytest.mark.parametrize(("fields", "want"), GUIDED)
def test_vllm_structured_outputs_choice_regex_json_and_grammar(engine, fields, want):
    """vLLM's ``structured_outputs`` (and its older ``guided_*``), as users' code sends
    them through the openai client's ``extra_body``, on chat and completions."""
    async def test(oa, _):
        texts = [(await oa.chat.completions.create(
            model=name, messages=MESSAGES, max_tokens=24, seed=seed,
            extra_body=fields)).choices[0].message.content
            for name in ("", "a") for seed in range(3)]
        texts.append((await oa.completions.create(model="b", prompt="x", max_tokens=24,
                                                  extra_body=fields)).choices[0].text)
        return texts

    for text in asyncio.run(_serve_returning(engine, test)):
        if isinstance(want, tuple):
            assert text in want
        elif isinstance(want, str):
            assert re.fullmatch(want, text), text
        else:
            jsonschema.validate(json.loads(text), want)


async def _serve_returning(engine, test):
    async with http_serving(engine) as (_, url):
        return await test(openai_client(url), url)


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs",
     "set exactly one of json (a schema), regex, choice (a list of strings)"),
    ({"guided_grammar": "start ::= \"a\""}, "guided_grammar", "the grammar cannot be enforced"),
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs",
     "set exactly one of"),
    ({"structured_outputs": {"choice": "ab"}}, "structured_outputs",
     "structured_outputs.choice is 'ab': send a list of non-empty strings"),
    # the field sent, not one the client never sent (an outside probe)
    ({"guided_choice": []}, "guided_choice", "guided_choice is []: send a list of non-empty "
     "strings"),
    ({"guided_choice": [1, 2]}, "guided_choice", "guided_choice is [1, 2]: send a list"),
    ({"guided_regex": 5}, "guided_regex", "guided_regex is 5: send a string"),
    ({"guided_regex": "(a"}, "guided_regex", "the regex cannot be enforced"),
    ({"structured_outputs": {"json": {"allOf": [{}, {}]}}}, "structured_outputs",
     "'allOf' would not be enforced"),
    ({"guided_choice": ["a"], "structured_outputs": {"regex": "a"}}, "guided_choice",
     "send structured_outputs only"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}},
     "guided_choice", "response_format and guided_choice both constrain"),
    ({"tools": TOOLS}, "tool_choice", 'set tool_choice to "required"'),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "needs a tool-call parser"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice", "names no tool of the request"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
    ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools", "tools[0] must be"),
    ({"response_format": json_schema({"type": "objec"})}, "response_format",
     "cannot be enforced"),
    ({"response_format": {"type": "xml"}}, "response_format", "use text, json_object or"),
    ({"response_format": {"type": "json_schema"}}, "response_format",
     "needs json_schema.schema"),
])
def test_bad_structured_fields_get_400_saying_what_to_send(engine, fields, param, message):
    async def test(oa, _):
        with pytest.raises(openai.BadRequestError) as err:
            await oa.chat.completions.create(model="", messages=MESSAGES, max_tokens=8,
                                             extra_body=fields)
        assert message in err.value.body["message"]
        if param:
            assert err.value.body["param"] == param
        with pytest.raises(openai.BadRequestError, match="tools are a chat field"):
            await oa.completions.create(model="", prompt="x", max_tokens=8,
                                        extra_body={"tools": TOOLS})

    serve(engine, test)


def test_tool_messages_render_through_the_chat_template(engine):
    """Multi-turn tool use: the tools, an assistant's tool_calls and the tool's answer reach
    the chat template (one that renders them), and the server takes such a chat."""
    tok = with_chat_template(engine.tokenizer)
    tok.chat_template = ("{% for t in tools or [] %}{{ t['function']['name'] }};{% endfor %}"
                         "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                         "{% for c in m.get('tool_calls') or [] %}{{ c['function']['name'] }}"
                         "{% endfor %}{% if m.get('tool_call_id') %}@{{ m['tool_call_id'] }}"
                         "{% endif %}|{% endfor %}")
    call = {"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [ChatMessage("user", "sum"), ChatMessage("assistant", "", [call]),
                ChatMessage("tool", "3", tool_call_id="call_1")]
    body = ChatCompletionRequest(messages=MESSAGES, tools=TOOLS, tool_choice="required")
    assert body.generate_requests()[0].tools == TOOLS  # the HTTP request's tools go along
    ids = prompt_token_ids(tok, GenerateRequest(messages=messages, tools=TOOLS))
    assert tok.decode(ids) == "weather;add;<user>sum|<assistant>add|<tool>3@call_1|"

    async def test(oa, _):
        out = await oa.chat.completions.create(
            model="", max_tokens=4, messages=[
                {"role": "user", "content": "sum"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "3", "tool_call_id": "call_1"}])
        assert out.choices[0].finish_reason in ("length", "stop")

    serve(engine, test)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output_returns_the_object(engine, method):
    from langchain_openai import ChatOpenAI

    async def test(_, url):
        for seed, adapter in enumerate(ADAPTERS):
            llm = ChatOpenAI(base_url=url, api_key="none", model=adapter or engine.model_name,
                             max_tokens=80, seed=seed, max_retries=0)
            got = await llm.with_structured_output(Answer, method=method).ainvoke("héllo")
            assert isinstance(got, Answer)

    serve(engine, test)
