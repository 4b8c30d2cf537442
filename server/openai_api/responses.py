"""Engine outputs -> OpenAI response bodies and server-sent-event chunks, for
``/v1/completions`` (``text_completion``) and ``/v1/chat/completions``
(``chat.completion``), in the shapes the official ``openai`` client parses."""

from __future__ import annotations

import json
import time

from nolaserve.adapters.errors import EngineStoppedError
from nolaserve.adapters.registry_rows import AdapterRecord

from ..engine.engine_types import RequestOutput
from ..engine.sequence import FinishReason

OWNED_BY = "nolaserve"
_FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}
DONE = b"data: [DONE]\n\n"


def finish_reason(out: RequestOutput) -> str | None:
    """OpenAI's ``stop`` (EOS or a stop string) or ``length``; None until the last output.
    A request the server cancelled (it is shutting down) is an error, not a finish."""
    if not out.finished:
        return None
    if out.finish_reason not in _FINISH:
        raise EngineStoppedError("the server stopped this request (it is shutting down); "
                                 "retry on another replica")
    return _FINISH[out.finish_reason]


class Responses:
    """The bodies of one request: whole (``complete``) or as stream chunks."""

    def __init__(self, chat: bool, model: str, request_id: str, token_ids: bool) -> None:
        self.chat, self.model, self.token_ids = chat, model, token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def _choice(self, text: str, token_ids: list[int], reason: str | None,
                delta: bool) -> dict:
        choice: dict = {"index": 0, "logprobs": None, "finish_reason": reason}
        if not self.chat:
            choice["text"] = text
        elif delta:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        if self.token_ids:
            choice["token_ids"] = token_ids
        return choice

    def complete(self, text: str, token_ids: list[int], last: RequestOutput) -> dict:
        body = self._envelope(self.object, [self._choice(text, token_ids,
                                                         finish_reason(last), False)])
        body["usage"] = usage(last)
        return body

    def first_chunk(self) -> bytes | None:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        if not self.chat:
            return None
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""},
                  "logprobs": None, "finish_reason": None}
        return self._sse(choice, with_usage=False)

    def chunk(self, out: RequestOutput, with_usage: bool) -> bytes | None:
        """The chunk of one engine output; None for an output with nothing to send."""
        reason = finish_reason(out)
        if not out.text and reason is None and not (self.token_ids and out.token_ids):
            return None
        return self._sse(self._choice(out.text, out.token_ids, reason, True), with_usage)

    def usage_chunk(self, last: RequestOutput) -> bytes:
        """``stream_options.include_usage``: the closing chunk, with empty choices."""
        body = self._envelope(self._chunk_object, [])
        body["usage"] = usage(last)
        return _event(body)

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _sse(self, choice: dict, with_usage: bool) -> bytes:
        body = self._envelope(self._chunk_object, [choice])
        if with_usage:
            body["usage"] = None
        return _event(body)


def usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _event(body: dict) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def model_card(model_id: str, created: float, parent: str | None, root: str,
               max_model_len: int | None = None) -> dict:
    card = {"id": model_id, "object": "model", "created": int(created),
            "owned_by": OWNED_BY, "root": root, "parent": parent}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card


def adapter_card(record: AdapterRecord, base_model: str, name: str) -> dict:
    """An adapter in ``/v1/models`` under ``name``, the model name that serves it;
    ``root`` and ``parent`` are the base model's id."""
    return model_card(name, record.created_at, base_model, base_model)
