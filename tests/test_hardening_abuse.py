"""Slow and abusive clients: streams that are never read, hundreds of idle connections,
oversized messages and 1 ms deadlines neither block nor starve other clients, and leave no
work or state behind."""

import asyncio
import time

import grpc
import pytest
from conftest import tiny_llama
from engine_helpers import make_engine
from server_helpers import (
    assert_no_leaks,
    expect_code,
    request,
    serving,
    slow_down,
    wait_idle,
)

from nolaserve.adapters.nola import random_nola
from nolaserve.v1 import admin_pb2, inference_pb2_grpc

Code = grpc.StatusCode
ANSWER_WITHIN = 10.0  # s: a normal request's bound while abusers are at it
IDLE_CONNECTIONS = 200  # CI value


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


@pytest.fixture
def engine(model, bytebpe):
    engine = make_engine(model, bytebpe, max_queued_requests=256)
    engine.store.register("n", random_nola(engine.store.spec, seed=1, rank=4,
                                           num_basis=16).to_bytes())
    return engine


async def timed_generate(c, **kw) -> float:
    start = time.monotonic()
    out = await c.inference.Generate(request(max_tokens=4, **kw), timeout=ANSWER_WITHIN)
    assert len(out.token_ids) == 4
    return time.monotonic() - start


def test_unread_streams_do_not_block_others_and_their_work_is_bounded(engine):
    async def main():
        async with serving(engine) as c:
            unread = [c.inference.GenerateStream(request(max_tokens=200, adapter="n"))
                      for _ in range(8)]
            await asyncio.sleep(0.2)  # they are running and never read
            for _ in range(3):
                await timed_generate(c, adapter="n")
            # an unread stream's engine work ends at max_tokens: nothing runs past it
            await wait_idle(engine, timeout=60)
            # their messages are buffered within gRPC's flow-control window (or the RPC
            # waits on its reader): bounded either way
            assert c.running.gate.in_flight <= 8
            for s in unread:
                s.cancel()
            deadline = time.monotonic() + 10
            while c.running.gate.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert c.running.gate.in_flight == 0  # nothing stays once the readers leave

    asyncio.run(main())
    assert_no_leaks(engine)


def test_many_idle_connections_do_not_starve_a_client(engine):
    async def main():
        async with serving(engine) as c:
            target = f"127.0.0.1:{c.running.port}"
            idle = [grpc.aio.insecure_channel(target) for _ in range(IDLE_CONNECTIONS)]
            try:
                await asyncio.wait_for(asyncio.gather(*[ch.channel_ready() for ch in idle]),
                                       60)
                await timed_generate(c)
                # a few of the idle ones wake up and are served too
                for ch in idle[::50]:
                    out = await inference_pb2_grpc.InferenceStub(ch).Generate(
                        request(max_tokens=2), timeout=ANSWER_WITHIN)
                    assert len(out.token_ids) == 2
            finally:
                await asyncio.gather(*[ch.close() for ch in idle])

    asyncio.run(main())
    assert_no_leaks(engine)


def test_oversized_messages_are_refused_without_blocking_others(engine):
    limit = 1 << 20

    async def main():
        async with serving(engine, max_message_bytes=limit) as c:
            big = admin_pb2.RegisterAdapterRequest(adapter_id="big", data=b"\0" * (2 * limit))
            huge_prompt = request(prompt="x" * (2 * limit))
            calls = [expect_code(Code.RESOURCE_EXHAUSTED, c.admin.RegisterAdapter(big))
                     for _ in range(4)]
            calls += [expect_code(Code.RESOURCE_EXHAUSTED, c.inference.Generate(huge_prompt))
                      for _ in range(4)]
            calls.append(timed_generate(c, adapter="n"))
            await asyncio.gather(*calls)
            await expect_code(Code.NOT_FOUND, c.admin.GetAdapter(
                admin_pb2.AdapterRef(adapter_id="big")))
            await timed_generate(c)

    asyncio.run(main())
    assert_no_leaks(engine)


def test_one_millisecond_deadlines_leave_no_work_and_no_wedged_engine(engine):
    """Regression: a deadline that fired while the request waited in the step thread's
    inbox used to kill the step thread (InvalidStateError on a cancelled future), after
    which every request hung; and a request added just after its caller left ran on."""
    slow_down(engine, 0.05)  # the inbox is only read between steps: widen the window

    async def one(i: int) -> Code:
        try:
            await c_ref[0].inference.Generate(request(max_tokens=100, adapter="n" * (i % 2)),
                                              timeout=(0.001, 0.01, 0.03, 0.07)[i % 4])
            return Code.OK
        except grpc.aio.AioRpcError as e:
            return e.code()

    c_ref: list = []

    async def main():
        async with serving(engine) as c:
            c_ref.append(c)
            busy = c.inference.GenerateStream(request(max_tokens=150))
            await busy.read()
            codes = await asyncio.gather(*[one(i) for i in range(100)])
            assert set(codes) == {Code.DEADLINE_EXCEEDED}, set(codes)
            assert c.running.engine._thread.is_alive()
            await timed_generate(c, adapter="n")
            busy.cancel()
            await wait_idle(engine, timeout=10)  # none of the 100 runs on: all aborted

    asyncio.run(main())
    assert_no_leaks(engine)
