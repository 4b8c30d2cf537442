"""Slow and abusive clients: streams that are never read, hundreds of idle connections,
oversized messages and 1 ms deadlines neither block nor starve other clients, and leave no
work or state behind."""

import asyncio
import contextlib
import itertools

import grpc
import pytest
from conftest import tiny_llama
from engine_helpers import StepProbe, make_engine
from openai_helpers import http_serving
from server_helpers import (
    HANG_GUARD,
    assert_no_leaks,
    expect_code,
    request,
    serving,
    slow_down,
    until,
    wait_idle,
)

from nolaserve.adapters.nola import random_nola
from nolaserve.server.openai_api import server as http_server
from nolaserve.v1 import admin_pb2, inference_pb2_grpc

Code = grpc.StatusCode
# A normal request of ``max_tokens`` decode steps is answered within this many more steps
# (its prefill and the step running when it arrived) while abusers are at it: counted in
# engine steps, not seconds, so a slow machine cannot fail it.
SLACK_STEPS = 3
IDLE_CONNECTIONS = 200  # CI value


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


@pytest.fixture
def engine(model, bytebpe):
    engine = make_engine(model, bytebpe, max_queued_requests=256)
    engine.store.register("n", random_nola(engine.store.spec, seed=1, rank=4,
                                           num_basis=16).to_bytes())
    engine.probe = StepProbe(engine)
    return engine


_ids = itertools.count()


async def answered(c, engine, max_tokens: int = 4, **kw) -> None:
    """A normal Generate gets all its tokens within ``max_tokens + SLACK_STEPS`` steps."""
    req = request(max_tokens=max_tokens, **kw)
    req.request_id = f"normal-{next(_ids)}"
    out = await c.inference.Generate(req, timeout=HANG_GUARD)
    assert len(out.token_ids) == max_tokens
    steps = engine.probe.steps_holding(req.request_id)
    assert steps <= max_tokens + SLACK_STEPS, f"{req.request_id} waited {steps} steps"


def test_unread_streams_do_not_block_others_and_their_work_is_bounded(engine):
    async def main():
        async with serving(engine) as c:
            unread = []
            for i in range(8):
                req = request(max_tokens=200, adapter="n")
                req.request_id = f"unread-{i}"
                unread.append(c.inference.GenerateStream(req))
            await until(lambda: len(engine.requests) == 8, "the 8 streams to reach the engine")
            for _ in range(3):
                await answered(c, engine, adapter="n")
            # an unread stream's engine work ends at max_tokens: nothing runs past it
            await wait_idle(engine)
            for i in range(8):
                assert engine.probe.steps_holding(f"unread-{i}") <= 200 + SLACK_STEPS
            # their messages are buffered within gRPC's flow-control window (or the RPC
            # waits on its reader): bounded either way
            assert c.running.gate.in_flight <= 8
            for s in unread:
                s.cancel()
            # nothing stays once the readers leave
            await until(lambda: c.running.gate.in_flight == 0, "the cancelled RPCs to end")

    asyncio.run(main())
    assert_no_leaks(engine)


def test_many_idle_connections_do_not_starve_a_client(engine):
    async def main():
        async with serving(engine) as c:
            target = f"127.0.0.1:{c.running.port}"
            idle = [grpc.aio.insecure_channel(target) for _ in range(IDLE_CONNECTIONS)]
            try:
                await asyncio.wait_for(asyncio.gather(*[ch.channel_ready() for ch in idle]),
                                       HANG_GUARD)
                await answered(c, engine)
                # a few of the idle ones wake up and are served too
                for ch in idle[::50]:
                    out = await inference_pb2_grpc.InferenceStub(ch).Generate(
                        request(max_tokens=2), timeout=HANG_GUARD)
                    assert len(out.token_ids) == 2
            finally:
                await asyncio.gather(*[ch.close() for ch in idle])

    asyncio.run(main())
    assert_no_leaks(engine)


def test_http_connections_without_a_whole_request_head_are_closed(engine, monkeypatch):
    """uvicorn waited forever for a request's head and body: an outside probe's silent and
    byte-a-while connections were all open after 75 s, each holding a descriptor. A
    connection's head must come within ``HEAD_TIMEOUT_S`` of its opening or its last
    response, its body within ``BODY_TIMEOUT_S`` (408); a request that runs longer, or a
    keep-alive wait shorter, is untouched."""
    monkeypatch.setattr(http_server, "HEAD_TIMEOUT_S", 0.5)
    monkeypatch.setattr(http_server, "BODY_TIMEOUT_S", 0.5)
    slow_down(engine, 0.05)

    async def closed(reader: asyncio.StreamReader) -> bool:
        return await asyncio.wait_for(reader.read(), HANG_GUARD) == b""

    async def main():
        async with http_serving(engine) as (_, url):
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            silent = await asyncio.open_connection("127.0.0.1", port)
            trickle = await asyncio.open_connection("127.0.0.1", port)
            head = b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 30  # 4 s of it
            sent = 0
            with contextlib.suppress(ConnectionError):
                for sent in range(len(head)):  # a byte every 0.02 s does not keep it open
                    trickle[1].write(head[sent:sent + 1])
                    await trickle[1].drain()
                    await asyncio.sleep(0.02)
            assert sent < len(head) // 2 and await closed(silent[0])
            slow = await asyncio.open_connection("127.0.0.1", port)  # a whole head, then a
            slow[1].write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"  # body that
                          b"Content-Length: 100\r\n\r\n{")  # never ends: 408 at its bound
            late = await asyncio.wait_for(slow[0].read(), HANG_GUARD)
            assert late.startswith(b"HTTP/1.1 408") and b"did not come whole in 0.5 s" in late
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = b'{"prompt": "hi", "max_tokens": 20, "ignore_eos": true}'
            for _ in range(2):  # a 1 s request, then a keep-alive wait under the bound
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_GUARD)
                length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                answer = await reader.readexactly(length)
                assert head.startswith(b"HTTP/1.1 200") and b'"length"' in answer
                await asyncio.sleep(0.3)
            assert await closed(reader)  # idle past the bound after its last response
            for w in (silent[1], trickle[1], slow[1], writer):
                w.close()

    asyncio.run(main())


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
            calls.append(answered(c, engine, adapter="n"))
            await asyncio.gather(*calls)
            await expect_code(Code.NOT_FOUND, c.admin.GetAdapter(
                admin_pb2.AdapterRef(adapter_id="big")))
            await answered(c, engine)

    asyncio.run(main())
    assert_no_leaks(engine)


def test_one_millisecond_deadlines_leave_no_work_and_no_wedged_engine(engine):
    """Regression: a deadline that fired while the request waited in the step thread's
    inbox used to kill the step thread (InvalidStateError on a cancelled future), after
    which every request hung; and a request added just after its caller left ran on."""
    slow_down(engine, 0.05)  # the inbox is only read between steps: widen the window

    async def one(i: int) -> Code:
        req = request(max_tokens=100, adapter="n" * (i % 2))
        req.request_id = f"short-{i}"
        try:
            await c_ref[0].inference.Generate(req, timeout=(0.001, 0.01, 0.03, 0.07)[i % 4])
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
            await until(lambda: c.running.gate.in_flight == 1, "the 100 RPCs to end")
            since = engine.probe.mark()
            assert c.running.engine._thread.is_alive()
            await answered(c, engine, adapter="n")
            busy.cancel()
            await wait_idle(engine)
            return since

    since = asyncio.run(main())
    # none of the 100 runs on once its RPC ended: each is aborted within two steps
    assert all(engine.probe.steps_holding(f"short-{i}", since) <= 2 for i in range(100))
    assert_no_leaks(engine)
