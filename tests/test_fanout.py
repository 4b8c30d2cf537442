"""Fanout: one child is iterated directly (no task per output); several are merged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from nolaserve.adapters.errors import QueueFullError
from nolaserve.server.engine.engine_types import RequestOutput
from nolaserve.server.fanout import Fanout


class Child:
    """An engine request's outputs: ``tokens`` outputs, the last finished; ``closed`` is
    set when the generator is closed (the real one aborts its engine request)."""

    def __init__(self, tokens: int, error: BaseException | None = None) -> None:
        self.tokens, self.error, self.closed = tokens, error, False
        self.gen = self._run()

    async def _run(self) -> AsyncGenerator[RequestOutput, None]:
        try:
            if self.error is not None:
                raise self.error
            for t in range(self.tokens):
                await asyncio.sleep(0)
                yield RequestOutput("r", str(t), [t], finished=t == self.tokens - 1)
        finally:
            self.closed = True


def _run_counting_tasks(coro_fn) -> tuple[object, int]:
    """Run ``coro_fn()`` and count the tasks created while it runs (not counting itself)."""
    created = 0

    async def main():
        nonlocal created
        loop = asyncio.get_running_loop()

        def factory(loop, coro, **kwargs):
            nonlocal created
            created += 1
            return asyncio.Task(coro, loop=loop, **kwargs)
        loop.set_task_factory(factory)
        try:
            return await coro_fn()
        finally:
            loop.set_task_factory(None)
    return asyncio.run(main()), created


async def _drain(children: list[Child]) -> list[tuple[int, list[int]]]:
    fan = Fanout([c.gen for c in children], [[1]])
    await fan.start()
    return [(i, out.token_ids) async for i, out in fan]


def test_one_child_yields_every_output_with_no_task_per_output():
    child = Child(50)
    outs, tasks = _run_counting_tasks(lambda: _drain([child]))
    assert outs == [(0, [t]) for t in range(50)]
    assert tasks == 0
    assert child.closed


def test_several_children_are_merged_in_order_and_use_tasks():
    children = [Child(3), Child(2)]
    outs, tasks = _run_counting_tasks(lambda: _drain(children))
    assert sorted(outs) == [(0, [0]), (0, [1]), (0, [2]), (1, [0]), (1, [1])]
    assert tasks > 0  # the counter sees the multi-child path's tasks


@pytest.mark.parametrize("n", [1, 2])
def test_start_raises_the_typed_error_with_every_child_closed(n):
    children = [Child(3, QueueFullError("queue full: retry later"))] + [
        Child(3) for _ in range(n - 1)]

    async def go():
        fan = Fanout([c.gen for c in children], [[1]])
        with pytest.raises(QueueFullError):
            await fan.start()
    asyncio.run(go())
    assert all(c.closed for c in children)


def test_one_child_closed_by_aclose_and_by_a_cancelled_iteration():
    async def go():
        child = Child(100)
        fan = Fanout([child.gen], [[1]])
        await fan.start()
        await anext(fan)
        await fan.aclose()
        assert child.closed
        assert [x async for x in fan] == []

        child = Child(10**6)
        fan = Fanout([child.gen], [[1]])
        await fan.start()

        async def consume():
            async for _ in fan:
                pass
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert child.closed
    asyncio.run(go())
