"""The request body fields completions and chat share (``SamplingBody``): OpenAI's and
vLLM's sampling fields mapped onto the engine's ``SamplingParams``, with the fields that
would change the output but are not supported here refused (``UnsupportedFieldError``
naming them) and the ones nobody defines ignored with a warning, as vLLM does."""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from nolaserve.adapters.errors import InvalidRequestError, UnsupportedFieldError, short

from ..engine.sequence import SamplingParams, StructuredSpec
from ..engine.structured import STRUCTURED
from ..generation import MAX_N
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
    "return_token_offsets": _off,
    "return_prompt_text": _off, "prompt_embeds": _off, "watermarking": _off,
    "repetition_detection": _off, "thinking_token_budget": _off, "mm_payload": _off,
}
# Standard fields that do not change the output.
_HARMLESS = {"user", "metadata", "store", "service_tier", "request_id", "priority",
             "reasoning_effort", "web_search_options", "include_reasoning", "session_id"}
MAX_CHOICES = 64  # choices per request: prompts x n


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk has its choice's usage


class NullIsDefault(BaseModel):
    """A request body in which a field sent as null is its default, as OpenAI's nullable
    fields (``stream``, ``echo``) are: clients that send every field send null for those
    they leave unset."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if value is not None
                or key not in cls.model_fields or cls.model_fields[key].is_required()}


class SamplingBody(NullIsDefault):
    """The fields completions and chat share: sampling, vLLM's extensions and the
    output's constraint."""

    is_chat: ClassVar[bool] = False  # chat's tool fields are in play

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
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None  # vLLM's: the prompt's, in its shape (completion_bodies.py)
    allowed_token_ids: list[int] | None = None
    logprob_token_ids: list[int] | None = None  # vLLM's: these tokens' logprobs, not top k
    bad_words: list[str] | None = None
    add_special_tokens: bool | None = None  # None: vLLM's default (chat False, else True)
    cache_salt: str | None = None
    truncation_side: str | None = None  # vLLM's: "right" keeps the prompt's first tokens
    stream_interval: int | None = None  # vLLM's: tokens per streamed chunk (>= the server's)
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
                                 self.is_chat,
                                 self.parallel_tool_calls is not False, *self._guided(),
                                 parser=tool_call_parser)

    def field_names(self) -> dict[str, str]:
        """The fields this request sent under other names than the engine's (or chat's,
        for a Responses request), by the engine's name."""
        return {}

    def client_error(self, e: Exception) -> Exception:
        """``e`` naming the fields as this request sent them: the engine names its own."""
        if not isinstance(e, InvalidRequestError):
            return e
        if e.param == STRUCTURED:
            e.param = self.structured_field()
        names = self.field_names()
        if names:
            e.args = (re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: names[m[0]],
                             str(e)),)
            e.param = names.get(e.param, e.param).split(".")[0] if e.param else e.param
        return e

    def structured_field(self) -> str | None:
        """The field that set the output's constraint, for its errors."""
        if self.tools is not None and self.tool_choice not in (None, "none", "auto"):
            return "tools"
        if self.response_format is not None and not (
                isinstance(self.response_format, dict)
                and self.response_format.get("type") == "text"):
            return "response_format"
        guided, field = self._guided()
        return None if guided is None else field

    def _guided(self) -> tuple[dict[str, Any] | None, str]:
        """``structured_outputs``, or vLLM's older ``guided_*`` fields said that way; and
        the field it came in, for errors."""
        old = {k: v for k, v in (("choice", self.guided_choice), ("regex", self.guided_regex),
                                 ("json", self.guided_json), ("grammar", self.guided_grammar))
               if v is not None}
        if old and self.structured_outputs is not None:
            raise InvalidRequestError("structured_outputs and guided_* both constrain the "
                                      "output: send structured_outputs only", "guided_"
                                      + next(iter(old)))
        if old:
            return old, "guided_" + next(iter(old)) if len(old) == 1 else "guided_*"
        return self.structured_outputs, "structured_outputs"

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
            top_k=self.top_k or 0,
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
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            prompt_logprobs=self._prompt_logprobs(),
            allowed_token_ids=self.allowed_token_ids, bad_words=list(self.bad_words or []),
            cache_salt=self.cache_salt, truncation_side=self.truncation_side or "left",
            logprob_token_ids=self.logprob_token_ids, stream_interval=self.stream_interval)

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
