"""Requests as the scheduler sees them: token ids, sampling parameters and progress.
Pure Python (no torch)."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

from nolaserve.adapters.errors import InvalidRequestError


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


@dataclass
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` is greedy; ``top_k == 0`` and
    ``top_p == 1`` turn those filters off; ``seed`` makes sampling reproducible whatever
    else is in the batch. ``max_tokens=None`` is as many as the context and
    ``max_tokens_limit`` allow (``Engine.add_request`` fills it in)."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self, max_tokens_limit: int) -> None:
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens must be between 1 and {max_tokens_limit}, got {self.max_tokens}"
            )
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0, got {self.temperature}"
            )
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(
                f"top_k must be >= 0 (0 = off; -1 also means off over HTTP), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be in [0, 2^63), got {self.seed}")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise InvalidRequestError("stop: at most 16 non-empty strings of <= 256 characters")


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
    arrival_time: float = field(default_factory=time.monotonic)

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
