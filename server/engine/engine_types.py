"""The engine's data at its boundary, shared by every backend (the native ``Engine`` and
``VllmEngine``): the limits and the request check they make, what a step hands back per
request, and what metrics scrape."""

from __future__ import annotations

from dataclasses import dataclass, replace

from nolaserve.adapters.errors import InvalidRequestError, Status, short
from nolaserve.adapters.store import StoreStats

from .prefix_cache import PrefixCacheStats
from .sequence import FinishReason, SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log probability (the raw ``log_softmax`` of the model's logits, before
    bias, penalties, grammar masks and temperature, as vLLM reports by default), the
    ``k`` most likely ``(token id, logprob)`` of that position, most likely first, and
    the token's ``rank`` there (1 = the likeliest; vLLM's: 1 + how many are likelier)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None

    def ranked(self, k: int) -> list[tuple[int, float, int | None]]:
        """vLLM's position: this token (with its own rank) and the ``k`` most likely
        (rank 1 to k), each token once, as ``(token id, logprob, rank)``."""
        position = {self.token_id: (self.logprob, self.rank)}
        for rank, (token_id, logprob) in enumerate(self.top[:k], start=1):
            position.setdefault(token_id, (logprob, rank))
        return [(t, logprob, rank) for t, (logprob, rank) in position.items()]


@dataclass
class RequestOutput:
    """What one step produced for one request: new text and token ids; the last output of
    a request has ``finished`` set with the reason and the token counts. ``logprobs``: one
    per entry of ``token_ids`` when the request asks; ``prompt_logprobs``: on the request's
    first output only, one per prompt token (the first is ``None``)."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_code: Status = Status.FAILED_PRECONDITION  # the kind of ``error``
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it
    cached_tokens: int = 0  # last output: prompt tokens served from the prefix cache

    @classmethod
    def joined(cls, outs: list[RequestOutput]) -> RequestOutput:
        """Consecutive outputs of one request as one: all text, token ids and logprobs;
        the first one's prompt logprobs; the last one's finish, counts and errors."""
        if len(outs) == 1:
            return outs[0]
        logprobs = [e for out in outs for e in out.logprobs or ()]
        return replace(outs[-1], text="".join(out.text for out in outs),
                       token_ids=[t for out in outs for t in out.token_ids],
                       logprobs=logprobs if any(o.logprobs is not None for o in outs) else None,
                       prompt_logprobs=outs[0].prompt_logprobs)


@dataclass(frozen=True)
class EngineLimits:
    max_prompt_tokens: int
    max_tokens_limit: int
    max_model_len: int
    max_queued_requests: int
    vocab_size: int = 0  # prompt token ids must be below it (0: not known, not checked)

    @classmethod
    def resolved(cls, max_prompt_tokens: int, max_tokens_limit: int, max_model_len: int,
                 max_queued_requests: int, vocab_size: int = 0) -> EngineLimits:
        """The limits with the config's ``0`` (the model's context, as vLLM bounds a
        request by ``max_model_len``) replaced by that context."""
        return cls(max_prompt_tokens or max_model_len - 1, max_tokens_limit or max_model_len,
                   max_model_len, max_queued_requests, vocab_size)

    @property
    def longest_prompt(self) -> int:
        """The longest prompt a request may have: the limit, and room for one token."""
        return min(self.max_prompt_tokens, self.max_model_len - 1)


@dataclass(frozen=True)
class StepStats:
    """What one step ran, for metrics: sequences, tokens and distinct adapters (the base
    model not counted)."""

    num_seqs: int
    num_tokens: int
    num_adapters: int


@dataclass(frozen=True)
class EngineStats:
    """A scrape of the engine's state: requests, KV blocks, the adapter store."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    store: StoreStats | None
    running_adapters: tuple[str, ...] = ()  # adapter ids of running requests, in order
    waiting_adapters: tuple[str, ...] = ()  # ... and of waiting ones (the base not listed)
    parked: int = 0  # requests parked so far (AdapterAdmission: time_slice and settle)
    prefix_cache: PrefixCacheStats | None = None  # native engine (all 0 when off)
    preemptions: int | None = None  # native engine: preemptions so far (vLLM counts its own)


def check_limits(lim: EngineLimits, prompt: list[int], params: SamplingParams) -> None:
    """The request checks every backend makes: a prompt of token ids in the vocabulary,
    within the limits, sampling parameters valid, prompt + max_tokens within the model's
    context."""
    if not prompt:
        raise InvalidRequestError("prompt is empty: send at least one token of text")
    if len(prompt) > lim.longest_prompt:
        raise InvalidRequestError(
            f"prompt has {len(prompt)} tokens; the limit is "
            f"{lim.longest_prompt}: shorten it"
        )
    bad = next((t for t in prompt if t < 0 or 0 < lim.vocab_size <= t), None)
    if bad is not None:
        raise InvalidRequestError(
            f"prompt token id {short(bad)} is out of range: token ids are 0 to "
            f"{lim.vocab_size - 1 if lim.vocab_size else 'the vocabulary size - 1'}")
    if params.n != 1:
        raise InvalidRequestError(f"n = {short(params.n)}: an engine request makes one "
                                  "sequence; LLM.generate and HTTP's n run n requests")
    params.validate(lim.max_tokens_limit, lim.vocab_size)
    if len(prompt) + params.max_tokens > lim.max_model_len:
        raise InvalidRequestError(
            f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) exceeds the "
            f"model's context of {lim.max_model_len} tokens: lower max_tokens"
        )
