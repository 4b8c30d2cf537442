"""The asyncio API: concurrent streams, typed errors before any output, cancellation that
frees KV blocks and the adapter slot within one step, and SmolLM2 end to end."""

import asyncio
import dataclasses
import re
import threading
from dataclasses import replace

import pytest
from conftest import tiny_llama
from engine_helpers import (
    BlockingLoad,
    Kill,
    RegistrySpy,
    StepProbe,
    greedy,
    hf_greedy,
    make_engine,
    run,
)

from nolaserve.adapters.errors import (
    AdapterNotFoundError,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    Status,
)
from nolaserve.adapters.nola import random_nola
from nolaserve.server.build import build_engine
from nolaserve.server.config import Config
from nolaserve.server.engine.async_engine import AsyncEngine
from nolaserve.server.engine.sequence import FinishReason, SamplingParams

LONG = SamplingParams(max_tokens=200, ignore_eos=True)
GUARD_S = 60  # only turns a wedged stream into a failure; a pass never waits for it


@pytest.fixture
def engine(bytebpe):
    engine = make_engine(tiny_llama(vocab_size=300), bytebpe)
    engine.store.register("n", random_nola(engine.store.spec, seed=1, rank=4,
                                           num_basis=16).to_bytes())
    return engine


async def collect(aeng, prompt, params, adapter=None):
    outs = [o async for o in aeng.generate(prompt, params, adapter)]
    return outs


def test_concurrent_streams_match_sync_runs(engine, bytebpe):
    reqs = {f"r{i}": ([7 + i] * (3 + i), greedy(10), "n" if i % 2 else None) for i in range(6)}
    alone = {rid: run(engine, {rid: req})[rid] for rid, req in reqs.items()}
    aeng = AsyncEngine(engine)

    async def main():
        return await asyncio.gather(*(collect(aeng, *req) for req in reqs.values()))

    try:
        results = asyncio.run(main())
    finally:
        aeng.stop()
    for rid, outs in zip(reqs, results):
        assert [t for o in outs for t in o.token_ids] == alone[rid]
        last = outs[-1]
        assert last.finished and last.finish_reason is FinishReason.LENGTH
        assert (last.prompt_tokens, last.completion_tokens) == (len(reqs[rid][0]), 10)
        assert "".join(o.text for o in outs) == bytebpe.decode(alone[rid])


def test_a_step_wakes_the_event_loop_once_for_all_its_outputs(engine):
    """The step thread hands a step's outputs to the event loop in one
    ``call_soon_threadsafe`` (one self-pipe write and wake-up), not one per stream: host
    work on the step thread, counted, not timed."""
    probe, wakes = StepProbe(engine), []
    aeng = AsyncEngine(engine)

    async def main():
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counted(callback, *args, **kw):
            if getattr(callback, "__name__", "") in ("put_nowait", "_put_all"):  # outputs
                wakes.append(len(probe.held))
            return real(callback, *args, **kw)

        loop.call_soon_threadsafe = counted
        return await asyncio.gather(*(collect(aeng, [7 + i] * 4, greedy(6)) for i in range(8)))

    try:
        results = asyncio.run(main())
    finally:
        aeng.stop()
    assert all(len(outs) == 6 for outs in results)
    per_step = [wakes.count(n) for n in sorted(set(wakes))]
    assert per_step == [1] * len(per_step) and len(per_step) >= 6, per_step  # not 8 a step


def test_stream_interval_joins_outputs_as_vllm_sends_them(engine):
    """vLLM's ``stream_interval``: the first output at once, then one for every N tokens
    (joined: text, token ids, logprobs), then the last; the server's interval is the
    least a request gets. The tokens and text are those of a stream of every output."""
    params = greedy(11)
    params.logprobs = 1

    aeng = AsyncEngine(engine)

    def outputs(server: int = 1, **kw):
        aeng.stream_interval = server
        return asyncio.run(collect(aeng, [7, 8, 9], replace(params, **kw)))

    try:
        every, by_4 = outputs(), outputs(4)
        asked_3, least_4 = outputs(stream_interval=3), outputs(4, stream_interval=2)
        with pytest.raises(InvalidRequestError, match="stream_interval"):
            outputs(stream_interval=0)
    finally:
        aeng.stop()
    assert [len(o.token_ids) for o in every] == [1] * 11
    assert [len(o.token_ids) for o in by_4] == [1, 4, 4, 2] == [len(o.token_ids) for o in least_4]
    assert [len(o.token_ids) for o in asked_3] == [1, 3, 3, 3, 1]
    for outs in (by_4, asked_3):
        assert [t for o in outs for t in o.token_ids] == [t for o in every for t in o.token_ids]
        assert "".join(o.text for o in outs) == "".join(o.text for o in every)
        assert [e for o in outs for e in o.logprobs] == [e for o in every for e in o.logprobs]
        assert outs[-1].finished and outs[-1].completion_tokens == 11


def test_errors_raise_and_cancel_frees_within_two_steps(engine):
    """Closing the stream (the client went away) aborts the request: at most the step
    already running when it closed, and one more, still hold it; the natural end would
    take 200 steps. The KV blocks and the slot are free afterwards."""
    probe = StepProbe(engine, delay=0.005)
    aeng = AsyncEngine(engine)

    async def main():
        with pytest.raises(InvalidRequestError, match="empty"):
            await collect(aeng, [], greedy(4))
        with pytest.raises(AdapterNotFoundError, match="nope"):  # before any output
            await collect(aeng, [5, 6], greedy(4), "nope")
        stream = aeng.generate([5, 6, 7], LONG, "n", request_id="gone")
        first = await stream.__anext__()
        assert not first.finished
        await stream.aclose()  # the client went away
        since = probe.mark()
        await until_gone(engine, "gone")
        return since

    try:
        since = asyncio.run(main())
    finally:
        aeng.stop()
    assert probe.steps_holding("gone") >= 1 and probe.steps_holding("gone", since) <= 2
    assert_freed(engine)


def test_a_cancelled_consumer_aborts_its_request_within_two_steps(engine):
    """A deadline or a cancelled RPC cancels the task that iterates ``generate``: the
    request is aborted, not left to run to max_tokens."""
    probe = StepProbe(engine, delay=0.005)
    aeng = AsyncEngine(engine)

    async def main():
        got_one = asyncio.Event()

        async def consume():
            async for _ in aeng.generate([5, 6, 7], LONG, "n", request_id="late"):
                got_one.set()

        task = asyncio.create_task(consume())
        await got_one.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        since = probe.mark()
        await until_gone(engine, "late")
        return since

    try:
        since = asyncio.run(main())
    finally:
        aeng.stop()
    assert probe.steps_holding("late", since) <= 2
    assert_freed(engine)


def test_a_caller_cancelled_during_its_add_is_aborted_once_the_add_ran(engine, monkeypatch):
    """The caller's deadline can pass while the step thread is inside ``add_request``:
    the add cannot be skipped any more, so the request it created must be aborted right
    after it, not left to run to max_tokens with nobody reading it."""
    probe = StepProbe(engine, delay=0.005)
    inside, go, added = threading.Event(), threading.Event(), threading.Event()
    add_request = engine.add_request

    def slow_add(*args, **kwargs):
        inside.set()
        go.wait(120)  # only a guard: the test releases it as soon as the caller is gone
        add_request(*args, **kwargs)
        added.set()

    monkeypatch.setattr(engine, "add_request", slow_add)
    aeng = AsyncEngine(engine)

    async def main():
        task = asyncio.create_task(collect(aeng, [5, 6, 7], LONG, "n"))
        await asyncio.to_thread(inside.wait, 120)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        since = probe.mark()
        go.set()
        await asyncio.to_thread(added.wait, 120)
        while engine.has_unfinished():
            await asyncio.sleep(0.002)
        return since

    try:
        since = asyncio.run(main())
    finally:
        go.set()
        aeng.stop()
    assert added.is_set()
    assert sum(bool(ids) for ids in probe.held[since:]) <= 2  # 200 if never aborted
    assert_freed(engine)


def test_a_cold_load_does_not_stop_others_decoding(engine):
    """While an adapter's cold load is stuck, requests already running keep getting tokens
    and finish; the stuck request is served once its load completes."""
    blocked = BlockingLoad(engine.store, "n")
    aeng = AsyncEngine(engine)

    async def main():
        base = aeng.generate([4, 5], greedy(24), None, request_id="base")
        first = await base.__anext__()
        cold = asyncio.create_task(collect(aeng, [5, 6, 7], greedy(3), "n"))
        await asyncio.to_thread(blocked.started.wait)  # the loader is stuck from here on
        rest = [out async for out in base]
        done_while_stuck = not blocked._go.is_set() and not blocked.timed_out
        blocked.release()
        return [first, *rest], await cold, done_while_stuck

    try:
        base, cold, done_while_stuck = asyncio.run(main())
    finally:
        aeng.stop()
    assert done_while_stuck, "the base request waited for another adapter's load"
    assert sum(len(o.token_ids) for o in base) == 24 and base[-1].finished
    assert sum(len(o.token_ids) for o in cold) == 3 and cold[-1].finished
    assert not blocked.timed_out
    assert_freed(engine)


def test_a_request_arriving_while_only_a_cold_load_is_pending_is_served(engine):
    """With nothing to run but a stuck cold load, the step loop waits for the load with a
    timeout, never for it alone: a request that arrives meanwhile is served at once."""
    blocked = BlockingLoad(engine.store, "n")
    aeng = AsyncEngine(engine)

    async def main():
        cold = asyncio.create_task(collect(aeng, [5, 6, 7], greedy(3), "n"))
        await asyncio.to_thread(blocked.started.wait)  # only the stuck load is pending
        base = await collect(aeng, [4, 5], greedy(4), None)
        done_while_stuck = not blocked._go.is_set() and not blocked.timed_out
        blocked.release()
        return base, await cold, done_while_stuck

    try:
        base, cold, done_while_stuck = asyncio.run(main())
    finally:
        aeng.stop()
    assert done_while_stuck, "the new request waited for another adapter's load"
    assert sum(len(o.token_ids) for o in base) == 4 and base[-1].finished
    assert sum(len(o.token_ids) for o in cold) == 3 and cold[-1].finished
    assert_freed(engine)


def test_a_late_abort_leaves_a_newer_request_with_the_same_id_alone(engine):
    """A client id can come back once its request finished. If the first consumer leaves
    before reading its last output, its abort must not touch the newer request."""
    aeng = AsyncEngine(engine)

    async def main():
        first = aeng.generate([5, 6, 7], greedy(2), "n", request_id="same")
        await first.__anext__()
        await until_gone(engine, "same")  # finished; its last output is still unread
        second = aeng.generate([5, 6, 7], greedy(12), "n", request_id="same")
        outs = [await second.__anext__()]
        await first.aclose()  # the first consumer leaves: its abort is submitted
        outs += await asyncio.wait_for(collect_rest(second), GUARD_S)
        return outs

    try:
        outs = asyncio.run(main())
    finally:
        aeng.stop()
    assert sum(len(o.token_ids) for o in outs) == 12
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
    assert_freed(engine)


def test_after_stop_new_requests_are_refused_as_a_shutdown(engine):
    aeng = AsyncEngine(engine)
    assert aeng._thread.daemon  # a program that never stops its engine can still exit
    assert aeng._thread.name == "engine-step"  # as thread dumps and the isolation tests know it
    aeng.stop()

    async def main():
        with pytest.raises(EngineStoppedError, match="the engine is shutting down; retry on "
                                                     "another replica or in a moment"):
            await collect(aeng, [5, 6], greedy(2))

    asyncio.run(main())
    assert aeng.dead is None


def test_a_dead_step_thread_fails_every_request_at_once_as_unavailable(engine):
    """If the step thread dies, the request in flight ends with an UNAVAILABLE error, a
    submission waiting for the thread fails with the same message, and so does every later
    one; ``dead`` and ``on_death`` get the error."""
    entered, proceed, died = threading.Event(), threading.Event(), []
    error = Kill("the step thread is gone")
    aeng = AsyncEngine(engine)
    aeng.on_death = died.append
    message = (r"the engine stopped \(Kill\); the server is restarting: retry on another "
               r"replica or in a moment")

    def dying_step():
        entered.set()
        proceed.wait(GUARD_S)  # until a submission waits in the inbox
        raise error

    async def main():
        stream = aeng.generate([5, 6, 7], LONG, "n", request_id="inflight")
        await anext(stream)  # the request runs
        engine.step = dying_step
        await asyncio.to_thread(entered.wait, GUARD_S)
        pending = asyncio.ensure_future(collect(aeng, [5, 6], greedy(2)))
        while not aeng._inbox:  # its add waits for the step thread
            await asyncio.sleep(0.002)
        proceed.set()
        last = await asyncio.wait_for(collect_rest(stream), GUARD_S)
        with pytest.raises(EngineStoppedError, match=message):
            await asyncio.wait_for(pending, GUARD_S)
        with pytest.raises(EngineStoppedError, match="the engine has stopped"):
            await asyncio.wait_for(collect(aeng, [5, 6], greedy(2)), GUARD_S)
        return last[-1]

    last = asyncio.run(main())
    assert entered.is_set() and aeng.dead is error and died == [error]
    assert (last.request_id, last.text, last.token_ids, last.finished) == ("inflight", "", [],
                                                                          True)
    assert last.finish_reason is FinishReason.ERROR and last.error_code is Status.UNAVAILABLE
    assert re.fullmatch(message, last.error)


def test_a_step_that_raises_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    """A bug in one step fails the requests it held (INTERNAL), not the engine: the step
    thread lives, the next request is served, and a full queue still refuses with its
    typed error."""
    step, broken = engine.step, threading.Event()

    def step_once_broken():
        if not broken.is_set():
            broken.set()
            raise RuntimeError("a bug")
        return step()

    monkeypatch.setattr(engine, "step", step_once_broken)
    monkeypatch.setattr(engine, "limits", dataclasses.replace(engine.limits,
                                                              max_queued_requests=1))
    aeng = AsyncEngine(engine)

    async def main():
        failed = await asyncio.wait_for(collect(aeng, [5, 6], greedy(2)), GUARD_S)
        stream = aeng.generate([5, 6, 7], LONG)
        await anext(stream)
        with pytest.raises(QueueFullError, match="1 requests in flight, the server's "
                           "max_queued_requests: retry later"):  # the key that bounds it
            await collect(aeng, [5, 6], greedy(2))
        await stream.aclose()
        return failed, await asyncio.wait_for(collect(aeng, [5, 6], greedy(2)), GUARD_S)

    try:
        failed, served = asyncio.run(main())
    finally:
        aeng.stop()
    assert failed[-1].finish_reason is FinishReason.ERROR
    assert failed[-1].error_code is Status.INTERNAL
    assert "internal error in engine step: RuntimeError('a bug')" in failed[-1].error
    assert aeng.dead is None and sum(len(o.token_ids) for o in served) == 2


def test_stop_cancels_the_requests_in_flight(engine):
    aeng = AsyncEngine(engine)

    async def main():
        stream = aeng.generate([5, 6, 7], LONG, "n")
        await anext(stream)  # in flight
        await asyncio.to_thread(aeng.stop)
        return await asyncio.wait_for(collect_rest(stream), GUARD_S)

    rest = asyncio.run(main())
    assert rest[-1].finished and rest[-1].finish_reason is FinishReason.CANCELLED
    assert_freed(engine)


def test_the_step_thread_never_reads_the_registry(engine):
    """``generate`` looks the adapter up on a worker thread; the add on the step thread
    does not look again (a slow registry would stall every request)."""
    spy = RegistrySpy(engine.store.registry)
    engine.store.registry = spy
    aeng = AsyncEngine(engine)
    try:
        outs = asyncio.run(collect(aeng, [5, 6, 7], greedy(3), "n"))
    finally:
        aeng.stop()
    assert sum(len(o.token_ids) for o in outs) == 3
    assert spy.threads and "engine-step" not in spy.threads, sorted(set(spy.threads))


def test_an_unset_max_tokens_fills_what_fits(engine):
    """``max_tokens`` left unset: as many tokens as fit the context and the limit."""
    aeng = AsyncEngine(engine)
    prompt = [5, 6, 7]
    unset = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    expected = engine.with_default_max_tokens(prompt, unset)

    async def main():
        return await collect(aeng, prompt, unset)

    try:
        outs = asyncio.run(main())
    finally:
        aeng.stop()
    assert expected.max_tokens > 16  # not the default of 16
    assert sum(len(o.token_ids) for o in outs) == expected.max_tokens
    assert outs[-1].finish_reason is FinishReason.LENGTH


async def collect_rest(stream) -> list:
    return [out async for out in stream]


async def until_gone(engine, request_id: str) -> None:
    """Until the engine no longer holds ``request_id`` (aborted, or at its natural end)."""
    while request_id in engine.requests:
        await asyncio.sleep(0.002)


def assert_freed(engine) -> None:
    bm = engine.scheduler.block_manager
    assert not engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks
    table = engine.store.slots.table
    assert all(table.refcount(s) == 0 for s in range(table.num_slots))


def test_smollm2_end_to_end_matches_generate(smollm2):
    """The bundled SmolLM2-135M: engine greedy tokens equal transformers generate."""
    engine = build_engine(Config(registry_path=":memory:", num_slots=2, max_rank=8,
                                 kv_cache_bytes=64 << 20))
    from nolaserve.server.engine.model_loader import load_model

    reference, tok = load_model(None, device="cpu", dtype="float32")
    prompts = [tok.encode(p) for p in ["The capital of France is", "def fibonacci(n):"]]
    got = run(engine, {f"p{i}": (p, greedy(12), None) for i, p in enumerate(prompts)})
    for i, p in enumerate(prompts):
        want, _ = hf_greedy(reference, p, 12)
        assert got[f"p{i}"] == want
