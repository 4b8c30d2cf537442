"""Several engine requests served as one: the ``n`` choices of each prompt of an OpenAI
request, merged into one stream of ``(choice index, output)`` in the order they come.

    fan = Fanout(children, prompt_ids); await fan.start(); async for i, out in fan: ...

``start`` waits until every child has its first output, so a typed error of any child
(bad input, unknown adapter, queue full) raises before anything is sent, with every
child closed; a failure later, a cancelled iteration or ``aclose`` closes all children
(each closed child aborts its engine request). One child (``n = 1``, one prompt: the
common case) is iterated directly, with no task per output.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator

from .engine.engine_types import RequestOutput


class Fanout:
    def __init__(self, children: list[AsyncGenerator[RequestOutput, None]],
                 prompt_ids: list[list[int]]) -> None:
        self.children = children
        self.prompt_ids = prompt_ids  # the token ids of each prompt, as the engine got them
        self._ready: deque[tuple[int, RequestOutput]] = deque()
        self._pending: dict[asyncio.Future, int] = {}  # next output of child i
        self._single = len(children) == 1
        self._single_done = False  # the one child gave its finished output (or ended)

    async def start(self) -> None:
        """Submit every child and wait for each one's first output (see the module)."""
        if self._single:
            await self._next_single()
            return
        self._pending = {asyncio.ensure_future(anext(c)): i
                         for i, c in enumerate(self.children)}
        started: set[int] = set()
        try:
            while len(started) < len(self.children):
                await self._take()
                started.update(i for i, _ in self._ready)
        except BaseException:
            await self.aclose()
            raise

    def __aiter__(self) -> Fanout:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if self._single and not self._ready and not self._single_done:
            await self._next_single()
        while not self._ready:
            if not self._pending:
                raise StopAsyncIteration
            try:
                await self._take()
            except BaseException:
                await self.aclose()
                raise
        return self._ready.popleft()

    async def _next_single(self) -> None:
        """Queue the one child's next output, awaited in this task (no task per output)."""
        try:
            out = await anext(self.children[0])
        except StopAsyncIteration:
            self._single_done = True
            return
        except BaseException:
            await self.aclose()
            raise
        self._ready.append((0, out))
        self._single_done = out.finished

    async def _take(self) -> None:
        """Wait for the next output(s); queue them, in child order, and ask for more."""
        done, _ = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
        for future in sorted(done, key=self._pending.__getitem__):
            i = self._pending.pop(future)
            out = future.result()
            self._ready.append((i, out))
            if not out.finished:
                self._pending[asyncio.ensure_future(anext(self.children[i]))] = i

    async def aclose(self) -> None:
        """Stop every child still running (idempotent)."""
        pending, self._pending = self._pending, {}
        self._single_done = True
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for child in self.children:
            await child.aclose()
