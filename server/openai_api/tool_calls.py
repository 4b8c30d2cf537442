"""OpenAI's structured-output fields as the engine's ``StructuredSpec``, and the output of a
tool call as OpenAI's ``tool_calls`` (docs/operations.md "Structured output").

- ``response_format``: ``{"type": "text"}`` (nothing), ``{"type": "json_object"}`` (any
  JSON object), ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``.
- ``tools`` with ``tool_choice`` a named function: the output is that function's arguments,
  held to its ``parameters`` schema. ``"required"``: the output is a JSON list of
  ``{"name", "parameters"}`` calls of any of the tools (as vLLM does). ``"none"`` ignores
  the tools; ``"auto"`` (the default with tools) needs a tool-call parser, which nolaserve
  has not: refused with a message saying what to send instead.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from nolaserve.adapters.errors import InvalidRequestError, UnsupportedFieldError, short

from ..engine.sequence import StructuredSpec

ANY_PARAMETERS = {"type": "object"}  # a function without ``parameters``


@dataclass(frozen=True)
class ToolMode:
    """How a chat request's output becomes tool calls: ``name`` is the named tool's (the
    output is its arguments); None for ``"required"`` (a JSON list of calls)."""

    name: str | None = None

    def calls(self, text: str) -> list[dict] | None:
        """OpenAI's ``tool_calls`` of a completed output; None if ``text`` is not one."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.name is not None:
            return [_call(self.name, text)]
        return [_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                for c in value]


    def message(self, text: str, delta: bool) -> dict | None:
        """The chat ``message`` (or stream ``delta``) carrying the calls of ``text``."""
        calls = self.calls(text)
        if calls is None:
            return None
        if delta:
            return {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
        return {"role": "assistant", "content": None, "tool_calls": calls}


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def structured_output(response_format: Any, tools: Any, tool_choice: Any, chat: bool,
                      parallel: bool = True) -> tuple[StructuredSpec | None, ToolMode | None]:
    """The engine's spec and the response's tool mode of a request's fields (``parallel``
    False: ``parallel_tool_calls`` false, at most one call)."""
    if tools is not None and not chat:
        raise UnsupportedFieldError("tools are a chat field: send them to "
                                    "/v1/chat/completions", "tools")
    spec, mode = _tools(tools, tool_choice, parallel)
    fmt = _response_format(response_format)
    if spec is not None and fmt is not None:
        raise InvalidRequestError("response_format and a tool call both constrain the "
                                  "output: send one of them", "response_format")
    return spec or fmt, mode


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


def _tools(tools: Any, choice: Any, parallel: bool
           ) -> tuple[StructuredSpec | None, ToolMode | None]:
    if not tools or choice == "none":
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools: send the tools, or leave "
                                      "tool_choice unset", "tool_choice")
        return None, None
    functions = _functions(tools)
    if choice is None or choice == "auto":
        raise UnsupportedFieldError(
            'tool_choice "auto" is not supported (nolaserve has no tool-call parser): set '
            'tool_choice to "required" or to {"type": "function", "function": {"name": ...}}',
            "tool_choice")
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
