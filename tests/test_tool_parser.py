"""Chat's ``tool_choice: auto`` with ``tool_call_parser: hermes``: the model's
``<tool_call>`` blocks held to vLLM's own ``Hermes2ProToolParser`` (run in the vLLM
virtualenv), the content before them streamed as it comes, and the whole exchange through
the official openai client."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import textwrap

import pytest
from engine_helpers import make_engine
from hypothesis import given, settings
from hypothesis import strategies as hs
from openai_helpers import http_serving, openai_client, stream_events, with_chat_template
from test_structured_http import MESSAGES, TOOLS, argument_deltas
from test_structured_output import model  # noqa: F401 (fixture)
from vllm_helpers import VLLM_ENV, vllm_python

from nolaserve.server.openai_api.tool_calls import HERMES_OPEN, CallStream, ToolMode, hermes_calls

CALL = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
OUTPUTS = [
    "no call here",
    CALL,
    "Let me add." + CALL,
    "Two: " + CALL + "\n" + CALL.replace("add", "weather").replace(
        '{"a": 1, "b": 2}', '{"city": "Oslo"}'),
    '<tool_call>{"name": "add", "arguments": {"a": 5}}',  # the last block unclosed
    "<tool_call>not json</tool_call>",
    '<tool_call>{"name": "add"}</tool_call>',  # no arguments
    '<tool_call>["add"]</tool_call>',
    '<tool_call>{"name": "café", "arguments": {"q": "naïve 中文"}}</tool_call> after',
    "<tool_call>",
    '<tool_call>{"name":"add","arguments":{"a":1}}</tool_call>',  # written compactly
]

SCRIPT = textwrap.dedent('''
    import json, sys
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
    parser = Hermes2ProToolParser(object())
    out = []
    for text in json.loads(sys.argv[1]):
        got = parser.extract_tool_calls(text, None)
        calls = [[c.function.name, json.loads(c.function.arguments)] for c in got.tool_calls]
        out.append([got.content, calls if got.tools_called else None])
    print("RESULT " + json.dumps(out))
''')


def ours(text: str) -> list:
    content, calls = hermes_calls(text)
    return [content or None, None if calls is None else
            [[c["function"]["name"], json.loads(c["function"]["arguments"])] for c in calls]]


@pytest.mark.slow
def test_hermes_parses_what_vllms_hermes_parser_parses():
    run = subprocess.run([vllm_python(), "-c", SCRIPT, json.dumps(OUTPUTS)],
                         env={**os.environ, **VLLM_ENV}, capture_output=True, text=True,
                         timeout=600)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, run.stderr[-3000:]
    theirs = json.loads(line.removeprefix("RESULT "))
    assert [ours(text) for text in OUTPUTS] == theirs
    assert sum(c is not None for _, c in theirs) >= 5  # most cases do call
    # the arguments as the model wrote them (vLLM re-serializes them), as a stream sends them
    assert hermes_calls(OUTPUTS[-1])[1][0]["function"]["arguments"] == '{"a":1}'


def test_content_streams_up_to_a_tool_calls_tag():
    mode = ToolMode(parser="hermes")
    assert mode.streamable("Sure, ") == len("Sure, ")
    assert mode.streamable("Sure <tool") == len("Sure ")  # may begin the tag: held
    assert mode.streamable("Sure <b>") == len("Sure <b>")
    assert mode.streamable("Sure " + CALL) == len("Sure ")
    assert ToolMode().streamable("[{") == 0  # required: the calls go whole


def streamed(mode: ToolMode, text: str, step: int, stop: bool = True) -> tuple[str, list, bool]:
    """``text`` fed to a ``CallStream`` ``step`` characters at a time: the content and
    each call's ``[id, name, arguments]`` as a client puts the deltas together."""
    stream, content, calls = CallStream(mode), "", []
    pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
    got = [stream.feed(p) for p in pieces[:-1]]
    *last, called = stream.finish(pieces[-1], stop)
    for piece, deltas in got + [tuple(last)]:
        content += piece
        for d in deltas:
            if "id" in d:
                assert d["index"] == len(calls) and d["type"] == "function"
                calls.append([d["id"], d["function"]["name"], ""])
            calls[d["index"]][2] += d["function"]["arguments"]
    return content, calls, called


REQUIRED = ('[{"name": "add", "parameters": {"a": 1, "b": "x}\\"y, {"}}, '
            '{"name":"weather","parameters":{"city":"Oslo","n":[1,{"x":null}]}} ]')


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
@pytest.mark.parametrize(("mode", "text"), [
    (ToolMode(), REQUIRED), (ToolMode("add"), '{"a": 1, "b": [2, "]}"]}')]
    + [(ToolMode(parser="hermes"), text) for text in OUTPUTS])
def test_a_stream_of_calls_puts_together_what_the_whole_output_holds(mode, text, step):
    """However the output is cut into pieces, the content and calls streamed make the
    whole response's (``split``), each call announced once, before its arguments."""
    content, calls = mode.split(text)
    got_content, got_calls, called = streamed(mode, text, step)
    assert called == (calls is not None)
    if calls is None:
        assert got_content == content
        return
    assert got_content == (content or "")
    assert [c[1:] for c in got_calls] == [[c["function"]["name"], c["function"]["arguments"]]
                                          for c in calls]
    assert len({c[0] for c in got_calls}) == len(got_calls)


@settings(max_examples=300, deadline=None)
@given(pieces=hs.lists(hs.sampled_from(['{"name": "add", "arguments": ', '{"a": 1}', "}", "{",
                                       "[", "]", '"', "\\", ",", ":", " ", "x", "é",
                                       HERMES_OPEN, "</tool_call>", '"name"', '"parameters"',
                                       '"arguments"', "<tool"]), max_size=30),
       mode=hs.sampled_from([ToolMode(), ToolMode("add"), ToolMode(parser="hermes")]),
       step=hs.integers(1, 7))
def test_any_output_streams_without_error_and_as_its_whole_parse(pieces, mode, step):
    """Whatever a model writes, cut anywhere: the stream never fails, and an output that
    parses streams exactly its calls."""
    text = "".join(pieces)
    content, calls = mode.split(text)
    got_content, got_calls, called = streamed(mode, text, step)
    if calls is not None:
        assert called and [c[1:] for c in got_calls] == [
            [c["function"]["name"], c["function"]["arguments"]] for c in calls]


def test_a_cut_output_streams_its_calls_as_far_as_written():
    """An output that ends on ``length`` is not parsed: its arguments so far, no more."""
    content, calls, called = streamed(ToolMode(), '[{"name": "add", "parameters": {"a": 1', 3,
                                      stop=False)
    assert (content, [c[1:] for c in calls], called) == ("", [["add", '{"a": 1']], False)


REGEX = {"call": r"Sure\. <tool_call>\{\"name\": \"add\", \"arguments\": \{\"a\": 1, "
                 r"\"b\": 2\}\}</tool_call>",
         "answer": "Paris is nice"}


def test_auto_tool_choice_over_the_openai_client(model, bytebpe):  # noqa: F811
    """The output is driven by a regex (structured outputs stay free with ``auto``): a
    call comes back as ``tool_calls`` after its content, whole and streamed (its arguments
    piece by piece, put together by the official client's accumulator); an answer without
    one is plain content; the streamed content never shows part of the tag."""
    engine = make_engine(model, with_chat_template(bytebpe))

    async def main():
        async with http_serving(engine, tool_call_parser="hermes") as (_, url):
            oa, out = openai_client(url), {}
            for name, regex in REGEX.items():
                kw = dict(model="", messages=MESSAGES, max_tokens=80, tools=TOOLS,
                          extra_body={"structured_outputs": {"regex": regex}})
                out[name] = (await oa.chat.completions.create(**kw)).choices[0]
                out[name + " stream"] = await stream_events(oa, **kw)
            return out

    out = asyncio.run(main())
    call = out["call"]
    assert call.finish_reason == "tool_calls" and call.message.content == "Sure. "
    (tool,) = call.message.tool_calls
    assert (tool.function.name, json.loads(tool.function.arguments)) == ("add", {"a": 1, "b": 2})
    events, streamed = out["call stream"]
    assert streamed.choices[0].finish_reason == "tool_calls"
    assert streamed.choices[0].message.content == "Sure. "
    assert [(c.function.name, c.function.arguments)
            for c in streamed.choices[0].message.tool_calls] == [("add", tool.function.arguments)]
    assert len(argument_deltas(events)[0]) > 1
    assert all("<" not in e.delta for e in events if e.type == "content.delta")
    answer = out["answer"]
    assert answer.finish_reason == "stop" and answer.message.content == "Paris is nice"
    assert answer.message.tool_calls is None
    events, streamed = out["answer stream"]
    assert streamed.choices[0].message.content == "Paris is nice"
    assert not streamed.choices[0].message.tool_calls
    assert len([e for e in events if e.type == "content.delta"]) > 1  # as it comes
