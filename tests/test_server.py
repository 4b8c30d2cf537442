"""The Inference service over a real gRPC channel: same tokens as the engine, chat
messages, typed errors as status codes, auth, deadlines and cancellation that stop the
work, and draining. Admin, metrics, TLS and the SIGTERM process: test_server_admin.py."""

import asyncio
import copy

import grpc
import pytest
from conftest import tiny_llama
from engine_helpers import StepProbe, greedy, make_engine, run
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_helpers import (
    HANG_GUARD,
    expect_code,
    request,
    serving,
    slow_down,
    until,
    wait_idle,
)

from nolaserve.adapters.nola import random_nola
from nolaserve.v1 import admin_pb2, inference_pb2

Code = grpc.StatusCode
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


@pytest.fixture
def engine(model, bytebpe):
    engine = make_engine(model, bytebpe)
    engine.store.register("n", random_nola(engine.store.spec, seed=1, rank=4,
                                           num_basis=16).to_bytes())
    return engine


def reference(model, tokenizer, prompt_ids, max_tokens, adapter=None):
    engine = make_engine(model, tokenizer)
    if adapter:
        engine.store.register(adapter, random_nola(engine.store.spec, seed=1, rank=4,
                                                   num_basis=16).to_bytes())
    return run(engine, {"r": (prompt_ids, greedy(max_tokens), adapter)})["r"]


def test_generate_and_stream_match_the_engine(model, bytebpe, engine):
    prompt_ids = bytebpe("héllo wörld")["input_ids"]
    want_base = reference(model, bytebpe, prompt_ids, 12)
    want_n = reference(model, bytebpe, prompt_ids, 12, adapter="n")

    async def main():
        async with serving(engine) as c:
            one = await c.inference.Generate(request(max_tokens=12))
            req = request(max_tokens=12, adapter="n")
            req.request_id = "mine"
            stream = [m async for m in c.inference.GenerateStream(req)]
            return one, stream

    one, stream = asyncio.run(main())
    assert list(one.token_ids) == want_base and one.text == bytebpe.decode(want_base)
    assert one.finish_reason == inference_pb2.FINISH_REASON_LENGTH and one.request_id
    assert (one.usage.prompt_tokens, one.usage.completion_tokens) == (len(prompt_ids), 12)
    assert [t for m in stream for t in m.token_ids] == want_n
    assert "".join(m.text for m in stream) == bytebpe.decode(want_n)
    assert {m.request_id for m in stream} == {"mine"}
    assert all(m.finish_reason == 0 and not m.HasField("usage") for m in stream[:-1])
    assert stream[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert stream[-1].usage.completion_tokens == 12


def test_messages_use_the_chat_template(model, bytebpe):
    chat_tok = copy.deepcopy(bytebpe)
    chat_tok.chat_template = CHAT_TEMPLATE
    messages = [{"role": "system", "content": "naïve"}, {"role": "user", "content": "café"}]
    text = chat_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<system>naïve\n<user>café\n<assistant>"
    want = reference(model, chat_tok, chat_tok(text, add_special_tokens=False)["input_ids"], 6)
    req = inference_pb2.GenerateRequest(
        messages=inference_pb2.ChatMessages(
            messages=[inference_pb2.ChatMessage(**m) for m in messages]),
        sampling=inference_pb2.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))

    async def main():
        async with serving(make_engine(model, chat_tok)) as c:
            got = await c.inference.Generate(req)
        async with serving(make_engine(model, bytebpe)) as c:
            await expect_code(Code.INVALID_ARGUMENT, c.inference.Generate(req),
                              "no chat template")
        return got

    assert list(asyncio.run(main()).token_ids) == want


def test_request_errors_map_to_status_codes(engine, monkeypatch):
    async def main():
        async with serving(engine) as c:
            gen = c.inference.Generate
            await expect_code(Code.NOT_FOUND, gen(request(adapter="nope")), "'nope'")
            await expect_code(Code.INVALID_ARGUMENT, gen(request(top_p=1.5)), "top_p")
            await expect_code(Code.INVALID_ARGUMENT, gen(request(max_tokens=1000)),
                              "max_tokens")
            await expect_code(Code.INVALID_ARGUMENT, gen(request(seed=2**63)), "seed")
            await expect_code(Code.INVALID_ARGUMENT, gen(inference_pb2.GenerateRequest()),
                              "prompt or messages")
            await expect_code(Code.INVALID_ARGUMENT, gen(request(prompt="")), "empty")
            adapter = engine.store.parsed("n")  # the adapter fails to load in the engine:
            monkeypatch.setattr(adapter, "materialize", _broken)  # the server's fault
            await expect_code(Code.INTERNAL,
                              c.inference.GenerateStream(request(adapter="n")), "disk on fire")
            monkeypatch.setattr(engine.store.registry, "count", _broken)
            await expect_code(Code.INTERNAL, c.admin.ListAdapters(admin_pb2.ListAdaptersRequest()),
                              "RuntimeError")
            ok = await gen(request(max_tokens=2))  # the server survived all of it
            assert len(ok.token_ids) == 2

    asyncio.run(main())
    assert not engine.has_unfinished()


def _broken(*args, **kwargs):
    raise RuntimeError("disk on fire")


def test_queue_full_is_resource_exhausted(model, bytebpe):
    engine = make_engine(model, bytebpe, max_queued_requests=1)
    slow_down(engine, 0.01)

    async def main():
        async with serving(engine) as c:
            stream = c.inference.GenerateStream(request(max_tokens=30))
            await stream.read()
            await expect_code(Code.RESOURCE_EXHAUSTED, c.inference.Generate(request()),
                              "retry later")
            stream.cancel()

    asyncio.run(main())


def test_deadline_and_cancel_stop_the_engine_request(engine):
    """A deadline (unary or stream) or a client cancel ends the engine request: once the
    RPC has ended on the server, at most two more steps hold it (the natural end would be
    200 steps away). Slow steps keep the request running while the client acts."""
    probe = StepProbe(engine, delay=0.01)

    def long(request_id: str):
        req = request(max_tokens=200, adapter="n")
        req.request_id = request_id
        return req

    async def ended(c, method: str, count: int) -> int:
        """Wait until the server counted ``count`` ``method`` RPCs, with any code (a stream
        whose client deadline passed may count as CANCELLED: the client's cancel can
        arrive before the server's own deadline). Its engine request is closed by then."""
        def counted() -> float:
            return sum(s.value for family in c.running.metrics.requests.collect()
                       for s in family.samples
                       if s.name.endswith("_total") and s.labels["rpc"] == method)

        await until(lambda: counted() >= count, f"{count} {method} RPCs to end")
        return probe.mark()

    async def main():
        marks = {}
        async with serving(engine) as c:
            await expect_code(Code.DEADLINE_EXCEEDED,
                              c.inference.Generate(long("unary"), timeout=1.5))
            marks["unary"] = await ended(c, "Generate", 1)
            stream = c.inference.GenerateStream(long("stream"), timeout=1.5)
            assert (await stream.read()).token_ids
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while await stream.read() is not grpc.aio.EOF:
                    pass
            assert info.value.code() == Code.DEADLINE_EXCEEDED
            marks["stream"] = await ended(c, "GenerateStream", 1)
            stream = c.inference.GenerateStream(long("cancel"))
            assert (await stream.read()).token_ids
            stream.cancel()
            marks["cancel"] = await ended(c, "GenerateStream", 2)
            await wait_idle(engine)
            # The client's deadline fires first (the server's is later by the transit
            # time), so on a loaded machine its cancel may arrive before the server's own
            # timer: either code, counted once.
            counted = c.running.metrics.requests
            assert sum(counted.labels("Generate", code)._value.get()
                       for code in ("DEADLINE_EXCEEDED", "CANCELLED")) == 1
        return marks

    marks = asyncio.run(main())
    for request_id, since in marks.items():
        assert probe.steps_holding(request_id) >= 1, f"{request_id} never reached the engine"
        assert probe.steps_holding(request_id, since) <= 2, request_id
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    table = engine.store.slots.table
    assert all(table.refcount(s) == 0 for s in range(table.num_slots))


def test_tokens_guard_admin_and_inference_but_not_health(engine):
    async def main():
        async with serving(engine, admin_token="adm-secret", inference_token="inf") as c:
            info = c.admin.GetServerInfo(admin_pb2.GetServerInfoRequest())
            await expect_code(Code.UNAUTHENTICATED, info, "admin_token")
            wrong = [("authorization", "Bearer inf")]
            await expect_code(Code.UNAUTHENTICATED, c.admin.GetServerInfo(
                admin_pb2.GetServerInfoRequest(), metadata=wrong), "wrong token")
            await c.admin.GetServerInfo(admin_pb2.GetServerInfoRequest(),
                                        metadata=[("authorization", "Bearer adm-secret")])
            await expect_code(Code.UNAUTHENTICATED, c.inference.Generate(request()),
                              "inference_token")
            await expect_code(Code.UNAUTHENTICATED, c.inference.GenerateStream(
                request(), metadata=[("authorization", "Bearer adm-secret")]), "wrong")
            out = await c.inference.Generate(request(max_tokens=3),
                                             metadata=[("authorization", "Bearer inf")])
            assert len(out.token_ids) == 3
            health = health_pb2_grpc.HealthStub(c.channel)
            status = await health.Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(main())


def test_drain_finishes_in_flight_and_refuses_new_requests(engine):
    slow_down(engine, 0.01)

    async def main():
        async with serving(engine) as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            stream = c.inference.GenerateStream(request(max_tokens=80, adapter="n"))
            tokens = list((await stream.read()).token_ids)
            stopping = asyncio.create_task(c.running.stop(HANG_GUARD))
            await until(lambda: c.running.gate.draining, "the server to start draining")
            await expect_code(Code.UNAVAILABLE, c.inference.Generate(request()),
                              "shutting down")
            await expect_code(Code.UNAVAILABLE, c.admin.GetAdapter(
                admin_pb2.AdapterRef(adapter_id="n")), "shutting down")
            status = await health.Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            while (m := await stream.read()) is not grpc.aio.EOF:
                tokens += m.token_ids
                last = m
            await stopping
            return tokens, last

    tokens, last = asyncio.run(main())
    assert len(tokens) == 80 and last.finish_reason == inference_pb2.FINISH_REASON_LENGTH
