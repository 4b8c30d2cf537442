"""Helpers for the gRPC server tests: an in-process server on a free port over a tiny
engine, raw stubs, and a slowed-down model runner for drain and deadline tests."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest

from nolaserve.server.app import RunningServer, start
from nolaserve.server.config import Config
from nolaserve.server.engine.engine import Engine
from nolaserve.v1 import admin_pb2_grpc, inference_pb2, inference_pb2_grpc


@dataclass
class Client:
    running: RunningServer
    channel: grpc.aio.Channel
    inference: inference_pb2_grpc.InferenceStub
    admin: admin_pb2_grpc.AdminStub


@asynccontextmanager
async def serving(engine: Engine, credentials: grpc.ChannelCredentials | None = None,
                  **config) -> AsyncIterator[Client]:
    """A server for ``engine`` on a free port of 127.0.0.1 and a channel to it."""
    cfg = Config(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, "http_port": 0,
                    **config})
    running = await start(cfg, engine)
    target = f"127.0.0.1:{running.port}"
    channel = (grpc.aio.secure_channel(target, credentials) if credentials
               else grpc.aio.insecure_channel(target))
    try:
        yield Client(running, channel, inference_pb2_grpc.InferenceStub(channel),
                     admin_pb2_grpc.AdminStub(channel))
    finally:
        await channel.close()
        await running.stop(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(prompt: str = "héllo wörld", max_tokens: int = 8, adapter: str = "",
            **sampling) -> inference_pb2.GenerateRequest:
    """A greedy request (temperature 0, EOS ignored) unless ``sampling`` says otherwise."""
    params = dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True) | sampling
    return inference_pb2.GenerateRequest(prompt=prompt, adapter_id=adapter,
                                         sampling=inference_pb2.SamplingParams(**params))


def slow_down(engine: Engine, seconds: float) -> None:
    """Make every model step take at least ``seconds`` (long generations for drain and
    deadline tests)."""
    execute = engine.runner.execute

    def slow_execute(batch):
        time.sleep(seconds)
        return execute(batch)

    engine.runner.execute = slow_execute


async def expect_code(code: grpc.StatusCode, call, match: str = "") -> str:
    """Await ``call`` (a unary call or a stream, drained) and check it fails with ``code``
    and a message containing ``match``; returns the message."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details()
    return info.value.details()


HANG_GUARD = 300.0  # s: only turns a hang into a failure; no passing run comes near it


async def until(condition, what: str, guard: float = HANG_GUARD) -> None:
    """Poll ``condition()`` until it holds. No timing is asserted: ``guard`` is there so a
    wedged server fails the test instead of hanging the run."""
    deadline = time.monotonic() + guard
    while not condition():
        assert time.monotonic() < deadline, f"hung waiting for {what}"
        await asyncio.sleep(0.005)


async def wait_idle(engine: Engine, guard: float = HANG_GUARD) -> None:
    """Until the engine holds no request (aborts are applied between steps)."""
    await until(lambda: not engine.has_unfinished(),
                f"the engine to finish {list(engine.requests)}", guard)


class BackgroundServer:
    """``serving(engine)`` on its own event loop in a thread, for synchronous clients
    (hypothesis tests, many-threaded storms): ``.port``, ``.engine``, ``.call(coro)``."""

    def __init__(self, engine: Engine, **config) -> None:
        import threading

        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._cm = serving(engine, **config)
        self.client: Client = self.call(self._cm.__aenter__())
        self.port = self.client.running.port

    def call(self, coro, timeout: float = 60.0):
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.call(self._cm.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


def assert_healthy(port: int, timeout: float = 10.0) -> None:
    """Health reports SERVING and a short greedy Generate on a fresh channel succeeds."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=timeout)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        out = inference_pb2_grpc.InferenceStub(channel).Generate(request(max_tokens=2),
                                                                 timeout=timeout)
        assert len(out.token_ids) == 2


def assert_no_leaks(engine: Engine) -> None:
    """No request in the engine, every KV block free, no slot reference or load left."""
    assert not engine.has_unfinished(), list(engine.requests)
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    if engine.store is not None:
        table = engine.store.slots.table
        table.check_invariants()
        assert [table.refcount(s) for s in range(table.num_slots)] == [0] * table.num_slots
        assert not engine.admission._loads
