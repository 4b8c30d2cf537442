"""The deletion contract (docs/operations.md): a request accepted for adapter X that is
not yet admitted (holds no slot) when X is deleted fails NOT_FOUND; once admitted it
completes with the weights it was admitted with, whatever happens to X. Registering the
same bytes under the same id again is idempotent."""

import asyncio

import grpc
import pytest
from conftest import tiny_llama
from engine_helpers import greedy, make_engine, run
from server_helpers import expect_code, request, serving, slow_down
from test_batch_invariant import random_lora

from nolaserve.adapters.cache import DeleteLog
from nolaserve.adapters.errors import AdapterExistsError, Status
from nolaserve.adapters.nola import random_nola
from nolaserve.server.engine.sequence import FinishReason
from nolaserve.v1 import admin_pb2

PROMPT = [5, 17, 33, 9]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


def nola(engine, seed: int) -> bytes:
    return random_nola(engine.store.spec, seed=seed, rank=4, num_basis=16).to_bytes()


def steps(engine, n: int) -> list:
    return [out for _ in range(n) for out in engine.step()]


@pytest.mark.parametrize("resident", [False, True])
def test_deleted_before_admission_fails_not_found(model, bytebpe, resident):
    engine = make_engine(model, bytebpe, max_num_seqs=1)
    engine.store.register("x", nola(engine, 1))
    if resident:  # hot in an idle slot: the delete frees it, admission finds nothing
        run(engine, {"warm": (PROMPT, greedy(1), "x")})
    engine.add_request("first", PROMPT, greedy(4), None)  # holds the only running seat
    engine.add_request("queued", PROMPT, greedy(4), "x")  # accepted, not admitted
    steps(engine, 1)
    assert engine.requests["queued"].seq.adapter_slot < 0
    engine.store.delete("x")
    outs = {o.request_id: o for o in steps(engine, 20) if o.finished}
    assert outs["queued"].finish_reason is FinishReason.ERROR
    assert outs["queued"].error_code is Status.NOT_FOUND and "'x'" in outs["queued"].error
    assert outs["first"].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("again", ["nola", "lora"])
def test_deleted_before_admission_fails_even_once_its_id_is_registered_again(model, bytebpe,
                                                                              again):
    """A queued request was served by whatever was registered under its id after the
    delete: another tenant's adapter, maybe (an outside probe). A replace instead serves it
    with the version registered when it is admitted."""
    engine = make_engine(model, bytebpe, max_num_seqs=1)
    engine.store.register("x", nola(engine, 1))
    engine.add_request("first", PROMPT, greedy(4), None)  # holds the only running seat
    engine.add_request("queued", PROMPT, greedy(4), "x")
    steps(engine, 1)
    engine.store.delete("x")
    other = nola(engine, 2) if again == "nola" else random_lora(engine.store.spec, 4)
    engine.store.register("x", other)
    engine.add_request("after", PROMPT, greedy(4), "x")  # accepted after the delete: served
    outs = {o.request_id: o for o in steps(engine, 40) if o.finished}
    assert outs["queued"].error_code is Status.NOT_FOUND
    assert "it was deleted after the request was accepted" in outs["queued"].error
    assert outs["after"].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("change", ["delete", "replace"])
def test_admitted_request_completes_with_the_weights_it_was_admitted_with(model, bytebpe,
                                                                          change):
    engine, alone = make_engine(model, bytebpe), make_engine(model, bytebpe)
    for e in (engine, alone):
        e.store.register("x", nola(e, 1))
    want = run(alone, {"r": (PROMPT, greedy(10), "x")})["r"]
    engine.add_request("r", PROMPT, greedy(10), "x")
    got = [t for o in steps(engine, 3) for t in o.token_ids]
    assert engine.requests["r"].seq.adapter_slot >= 0  # admitted
    if change == "delete":
        engine.store.delete("x")
    else:
        engine.store.register("x", nola(engine, 2), replace=True)
    while engine.has_unfinished():
        got += [t for o in engine.step() for t in o.token_ids]
    assert got == want
    if change == "replace":  # new requests get the new weights
        alone.store.register("x", nola(alone, 2), replace=True)
        assert run(engine, {"n": (PROMPT, greedy(10), "x")}) == \
            run(alone, {"n": (PROMPT, greedy(10), "x")})


def test_same_bytes_again_return_the_existing_record(model, bytebpe):
    engine = make_engine(model, bytebpe)
    data = nola(engine, 1)
    first = engine.store.register("x", data)
    run(engine, {"warm": (PROMPT, greedy(1), "x")})
    assert engine.store.register("x", data) == first
    assert engine.store.register("x", data, replace=True) == first
    assert engine.store.slots.table.ready_slot_of("x") is not None  # nothing was dropped
    with pytest.raises(AdapterExistsError):
        engine.store.register("x", nola(engine, 2))


def test_queued_request_of_a_deleted_adapter_is_not_found_over_grpc(model, bytebpe):
    engine = make_engine(model, bytebpe, max_num_seqs=1)
    engine.store.register("x", nola(engine, 1))
    slow_down(engine, 0.02)

    async def main():
        async with serving(engine) as c:
            long = c.inference.GenerateStream(request(max_tokens=40))
            await long.read()  # running: the next request waits for a seat
            queued = asyncio.ensure_future(c.inference.Generate(request(adapter="x")))
            while len(engine.requests) < 2:
                await asyncio.sleep(0.005)
            await c.admin.DeleteAdapter(admin_pb2.AdapterRef(adapter_id="x"))
            await asyncio.to_thread(engine.store.register, "x", nola(engine, 2))  # not its own
            await expect_code(grpc.StatusCode.NOT_FOUND, queued, "no adapter is registered")
            long.cancel()

    asyncio.run(main())


def test_the_delete_log_answers_for_its_last_deletes():
    log = DeleteLog(max_entries=2)
    before = log.now()
    for adapter_id in ("a", "b", "c"):
        log.note(adapter_id)
    assert [log.since(i, before) for i in "abcd"] == [False, True, True, False]  # a: evicted
    assert not log.since("c", log.now())
