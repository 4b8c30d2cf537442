"""OpenAI (and vLLM) request bodies -> ``GenerateRequest``, the request every front end
builds. A standard field that would change the output but is not supported raises
``UnsupportedFieldError`` naming it; a field nobody defines is ignored with a warning, as
vLLM does.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict

from nolaserve.adapters.errors import InvalidRequestError, UnsupportedFieldError, short

from ..chat import ChatMessage, ChatOptions
from ..engine.sequence import MAX_LOGPROBS, SamplingParams, StructuredSpec
from ..generation import GenerateRequest
from .tool_calls import ToolMode, structured_output

log = logging.getLogger("nolaserve.http")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


def _off(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == {} or value == []


# Known fields that change the output, with the test for "set to what changes nothing".
_REFUSED: dict[str, Any] = {
    "suffix": _off,
    "echo": _off,  # a completions field; chat has no echo in OpenAI's API
    "functions": _off,
    "function_call": lambda v: v in (None, "none"),
    "use_beam_search": _off,
    "length_penalty": lambda v: v in (None, 1, 1.0),
    "guided_whitespace_pattern": _off,
    "chat_template": _off, "logits_processors": _off,
    "prediction": _off, "audio": _off, "modalities": lambda v: v in (None, ["text"]),
    # vLLM's, not implemented here
    "spaces_between_special_tokens": lambda v: v in (None, True),
    "return_token_offsets": _off,
    "return_prompt_text": _off, "prompt_embeds": _off, "watermarking": _off,
    "repetition_detection": _off, "thinking_token_budget": _off, "mm_payload": _off,
}
# Standard fields that do not change the output.
_HARMLESS = {"user", "metadata", "store", "service_tier", "request_id", "priority",
             "reasoning_effort", "web_search_options", "include_reasoning", "session_id",
             "stream_interval"}
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request: prompts x n


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk has its choice's usage


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
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's extension, as min_tokens
    min_tokens: int | None = None
    min_p: float | None = None  # vLLM's extensions, as min_tokens
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None  # vLLM's: the prompt's, in its shape (completion_bodies.py)
    allowed_token_ids: list[int] | None = None
    logprob_token_ids: list[int] | None = None  # vLLM's: these tokens' logprobs, not top k
    bad_words: list[str] | None = None
    add_special_tokens: bool | None = None  # None: vLLM's default (chat False, else True)
    cache_salt: str | None = None
    truncation_side: str | None = None  # vLLM's: "right" keeps the prompt's first tokens
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False  # vLLM's extension: token ids in the choices
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:<id>"
    response_format: Any = None  # these three: tool_calls.py
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's; and its older guided_*
    guided_choice: Any = None
    guided_regex: Any = None
    guided_json: Any = None
    guided_grammar: Any = None

    def structured_output(self, tool_call_parser: str = ""
                          ) -> tuple[StructuredSpec | None, ToolMode | None]:
        """The output's constraint, and how it becomes tool calls (chat only; the server's
        ``tool_call_parser`` lets ``tool_choice: auto`` through)."""
        return structured_output(self.response_format, self.tools, self.tool_choice,
                                 isinstance(self, ChatCompletionRequest),
                                 self.parallel_tool_calls is not False, self._guided(),
                                 tool_call_parser)

    def _guided(self) -> dict[str, Any] | None:
        """``structured_outputs``, or vLLM's older ``guided_*`` fields said that way."""
        old = {k: v for k, v in (("choice", self.guided_choice), ("regex", self.guided_regex),
                                 ("json", self.guided_json), ("grammar", self.guided_grammar))
               if v is not None}
        if old and self.structured_outputs is not None:
            raise InvalidRequestError("structured_outputs and guided_* both constrain the "
                                      "output: send structured_outputs only", "guided_"
                                      + next(iter(old)))
        return old or self.structured_outputs

    @property
    def stream_usage(self) -> str:
        """What a stream says of usage (``responses.Shape.stream_usage``), as vLLM: ``""``,
        ``"final"`` (``include_usage``) or ``"continuous"`` (and ``continuous_usage_stats``)."""
        options = self.stream_options
        if not (options and options.include_usage):
            return ""
        return "continuous" if options.continuous_usage_stats else "final"

    @property
    def num_choices(self) -> int:
        """``n``: the choices of each prompt (checked by ``sampling_params``)."""
        return 1 if self.n is None else self.n

    def top_logprobs_k(self) -> int | None:
        """The ``k`` most likely tokens to report beside each sampled one; None: none."""
        return None

    def sampling_params(self, max_tokens: int | None, tool_call_parser: str = ""
                        ) -> SamplingParams:
        """Check the fields nobody here implements, then map the rest onto the engine's
        parameters (their ranges are checked by the engine, like the gRPC ones)."""
        self._check_extra()
        self._check_n()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,  # vLLM's -1 = off
            seed=self.seed, stop=stop, ignore_eos=self.ignore_eos,
            logprobs=self.top_logprobs_k(), logit_bias=self._logit_bias(),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=(1.0 if self.repetition_penalty is None
                                else self.repetition_penalty),
            min_tokens=self.min_tokens or 0,
            structured=self.structured_output(tool_call_parser)[0],
            min_p=self.min_p or 0.0, stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            prompt_logprobs=self._prompt_logprobs(),
            allowed_token_ids=self.allowed_token_ids, bad_words=list(self.bad_words or []),
            cache_salt=self.cache_salt, truncation_side=self.truncation_side or "left",
            logprob_token_ids=self.logprob_token_ids)

    def _prompt_logprobs(self) -> int | None:
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidRequestError("prompt_logprobs are not available when streaming (as "
                                      "in vLLM): set stream to false", "prompt_logprobs")
        return self.prompt_logprobs

    def _check_n(self) -> None:
        if not 1 <= self.num_choices <= MAX_N:
            raise InvalidRequestError(f"n must be between 1 and {MAX_N}, got {self.n}", "n")
        if self.best_of not in (None, self.num_choices):
            raise UnsupportedFieldError(
                f"best_of = {self.best_of} is not supported: only best_of == n "
                f"({self.num_choices}); leave it unset", "best_of")

    def _logit_bias(self) -> dict[int, float]:
        """OpenAI's ``{"<token id>": bias}`` with integer ids (their range is the engine's
        check)."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidRequestError(
                    f"logit_bias key {short(key)} is not a token id: use integer token ids "
                    "as keys", "logit_bias") from None
        return bias

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
    logprobs: int | None = None
    echo: bool = False

    def top_logprobs_k(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one, or a batch (strings or token-id lists)."""
        prompt = self.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            return [prompt]
        if len(prompt) * self.num_choices > MAX_CHOICES:
            raise InvalidRequestError(
                f"the batch has {len(prompt)} prompts x n = {self.num_choices}; a request "
                f"makes at most {MAX_CHOICES} choices: split the batch", "prompt")
        return list(prompt)

    def generate_requests(self, tool_call_parser: str = "") -> list[GenerateRequest]:
        """One ``GenerateRequest`` per prompt (each fanned out into ``n`` choices); a
        completion has no tools, so ``tool_call_parser`` (chat's) changes nothing."""
        params = self.sampling_params(DEFAULT_COMPLETION_TOKENS if self.max_tokens is None
                                      else self.max_tokens)
        if self.echo and params.logprobs is not None:  # the engine computes the larger k
            params.prompt_logprobs = max(params.logprobs, params.prompt_logprobs or 0)
        return [GenerateRequest(self.model, prompt=p, params=params,
                                add_special_tokens=self.add_special_tokens)
                if isinstance(p, str)
                else GenerateRequest(self.model, prompt_token_ids=list(p), params=params)
                for p in self.prompts()]


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

    def message(self) -> ChatMessage:
        """The message with its tool fields (an assistant's ``tool_calls``, a tool's
        ``tool_call_id``), which the chat template renders if it knows them."""
        extra = self.model_extra or {}
        calls, call_id = extra.get("tool_calls"), extra.get("tool_call_id")
        if calls is not None and not isinstance(calls, list) or \
                call_id is not None and not isinstance(call_id, str):
            raise InvalidRequestError("a message's tool_calls must be a list and its "
                                      "tool_call_id a string", "messages")
        return ChatMessage(self.role, self.text(), calls, call_id)


class ChatFields(BaseModel):
    """vLLM's chat rendering fields (``chat.ChatOptions``), of chat and ``/tokenize``."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None  # for RAG templates; checked by ChatOptions

    def chat_options(self) -> ChatOptions:
        return ChatOptions(self.add_generation_prompt, self.continue_final_message,
                           self.chat_template_kwargs or {}, self.documents)


class ChatCompletionRequest(_Sampling, ChatFields):
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def top_logprobs_k(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequestError("top_logprobs needs logprobs: set logprobs to "
                                          "true, or leave top_logprobs unset", "top_logprobs")
            return None
        k = self.top_logprobs or 0
        if not 0 <= k <= MAX_LOGPROBS:
            raise InvalidRequestError(
                f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {k}", "top_logprobs")
        return k

    def generate_requests(self, tool_call_parser: str = "") -> list[GenerateRequest]:
        """The chat's request; the chat template sees the tools when they are in play
        (``tool_choice`` not ``none``)."""
        limit = (self.max_tokens if self.max_completion_tokens is None
                 else self.max_completion_tokens)  # None: as many as fit
        params = self.sampling_params(limit, tool_call_parser)
        messages = [m.message() for m in self.messages]
        in_play = self.structured_output(tool_call_parser)[1] is not None
        tools = self.tools if in_play else None
        return [GenerateRequest(self.model, messages=messages, params=params, tools=tools,
                                chat=self.chat_options(),
                                add_special_tokens=self.add_special_tokens)]
