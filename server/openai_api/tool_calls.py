"""OpenAI's structured-output fields as the engine's ``StructuredSpec``, and the output of a
tool call as OpenAI's ``tool_calls`` (docs/operations.md "Structured output").

- ``response_format``: ``{"type": "text"}`` (nothing), ``{"type": "json_object"}`` (any
  JSON object), ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``.
- vLLM's ``structured_outputs``: ``{"choice": [...]}``, ``{"regex": "..."}``, ``{"json":
  schema}``, ``{"grammar": "<EBNF>"}`` (xgrammar's syntax) or ``{"json_object": true}``;
  its older ``guided_choice``, ``guided_regex``, ``guided_json`` and ``guided_grammar``
  mean the same. ``structural_tag`` is refused.
- ``tools`` with ``tool_choice`` a named function: the output is that function's arguments,
  held to its ``parameters`` schema. ``"required"``: the output is a JSON list of
  ``{"name", "parameters"}`` calls of any of the tools (as vLLM does). ``"none"`` ignores
  the tools; ``"auto"`` (the default with tools) leaves the output free and parses the
  model's own tool calls with the server's ``tool_call_parser`` (``hermes``: vLLM's
  ``<tool_call>`` blocks); without one it is refused with a message saying what to send.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, fields
from typing import Any

from nolaserve.adapters.errors import InvalidRequestError, UnsupportedFieldError, short

from ..engine.sequence import StructuredOutputsParams, StructuredSpec

ANY_PARAMETERS = {"type": "object"}  # a function without ``parameters``


@dataclass(frozen=True)
class ToolMode:
    """How a chat request's output becomes tool calls: ``name`` is the named tool's (the
    output is its arguments); ``parser`` a tool-call parser's (``tool_choice: auto``: the
    model answers, or calls tools in its own format); neither: ``"required"`` (a JSON
    list of calls)."""

    name: str | None = None
    parser: str = ""

    def split(self, text: str) -> tuple[str, list[dict] | None]:
        """``(content, calls)`` of a completed output; ``calls`` None when ``text`` holds
        none (the content is then all of it). Each call's arguments are the text the model
        wrote for them (``CallScanner``), as its stream sent them."""
        if self.parser:
            return hermes_calls(text)
        try:
            value = json.loads(text)
        except ValueError:
            return text, None
        if self.name is not None:
            return "", [_call(self.name, text)]
        try:
            return "", _calls(value, "parameters", text, CallScanner.required())
        except (KeyError, TypeError):  # JSON, but not a list of calls (a cut output)
            return text, None

    def streamable(self, text: str) -> int:
        """How much of a partial output streams now as content: with a parser, up to a
        tool call's opening tag, less any suffix that may begin one; else nothing (the
        output is the calls)."""
        if not self.parser:
            return 0
        if (at := text.find(HERMES_OPEN)) >= 0:
            return at
        for k in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
            if text.endswith(HERMES_OPEN[:k]):
                return len(text) - k
        return len(text)


@dataclass
class FoundCall:
    """A call object of a JSON text: its name once its string is closed; where its
    arguments' value starts and (once it is whole) ends."""

    name: str | None = None
    start: int = -1
    end: int = -1


class CallScanner:
    """Finds, one character at a time as a JSON text grows, its call objects ``{"name":
    ..., key: arguments}``: those opened at ``depth`` (0: objects one after another, as
    hermes blocks, anything between them skipped; 1: a list of them, as ``"required"``'s
    output), from ``start`` on. It follows the JSON's structure only: ``json.loads``
    judges the whole."""

    def __init__(self, depth: int, key: str, start: int = 0) -> None:
        self.depth, self.key = depth, key
        self.calls: list[FoundCall] = []
        self.solid = start  # just past the last character read that is not white space
        self._stack: list[str] = []
        self._string = -1  # where the open string started (-1: none is open)
        self._escaped = False
        self._phase = "key"  # in a call object: "key", "colon" (after it) or "value"
        self._started = False  # the value has begun
        self._key = ""  # the key whose value is read
        self._pos = start  # the characters read so far

    @classmethod
    def required(cls) -> CallScanner:
        """``"required"``'s output: a list of ``{"name", "parameters"}``."""
        return cls(1, "parameters")

    @classmethod
    def hermes(cls, start: int) -> CallScanner:
        """hermes blocks ``{"name", "arguments"}``, the first after ``start``."""
        return cls(0, "arguments", start)

    def scan(self, text: str) -> list[FoundCall]:
        """Read ``text`` (the text read before, and more); the calls found so far."""
        for i in range(self._pos, len(text)):
            c = text[i]
            if self._string >= 0:
                self._in_string(text, i, c)
            elif not c.isspace():
                self._structure(i, c)
        self._pos = len(text)
        return self.calls

    def arguments(self, text: str, call: FoundCall, whole: bool = False) -> str | None:
        """A call's arguments as far as they are written (``whole``: only once complete);
        None before they start."""
        if call.start < 0 or whole and call.end < 0:
            return None
        return text[call.start:call.end if call.end >= 0 else self.solid]

    def _in_call(self) -> bool:
        return len(self._stack) == self.depth + 1 and self._stack[self.depth] == "{"

    def _in_string(self, text: str, i: int, c: str) -> None:
        self.solid = i + 1
        if self._escaped:
            self._escaped = False
        elif c == "\\":
            self._escaped = True
        elif c == '"':
            start, self._string = self._string, -1
            if self._in_call():
                self._string_closed(_decoded(text[start:i + 1]))

    def _string_closed(self, value: object) -> None:
        if self._phase == "key":
            self._key, self._phase = value, "colon"
        elif self._phase == "value" and self._key == "name" and isinstance(value, str):
            self.calls[-1].name = value

    def _structure(self, i: int, c: str) -> None:
        level = len(self._stack)
        if level == 0 and c not in "{[":
            return  # outside the JSON (between hermes blocks)
        before, self.solid = self.solid, i + 1
        if self._in_call():
            self._call_level(i, c, before)
        if c in "{[":
            if level == self.depth and c == "{":
                self.calls.append(FoundCall())
                self._phase = "key"
            self._stack.append(c)
        elif c in "}]":
            self._stack.pop()
        elif c == '"':
            self._string = i

    def _call_level(self, i: int, c: str, before: int) -> None:
        """A structural character of a call object itself (not of a value inside it)."""
        call = self.calls[-1]
        if self._phase == "colon" and c == ":":
            self._phase, self._started = "value", False
        elif self._phase == "value" and c in ",}":
            if self._key == self.key and call.start >= 0 and call.end < 0:
                call.end = before
            self._phase = "key"
        elif self._phase == "value" and not self._started:
            self._started = True
            if self._key == self.key and call.start < 0:
                call.start = i


def _decoded(literal: str) -> object:
    try:
        return json.loads(literal)
    except ValueError:
        return None


class CallStream:
    """A streamed choice's tool calls as they are written, as OpenAI's (and vLLM's)
    ``delta.tool_calls``: a call's id and name once its name is known, then its arguments
    piece by piece; with a parser, the content before the first call streams as it comes.
    Calls go in order: a call waits for the names of those before it."""

    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.text = ""
        self.content = 0  # how much of ``text`` streamed as content
        self.scanner = (None if mode.parser or mode.name is not None  # hermes: at a tag
                        else CallScanner.required())
        self.sent: list[dict] = []  # each call announced, its arguments as sent so far

    @classmethod
    def whole(cls, mode: ToolMode, text: str, parse: bool) -> tuple[str, list[dict], bool]:
        """A whole response's content and calls, and whether the output holds calls: what
        a stream of ``text`` sends (``finish``), at once, so that a response says what
        its stream would: cut at ``max_tokens``, the calls as far as they are written."""
        stream = cls(mode)
        content, _, called = stream.finish(text, parse)
        return content, stream.sent, called

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        """The content and call deltas that ``piece``, the output's next text, lets
        stream now."""
        self.text += piece
        content = ""
        if self.mode.parser and self.scanner is None:
            end = self.content + self.mode.streamable(self.text[self.content:])
            content, self.content = self.text[self.content:end], end
            if self.text.startswith(HERMES_OPEN, end):
                self.scanner = CallScanner.hermes(end + len(HERMES_OPEN))
        return content, self._deltas(self._written())

    def finish(self, piece: str, parse: bool) -> tuple[str, list[dict], bool]:
        """The last chunk's content and call deltas, ``piece`` its text, and whether the
        output holds calls. ``parse``: it ended on a stop, so its calls are parsed
        (``ToolMode.split``) and whatever of them is not sent goes now. Else, or without
        calls, the content not sent (hermes: the rest of the text, as a whole response has
        it all) or the arguments' rest."""
        self.text += piece
        content, calls = self.mode.split(self.text) if parse else (self.text, None)
        if calls is not None:
            return content[self.content:], self._deltas(
                [(c["function"]["name"], c["function"]["arguments"]) for c in calls],
                [c["id"] for c in calls]), True
        if self.mode.parser:
            content, self.content = self.text[self.content:], len(self.text)
            return content, [], False
        return "", self._deltas(self._written()), False

    def _written(self) -> list[tuple[str | None, str | None]]:
        """Each call's name and arguments as far as they are written."""
        if self.mode.name is not None:  # the output is the named tool's arguments
            return [(self.mode.name, self.text)]
        if self.scanner is None:
            return []
        return [(c.name, self.scanner.arguments(self.text, c))
                for c in self.scanner.scan(self.text)]

    def _deltas(self, calls: list[tuple[str | None, str | None]],
                ids: list[str] | None = None) -> list[dict]:
        out = []
        for i, (name, arguments) in enumerate(calls):
            if name is None:
                break
            new = i == len(self.sent)
            if new:
                self.sent.append(_call(name, "", ids[i] if ids else None))
            sent = self.sent[i]["function"]
            piece = (arguments or "")[len(sent["arguments"]):]
            sent["arguments"] += piece
            if new:
                out.append({"index": i, **_call(name, piece, self.sent[i]["id"])})
            elif piece:
                out.append({"index": i, "function": {"arguments": piece}})
        return out


HERMES_OPEN = "<tool_call>"
HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def hermes_calls(text: str) -> tuple[str, list[dict] | None]:
    """vLLM's ``hermes`` parser: each ``<tool_call>{"name", "arguments"}</tool_call>``
    block (the last may be unclosed) is a call; the content is the text before the first.
    Text without a block, or with one that does not parse, is all content."""
    if HERMES_OPEN not in text:
        return text, None
    try:
        found = [json.loads(closed or open_) for closed, open_ in HERMES_CALL.findall(text)]
        at = text.find(HERMES_OPEN)
        calls = _calls(found, "arguments", text, CallScanner.hermes(at + len(HERMES_OPEN)))
    except (ValueError, KeyError, TypeError):
        return text, None
    return text[:at], calls


def _call(name: str, arguments: str, call_id: str | None = None) -> dict:
    return {"id": call_id or _call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _calls(found: Any, key: str, text: str, scanner: CallScanner) -> list[dict]:
    """The calls of ``found`` (parsed ``{"name", key}`` objects), each one's arguments as
    ``text`` writes them where ``scanner`` finds the same calls there, else as JSON."""
    spans = scanner.scan(text)
    if [c.name for c in spans] != [f["name"] for f in found]:
        spans = [FoundCall()] * len(found)
    return [_call(f["name"], scanner.arguments(text, c, whole=True)
                  or json.dumps(f[key], ensure_ascii=False))
            for f, c in zip(found, spans)]


def structured_output(response_format: Any, tools: Any, tool_choice: Any, chat: bool,
                      parallel: bool = True, guided: dict[str, Any] | None = None,
                      guided_field: str = "structured_outputs", parser: str = ""
                      ) -> tuple[StructuredSpec | None, ToolMode | None]:
    """The engine's spec and the response's tool mode of a request's fields (``parallel``
    False: ``parallel_tool_calls`` false, at most one call; ``guided``: vLLM's
    ``structured_outputs``, or its ``guided_*`` fields as such a dict, from the field
    ``guided_field``; ``parser``: the server's ``tool_call_parser``, which
    ``tool_choice: auto`` needs)."""
    if tools is not None and not chat:
        raise UnsupportedFieldError("tools are a chat field: send them to "
                                    "/v1/chat/completions", "tools")
    spec, mode = _tools(tools, tool_choice, parallel, parser)
    asked = [(name, s) for name, s in (("a tool call", spec),
                                       ("response_format", _response_format(response_format)),
                                       (guided_field, _guided(guided, guided_field)))
             if s is not None]
    if len(asked) > 1:
        raise InvalidRequestError(f"{asked[0][0]} and {asked[1][0]} both constrain the "
                                  "output: send one of them", asked[1][0])
    return (asked[0][1] if asked else None), mode


GUIDED_OPTIONS = {"disable_any_whitespace", "disable_fallback",
                  "disable_additional_properties"}  # what nolaserve does anyway, or moot


def _guided(value: dict[str, Any] | None, field: str) -> StructuredSpec | None:
    """vLLM's ``structured_outputs`` (or ``guided_*``, in ``field``) as a spec: exactly one
    constraint."""
    if value is None:
        return None
    asked = {k: v for k, v in value.items() if k not in GUIDED_OPTIONS and v is not None}
    unknown = sorted(asked.keys() - {f.name for f in fields(StructuredOutputsParams)})
    if unknown:
        raise UnsupportedFieldError(f"{field} asks for {unknown}: set exactly one of json (a "
                                    "schema), regex, choice (a list of strings), grammar "
                                    "(EBNF) or json_object", field)
    return StructuredOutputsParams(**asked).spec(field)


def _response_format(value: Any) -> StructuredSpec | None:
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec()
    if kind == "json_schema":
        block = value.get("json_schema")
        schema = block.get("schema") if isinstance(block, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError("response_format json_schema needs json_schema.schema, "
                                      "a JSON schema object", "response_format")
        return StructuredSpec(json.dumps(schema))
    raise InvalidRequestError(f"response_format type {short(str(kind))} is not supported: use "
                              "text, json_object or json_schema", "response_format")


def _tools(tools: Any, choice: Any, parallel: bool, parser: str
           ) -> tuple[StructuredSpec | None, ToolMode | None]:
    if not tools or choice == "none":
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools: send the tools, or leave "
                                      "tool_choice unset", "tool_choice")
        return None, None
    functions = _functions(tools)
    if choice is None or choice == "auto":
        if not parser:
            raise UnsupportedFieldError(
                'tool_choice "auto" (the default with tools) needs a tool-call parser: start '
                'the server with tool_call_parser: hermes, or set tool_choice to "required" '
                'or to {"type": "function", "function": {"name": ...}}', "tool_choice")
        return None, ToolMode(parser=parser)
    if choice == "required":
        return StructuredSpec(json.dumps(_list_of_calls(functions, parallel))), ToolMode()
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if name not in functions:
        raise InvalidRequestError(
            f"tool_choice {short(str(choice))} names no tool of the request: use \"required\" "
            f"or {{\"type\": \"function\", \"function\": {{\"name\": one of "
            f"{sorted(functions)[:10]}}}}}", "tool_choice")
    return StructuredSpec(json.dumps(functions[name])), ToolMode(name)


def _functions(tools: Any) -> dict[str, dict]:
    """Tool name -> its parameters schema."""
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list of {\"type\": \"function\", "
                                  "\"function\": {\"name\", \"parameters\"}}", "tools")
    out = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function" \
                or not isinstance(fn.get("name"), str):
            raise InvalidRequestError(f"tools[{i}] must be {{\"type\": \"function\", "
                                      "\"function\": {\"name\": ..., \"parameters\": ...}}",
                                      "tools")
        params = fn.get("parameters") or ANY_PARAMETERS
        if not isinstance(params, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema "
                                      "object", "tools")
        out[fn["name"]] = params
    return out


def _list_of_calls(functions: dict[str, dict], parallel: bool) -> dict:
    """vLLM's schema for ``"required"``: a non-empty list of calls of any of the tools (of
    one call unless ``parallel``)."""
    return {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}),
            "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"enum": [name]}, "parameters": params},
         "required": ["name", "parameters"], "additionalProperties": False}
        for name, params in functions.items()]}}
