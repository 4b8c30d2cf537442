"""OpenAI's Responses API, ``POST /v1/responses``, stateless: ``instructions`` and
``input`` (a string, or message items) become a chat request, rendered, sampled and
constrained as ``/v1/chat/completions`` would, and its output comes back as a
``response`` object, or streamed as the Responses API's typed events, in the shapes the
official ``openai`` client parses. Function ``tools`` work as in chat (``tool_choice``
``required`` or a named function; ``auto`` with the server's ``tool_call_parser``): calls
come back as ``function_call`` output items, and ``function_call`` /
``function_call_output`` input items go back to the model as chat's tool messages.
Nothing is stored, so ``previous_response_id`` (and ``background``, ``conversation``, a
stored ``prompt``) get 400; so do built-in tools, images and files.

    ResponsesRequest (JSON) -> .chat(): ChatCompletionRequest -> engine
    engine outputs -> response_bodies.ResponseBodies: the ``response`` object, or events
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from nolaserve.adapters.errors import InvalidRequestError, UnsupportedFieldError, short

from .errors import invalid_body
from .protocol import ChatCompletionRequest, part_text
from .sampling_body import NullIsDefault

log = logging.getLogger("nolaserve.http")
LOGPROBS = "message.output_text.logprobs"  # the ``include`` that asks for the text's
_ROLES = ("user", "assistant", "system", "developer")  # chat.py renders developer as system
_TEXT_PARTS = ("input_text", "output_text", "text")
# Responses API fields this server cannot honour, with "set to what changes nothing".
_REFUSED = {"previous_response_id": lambda v: v is None, "background": lambda v: not v,
            "conversation": lambda v: v is None, "prompt": lambda v: v is None,
            "truncation": lambda v: v in (None, "disabled")}
# Fields of the Responses API that change nothing here (nothing is stored or billed).
_HARMLESS = {"store", "user", "service_tier", "reasoning", "safety_identifier",
             "prompt_cache_key", "max_tool_calls", "stream_options", "prompt_cache_retention"}
# Sampling fields that go on to the chat request, as vLLM's ResponsesRequest takes them.
_SAMPLING = {"top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
             "seed", "logit_bias", "stop", "stop_token_ids", "ignore_eos", "min_tokens",
             "skip_special_tokens", "spaces_between_special_tokens",
             "include_stop_str_in_output", "allowed_token_ids",
             "bad_words", "cache_salt", "structured_outputs", "chat_template_kwargs",
             "truncate_prompt_tokens", "truncation_side", "priority", "request_id"}


class ResponsesChat(ChatCompletionRequest):
    """The chat request a Responses request makes; its errors name the Responses fields."""

    def field_names(self) -> dict[str, str]:
        return {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
                "response_format": "text.format"}


class ResponsesRequest(NullIsDefault):
    model: str = ""
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    include: list[str] | None = None  # [LOGPROBS] or nothing
    top_logprobs: int | None = None  # with include: [LOGPROBS]

    def chat(self) -> ResponsesChat:
        """The chat request that serves this one (its sampling fields checked there)."""
        extra = self.model_extra or {}
        for name, value in extra.items():
            if name in _REFUSED and not _REFUSED[name](value):
                raise UnsupportedFieldError(
                    f"{name} = {short(value)} is not supported by this stateless Responses "
                    "API (nothing is stored): leave it unset", name)
        ignored = sorted(k for k in extra if k not in _REFUSED.keys() | _HARMLESS | _SAMPLING)
        if ignored:
            log.warning("fields present in the request but ignored: %s", ignored)
        try:
            return self._chat(extra)
        except ValidationError as e:  # a sampling field passed on
            raise InvalidRequestError(*invalid_body(e.errors())) from None

    def _chat(self, extra: dict[str, Any]) -> ResponsesChat:
        return ResponsesChat(
            model=self.model, messages=self._messages(), stream=self.stream,
            max_completion_tokens=self.max_output_tokens, temperature=self.temperature,
            top_p=self.top_p, response_format=self._response_format(),
            tools=self._chat_tools(), tool_choice=self._chat_tool_choice(),
            parallel_tool_calls=self.parallel_tool_calls,
            logprobs=self._logprobs(),
            top_logprobs=self.top_logprobs if self._logprobs() else None,
            **{k: v for k, v in extra.items() if k in _SAMPLING})

    def _logprobs(self) -> bool:
        """Whether the text's logprobs are asked for (OpenAI: only through ``include``)."""
        other = set(self.include or ()) - {LOGPROBS}
        if other:
            raise UnsupportedFieldError(f"include {sorted(other)[:3]} is not supported: only "
                                        f"{LOGPROBS!r}", "include")
        return bool(self.include)

    @property
    def text_format(self) -> dict[str, Any]:
        """``text.format``, as the response echoes it (``{"type": "text"}`` unset)."""
        return (self.text or {}).get("format") or {"type": "text"}

    def _messages(self) -> list[dict[str, Any]]:
        messages = [{"role": "system", "content": self.instructions}] \
            if self.instructions else []
        if isinstance(self.input, str):
            return messages + [{"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            if (message := _message(item, i, messages)) is not None:
                messages.append(message)
        if not messages:
            raise InvalidRequestError("input is empty: send at least one message", "input")
        return messages

    def _chat_tools(self) -> list[dict[str, Any]] | None:
        """Function tools in chat's shape (``{"type", "function": {...}}``)."""
        if not self.tools:
            return None
        chat = []
        for i, tool in enumerate(self.tools):
            if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                raise UnsupportedFieldError(
                    f"tools[{i}] is a {short(tool.get('type'))} tool: only function tools "
                    "({\"type\": \"function\", \"name\", \"parameters\"}) are supported",
                    "tools")
            chat.append({"type": "function", "function": {
                k: tool[k] for k in ("name", "description", "parameters", "strict")
                if k in tool}})
        return chat

    def _chat_tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            return choice
        if choice.get("type") == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        raise UnsupportedFieldError(f"tool_choice {short(choice)} is not supported: use "
                                    "none, auto, required or {\"type\": \"function\", "
                                    "\"name\": ...}", "tool_choice")

    def _response_format(self) -> dict[str, Any] | None:
        """``text.format`` as chat's ``response_format``."""
        fmt = self.text_format
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            if not isinstance(fmt.get("schema"), dict):
                raise InvalidRequestError("text.format json_schema needs schema, a JSON "
                                          "schema object", "text")
            return {"type": "json_schema", "json_schema": {
                "name": fmt.get("name", "response"), "schema": fmt.get("schema"),
                "strict": fmt.get("strict")}}
        raise UnsupportedFieldError(f"text.format type {short(kind)} is not supported: use "
                                    "text, json_object or json_schema", "text")


def _message(item: Any, i: int, before: list[dict]) -> dict | None:
    """Input item ``i`` as a chat message; a ``function_call`` joins the assistant message
    of the calls just before it (None: nothing new)."""
    kind = item.get("type", "message") if isinstance(item, dict) else None
    if kind == "function_call":
        call = {"id": _field(item, "call_id", i), "type": "function", "function": {
            "name": _field(item, "name", i), "arguments": _field(item, "arguments", i)}}
        last = before[-1] if before else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
            last["tool_calls"].append(call)
            return None
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if kind == "function_call_output":
        return {"role": "tool", "tool_call_id": _field(item, "call_id", i),
                "content": _field(item, "output", i)}
    role = item.get("role") if kind == "message" else None
    if role not in _ROLES:
        raise UnsupportedFieldError(
            f"input[{i}] is a {short(kind)} item with role {short(role)}: only message items "
            f"of roles {', '.join(_ROLES)}, function_call and function_call_output items "
            "are supported", "input")
    return {"role": role, "content": _text(item.get("content"), i)}


def _field(item: dict, name: str, i: int) -> str:
    if not isinstance(item.get(name), str):
        raise InvalidRequestError(f"input[{i}] ({item.get('type')}) needs {name}, a string",
                                  "input")
    return item[name]


def _text(content: Any, i: int) -> str:
    """A message item's content: a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"input[{i}].content must be a string or a list of text "
                                  "parts", "input")
    return "".join(part_text(part, _TEXT_PARTS, "input") for part in content)
