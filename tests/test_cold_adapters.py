"""Cold adapters: prefetch at acceptance, a bounded regeneration pool, the warm tier and
adapter-aware admission with its aging bound. Step counts and events, never seconds."""

import random
import threading

import pytest
import torch
from conftest import tiny_llama
from engine_helpers import greedy, make_engine, run

from nolaserve.adapters import philox
from nolaserve.adapters.errors import NoFreeSlotError
from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.registry_sqlite import SqliteRegistry
from nolaserve.adapters.slot_table import Acquired, SlotTable
from nolaserve.adapters.spec import BaseModelSpec, DirectFactors
from nolaserve.adapters.store import AdapterStore
from nolaserve.server.engine.block_manager import BlockManager
from nolaserve.server.engine.scheduler import Scheduler
from nolaserve.server.engine.sequence import Sequence

PROMPT = [5, 17, 33, 9]
SPEC = BaseModelSpec(num_layers=2, module_shapes={"q": (16, 16), "v": (16, 8)}, max_rank=8)
GUARD = 60.0  # seconds an event may take before the test fails; a pass never waits for it


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


def nola(spec, seed: int) -> bytes:
    return random_nola(spec, seed=seed, rank=4, num_basis=16).to_bytes()


def on_prefetch(store) -> threading.Event:
    """An event set each time a prefetch returns (whether it loaded anything)."""
    done, prefetch = threading.Event(), store.prefetch

    def spy(adapter_id: str) -> bool:
        try:
            return prefetch(adapter_id)
        finally:
            done.set()

    store.prefetch = spy
    return done


def test_more_adapters_than_slots_each_request_gets_its_own_adapters_tokens(model, bytebpe,
                                                                          monkeypatch):
    """Three adapters over one slot: requests wait for the slot in turn, and none is run
    before its adapter is in it (it would get the base model's tokens). Slow loads (a
    sleep before each admission-time load) keep loads pending across steps."""
    def engine_of_three():
        engine = make_engine(model, bytebpe, num_slots=1)
        for i in range(3):
            engine.store.register(f"a{i}", random_nola(engine.store.spec, seed=i, rank=4,
                                                       num_basis=16,
                                                       coeff_std=0.5).to_bytes())
        return engine

    reqs = {f"r{i}": (PROMPT, greedy(6), f"a{i}") for i in range(3)}
    solo = engine_of_three()
    alone = {rid: run(solo, {rid: req})[rid] for rid, req in reqs.items()}
    base = run(solo, {"b": (PROMPT, greedy(6), None)})["b"]
    assert all(tokens != base for tokens in alone.values())  # the adapters matter
    engine = engine_of_three()
    acquire = engine.store.acquire

    def slow_acquire(adapter_id: str, factors=None) -> int:
        threading.Event().wait(0.05)  # not a threshold: only keeps the load pending
        return acquire(adapter_id, factors)

    monkeypatch.setattr(engine.store, "acquire", slow_acquire)
    assert run(engine, reqs) == alone


def test_prefetch_starts_before_admission(model, bytebpe):
    engine = make_engine(model, bytebpe, max_num_seqs=1)
    engine.store.register("x", nola(engine.store.spec, 1))
    loaded = threading.Event()
    engine.store.observe_loads(lambda seconds: loaded.set())
    engine.add_request("first", PROMPT, greedy(6), None)  # holds the only running seat
    engine.add_request("queued", PROMPT, greedy(4), "x")
    assert loaded.wait(GUARD), "accepting the request did not start its adapter's load"
    assert engine.requests["queued"].seq.adapter_slot < 0  # loaded, not admitted
    assert "x" in engine.store.slot_snapshot().ready
    while engine.has_unfinished():
        engine.step()
    stats = engine.store.stats.slots
    assert stats.misses == 1, "admission loaded the adapter again"
    assert stats.hits == 0, "the prefetch's miss was counted again as the request's hit"
    assert stats.slots_used == 1 and engine.store.slots.table.refcount(0) == 0


def test_each_request_counts_one_hit_or_miss_in_each_cache(model, bytebpe):
    """A, B, A, C, A, B over two slots, one at a time: slots hit twice (A's returns) and
    miss four times; the host cache parses each adapter once. An outside probe counted a
    hit for every request besides its miss (the prefetch's load, then its own acquire;
    the check's parse, then the load's)."""
    engine = make_engine(model, bytebpe, num_slots=2)
    for i, name in enumerate("ABC"):
        engine.store.register(name, nola(engine.store.spec, i))
    for i, name in enumerate("ABACAB"):
        run(engine, {f"r{i}": (PROMPT, greedy(2), name)})
    stats = engine.store.stats
    assert (stats.slots.hits, stats.slots.misses) == (2, 4)
    assert (stats.host.hits, stats.host.misses) == (3, 3)


def test_a_prefetch_never_evicts_a_running_requests_slot(model, bytebpe):
    engine = make_engine(model, bytebpe, num_slots=2)
    for i, name in enumerate("abc"):
        engine.store.register(name, nola(engine.store.spec, i))
    engine.add_request("ra", PROMPT, greedy(12), "a")
    engine.add_request("rb", PROMPT, greedy(12), "b")
    out: dict[str, list[int]] = {}

    def step() -> None:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)

    while any(engine.requests[r].seq.adapter_slot < 0 for r in ("ra", "rb")):
        step()  # both admitted, both slots referenced
    slots = {r: engine.requests[r].seq.adapter_slot for r in ("ra", "rb")}
    prefetched = on_prefetch(engine.store)
    engine.add_request("rc", PROMPT, greedy(2), "c")
    assert prefetched.wait(GUARD)
    stats = engine.store.stats.slots
    assert stats.evictions == 0 and "c" not in engine.store.slot_snapshot().ready
    assert {r: engine.requests[r].seq.adapter_slot for r in slots} == slots
    while engine.has_unfinished():
        step()
    assert [len(out[r]) for r in ("ra", "rb", "rc")] == [12, 12, 2]


def test_evictions_prefer_adapters_no_queued_request_wants():
    table = SlotTable(2)
    for name in ("old", "new"):
        slot, found = table.acquire(name)
        assert found is Acquired.LOAD
        table.loaded(slot)
        table.release(slot)  # "old" is the least recently used idle slot
    table.want("old")
    slot, _ = table.acquire("x")
    assert table.slot_of("new") is None and table.slot_of("old") is not None
    table.loaded(slot)
    table.release(slot)
    table.want("x")
    with pytest.raises(NoFreeSlotError):
        table.acquire("y", prefetch=True)  # every idle slot is wanted
    table.acquire("y")  # an admission may still evict the least recently used one
    assert table.slot_of("old") is None
    table.unwant("old")
    assert not table.is_wanted("old") and table.is_wanted("x")
    table.check_invariants()


def _a_cold_request_finishes(model, bytebpe, aging_steps: int, max_steps: int) -> bool:
    """One slot kept busy by a new request for "a" every step; is the request for "b"
    (accepted at step 3) served within ``max_steps``?"""
    engine = make_engine(model, bytebpe, num_slots=1, admission_aging_steps=aging_steps)
    for i, name in enumerate("ab"):
        engine.store.register(name, nola(engine.store.spec, i))
    finished = set()
    for step in range(max_steps):
        engine.add_request(f"a{step}", PROMPT, greedy(3), "a")
        if step == 3:
            engine.add_request("b", PROMPT, greedy(2), "b")
        finished |= {o.request_id for o in engine.step() if o.finished}
        if "b" in finished:
            return True
    return False


def test_no_cold_request_starves_behind_a_hot_adapter(model, bytebpe):
    assert _a_cold_request_finishes(model, bytebpe, aging_steps=4, max_steps=200)
    # the same traffic without the bound: every slot is always in use, "b" never loads
    assert not _a_cold_request_finishes(model, bytebpe, aging_steps=10**9, max_steps=60)


def test_an_overdue_request_blocks_later_admissions():
    seqs = [Sequence(f"s{i}", [1, 2], greedy(2), adapter) for i, adapter in
            enumerate(["cold", "hot", "hot"])]
    overdue = {"s0": False}
    sched = Scheduler(BlockManager(64, 4), 8, 64, adapter_ready=lambda s: s.adapter_id == "hot",
                      adapter_overdue=lambda s: overdue[s.request_id])
    sched.add(seqs[0])
    sched.add(seqs[1])
    assert [s.seq.request_id for s in sched.schedule().scheduled] == ["s1"]  # hot first
    overdue["s0"] = True
    sched.add(seqs[2])
    assert sched.schedule().scheduled[0].seq.request_id == "s1"  # running, not admitted
    assert seqs[2] in sched.waiting  # not admitted ahead of the overdue one


def settled_steps(engine, requests: dict, after_step=lambda: None
                  ) -> tuple[list[list[str]], dict[str, list[int]]]:
    """Submit ``requests``, then step until every request finishes, letting each pending
    adapter load settle before a step (so the run is the same on any machine) and calling
    ``after_step()`` after each: the ids that got a token, per step, and each request's
    tokens."""
    for rid, (prompt, params, adapter) in requests.items():
        engine.add_request(rid, prompt, params, adapter)
    steps, tokens = [], {}
    while engine.has_unfinished():
        for _ in range(4):  # each returns at once when no load is pending
            engine.admission.wait(GUARD)
        outs = [o for o in engine.step() if o.token_ids]
        steps.append([o.request_id for o in outs])
        for o in outs:
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
        after_step()
        assert len(steps) < 1000, "the engine did not finish"
    return steps, tokens


def sliced_engine(model, bytebpe, quantum_steps: int):
    engine = make_engine(model, bytebpe, num_slots=1, admission_quantum_steps=quantum_steps)
    for i, name in enumerate("ab"):
        engine.store.register(name, random_nola(engine.store.spec, seed=i, rank=4,
                                                num_basis=16, coeff_std=0.5).to_bytes())
    return engine


def holds_nothing(engine) -> bool:
    bm = engine.scheduler.block_manager
    return bm.num_free_blocks == bm.num_blocks and engine.store.slots.table.refcount(0) == 0


LONG, COLD = (PROMPT, greedy(40), "a"), (PROMPT[::-1], greedy(3), "b")


@pytest.fixture(scope="module")
def alone(model, bytebpe) -> dict[str, list[int]]:
    """The tokens of LONG and COLD, each run by itself."""
    return {rid: run(sliced_engine(model, bytebpe, 0), {rid: req})[rid]
            for rid, req in (("long", LONG), ("cold", COLD))}


@pytest.mark.parametrize("quantum_steps", [0, 2])
def test_time_slicing_gives_a_cold_request_its_first_token_before_a_long_one_ends(
        model, bytebpe, alone, quantum_steps):
    """One slot, held by a long request: with time slicing the cold request's first token
    comes within a few steps, and parking changes no request's tokens; without it, the
    cold request waits for the long one to finish."""
    engine = sliced_engine(model, bytebpe, quantum_steps)
    engine.add_request("long", *LONG)
    first = []
    while not first:
        first = engine.step()  # the long request has its first token
    steps, tokens = settled_steps(engine, {"cold": COLD})
    first_cold = next(i for i, ids in enumerate(steps) if "cold" in ids)
    long_before = sum("long" in ids for ids in steps[:first_cold])
    if quantum_steps:
        assert long_before <= quantum_steps + 4 and engine.admission.parked >= 1
    else:
        assert long_before == 39 and engine.admission.parked == 0
    assert {"long": first[0].token_ids + tokens["long"], "cold": tokens["cold"]} == alone
    assert holds_nothing(engine)


def written_in_slot(store: AdapterStore, adapter_id: str) -> DirectFactors:
    """The adapter as CUDA loads a NOLA adapter (``DirectFactors``: written straight into
    its slot, never through the warm tier), its values materialized on the CPU."""
    factors = store._materialize(store.parsed(adapter_id), "cpu")

    def write(views) -> None:
        for key, (a, b) in views.items():
            a.copy_(factors.modules[key].A)
            b.copy_(factors.modules[key].B)

    return DirectFactors({k: f.rank for k, f in factors.modules.items()},
                         next(iter(factors.modules.values())).scale, write)


@pytest.mark.parametrize("direct", [False, True])
def test_two_long_requests_over_one_slot_take_turns(model, bytebpe, alone, direct):
    """Also with the adapters written straight into their slot, as NOLA on CUDA
    (``direct``: never through the warm tier): they were never parked then, so the
    second request waited for the first to finish."""
    engine = sliced_engine(model, bytebpe, 2)
    if direct:
        engine.store.slots._direct = lambda i: written_in_slot(engine.store, i)
    both = {"long": LONG, "other": (PROMPT[::-1], greedy(40), "b")}
    seen = []  # what vllm:lora_requests_info tells a router after each step
    steps, tokens = settled_steps(engine, both, lambda: seen.append(
        (engine.stats.running_adapters, engine.stats.waiting_adapters)))
    turns = [ids[0] for ids in steps if ids]
    switches = sum(x != y for x, y in zip(turns, turns[1:]))
    assert switches >= 4 and engine.stats.parked >= 4  # by turns, not one then the other
    # the adapter in the slot runs, the parked one waits (it was in neither list)
    assert all(len(running) <= 1 for running, _ in seen)
    assert sum(sorted(running + waiting) == ["a", "b"] for running, waiting in seen) >= 4
    assert tokens["long"] == alone["long"]
    assert tokens["other"] == run(sliced_engine(model, bytebpe, 0), {"o": both["other"]})["o"]
    assert holds_nothing(engine)


@pytest.mark.parametrize("change", ["replaced", "deleted"])
def test_a_parked_request_keeps_its_weights_when_its_adapter_is_replaced_or_deleted(
        model, bytebpe, alone, change):
    """A parked request resumes from the factors it was using, not from whatever the
    registry holds now: it finishes with its adapter's old weights, as a running one."""
    engine = sliced_engine(model, bytebpe, 2)
    long = engine.requests.get

    def change_when_parked() -> None:
        if not changed and long("long") is not None and long("long").seq.adapter_slot < 0:
            if change == "replaced":
                engine.store.register("a", nola(engine.store.spec, 9), replace=True)
            else:
                engine.store.delete("a")
            changed.append(change)

    changed: list[str] = []
    _, tokens = settled_steps(engine, {"long": LONG, "cold": COLD}, change_when_parked)
    assert changed and tokens == alone
    assert holds_nothing(engine)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_warm_tier_returns_bit_identical_factors(dtype):
    def slot_contents(store, slot: int) -> list[torch.Tensor]:
        return [t[slot].clone() for key in store.slots._buffers
                for t in store.slots.buffers(*key)]

    warm = AdapterStore(SPEC, SqliteRegistry(":memory:"), num_slots=1, dtype=dtype,
                        warm_cache_bytes=1 << 20)
    cold = AdapterStore(SPEC, SqliteRegistry(":memory:"), num_slots=1, dtype=dtype)
    for store in (warm, cold):
        store.register("x", nola(SPEC, 1))
        store.register("y", nola(SPEC, 2))
    regenerated = []
    for store in (warm, cold):
        for name in ("x", "y", "x"):  # x, evicted by y, back: from the warm tier in `warm`
            slot = store.acquire(name)
            regenerated.append(slot_contents(store, slot))
            store.release(slot)
    assert warm.stats.warm.hits == 1 and warm.stats.slots.misses == 3
    assert cold.stats.warm is None
    first, _, reloaded, regen_x, _, regen_again = regenerated
    for a, b, c in zip(first, reloaded, regen_x):
        assert torch.equal(a, b) and torch.equal(b, c)  # bitwise, NaN-free factors
    assert all(torch.equal(a, b) for a, b in zip(regen_x, regen_again))


def test_a_prefetch_with_no_slot_free_fills_the_warm_tier():
    """Every slot is in use: the prefetch regenerates into the warm tier instead, and the
    slot the adapter gets later is filled by a copy."""
    store = AdapterStore(SPEC, SqliteRegistry(":memory:"), num_slots=1, warm_cache_bytes=1 << 20)
    store.register("x", nola(SPEC, 1))
    store.register("y", nola(SPEC, 2))
    slot = store.acquire("x")  # in use
    assert not store.prefetch("y")
    assert "y" in store.warm and store.stats.slots.misses == 1
    assert not store.prefetch("x")  # resident: nothing to do
    assert store.stats.warm.hits == 0
    store.release(slot)
    store.release(store.acquire("y"))
    assert store.stats.warm.hits == 1 and store.stats.warm.misses == 2


def slot_contents(store: AdapterStore, slot: int) -> list[torch.Tensor]:
    return [t[slot] for layer in range(SPEC.num_layers) for module in SPEC.module_shapes
            for t in store.slots.buffers(layer, module)]


@pytest.mark.parametrize("warm", [True, False])
def test_held_factors_load_a_slot_exactly_as_the_one_a_request_is_parked_off(warm):
    """What a parked request holds: the warm tier's entry (by reference) while it is the
    version in the slot; else a host copy of the slot, under the slot's version (the warm
    tier off, or a replace retired the slot): either loads another slot with the same
    contents and version, so the request resumes with the weights it ran with."""
    store = AdapterStore(SPEC, SqliteRegistry(":memory:"), num_slots=3,
                         warm_cache_bytes=(1 << 20) * warm)
    store.register("x", nola(SPEC, 1))
    slot = store.acquire("x")
    if warm:
        assert store.held_factors("x", slot) is store.warm.peek("x") is not None
    store.register("x", nola(SPEC, 2), replace=True)  # the slot is retired (still in use)
    held = store.held_factors("x", slot)
    assert store.warm is None or held is not store.warm.peek("x")
    buffers = {t.untyped_storage().data_ptr() for t in slot_contents(store, slot)}
    assert not buffers & {t.untyped_storage().data_ptr()  # a copy, not the slot's views
                          for f in held.modules.values() for t in (f.A, f.B)}
    assert held.version == store.slots.version_of(slot)
    parked = store.acquire("x#parked-0", held)
    assert store.slots.version_of(parked) == held.version
    assert all(map(torch.equal, slot_contents(store, parked), slot_contents(store, slot)))
    new = store.acquire("x")  # the replacement
    assert not torch.equal(slot_contents(store, new)[0], slot_contents(store, slot)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_nola_adapter_regenerated_in_its_cuda_slot_is_held_as_a_copy_of_the_slot():
    """On CUDA a NOLA adapter is regenerated in its slot, never in the warm tier: the
    requests parked off it hold a copy of the slot, which loads another one exactly."""
    store = AdapterStore(SPEC, SqliteRegistry(":memory:"), num_slots=2, device="cuda",
                         warm_cache_bytes=1 << 20)
    store.register("x", nola(SPEC, 1))
    slot = store.acquire("x")
    assert "x" not in store.warm
    parked = store.acquire("x#parked-0", store.held_factors("x", slot))
    assert all(map(torch.equal, slot_contents(store, parked), slot_contents(store, slot)))


def test_a_replaced_adapter_is_not_served_from_the_warm_tier():
    store = AdapterStore(SPEC, SqliteRegistry(":memory:"), num_slots=1, warm_cache_bytes=1 << 20)
    store.register("x", nola(SPEC, 1))
    store.release(store.acquire("x"))
    store.register("x", nola(SPEC, 7), replace=True)
    slot = store.acquire("x")
    assert store.stats.warm.hits == 0
    want = random_nola(SPEC, seed=7, rank=4, num_basis=16).materialize()
    a, _, _ = store.slots.buffers(0, "q")
    assert torch.equal(a[slot, :4], want.modules[(0, "q")].A)


@pytest.mark.parametrize("threads", [1, 2])
def test_regeneration_runs_on_materialize_threads_only(monkeypatch, threads):
    names, contract = set(), philox.contract

    def spy(*args):
        names.add(threading.current_thread().name)
        return contract(*args)

    monkeypatch.setattr(philox, "contract", spy)
    store = AdapterStore(SPEC, SqliteRegistry(":memory:"), num_slots=2, materialize_threads=threads)
    store.register("x", nola(SPEC, 1))
    store.register("y", nola(SPEC, 2))
    loads = [threading.Thread(target=store.acquire, args=(n,)) for n in "xy"]
    for t in loads:
        t.start()
    for t in loads:
        t.join()
    assert names and all(n.startswith("nola-regen") for n in names)
    assert len(names) <= threads
    store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_slot_writes_are_ordered_after_the_steps_that_read_the_slot(monkeypatch):
    """A read of slot 0 queued on the compute stream behind a long kernel still sees the
    old adapter; the load waits for it by an event (no device-wide sync) and the new
    contents are in place once the load returns."""
    store = AdapterStore(SPEC, SqliteRegistry(":memory:"), num_slots=1, device="cuda")
    store.register("x", nola(SPEC, 1))
    store.register("y", nola(SPEC, 2))
    store.release(store.acquire("x"))
    a, _, _ = store.slots.buffers(0, "q")
    old = a[0].clone()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: pytest.fail("device sync"))
    torch.cuda._sleep(1 << 28)  # keeps the compute stream busy
    seen = a[0].clone()  # queued behind the sleep: must read x's factors
    store.release(store.acquire("y"))  # evicts x; writes on the side stream
    new = a[0].clone()  # queued after the load returned: y's factors
    torch.cuda.current_stream().synchronize()
    assert torch.equal(seen, old)
    want = random_nola(SPEC, seed=2, rank=4, num_basis=16).materialize("cuda")
    assert torch.equal(new[:4], want.modules[(0, "q")].A.to(new.dtype))
    assert not torch.equal(new, old)


def adapters_engine(model, bytebpe, names: str, **config):
    engine = make_engine(model, bytebpe, admission_quantum_steps=2, **config)
    for i, name in enumerate(names):
        engine.store.register(name, random_nola(engine.store.spec, seed=i, rank=4,
                                                num_basis=16, coeff_std=0.5).to_bytes())
    return engine


def alone_tokens(model, bytebpe, requests: dict) -> dict[str, list[int]]:
    names = "".join(sorted({adapter for _, _, adapter in requests.values()}))
    return {rid: run(adapters_engine(model, bytebpe, names), {rid: req})[rid]
            for rid, req in requests.items()}


def test_time_slicing_parks_nobody_for_a_request_max_num_seqs_keeps_out(model, bytebpe):
    """Two slots, max_num_seqs 2, four adapters: the two waiting requests could not run
    even with a slot (parked requests still count toward max_num_seqs), so nobody is
    parked for them. This hung: both running requests parked, the slots handed to
    requests that were never admitted."""
    requests = {name: ([5 + i, 17, 33, 9], greedy(24), name) for i, name in enumerate("abcd")}
    engine = adapters_engine(model, bytebpe, "abcd", num_slots=2, max_num_seqs=2)
    assert run(engine, requests, max_steps=600) == alone_tokens(model, bytebpe, requests)
    assert holds_nothing(engine)


def test_a_slot_handed_to_a_request_that_is_not_admitted_is_taken_back(model, bytebpe):
    """One slot, 16 KV blocks: "long" holds 10 of them. "big" (9 blocks) cannot run until
    it ends, so nobody is parked for it; "small" could, and "long" is parked for it, but
    first come, first served keeps it behind "big": the slot goes back to "long" instead of
    sitting with a request that does not run while "long" holds the blocks "big" needs
    (which hung)."""
    engine = adapters_engine(model, bytebpe, "abc", num_slots=1, kv_cache_bytes=16 * 2048)
    long = {"long": (list(range(5, 41)), greedy(12), "a")}
    engine.add_request("long", *long["long"])
    first = []
    while not first:
        first = engine.step()  # "long" has its first token: 10 blocks
    later = {"big": (list(range(50, 86)), greedy(3), "b"), "small": ([7, 8], greedy(3), "c")}
    _, tokens = settled_steps(engine, later)
    tokens["long"] = first[0].token_ids + tokens["long"]
    assert engine.admission.parked >= 1
    assert tokens == alone_tokens(model, bytebpe, {**long, **later})
    assert holds_nothing(engine)


WEDGE_PLAN = [  # (request, adapter or None, prompt tokens, max_tokens, arrival step)
    ("r4", 0, 8, 18, 3), ("r10", None, 1, 7, 3), ("r7", 2, 48, 19, 4), ("r8", 2, 16, 32, 4),
    ("r11", None, 30, 5, 4), ("r2", 2, 2, 16, 6), ("r0", 0, 8, 32, 7), ("r9", 2, 4, 18, 7),
    ("r1", 0, 16, 34, 8), ("r3", None, 8, 12, 9), ("r6", None, 8, 8, 9), ("r12", 1, 47, 20, 9),
    ("r13", None, 46, 21, 9), ("r5", 1, 2, 29, 11)]


@pytest.mark.parametrize("warm_cache_bytes", [256 << 20, 0])
def test_no_waiting_request_holds_a_slot_after_the_schedule(model, bytebpe, warm_cache_bytes):
    """2 slots, 3 cold adapters and base requests, tight KV, aging 2, quantum 1 (an outside
    probe's search): finished loads of requests queued behind an overdue one held both
    slots, or requests parked and preempted kept theirs, while the overdue one waited for a
    slot: no step progressed, ever (6 runs in 6). After each schedule no waiting request
    keeps a slot now; everything finishes and nothing is left held. With the warm tier off
    too (a parked request holds a copy of its slot: the case of every NOLA adapter on CUDA,
    regenerated in its slot, never in the warm tier)."""
    engine = make_engine(model, bytebpe, num_slots=2, max_num_seqs=4, block_size=2,
                         max_num_batched_tokens=16, admission_quantum_steps=1,
                         admission_aging_steps=2, enable_prefix_caching=False,
                         kv_cache_bytes=35 * 1024,  # 34 blocks and the scratch block
                         warm_cache_bytes=warm_cache_bytes)
    rng = random.Random(0)
    for attempt in range(1):
        names = [f"t{attempt}x{i}" for i in range(3)]
        for i, name in enumerate(names):
            engine.store.register(name, nola(engine.store.spec, 1000 * attempt + i))
        plan = [(f"t{attempt}{rid}", None if a is None else names[a],
                 [rng.randrange(3, 300) for _ in range(n)], greedy(m), at)
                for rid, a, n, m, at in WEDGE_PLAN]
        for step in range(5000):
            while plan and plan[0][4] <= step:
                rid, adapter, prompt, params, _ = plan.pop(0)
                engine.add_request(rid, prompt, params, adapter)
            if not plan and not engine.has_unfinished():
                break
            engine.step()
        assert not engine.has_unfinished(), "the engine stopped progressing"
        assert engine.admission.parked > 0
        assert holds_nothing(engine) and engine.store.slots.table.refcount(1) == 0


KV_BYTES = 32768  # 7 blocks of 4 tokens: the 8 requests cannot all hold theirs


def test_requests_pushed_out_of_the_kv_cache_resume_in_one_slot_not_one_each(model, bytebpe):
    """Requests preempted for KV blocks while holding their adapter's slot are parked;
    each got a key of its own, so an outside probe's 48 choices of one adapter filled all
    32 slots with copies of it (every other tenant's adapter evicted). Parked off one
    version, they share its key: one slot."""
    engine = make_engine(model, bytebpe, num_slots=8, kv_cache_bytes=KV_BYTES,
                         max_num_seqs=8)
    engine.store.register("x", nola(engine.store.spec, 1))
    outs = run(engine, {f"r{i}": ([5 + i, 9, 13], greedy(40), "x") for i in range(8)})
    assert len(outs) == 8 and engine.admission.parked > 0  # pushed out, holding the slot
    assert len(engine.store.slot_snapshot().ready) <= 2  # x, and x's parked version
