"""Requests as the scheduler sees them: token ids, sampling parameters and progress.
Pure Python (no torch)."""

from __future__ import annotations

import enum
import json as jsonlib
import math
import numbers
import sys
from collections.abc import Callable, Iterable
from dataclasses import InitVar, dataclass, field

from nolaserve.adapters.errors import InvalidRequestError, check_utf8, short


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class StructuredSpec:
    """Output held to a grammar (structured.py), one of: ``json_schema`` (a JSON schema as
    JSON text), ``regex`` (the whole output matches it), ``choice`` (the output is exactly
    one of these strings), ``grammar`` (EBNF, xgrammar's, whose ``root`` rule matches the
    whole output; or Lark, whose ``start`` rule does); none of them set: any JSON object
    (OpenAI's ``json_object``)."""

    json_schema: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's ``StructuredOutputsParams`` (offline ``SamplingParams(structured_outputs=)``):
    exactly one of a JSON schema (a dict or its text), a regex, a choice of strings, a
    grammar or ``json_object``; ``spec`` is it as a ``StructuredSpec``."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def spec(self, field: str = "structured_outputs") -> StructuredSpec:
        """The spec; a bad value fails naming ``field`` (the request field it came in:
        ``structured_outputs``, or one of vLLM's older ``guided_*``)."""
        asked = {k: v for k, v in vars(self).items() if v is not None and v is not False}
        if len(asked) != 1:
            raise InvalidRequestError(
                f"{field} sets {sorted(asked) or 'nothing'}: set exactly one of json (a "
                "schema), regex, choice (a list of strings), grammar (EBNF) or json_object",
                field)
        (kind, value), = asked.items()
        fits, shape = _SHAPES[kind]
        if not fits(value):
            name = f"{field}.{kind}" if field == "structured_outputs" else field
            raise InvalidRequestError(f"{name} is {short(value)}: send {shape}", field)
        if kind == "json":
            return StructuredSpec(value if isinstance(value, str) else jsonlib.dumps(value))
        if kind == "json_object":
            return StructuredSpec()
        return StructuredSpec(**{kind: tuple(value) if kind == "choice" else value})


_SHAPES: dict[str, tuple[Callable[[object], bool], str]] = {  # what each kind takes
    "json": (lambda v: isinstance(v, dict | str), "a JSON schema"),
    "regex": (lambda v: isinstance(v, str), "a string"),
    "choice": (lambda v: isinstance(v, list | tuple) and bool(v)
               and all(isinstance(c, str) and c for c in v), "a list of non-empty strings"),
    "grammar": (lambda v: isinstance(v, str), "an EBNF grammar as a string"),
    "json_object": (lambda v: v is True, "true"),
}


@dataclass
class SamplingParams:
    """Per-request sampling, checked at construction as vLLM's is (``check``) and again
    within the engine's bounds (``validate``). ``temperature == 0`` is greedy; ``top_k``
    0 (or vLLM's -1) and ``top_p == 1`` turn those filters off; ``seed`` makes sampling
    reproducible whatever else is in the batch. ``max_tokens=None`` is as many as the
    context and ``max_tokens_limit`` allow (``Engine.add_request`` fills it in)."""

    max_tokens: int | None = 16
    n: int = 1  # vLLM's: completions per prompt, LLM.generate's (each its own engine request)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's and the k most likely
    logprob_token_ids: list[int] | None = None  # vLLM's: with logprobs, these instead of top k
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    presence_penalty: float = 0.0  # OpenAI: over the output tokens so far
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM/transformers: over prompt and output tokens
    min_tokens: int = 0  # EOS, stop strings and stop tokens do not end the request before it
    structured: StructuredSpec | None = None  # output held to a grammar
    min_p: float = 0.0  # vLLM: drop tokens less likely than min_p x the likeliest; 0 = off
    stop_token_ids: list[int] = field(default_factory=list)  # vLLM: end the request (STOP)
    include_stop_str_in_output: bool = False  # vLLM: the text ends after the stop string
    skip_special_tokens: bool = True  # vLLM: False keeps special tokens' text (<eos>)
    spaces_between_special_tokens: bool = True  # vLLM: False joins adjacent added tokens
    truncate_prompt_tokens: int | None = None  # vLLM: keep the last k (-1: all that fit)
    truncation_side: str = "left"  # vLLM: "right" keeps the prompt's first k tokens instead
    allowed_token_ids: list[int] | None = None  # vLLM: only these may be sampled; None: all
    bad_words: list[str] = field(default_factory=list)  # vLLM: never output these words
    cache_salt: str | None = None  # vLLM: only requests with this salt share prefix blocks
    stream_interval: int | None = None  # vLLM's: tokens per streamed output (>= the server's)
    structured_outputs: InitVar[StructuredOutputsParams | None] = None  # vLLM's: -> structured

    def __post_init__(self, structured_outputs: StructuredOutputsParams | None) -> None:
        if isinstance(self.stop, str):  # vLLM's str | list[str]: one stop string
            self.stop = [self.stop]
        if self.top_k == -1:  # vLLM's other "off"
            self.top_k = 0
        if structured_outputs is not None:
            self.structured = structured_outputs.spec()
        self.check()  # as vLLM's: a bad value fails where it is written

    def validate(self, max_tokens_limit: int, vocab_size: int) -> None:
        """``check`` within an engine's bounds: ``max_tokens`` at most ``max_tokens_limit``,
        token ids under ``vocab_size`` (0: not known)."""
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens must be between 1 and {max_tokens_limit}, got {self.max_tokens}",
                "max_tokens")
        self.check(vocab_size)

    def check(self, vocab_size: int = 0) -> None:
        """Raise ``InvalidRequestError`` naming the first bad field; ``vocab_size`` (0: not
        known) bounds token ids. ``max_tokens`` may be None (as many as fit)."""
        self._check_types()
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise InvalidRequestError(
                f"max_tokens must be >= 1 (or None), got {short(self.max_tokens)}", "max_tokens")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0, got {self.temperature}",
                "temperature")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            raise InvalidRequestError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}",
                                      "min_p")
        if self.top_k < 0:
            raise InvalidRequestError(
                f"top_k must be >= 0 (0 or -1 = off), got {self.top_k}",
                "top_k")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be between 1 and {MAX_N}, got {short(self.n)}",
                                      "n")
        if self.seed is not None and not -2**63 <= self.seed < 2**63:  # vLLM's int64
            raise InvalidRequestError(f"seed must be a 64-bit signed integer, in [-2^63, "
                                      f"2^63), got {short(self.seed)}", "seed")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise InvalidRequestError("stop: at most 16 non-empty strings of <= 256 characters",
                                      "stop")
        for i, text in enumerate(self.stop):
            check_utf8(text, f"stop[{i}]", "stop")
        if self.truncate_prompt_tokens not in (None, -1) and self.truncate_prompt_tokens < 1:
            raise InvalidRequestError(
                f"truncate_prompt_tokens must be >= 1 (the prompt's last tokens to keep) or -1 "
                f"(as many as fit), got {self.truncate_prompt_tokens}", "truncate_prompt_tokens")
        if self.stream_interval is not None and (not isinstance(self.stream_interval, int)
                                                 or self.stream_interval < 1):
            raise InvalidRequestError(f"stream_interval must be a whole number of tokens "
                                      f">= 1 (or unset), got {short(self.stream_interval)}",
                                      "stream_interval")
        self._check_processing(vocab_size)

    def _check_types(self) -> None:
        for name in _NUMBERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidRequestError(f"{name} must be a number, got {short(value)}", name)
            if isinstance(value, numbers.Integral) and abs(value) > _FLOAT_MAX:  # math overflows
                raise InvalidRequestError(f"{name} must be a finite number, got {short(value)}",
                                          name)
        for name, optional in _WHOLE_NUMBERS.items():
            value = getattr(self, name)
            if (value is None and not optional) or value is not None and (
                    isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise InvalidRequestError(f"{name} must be a whole number"
                                          f"{' (or None)' if optional else ''}, got "
                                          f"{short(value)}", name)
        stop = self.stop
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got "
                                      f"{short(self.stop)}", "stop")

    def _check_processing(self, vocab_size: int) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
                raise InvalidRequestError(
                    f"{name} must be between 0 and {MAX_LOGPROBS} (or unset), got {k}", name)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -2 <= v <= 2):
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {v}", name)
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidRequestError(
                f"repetition_penalty must be a finite number > 0 (1 = off), got "
                f"{self.repetition_penalty}", "repetition_penalty")
        most = self.max_tokens if self.max_tokens is not None else math.inf
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= most:
            raise InvalidRequestError(
                f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got "
                f"{self.min_tokens}", "min_tokens")
        _validate_logit_bias(self.logit_bias, vocab_size)
        _validate_token_ids("stop_token_ids", self.stop_token_ids, MAX_STOP_TOKEN_IDS,
                            vocab_size)
        if self.logprob_token_ids is not None:
            if self.logprobs is None or not self.logprob_token_ids:
                raise InvalidRequestError("logprob_token_ids needs logprobs set and at least "
                                          "one token id (as in vLLM)", "logprob_token_ids")
            _validate_token_ids("logprob_token_ids", self.logprob_token_ids,
                                MAX_LOGPROB_TOKEN_IDS, vocab_size)
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise InvalidRequestError("allowed_token_ids is empty: list at least one "
                                          "token id, or leave it unset to allow every token",
                                          "allowed_token_ids")
            _validate_token_ids("allowed_token_ids", self.allowed_token_ids,
                                vocab_size or MAX_ALLOWED_TOKEN_IDS, vocab_size)
        if self.truncation_side not in ("left", "right"):
            raise InvalidRequestError(f"truncation_side must be left (keep the prompt's last "
                                      f"tokens) or right (its first), got "
                                      f"{str(self.truncation_side)[:20]!r}", "truncation_side")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not
                                            1 <= len(self.cache_salt) <= MAX_CACHE_SALT):
            raise InvalidRequestError(f"cache_salt must be a string of 1 to {MAX_CACHE_SALT} "
                                      "characters, or unset", "cache_salt")
        if len(self.bad_words) > MAX_BAD_WORDS or any(
                not isinstance(w, str) or not w.strip() or len(w) > 256 for w in self.bad_words):
            raise InvalidRequestError(f"bad_words: at most {MAX_BAD_WORDS} strings of 1 to 256 "
                                      "characters, not only spaces", "bad_words")


_FLOAT_MAX = sys.float_info.max
_NUMBERS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty")
_WHOLE_NUMBERS = {"n": False, "top_k": False, "min_tokens": False, "max_tokens": True,
                  "seed": True, "logprobs": True, "prompt_logprobs": True,
                  "truncate_prompt_tokens": True, "stream_interval": True}  # name -> optional
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's bound
MAX_ALLOWED_TOKEN_IDS = 1 << 18  # when the vocabulary size is not known; else its size
MAX_CACHE_SALT = 1024
MAX_N = 64  # completions per prompt (LLM.generate's; the servers allow 16)
MAX_BAD_WORDS = 128  # vLLM's VLLM_MAX_NUM_BAD_WORDS (it counts them after tokenizing)


def _validate_token_ids(name: str, ids: list[int], most: int, vocab_size: int) -> None:
    if len(ids) > most:
        raise InvalidRequestError(f"{name} has {len(ids)} entries; at most {most} are allowed",
                                  name)
    for token in ids:
        if not isinstance(token, int) or token < 0 or 0 < vocab_size <= token:
            top = vocab_size - 1 if vocab_size else "the vocabulary size - 1"
            raise InvalidRequestError(f"{name} entry {str(token)[:20]} is out of range: "
                                      f"token ids are 0 to {top}", name)


def _validate_logit_bias(bias: dict[int, float], vocab_size: int) -> None:
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(
            f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed",
            "logit_bias")
    for token, value in bias.items():
        if not isinstance(token, int) or token < 0 or 0 < vocab_size <= token:
            top = vocab_size - 1 if vocab_size else "the vocabulary size - 1"
            raise InvalidRequestError(
                f"logit_bias token id {short(token)} is out of range: token ids are 0 to {top}",
                "logit_bias")
        if not (isinstance(value, int | float) and -100 <= value <= 100):  # NaN fails too
            raise InvalidRequestError(
                f"logit_bias for token {token} must be in [-100, 100], got {short(value)}",
                "logit_bias")


@dataclass(eq=False)
class Sequence:
    """One request in flight. Tokens ``[0, num_computed_tokens)`` have their KV in the
    cache (blocks in ``block_table``); the rest are computed in later steps."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    adapter_slot: int = -1  # device slot of the adapter once admitted; -1 = base model
    finish_reason: FinishReason | None = None
    error: str | None = None
    prefix_counted: bool = False  # its prefix-cache lookup is in the counters (once)
    num_cached_tokens: int = -1  # prompt tokens the prefix cache held when first admitted
    checked_at: int = 0  # the store's delete log when its adapter was checked (DeleteLog)
    bad_word_ids: tuple[tuple[int, ...], ...] = ()  # params.bad_words as token sequences

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_adapter(self) -> bool:
        return self.adapter_id is not None and self.adapter_slot < 0


def adapter_ids_of(snapshot: Callable[[], Iterable[Sequence]],
                   in_slot: bool | None = None) -> tuple[str, ...]:
    """Adapter ids of a scheduler queue, read from a scrape thread while the step thread
    runs (a queue changed during the read is read again); ``in_slot``: only those of the
    sequences whose adapter holds (True) or does not hold (False, parked) a slot."""
    for _ in range(3):
        try:
            return tuple(s.adapter_id for s in snapshot() if s.adapter_id and (
                in_slot is None or (s.adapter_slot >= 0) == in_slot))
        except RuntimeError:  # deque mutated during iteration
            continue
    return ()
