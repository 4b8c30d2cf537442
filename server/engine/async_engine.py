"""The asyncio face of the engine: ``generate()`` returns an async iterator of outputs.

One background thread runs ``Engine.step()`` in a loop. Submissions and cancellations
from the event loop are applied between steps, so a cancellation frees the request's KV
blocks and adapter slot within one step. If that thread ends for any reason other than
``stop()``, every request in flight and every later submission gets ``EngineStoppedError``
(UNAVAILABLE) at once, and ``on_death`` is called (the server turns NOT_SERVING and exits).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from nolaserve.adapters import cpu_threads
from nolaserve.adapters.errors import EngineStoppedError, Status
from nolaserve.adapters.store import AdapterStore

from .engine import Engine
from .engine_types import EngineLimits, RequestOutput
from .sequence import FinishReason, SamplingParams


@dataclass
class OutputStream:
    """Where one request's outputs go (its event loop and queue), and those held back
    for it: with ``interval`` > 1 (vLLM's ``stream_interval``) the first output goes at
    once, then one for every ``interval`` tokens, joined, and the last one."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    interval: int = 1
    held: list[RequestOutput] = field(default_factory=list)
    started: bool = False

    def due(self, out: RequestOutput) -> RequestOutput | None:
        """``out``, joined to what is held before it, if it goes now; else None (held)."""
        if self.interval == 1:
            return out
        self.held.append(out)
        tokens = sum(len(o.token_ids) for o in self.held)
        if not (out.finished or not self.started or tokens >= self.interval):
            return None
        held, self.held, self.started = self.held, [], True
        return RequestOutput.joined(held)


class AsyncEngine:
    def __init__(self, engine: Engine, stream_interval: int = 1):
        self.engine = engine
        self._wake = threading.Condition()
        self._inbox: list = []  # (callable, Future) applied by the step thread
        self._queues: dict[str, OutputStream] = {}
        self.stream_interval = stream_interval  # the least a request's stream_interval is
        self._ids = itertools.count()
        self._stopped = False
        self.dead: BaseException | None = None  # why the step thread ended unasked
        self.on_death: Callable[[BaseException], None] | None = None  # called on that thread
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt the engine takes (its limit and the model's context)."""
        return self.engine.limits.longest_prompt

    @property
    def limits(self) -> EngineLimits:
        """The engine's limits: context length, vocabulary size, queue."""
        return self.engine.limits

    @property
    def tokenizer(self):
        """The engine's tokenizer, for front ends that turn text into prompt ids."""
        return self.engine.tokenizer

    @property
    def store(self) -> AdapterStore | None:
        """The engine's adapter store (None: it serves the base model only)."""
        return self.engine.store

    @property
    def model_name(self) -> str:
        """The base model's id, for front ends that resolve model names."""
        return self.engine.model_name

    async def check(self, prompt_token_ids: list[int], params: SamplingParams,
                    adapter_id: str | None) -> SamplingParams:
        """Raise the typed error ``generate`` would for this request, starting nothing;
        ``params`` with its default ``max_tokens`` filled in. The adapter lookup reads the
        registry: here, on a worker thread, never on the step thread (which a slow registry
        would stall for every request). The grammar's compile is awaited, holding no
        thread, and is a cache hit in ``add_request``."""
        params = self.engine.with_default_max_tokens(prompt_token_ids, params)
        await asyncio.to_thread(self.engine.checks.check, prompt_token_ids, params,
                                adapter_id)
        await self.engine.grammars.wait(params.structured)
        return params

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       adapter_id: str | None = None, request_id: str | None = None,
                       label: str = "") -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs; the last one has ``finished`` set.
        Raises the engine's typed errors (bad input, unknown adapter, queue full) before
        yielding anything. Closing the iterator early cancels the request. Without a
        ``request_id`` the engine names it ``req-<n>/<label>``: unique whatever the label
        (a front end's client-chosen id), which only makes it traceable."""
        request_id = request_id or f"req-{next(self._ids)}/{label}"
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        checked_at = self.engine.delete_moment()
        params = await self.check(prompt_token_ids, params, adapter_id)

        interval = max(self.stream_interval, params.stream_interval or 1)

        def add() -> None:
            self.engine.add_request(request_id, prompt_token_ids, params, adapter_id,
                                    checked_at=checked_at)
            self._queues[request_id] = OutputStream(loop, queue, interval)

        try:
            await asyncio.wrap_future(self._submit(add))
        except asyncio.CancelledError:
            # The caller went away (deadline, cancel) while the add sat in the inbox or ran:
            # a skipped add leaves nothing, one that ran is aborted (only if it is ours).
            self._submit(lambda: self._abort(request_id, queue))
            raise
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._submit(lambda: self._abort(request_id, queue))

    def _abort(self, request_id: str, queue: asyncio.Queue) -> None:
        """Abort ``request_id`` if it is still the request that fed ``queue`` (a request
        with the same client-chosen id, submitted by someone else, is left alone)."""
        target = self._queues.get(request_id)
        if target is None or target.queue is not queue:
            return
        del self._queues[request_id]
        self.engine.abort(request_id)

    def _submit(self, fn) -> Future:
        future: Future = Future()
        with self._wake:
            if self._stopped:
                why = "has stopped" if self.dead is not None else "is shutting down"
                future.set_exception(EngineStoppedError(f"the engine {why}; retry on "
                                                        "another replica or in a moment"))
                return future
            self._inbox.append((fn, future))
            self._wake.notify()
        return future

    def _run(self) -> None:
        try:
            cpu_threads.parallel()  # the process's one OpenMP team (cpu_threads.py)
            self._loop()
        except BaseException as e:  # noqa: BLE001 - whatever it was, nobody may hang on it
            self._die(e)

    def _die(self, error: BaseException) -> None:
        """The step thread is ending unasked: fail everything now, tell ``on_death``."""
        with self._wake:
            self._stopped = True
            self.dead = error
            inbox, self._inbox = self._inbox, []
        message = (f"the engine stopped ({type(error).__name__}); the server is restarting: "
                   "retry on another replica or in a moment")
        for _, future in inbox:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineStoppedError(message))
        queues, self._queues = self._queues, {}
        for request_id, stream in queues.items():
            out = RequestOutput(request_id, "", [], True, FinishReason.ERROR, error=message,
                                error_code=Status.UNAVAILABLE)
            if not stream.loop.is_closed():
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
        if self.on_death is not None:
            self.on_death(error)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self.engine.has_unfinished() and not self._stopped:
                    self._wake.wait()
                if self._stopped and not self._inbox:
                    return
                inbox, self._inbox = self._inbox, []
            for fn, future in inbox:
                if not future.set_running_or_notify_cancel():
                    continue  # the submitter gave up (deadline) before it ran: skip it
                try:
                    future.set_result(fn())
                except Exception as e:  # typed request errors go back to the caller
                    future.set_exception(e)
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception as e:  # a bug must not wedge the server: fail, keep serving
                    outputs = self.engine.fail_all(f"internal error in engine step: {e!r}")
                self._dispatch(outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their requests' queues (those due, ``OutputStream``):
        one wake-up of each event loop per step (a ``call_soon_threadsafe`` writes to the
        loop's self-pipe), not one per output."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._queues.get(out.request_id)
            if stream is None or (out := stream.due(out)) is None:
                continue
            if out.finished:
                del self._queues[out.request_id]
            by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_put_all, items)

    async def cancel_all(self) -> None:
        """Cancel every request in flight: each stream gets its last output (finish
        CANCELLED), between two steps."""
        await asyncio.wrap_future(self._submit(self._cancel_all))

    def _cancel_all(self) -> None:
        for request_id in list(self.engine.requests):
            self._dispatch([self.engine.abort(request_id)])

    def stop(self) -> None:
        """Stop the step thread; requests still in flight are cancelled."""
        future = self._submit(self._cancel_all)
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join()
        if not future.done():
            future.cancel()

    def close(self) -> None:
        """``stop``, then close the engine it drives (admission worker, adapter store)."""
        self.stop()
        self.engine.close()


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
