"""OpenAI's Responses API, ``POST /v1/responses``, stateless: ``instructions`` and
``input`` (a string, or message items) become a chat request, rendered, sampled and
constrained as ``/v1/chat/completions`` would, and its output comes back as a
``response`` object, or streamed as the Responses API's typed events, in the shapes the
official ``openai`` client parses. Nothing is stored, so ``previous_response_id`` (and
``background``, ``conversation``, a stored ``prompt``) get 400; so do tools, images and
files, which this server does not take here.

    ResponsesRequest (JSON) -> .chat(): ChatCompletionRequest -> engine
    engine outputs -> ResponseBodies: .complete() (JSON), or first/chunk/last events
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from nolaserve.adapters.errors import InvalidRequestError, UnsupportedFieldError, short

from ..engine.engine_types import RequestOutput
from .errors import error_of
from .protocol import ChatCompletionRequest
from .responses import Shape, finish_reason

log = logging.getLogger("nolaserve.http")
_ROLES = {"user": "user", "assistant": "assistant", "system": "system",
          "developer": "system"}  # a developer message is the system prompt of chat
_TEXT_PARTS = ("input_text", "output_text", "text")
# Responses API fields this server cannot honour, with "set to what changes nothing".
_REFUSED = {"previous_response_id": lambda v: v is None, "background": lambda v: not v,
            "conversation": lambda v: v is None, "prompt": lambda v: v is None,
            "tools": lambda v: not v, "tool_choice": lambda v: v in (None, "none", "auto"),
            "top_logprobs": lambda v: not v, "include": lambda v: not v,
            "truncation": lambda v: v in (None, "disabled")}
# Fields of the Responses API that change nothing here (nothing is stored or billed).
_HARMLESS = {"store", "metadata", "user", "service_tier", "parallel_tool_calls",
             "reasoning", "safety_identifier", "prompt_cache_key", "max_tool_calls",
             "stream_options", "prompt_cache_retention"}
# Sampling fields that go on to the chat request, as vLLM's ResponsesRequest takes them.
_SAMPLING = {"top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
             "seed", "logit_bias", "stop", "stop_token_ids", "ignore_eos", "min_tokens",
             "skip_special_tokens", "include_stop_str_in_output", "allowed_token_ids",
             "bad_words", "cache_salt", "structured_outputs", "chat_template_kwargs",
             "truncate_prompt_tokens", "priority", "request_id"}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = ""
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None

    def chat(self) -> ChatCompletionRequest:
        """The chat request that serves this one (its sampling fields checked there)."""
        extra = self.model_extra or {}
        for name, value in extra.items():
            if name in _REFUSED and not _REFUSED[name](value):
                raise UnsupportedFieldError(
                    f"{name} = {short(value)} is not supported by this stateless Responses "
                    "API (no tools, nothing stored): leave it unset", name)
        ignored = sorted(k for k in extra if k not in _REFUSED.keys() | _HARMLESS | _SAMPLING)
        if ignored:
            log.warning("fields present in the request but ignored: %s", ignored)
        return ChatCompletionRequest(
            model=self.model, messages=self._messages(), stream=self.stream,
            max_completion_tokens=self.max_output_tokens, temperature=self.temperature,
            top_p=self.top_p, response_format=self._response_format(),
            **{k: v for k, v in extra.items() if k in _SAMPLING})

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
            kind, role = item.get("type", "message"), item.get("role")
            if kind != "message" or role not in _ROLES:
                raise UnsupportedFieldError(
                    f"input[{i}] is a {short(kind)} item with role {short(role)}: only "
                    f"message items of roles {', '.join(_ROLES)} are supported", "input")
            messages.append({"role": _ROLES[role], "content": _text(item.get("content"), i)})
        if not messages:
            raise InvalidRequestError("input is empty: send at least one message", "input")
        return messages

    def _response_format(self) -> dict[str, Any] | None:
        """``text.format`` as chat's ``response_format``."""
        fmt = self.text_format
        kind = fmt.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            return {"type": "json_schema", "json_schema": {
                "name": fmt.get("name", "response"), "schema": fmt.get("schema"),
                "strict": fmt.get("strict")}}
        raise UnsupportedFieldError(f"text.format type {short(kind)} is not supported: use "
                                    "text, json_object or json_schema", "text")


def _text(content: Any, i: int) -> str:
    """A message item's content: a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"input[{i}].content must be a string or a list of text "
                                  "parts", "input")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS \
                or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else part
            raise UnsupportedFieldError(f"input[{i}] has a content part of type "
                                        f"{short(kind)}: only text parts are supported",
                                        "input")
        texts.append(part["text"])
    return "".join(texts)


class ResponseBodies:
    """The ``response`` object of one request: whole (``add`` each output, then
    ``complete``) or as stream events (``first_chunks``, ``chunk``, ``last_chunks``)."""

    def __init__(self, shape: Shape, request: ResponsesRequest) -> None:
        self.shape, self.request = shape, request
        self.id, self.item_id = "resp_" + shape.request_id, "msg_" + shape.request_id
        self.created = int(time.time())
        self.text: list[str] = []
        self.last: RequestOutput | None = None
        self.sequence = 0

    def add(self, index: int, out: RequestOutput) -> None:
        self.text.append(out.text)
        if out.finished:
            finish_reason(out)  # a request the server cancelled raises
            self.last = out

    def complete(self) -> dict:
        return self._response(self._status(), [self._item(self._status(), "".join(self.text))])

    def first_chunks(self) -> list[bytes]:
        """``response.created`` to the empty text part, before the first token."""
        empty = self._response("in_progress", [])
        return [self._event("response.created", response=empty),
                self._event("response.in_progress", response=empty),
                self._event("response.output_item.added", output_index=0,
                            item=self._item("in_progress", None)),
                self._event("response.content_part.added", **self._where(),
                            part=_part(""))]

    def chunk(self, index: int, out: RequestOutput) -> bytes | None:
        self.add(index, out)
        if not out.text:
            return None
        return self._event("response.output_text.delta", **self._where(), delta=out.text,
                           logprobs=[])

    def last_chunks(self) -> list[bytes]:
        """The text's, part's and item's ``done`` events, then ``response.completed``, its
        status ``incomplete`` when the output reached ``max_output_tokens`` (as vLLM sends
        it; the client's ``get_final_response`` needs that event)."""
        text, status = "".join(self.text), self._status()
        item = self._item(status, text)
        return [self._event("response.output_text.done", **self._where(), text=text,
                            logprobs=[]),
                self._event("response.content_part.done", **self._where(), part=_part(text)),
                self._event("response.output_item.done", output_index=0, item=item),
                self._event("response.completed", response=self._response(status, [item]))]

    def error_chunks(self, exc: BaseException) -> list[bytes]:
        error = error_of(exc)[2]["error"]
        return [self._event("error", code=str(error["code"]), message=error["message"],
                            param=error["param"])]

    def _status(self) -> str:
        return "incomplete" if self.last and finish_reason(self.last) == "length" \
            else "completed"

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def _item(self, status: str, text: str | None) -> dict:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant",
                "content": [] if text is None else [_part(text)]}

    def _response(self, status: str, output: list[dict]) -> dict:
        r, last = self.request, self.last
        usage = None if last is None or status == "in_progress" else {
            "input_tokens": last.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": last.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": last.prompt_tokens + last.completion_tokens}
        return {"id": self.id, "object": "response", "created_at": self.created,
                "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"}
                if status == "incomplete" else None,
                "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
                "model": self.shape.model, "output": output, "parallel_tool_calls": True,
                "previous_response_id": None, "temperature": r.temperature, "top_p": r.top_p,
                "tool_choice": "auto", "tools": [], "text": {"format": r.text_format},
                "truncation": "disabled", "metadata": r.metadata or {}, "store": False,
                "background": False, "usage": usage}

    def _event(self, kind: str, **fields: Any) -> bytes:
        """One server-sent event, named as its ``type`` (as OpenAI's stream names them)."""
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
