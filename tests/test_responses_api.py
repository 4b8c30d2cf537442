"""OpenAI's Responses API (``/v1/responses``), driven by the official ``openai`` client:
whole, streamed as typed events (raw, and through the client's own ``responses.stream``
accumulator), with adapters, ``text.format`` JSON schemas, function tools (calls out,
call results back in) and the refusals of a stateless server; each held to
``/v1/chat/completions`` for the same request."""

import asyncio
import json

import jsonschema
import pytest
from conftest import tiny_llama
from engine_helpers import make_engine
from openai_helpers import http, http_serving, openai_client, with_chat_template

from nolaserve.adapters.nola import random_nola

GREEDY = {"ignore_eos": True}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}},
          "required": ["ok"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "add", "description": "a + b", "parameters": ADD},
         {"type": "function", "name": "now", "parameters": {"type": "object", "properties": {},
                                                            "additionalProperties": False}}]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300, eos_token_id=0)  # the tokenizer's <eos>


@pytest.fixture
def engine(model, bytebpe):
    engine = make_engine(model, with_chat_template(bytebpe))
    engine.store.register("a", random_nola(engine.store.spec, seed=1, rank=4, num_basis=32,
                                           coeff_std=0.5).to_bytes())
    return engine


def serve(engine, fn):
    async def main():
        async with http_serving(engine) as (_, url), http(url) as h:
            return await fn(openai_client(url), h)
    return asyncio.run(main())


async def chat_text(oa, model: str, messages: list[dict], **kw):
    out = await oa.chat.completions.create(model=model, messages=messages, temperature=0,
                                           extra_body=GREEDY, **kw)
    return out.choices[0].message.content, out.usage


def test_whole_responses_equal_chat_for_the_same_request(engine):
    items = [{"role": "developer", "content": "be brief"},
             {"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": "héllo "},
                          {"type": "input_text", "text": "wörld"}]}]
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "héllo wörld"}]

    async def fn(oa, h):
        got = {}
        for name in ("", "a"):
            plain = await oa.responses.create(model=name, input="héllo wörld",
                                              instructions="be brief", max_output_tokens=8,
                                              temperature=0, extra_body=GREEDY)
            listed = await oa.responses.create(model=name, input=items, max_output_tokens=8,
                                               temperature=0, extra_body=GREEDY)
            got[name] = plain, listed, await chat_text(oa, name, messages, max_tokens=8)
        return got

    for name, (plain, listed, (text, usage)) in serve(engine, fn).items():
        assert plain.output_text == listed.output_text == text, name
        assert plain.object == "response" and plain.id.startswith("resp_")
        assert plain.status == "incomplete" and plain.incomplete_details.reason == \
            "max_output_tokens"
        assert plain.output[0].type == "message" and plain.output[0].role == "assistant"
        assert plain.instructions == "be brief" and plain.max_output_tokens == 8
        assert (plain.usage.input_tokens, plain.usage.output_tokens) == \
            (usage.prompt_tokens, 8)
        assert plain.usage.total_tokens == usage.prompt_tokens + 8


def test_streamed_events_come_in_order_and_add_up(engine):
    async def fn(oa, h):
        kw = dict(model="a", input="héllo wörld", max_output_tokens=6, temperature=0,
                  extra_body=GREEDY)
        events = [e async for e in await oa.responses.create(stream=True, **kw)]
        async with oa.responses.stream(**kw) as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
        whole = await oa.responses.create(**kw)
        return events, deltas, final, whole

    events, deltas, final, whole = serve(engine, fn)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events[4:-4])
    assert text == events[-4].text == "".join(deltas) == final.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == 6 == final.usage.output_tokens
    assert events[-1].response.status == "incomplete" == final.status  # max_output_tokens


def test_text_format_json_schema_constrains_the_output(engine):
    async def fn(oa, h):
        return [await oa.responses.create(
            model="", input="json please", max_output_tokens=40, extra_body={"seed": seed},
            text={"format": {"type": "json_schema", "name": "r", "schema": SCHEMA,
                             "strict": True}}) for seed in range(3)]

    for out in serve(engine, fn):
        assert out.status == "completed"
        jsonschema.validate(json.loads(out.output_text), SCHEMA)
        assert out.text.format.type == "json_schema"


def test_include_output_text_logprobs_gives_chats_logprobs(engine):
    """``include: ["message.output_text.logprobs"]`` with ``top_logprobs``: the text
    part's (and each delta's) logprobs are chat's entries for the same request."""
    async def fn(oa, h):
        kw = dict(model="", input="héllo", max_output_tokens=4, temperature=0,
                  top_logprobs=2, include=["message.output_text.logprobs"], extra_body=GREEDY)
        whole = await oa.responses.create(**kw)
        events = [e async for e in await oa.responses.create(stream=True, **kw)]
        chat = await oa.chat.completions.create(
            model="", messages=[{"role": "user", "content": "héllo"}], max_tokens=4,
            temperature=0, logprobs=True, top_logprobs=2, extra_body=GREEDY)
        plain = await oa.responses.create(**kw | {"include": None})
        return whole, events, chat, plain

    whole, events, chat, plain = serve(engine, fn)
    want = [(e.token, e.logprob, [t.token for t in e.top_logprobs])
            for e in chat.choices[0].logprobs.content]
    got = [(e.token, e.logprob, [t.token for t in e.top_logprobs])
           for e in whole.output[0].content[0].logprobs]
    streamed = [(e.token, e.logprob, [t.token for t in e.top_logprobs])
                for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    # the later requests start from the first's cached prompt blocks: the same tokens, and
    # logprobs equal up to rounding (a prefill of another length; 5e-7 on an AVX-512 CPU)
    assert [(t, top) for t, _, top in got] == [(t, top) for t, _, top in want] == \
        [(t, top) for t, _, top in streamed] and len(want) == 4
    for entries in (got, streamed):
        assert [lp for _, lp, _ in entries] == pytest.approx([lp for _, lp, _ in want],
                                                             rel=1e-5)
    assert plain.output[0].content[0].logprobs == []


@pytest.mark.parametrize(("body", "param"), [
    ({"previous_response_id": "resp_x"}, "previous_response_id"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{"type": "function", "name": "f"}]}, "tool_choice"),  # auto: no parser
    ({"tools": TOOLS, "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input"),
    ({"background": True}, "background"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"include": [{"a": 1}]}, None),
    ({"input": []}, "input"),
    ({"text": {"format": {"type": "grammar"}}}, "text"),
    ({"text": {"format": "json"}}, "text"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
    ({"text": {"format": {"type": "json_schema", "name": "x",
                          "schema": {"allOf": [SCHEMA, ADD]}}}}, "text"),
    ({"max_output_tokens": 10**6}, "max_output_tokens"),
    ({"max_output_tokens": "many"}, "max_output_tokens"),
    ({"temperature": -1}, None),
    ({"max_output_tokens": 0}, None),
    ({"logit_bias": []}, "logit_bias"),  # checked by chat: pydantic's raw text before
])
def test_what_a_stateless_server_cannot_do_is_a_400_naming_it(engine, body, param):
    async def fn(oa, h):
        r = await h.post("/v1/responses", json={"input": "hi"} | body)
        ok = await h.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2,
                                                 "store": True, "metadata": {"k": "v"},
                                                 "stream": None, "top_logprobs": None})
        return r, ok

    r, ok = serve(engine, fn)
    assert r.status_code == 400, r.text
    if param:
        assert r.json()["error"]["param"] == param
    message = r.json()["error"]["message"]
    assert "validation error" not in message
    assert not {"response_format", "max_completion_tokens"} & set(message.split()), message
    assert ok.status_code == 200 and ok.json()["metadata"] == {"k": "v"}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "add"}])
def test_function_tools_give_function_call_items_whole_and_streamed(engine, choice):
    names = {"add", "now"} if choice == "required" else {"add"}

    async def fn(oa, h):
        kw = dict(model="a", input="add 2 and 3", tools=TOOLS, tool_choice=choice,
                  parallel_tool_calls=False, max_output_tokens=100,
                  extra_body={"seed": 1})
        whole = await oa.responses.create(**kw)
        events = [e async for e in await oa.responses.create(stream=True, **kw)]
        async with oa.responses.stream(**kw) as stream:
            final = await stream.get_final_response()
        cut = kw | {"max_output_tokens": 16}  # a whole response says what its stream says
        cuts = [await oa.responses.create(**cut),
                [e async for e in await oa.responses.create(stream=True, **cut)][-1].response]
        return whole, events, final, cuts

    whole, events, final, cuts = serve(engine, fn)
    said = [[(o.type, o.status, getattr(o, "arguments", None)) for o in r.output] for r in cuts]
    assert said[0] == said[1] and said[0][-1][:2] == ("function_call", "incomplete"), said
    assert cuts[0].status == cuts[1].status == "incomplete"
    for out in (whole, final, events[-1].response):
        assert out.status == "completed" and [o.type for o in out.output] == ["function_call"]
        call = out.output[0]
        assert call.name in names and call.call_id.startswith("call_")
        if call.name == "add":
            jsonschema.validate(json.loads(call.arguments), ADD)
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        *["response.function_call_arguments.delta"] * len(deltas),
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert len(deltas) > 1  # as the arguments are written, not whole at the end
    assert "".join(deltas) == events[-3].arguments == events[-1].response.output[0].arguments
    assert events[-1].response.output[0].arguments == whole.output[0].arguments
    assert events[2].item.id == events[-1].response.output[0].id  # the item announced


def test_call_results_go_back_as_chat_tool_messages(engine):
    """``function_call`` and ``function_call_output`` input items render as chat's
    assistant ``tool_calls`` and ``tool`` messages (the template sees what chat's would)."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    items = [{"role": "user", "content": "add 2 and 3"},
             {"type": "function_call", "call_id": "call_1", "name": "add",
              "arguments": '{"a": 2, "b": 3}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "5"}]
    messages = [{"role": "user", "content": "add 2 and 3"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "5"}]

    async def fn(oa, h):
        got = await oa.responses.create(model="", input=items, max_output_tokens=8,
                                        temperature=0, extra_body=GREEDY)
        return got, await chat_text(oa, "", messages, max_tokens=8)

    got, (text, usage) = serve(engine, fn)
    assert got.output_text == text and got.usage.input_tokens == usage.prompt_tokens


REGEX = {"call": r"Sure\. <tool_call>\{\"name\": \"add\", \"arguments\": \{\"a\": 1, "
                 r"\"b\": 2\}\}</tool_call>",
         "answer": "Paris is nice"}


def test_auto_tools_stream_the_answer_and_then_the_calls(engine):
    """``tool_choice: auto`` (the server's ``tool_call_parser: hermes``; the model's
    output driven by a regex, as structured outputs stay free with ``auto``): the text
    before a ``<tool_call>`` streams as it comes, never part of the tag; its message item
    is done before the call's item is added, whose arguments stream as they are written;
    an answer with no call is a message."""
    async def main():
        async with http_serving(engine, tool_call_parser="hermes") as (_, url):
            oa, out = openai_client(url), {}
            for name, regex in REGEX.items():
                kw = dict(model="", input="hi", tools=TOOLS, max_output_tokens=80,
                          extra_body={"structured_outputs": {"regex": regex}})
                out[name] = await oa.responses.create(**kw)
                out[name + " stream"] = [e async for e in await oa.responses.create(
                    stream=True, **kw)]
            return out

    out = asyncio.run(main())
    call, answer = out["call"], out["answer"]
    assert [o.type for o in call.output] == ["message", "function_call"]
    assert call.output_text == "Sure. " and call.output[1].name == "add"
    assert json.loads(call.output[1].arguments) == {"a": 1, "b": 2}
    assert [o.type for o in answer.output] == ["message"]
    assert answer.output_text == "Paris is nice"
    for name, whole in (("call", call), ("answer", answer)):
        events = out[name + " stream"]
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert "".join(deltas) == whole.output_text and "<" not in "".join(deltas)
        final = events[-1].response  # the calls' ids are each response's own
        assert [o.type for o in final.output] == [o.type for o in whole.output]
        assert final.output_text == whole.output_text
    assert len([e for e in out["answer stream"] if e.type.endswith("text.delta")]) > 1
    events = out["call stream"]
    items = [(e.type, e.output_index) for e in events if e.type.startswith("response.output_item")]
    assert items == [("response.output_item.added", 0), ("response.output_item.done", 0),
                     ("response.output_item.added", 1), ("response.output_item.done", 1)]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 1 and "".join(deltas) == events[-1].response.output[1].arguments
