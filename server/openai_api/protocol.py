"""OpenAI (and vLLM) request bodies -> ``GenerateRequest``, the request every front end
builds: completions (one or a batch of prompts) and chat (messages and vLLM's rendering
fields), over the shared ``sampling_body.SamplingBody``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from nolaserve.adapters.errors import InvalidRequestError, UnsupportedFieldError, short

from ..chat import ChatMessage, ChatOptions
from ..engine.sequence import MAX_LOGPROBS
from ..generation import GenerateRequest
from .sampling_body import DEFAULT_COMPLETION_TOKENS, MAX_CHOICES, SamplingBody


class CompletionRequest(SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False

    def top_logprobs_k(self) -> int | None:
        return self.logprobs

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens`` 0: the prompt scored, nothing generated (as vLLM and
        OpenAI's legacy API allow); the engine makes one token, which nobody sees."""
        return bool(self.echo) and self.max_tokens == 0

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
        params = self.sampling_params(1 if self.echo_only else DEFAULT_COMPLETION_TOKENS
                                      if self.max_tokens is None else self.max_tokens)
        if self.echo and params.logprobs is not None:  # the engine computes the larger k
            params.prompt_logprobs = max(params.logprobs, params.prompt_logprobs or 0)
        return [GenerateRequest(self.model, prompt=p, params=params,
                                add_special_tokens=self.add_special_tokens)
                if isinstance(p, str)
                else GenerateRequest(self.model, prompt_token_ids=list(p), params=params)
                for p in self.prompts()]


def part_text(part: Any, kinds: tuple[str, ...], param: str) -> str:
    """The text of a content part ``{"type": <one of kinds>, "text": ...}``; any other
    part is ``UnsupportedFieldError``, a text part without its text
    ``InvalidRequestError``, each naming ``param``."""
    def example(kind: str) -> str:
        return f'{{"type": "{kind}", "text": "..."}}'
    if not isinstance(part, dict):
        raise InvalidRequestError(f"a content part is an object such as {example(kinds[0])}, not "
                                  f"{short(part)}", param)
    kind = part.get("type")
    if kind not in kinds:
        raise UnsupportedFieldError(f"a content part of type {short(kind)} is not "
                                    f"supported: send parts of type {' or '.join(kinds)}",
                                    param)
    if not isinstance(part.get("text"), str):
        raise InvalidRequestError(f'a content part of type "{kind}" needs its text, a '
                                  f"string: {example(kind)}", param)
    return part["text"]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part_text(part, ("text",), "messages") for part in self.content)

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


class ChatCompletionRequest(SamplingBody, ChatFields):
    is_chat: ClassVar[bool] = True
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def field_names(self) -> dict[str, str]:
        return {} if self.max_completion_tokens is None else {
            "max_tokens": "max_completion_tokens"}

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
