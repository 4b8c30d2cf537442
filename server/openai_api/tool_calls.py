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
from dataclasses import dataclass
from typing import Any

from nolaserve.adapters.errors import InvalidRequestError, UnsupportedFieldError, short

from ..engine.sequence import StructuredSpec

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
        none (the content is then all of it)."""
        if self.parser:
            return hermes_calls(text)
        try:
            value = json.loads(text)
        except ValueError:
            return text, None
        if self.name is not None:
            return "", [_call(self.name, text)]
        return "", [_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                    for c in value]

    def streamable(self, text: str) -> int:
        """How much of a partial output streams now as content: with a parser, up to a
        tool call's opening tag, less any suffix that may begin one; else nothing (the
        calls go whole, in the last chunk)."""
        if not self.parser:
            return 0
        if (at := text.find(HERMES_OPEN)) >= 0:
            return at
        for k in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
            if text.endswith(HERMES_OPEN[:k]):
                return len(text) - k
        return len(text)


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
        calls = [_call(c["name"], json.dumps(c["arguments"], ensure_ascii=False))
                 for c in found]
    except (ValueError, KeyError, TypeError):
        return text, None
    return text[: text.find(HERMES_OPEN)], calls


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def structured_output(response_format: Any, tools: Any, tool_choice: Any, chat: bool,
                      parallel: bool = True, guided: dict[str, Any] | None = None,
                      parser: str = "") -> tuple[StructuredSpec | None, ToolMode | None]:
    """The engine's spec and the response's tool mode of a request's fields (``parallel``
    False: ``parallel_tool_calls`` false, at most one call; ``guided``: vLLM's
    ``structured_outputs``, or its ``guided_*`` fields as such a dict; ``parser``: the
    server's ``tool_call_parser``, which ``tool_choice: auto`` needs)."""
    if tools is not None and not chat:
        raise UnsupportedFieldError("tools are a chat field: send them to "
                                    "/v1/chat/completions", "tools")
    spec, mode = _tools(tools, tool_choice, parallel, parser)
    asked = [(name, s) for name, s in (("a tool call", spec),
                                       ("response_format", _response_format(response_format)),
                                       ("structured_outputs", _guided(guided)))
             if s is not None]
    if len(asked) > 1:
        raise InvalidRequestError(f"{asked[0][0]} and {asked[1][0]} both constrain the "
                                  "output: send one of them", asked[1][0])
    return (asked[0][1] if asked else None), mode


GUIDED_OPTIONS = {"disable_any_whitespace", "disable_fallback",
                  "disable_additional_properties"}  # what nolaserve does anyway, or moot


def _guided(value: dict[str, Any] | None) -> StructuredSpec | None:
    """vLLM's ``structured_outputs`` as a spec: exactly one constraint."""
    if value is None:
        return None
    asked = {k: v for k, v in value.items() if k not in GUIDED_OPTIONS and v is not None}
    if len(asked) != 1 or not asked.keys() <= {"choice", "regex", "json", "json_object",
                                                "grammar"}:
        raise UnsupportedFieldError(
            f"structured_outputs asks for {sorted(asked) or 'nothing'}: set exactly one of "
            "choice (a list of strings), regex, json (a schema), grammar (EBNF) or "
            "json_object", "structured_outputs")
    (kind, v), = asked.items()
    if kind == "choice" and isinstance(v, list) and all(isinstance(c, str) for c in v):
        return StructuredSpec(choice=tuple(v))
    if kind == "regex" and isinstance(v, str):
        return StructuredSpec(regex=v)
    if kind == "grammar" and isinstance(v, str):
        return StructuredSpec(grammar=v)
    if kind == "json" and isinstance(v, dict | str):
        return StructuredSpec(v if isinstance(v, str) else json.dumps(v))
    if kind == "json_object" and v is True:
        return StructuredSpec()
    raise InvalidRequestError(f"structured_outputs.{kind} is {short(v)}: send "
                              + {"choice": "a list of strings", "regex": "a string",
                                 "json": "a JSON schema", "json_object": "true",
                                 "grammar": "an EBNF grammar as a string"}[kind],
                              "structured_outputs")


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
