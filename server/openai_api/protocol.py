"""OpenAI (and vLLM) request bodies -> ``GenerateRequest``, the request every front end
builds. A standard field that would change the output but is not supported raises
``UnsupportedFieldError`` naming it; a field nobody defines is ignored with a warning, as
vLLM does.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict

from nolaserve.adapters.errors import UnsupportedFieldError

from ..engine.sequence import SamplingParams
from ..generation import ChatMessage, GenerateRequest

log = logging.getLogger("nolaserve.http")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


def _off(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == {} or value == []


# Known fields that change the output, with the test for "set to what changes nothing".
_REFUSED: dict[str, Any] = {
    "logit_bias": _off, "presence_penalty": _off, "frequency_penalty": _off,
    "logprobs": _off, "top_logprobs": _off, "prompt_logprobs": _off, "suffix": _off,
    "echo": _off, "response_format": lambda v: _off(v) or v == {"type": "text"},
    "tools": _off, "tool_choice": lambda v: v in (None, "none"), "functions": _off,
    "function_call": lambda v: v in (None, "none"), "best_of": lambda v: v in (None, 1),
    "repetition_penalty": lambda v: v in (None, 1, 1.0), "min_tokens": _off, "min_p": _off,
    "stop_token_ids": _off, "bad_words": _off, "use_beam_search": _off,
    "length_penalty": lambda v: v in (None, 1, 1.0), "guided_json": _off,
    "guided_regex": _off, "guided_choice": _off, "guided_grammar": _off,
    "structured_outputs": _off, "include_stop_str_in_output": _off,
    "skip_special_tokens": lambda v: v in (None, True), "truncate_prompt_tokens": _off,
    "add_generation_prompt": lambda v: v in (None, True), "continue_final_message": _off,
    "chat_template": _off, "chat_template_kwargs": _off, "logits_processors": _off,
    "prediction": _off, "audio": _off, "modalities": lambda v: v in (None, ["text"]),
}
# Standard fields that do not change the output.
_HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls",
             "request_id", "priority", "reasoning_effort", "web_search_options"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False  # vLLM's extension: token ids in the choices

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """Check the fields nobody here implements, then the engine's parameters (their
        ranges are checked by the engine, like the gRPC ones)."""
        self._check_extra()
        if self.n not in (None, 1):
            raise UnsupportedFieldError(f"n = {self.n} is not supported: send n separate "
                                        "requests (with different seeds)", "n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,  # vLLM's -1 = off
            seed=self.seed, stop=stop, ignore_eos=self.ignore_eos)

    def _check_extra(self) -> None:
        ignored = []
        for name, value in (self.model_extra or {}).items():
            if name in _REFUSED:
                if not _REFUSED[name](value):
                    raise UnsupportedFieldError(
                        f"{name} = {value!r} is not supported by nolaserve; leave it unset",
                        name)
            elif name not in _HARMLESS:
                ignored.append(name)
        if ignored:
            log.warning("fields present in the request but ignored: %s", sorted(ignored))


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]

    def generate_request(self) -> GenerateRequest:
        params = self.sampling_params(DEFAULT_COMPLETION_TOKENS if self.max_tokens is None
                                      else self.max_tokens)
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise UnsupportedFieldError("a batch of prompts is not supported: send one "
                                            "prompt per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return GenerateRequest(self.model, prompt=prompt, params=params)
        return GenerateRequest(self.model, prompt_token_ids=list(prompt), params=params)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UnsupportedFieldError(
                    f"message content of type {part.get('type')!r} is not supported: "
                    "send text", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None

    def generate_request(self) -> GenerateRequest:
        limit = (self.max_tokens if self.max_completion_tokens is None
                 else self.max_completion_tokens)  # None: as many as fit
        params = self.sampling_params(limit)
        messages = [ChatMessage(m.role, m.text()) for m in self.messages]
        return GenerateRequest(self.model, messages=messages, params=params)


class LoadLoraRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a ``prompt`` or chat ``messages`` (rendered as chat does)."""

    model: str = ""
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool = True

    def generate_request(self) -> GenerateRequest:
        messages = None if self.messages is None else \
            [ChatMessage(m.role, m.text()) for m in self.messages]
        return GenerateRequest(self.model, prompt=self.prompt, messages=messages)


class DetokenizeRequest(BaseModel):
    model: str = ""
    tokens: list[int]
