"""The vLLM backend (``engine: vllm``): vLLM's ``AsyncLLM`` in this process and event
loop, behind the two faces the front ends already use:

- the ``AsyncEngine`` face (``generate``, ``max_prompt_tokens``, ``tokenizer``,
  ``model_name``, ``stop``, ``close``, ``dead`` / ``on_death``) for ``Generation``;
- the ``Engine`` face (``store``, ``limits``, ``spec``, ``placement``, ``stats``,
  ``observe``, ``extra_metrics``) for the Admin service, the HTTP API and the metrics.

Adapters come from the same ``AdapterStore``; ``VllmLoras`` hands vLLM each adapter
version as a PEFT directory. A request's cancellation is vLLM's ``abort``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing

from nolaserve.adapters.errors import EngineStoppedError, QueueFullError, ServingError
from nolaserve.adapters.spec import BaseModelSpec
from nolaserve.adapters.store import AdapterStore

from . import vllm_args
from .engine_types import EngineLimits, EngineStats, RequestOutput, StepStats, check_limits
from .fair_tags import FairTags
from .sequence import SamplingParams
from .vllm_loras import Version, VllmLoras
from .vllm_stats import VllmStats

log = logging.getLogger("nolaserve.engine")
WATCH_INTERVAL_S = 1.0


class VllmEngine:
    def __init__(self, llm, store: AdapterStore, loras: VllmLoras, tokenizer,
                 limits: EngineLimits, stats: VllmStats, dtype: str, device: str) -> None:
        self.llm, self.store, self.loras, self.tokenizer = llm, store, loras, tokenizer
        self.limits, self._stats, self._placement = limits, stats, (dtype, device)
        self.loop = asyncio.get_running_loop()
        loras.loop = self.loop
        self._ids = itertools.count()
        self._in_flight: dict[str, str | None] = {}  # request id -> adapter id
        self._tags = FairTags()  # each request's vLLM priority: fair queuing, as native
        # versions handed to add_lora once (so that a bad load fails its request, typed);
        # one vLLM evicted or that was removed is reloaded by vLLM from its directory
        self._added: set[str] = set()
        self.dead: BaseException | None = None
        self.on_death: Callable[[BaseException], None] | None = None
        self._stopped = False
        self._watch = self.loop.create_task(self._watch_engine())
        # vLLM's CPU LoRA ops give a token without a LoRA the last slot's delta: there,
        # base-model requests run as a zero LoRA (VllmLoras.zero)
        self._base = loras.zero() if device == "cpu" else None

    # -- the Engine face ------------------------------------------------------------
    @property
    def spec(self) -> BaseModelSpec:
        return self.store.spec

    @property
    def model_name(self) -> str:
        return self.store.spec.name

    @property
    def placement(self) -> tuple[str, str]:
        return self._placement

    @property
    def max_prompt_tokens(self) -> int:
        return self.limits.longest_prompt

    @property
    def stats(self) -> EngineStats:
        s = self._stats.snapshot()
        return EngineStats(s.running, s.waiting, s.kv_blocks_used, s.kv_blocks_total,
                           self.store.stats, s.running_adapters, s.waiting_adapters)

    def observe(self, on_step: Callable[[StepStats], None],
                on_load: Callable[[float], None] | None = None) -> None:
        """``on_step`` after each vLLM iteration that ran something; ``on_load`` after
        each adapter version materialized to its directory."""
        self._stats.step_observers.append(on_step)
        if on_load is not None:
            self.store.observe_loads(on_load)

    def extra_metrics(self, emitted: set[str]) -> Iterator:
        """vLLM's own Prometheus series, less those nolaserve already exports."""
        return self._stats.vllm_metrics(emitted)

    # -- the AsyncEngine face ---------------------------------------------------------
    async def check(self, prompt_token_ids: list[int], params: SamplingParams,
                    adapter_id: str | None) -> SamplingParams:
        """As ``AsyncEngine.check``: the limits and the adapter's record, starting nothing;
        ``params`` with its default ``max_tokens`` filled in."""
        if params.max_tokens is None:
            params = _fill_max_tokens(params, self.limits, len(prompt_token_ids))
        check_limits(self.limits, prompt_token_ids, params)
        if adapter_id:
            await asyncio.to_thread(self.store.get, adapter_id)
        return params

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       adapter_id: str | None = None, request_id: str | None = None,
                       label: str = "") -> AsyncIterator[RequestOutput]:
        """As ``AsyncEngine.generate``: typed errors before the first output; closing the
        iterator early aborts the vLLM request."""
        request_id = request_id or f"req-{next(self._ids)}/{label}"
        params = await self.check(prompt_token_ids, params, adapter_id)
        self._check_open()
        if len(self._in_flight) >= self.limits.max_queued_requests:
            raise QueueFullError(f"{len(self._in_flight)} requests in flight, the server's "
                                 "max_queued_requests: retry later")
        version = (await asyncio.to_thread(self.loras.use, adapter_id) if adapter_id
                   else self._base)
        self._in_flight[request_id] = adapter_id
        tag = self._tags.tag(adapter_id or None)
        try:
            async for out in self._run(request_id, prompt_token_ids, params, version, tag):
                yield out
        finally:
            del self._in_flight[request_id]
            self._tags.done(adapter_id or None, tag)
            if adapter_id:
                self.loras.done(version)

    async def _run(self, request_id: str, prompt: list[int], params: SamplingParams,
                   version: Version | None, priority: int) -> AsyncIterator[RequestOutput]:
        from vllm.lora.request import LoRARequest

        lora = None
        try:
            if version is not None:
                lora = LoRARequest(version.name, version.lora_int_id, version.path)
                if version.name not in self._added:  # load errors surface here, typed
                    await self.llm.add_lora(lora)
                    self._added.add(version.name)
            salt = {} if params.cache_salt is None else {"cache_salt": params.cache_salt}
            stream = self.llm.generate({"prompt_token_ids": prompt, **salt},
                                       vllm_args.sampling(params), request_id,
                                       lora_request=lora, priority=priority)
            completion = 0
            async with aclosing(stream) as outputs:
                async for out in outputs:
                    completion += len(out.outputs[0].token_ids)
                    yield vllm_args.request_output(request_id, out, len(prompt), completion,
                                                   params)
        except (ServingError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            error = vllm_args.typed_error(e)
            if isinstance(error, EngineStoppedError):
                self._die(e)
            raise error from e

    # -- lifecycle ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._stopped or self.dead is not None:
            why = "has stopped" if self.dead is not None else "is shutting down"
            raise EngineStoppedError(f"the vLLM engine {why}; retry on another replica or "
                                     "in a moment")

    async def _watch_engine(self) -> None:
        """vLLM's engine core is a process of its own: notice when it dies while idle."""
        while not self._stopped:
            if self.llm.errored:
                self._die(self.llm.dead_error)
                return
            await asyncio.sleep(WATCH_INTERVAL_S)

    def _die(self, error: BaseException) -> None:
        if self.dead is not None or self._stopped:
            return
        self.dead = error
        log.critical("the vLLM engine failed: %r", error)
        if self.on_death is not None:
            self.on_death(error)

    async def cancel_all(self) -> None:
        """Abort every request in flight: each stream gets vLLM's last output (``abort``,
        our CANCELLED)."""
        if self._in_flight and not self._stopped:
            await self.llm.abort(list(self._in_flight))

    def stop(self) -> None:
        """Abort every request in flight and shut vLLM down (from any thread)."""
        self._on_loop(self._shutdown)

    def close(self) -> None:
        """``stop``, then close the adapter store and remove the adapter directories."""
        self.stop()
        self.store.close()
        self.loras.dirs.close()

    def _shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._watch.cancel()
        self.llm.shutdown()

    def _on_loop(self, fn: Callable[[], None]) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop or self.loop.is_closed():
            fn()
            return

        async def call() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(call(), self.loop).result()


def _fill_max_tokens(params: SamplingParams, limits: EngineLimits, prompt: int
                     ) -> SamplingParams:
    import dataclasses

    room = max(1, min(limits.max_tokens_limit, limits.max_model_len - prompt))
    return dataclasses.replace(params, max_tokens=room)
