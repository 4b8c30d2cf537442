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
from openai_helpers import http_serving, openai_client, with_chat_template
from test_structured_http import MESSAGES, TOOLS
from test_structured_output import model  # noqa: F401 (fixture)
from vllm_helpers import VLLM_ENV, vllm_python

from nolaserve.server.openai_api.tool_calls import ToolMode, hermes_calls

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
]

SCRIPT = textwrap.dedent('''
    import json, sys
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
    parser = Hermes2ProToolParser(object())
    out = []
    for text in json.loads(sys.argv[1]):
        got = parser.extract_tool_calls(text, None)
        calls = [[c.function.name, c.function.arguments] for c in got.tool_calls]
        out.append([got.content, calls if got.tools_called else None])
    print("RESULT " + json.dumps(out))
''')


def ours(text: str) -> list:
    content, calls = hermes_calls(text)
    return [content or None, None if calls is None else
            [[c["function"]["name"], c["function"]["arguments"]] for c in calls]]


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


def test_content_streams_up_to_a_tool_calls_tag():
    mode = ToolMode(parser="hermes")
    assert mode.streamable("Sure, ") == len("Sure, ")
    assert mode.streamable("Sure <tool") == len("Sure ")  # may begin the tag: held
    assert mode.streamable("Sure <b>") == len("Sure <b>")
    assert mode.streamable("Sure " + CALL) == len("Sure ")
    assert ToolMode().streamable("[{") == 0  # required: the calls go whole


REGEX = {"call": r"Sure\. <tool_call>\{\"name\": \"add\", \"arguments\": \{\"a\": 1, "
                 r"\"b\": 2\}\}</tool_call>",
         "answer": "Paris is nice"}


def test_auto_tool_choice_over_the_openai_client(model, bytebpe):  # noqa: F811
    """The output is driven by a regex (structured outputs stay free with ``auto``): a
    call comes back as ``tool_calls`` after its content, whole and streamed; an answer
    without one is plain content; the streamed content never shows part of the tag."""
    engine = make_engine(model, with_chat_template(bytebpe))

    async def main():
        async with http_serving(engine, tool_call_parser="hermes") as (_, url):
            oa, out = openai_client(url), {}
            for name, regex in REGEX.items():
                kw = dict(model="", messages=MESSAGES, max_tokens=80, tools=TOOLS,
                          extra_body={"structured_outputs": {"regex": regex}})
                out[name] = (await oa.chat.completions.create(**kw)).choices[0]
                out[name + " stream"] = [c.choices[0] async for c in
                                         await oa.chat.completions.create(stream=True, **kw)]
            return out

    out = asyncio.run(main())
    call = out["call"]
    assert call.finish_reason == "tool_calls" and call.message.content == "Sure. "
    (tool,) = call.message.tool_calls
    assert (tool.function.name, json.loads(tool.function.arguments)) == ("add", {"a": 1, "b": 2})
    chunks = out["call stream"]
    assert "".join(c.delta.content or "" for c in chunks) == "Sure. "
    assert [c.finish_reason for c in chunks][-1] == "tool_calls"
    streamed = [d for c in chunks for d in c.delta.tool_calls or []]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in streamed] == [
        ("add", {"a": 1, "b": 2})]
    answer = out["answer"]
    assert answer.finish_reason == "stop" and answer.message.content == "Paris is nice"
    assert answer.message.tool_calls is None
    assert "".join(c.delta.content or "" for c in out["answer stream"]) == "Paris is nice"
    assert len([c for c in out["answer stream"] if c.delta.content]) > 1  # as it comes
