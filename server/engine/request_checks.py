"""A request's checks before it is queued (limits, sampling, the KV cache's capacity, the
adapter; its grammar is ``structured.Grammars``'s) and the ``max_tokens`` of a request that
left it unset."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from nolaserve.adapters.errors import IncompatibleAdapterError, RequestTooLargeError, short
from nolaserve.adapters.store import AdapterStore

from .engine_types import EngineLimits, check_limits
from .scheduler import Scheduler
from .sequence import SamplingParams


class RequestChecks:
    """The engine's request checks; they read no per-step state, so any thread may run
    them (the adapter check reads the registry: keep it off the step thread)."""

    def __init__(self, limits: EngineLimits, scheduler: Scheduler,
                 store: Callable[[], AdapterStore | None]) -> None:
        self.limits, self.scheduler, self.store = limits, scheduler, store

    def with_default_max_tokens(self, prompt: list[int], params: SamplingParams
                                ) -> SamplingParams:
        """``params`` with an unset ``max_tokens`` filled in: as many as fit."""
        if params.max_tokens is not None:
            return params
        room = min(self.limits.max_model_len, self.scheduler.block_manager.max_tokens)
        return dataclasses.replace(params, max_tokens=max(1, min(
            self.limits.max_tokens_limit, room - len(prompt))))

    def check(self, prompt: list[int], params: SamplingParams, adapter_id: str | None) -> None:
        """Raise the typed error of the first check ``prompt`` and ``params`` fail, but
        the grammar's (``Grammars.compile`` or ``wait``); ``adapter_id`` (None: not
        checked) must be registered and servable."""
        check_limits(self.limits, prompt, params)
        total = len(prompt) + params.max_tokens
        capacity = self.scheduler.block_manager.max_tokens
        if total > capacity:
            raise RequestTooLargeError(
                f"prompt + max_tokens = {total} tokens but the KV cache holds {capacity}"
            )
        if adapter_id:
            self._check_adapter(adapter_id)

    def _check_adapter(self, adapter_id: str) -> None:
        store = self.store()
        if store is None:
            raise IncompatibleAdapterError("this engine serves the base model only")
        record = store.get(adapter_id)  # AdapterNotFoundError if unknown
        if record.kind == "rmm-basis":
            raise IncompatibleAdapterError(
                f"{short(adapter_id)} is an RMM basis; request one of its tasks instead"
            )
        store.parsed(adapter_id).validate(store.spec)  # e.g. registered for another model
