"""Isolation at the service: the step thread never touches the registry (so a held
registry lock cannot stall decoding), and a dead step thread turns the server
NOT_SERVING and every RPC UNAVAILABLE at once instead of hanging until deadlines."""

import asyncio
import threading

import grpc
import pytest
from conftest import tiny_llama
from engine_helpers import Kill, RegistrySpy, make_engine
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import expect_code, free_port, request, serving, slow_down

from nolaserve.adapters.nola import random_nola
from nolaserve.server.app import serve_async
from nolaserve.server.config import Config

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


def test_step_thread_never_calls_the_registry_even_while_its_lock_is_held(model, bytebpe):
    engine = make_engine(model, bytebpe)
    spec = engine.store.spec
    for aid in ("hot", "cold"):
        engine.store.register(aid, random_nola(spec, seed=len(aid), rank=4,
                                               num_basis=16).to_bytes())
    spy = RegistrySpy(engine.store.registry)
    engine.store.registry = spy
    slow_down(engine, 0.01)

    async def main():
        async with serving(engine) as c:
            await c.admin.PinAdapter(_ref("hot"))
            tokens_while_held, held = [], threading.Event()

            def hold_lock():
                with spy.real._lock:  # a registration burst or a slow fsync
                    held.set()
                    threading.Event().wait(0.5)
                held.clear()

            holder = None
            async for msg in c.inference.GenerateStream(request(max_tokens=60, adapter="hot")):
                if holder is None:
                    holder = asyncio.ensure_future(asyncio.to_thread(hold_lock))
                    while not held.is_set():
                        await asyncio.sleep(0.001)
                elif held.is_set():
                    tokens_while_held += msg.token_ids
            await holder
            cold = await c.inference.Generate(request(max_tokens=4, adapter="cold"))
            await c.admin.DeleteAdapter(_ref("cold"))
            await expect_code(Code.NOT_FOUND, c.inference.Generate(
                request(max_tokens=4, adapter="cold")))
            return tokens_while_held, cold

    tokens_while_held, cold = asyncio.run(main())
    assert tokens_while_held, "decoding stalled while the registry lock was held"
    assert len(cold.token_ids) == 4
    assert spy.threads and "engine-step" not in spy.threads, sorted(set(spy.threads))


def _ref(adapter_id: str):
    from nolaserve.v1 import admin_pb2

    return admin_pb2.AdapterRef(adapter_id=adapter_id)


def kill_step_thread(engine) -> None:
    def die():
        raise Kill("the step thread is gone")

    engine.step = die


def test_killed_step_thread_is_not_serving_and_rpcs_are_unavailable(model, bytebpe):
    engine = make_engine(model, bytebpe)
    slow_down(engine, 0.01)

    async def main():
        async with serving(engine) as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            stream = c.inference.GenerateStream(request(max_tokens=200))
            await stream.read()  # in flight
            kill_step_thread(engine)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while await stream.read() is not grpc.aio.EOF:
                    pass
            in_flight = info.value.code()
            for _ in range(100):  # health flips on the event loop right after the death
                status = (await health.Check(health_pb2.HealthCheckRequest(),
                                             timeout=1)).status
                if status != health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.01)
            await expect_code(Code.UNAVAILABLE, c.inference.Generate(request(), timeout=1),
                              "engine has stopped")
            return in_flight, status, c.running.died.is_set()

    in_flight, status, died = asyncio.run(main())
    assert in_flight == Code.UNAVAILABLE
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert died


def test_serve_exits_non_zero_when_the_step_thread_dies(model, bytebpe):
    engine = make_engine(model, bytebpe)
    port = free_port()

    async def main():
        server = asyncio.ensure_future(serve_async(
            Config(host="127.0.0.1", port=port, metrics_port=0), engine))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            async for answer in health.Watch(health_pb2.HealthCheckRequest(),
                                             wait_for_ready=True, timeout=30):
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    break  # (NOT_SERVING while the engine is added)
            kill_step_thread(engine)
            from nolaserve.v1 import inference_pb2_grpc

            with pytest.raises(grpc.aio.AioRpcError):  # wakes the step thread, which dies
                await inference_pb2_grpc.InferenceStub(channel).Generate(request(), timeout=10)
        return await asyncio.wait_for(server, 30)

    assert asyncio.run(main()) == 1
