"""Automatic prefix caching (issue #31): the pure-Python cache and block manager, then the
engine: greedy tokens equal with the cache on and off, a replaced adapter never reuses its
old version's KV, no block leaks, preemption and time slicing, the config key and flag."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from conftest import tiny_llama
from engine_helpers import greedy, make_engine, run
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_helpers import stub_engine_args

from nolaserve.adapters.errors import InvalidRequestError, RequestFailedError, Status
from nolaserve.adapters.nola import random_nola
from nolaserve.server.config import Config
from nolaserve.server.engine.block_manager import BlockManager
from nolaserve.server.engine.memory import bytes_per_block
from nolaserve.server.engine.prefix_cache import PrefixCache, block_hash
from nolaserve.server.engine.scheduler import Scheduler, SchedulerOutput
from nolaserve.server.engine.sequence import FinishReason, SamplingParams, Sequence
from nolaserve.server.engine.vllm_args import engine_args

BS = 4


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=300)


def seq(rid: str, prompt: list[int]) -> Sequence:
    return Sequence(rid, prompt, SamplingParams(max_tokens=4))


def computed(bm: BlockManager, rid: str, num_tokens: int) -> Sequence:
    """A request of prompt ``range(num_tokens)`` whose KV is computed and whose full blocks
    are cached, by the base model's weights."""
    s = seq(rid, list(range(num_tokens)))
    assert bm.match_prefix(s, "base") == 0
    bm.allocate(s, num_tokens)
    s.num_computed_tokens = num_tokens
    bm.cache_computed(s)
    return s


def nola(engine, seed: int) -> bytes:
    return random_nola(engine.store.spec, seed=seed, rank=4, num_basis=16).to_bytes()


def check_no_leak(engine) -> None:
    bm = engine.scheduler.block_manager
    assert not engine.requests and not bm._refs and not bm._seqs
    assert bm.num_free_blocks == bm.num_blocks
    cached = bm.cache.num_free if bm.cache else 0
    assert len(set(bm._free)) + cached == bm.num_blocks == len(bm._free) + cached


# -- the pure-Python cache -----------------------------------------------------------
def test_block_hash_chains_parent_identity_and_tokens():
    h = block_hash(b"", "base", [1, 2, 3, 4])
    assert h == block_hash(b"", "base", [1, 2, 3, 4])
    assert len({h, block_hash(h, "base", [1, 2, 3, 4]), block_hash(b"", "x@v1", [1, 2, 3, 4]),
                block_hash(b"", "x@v2", [1, 2, 3, 4]), block_hash(b"", "base", [1, 2, 3, 5])}) == 5


def test_cache_lru_evicts_the_least_recently_released():
    cache = PrefixCache()
    for block in range(3):
        cache.insert(block, bytes([block]))
    cache.insert(7, bytes([0]))  # a second block for a known hash: the first stays
    assert cache.get(bytes([0])) == 0 and not cache.is_cached(7)
    cache.release(2)
    cache.release(0)
    cache.take(2)  # held again: not evictable
    assert cache.num_free == 1 and cache.evict() == 0 and cache.evict() is None
    assert cache.get(bytes([0])) is None and cache.stats.cached_blocks == 2


def test_a_new_request_shares_the_full_blocks_but_never_its_last_tokens_block():
    bm = BlockManager(8, BS, enable_caching=True)
    a = computed(bm, "a", 10)  # blocks 0 and 1 are full; block 2 holds 2 tokens
    b = seq("b", list(range(8)))  # exactly two blocks: the second holds its last token
    assert bm.match_prefix(b, "base") == 4 and b.block_table == a.block_table[:1]
    assert bm.match_prefix(seq("c", list(range(12))), "x@v1") == 0  # other weights
    d = seq("d", list(range(9)))
    assert bm.match_prefix(d, "base") == 8 and d.block_table == a.block_table[:2]


def test_shared_blocks_are_reference_counted_and_evicted_only_when_needed():
    bm = BlockManager(4, BS, enable_caching=True)
    a, b = computed(bm, "a", 9), seq("b", list(range(9)))
    assert bm.match_prefix(b, "base") == 8
    bm.free(a)
    assert bm.num_free_blocks == 2  # a's 3rd block and the spare; b holds the shared two
    bm.free(b)
    assert bm.num_free_blocks == 4 and bm.cache.num_free == 2
    c = seq("c", [99] * 12)
    bm.match_prefix(c, "base")
    bm.allocate(c, 8)  # two uncached blocks first: the cached ones survive
    assert bm.cache.num_free == 2
    bm.allocate(c, 12)  # then the least recently released: the tail went back first
    assert bm.cache.num_free == 1 and bm.match_prefix(b, "base") == 4


def test_writing_into_a_cached_block_is_a_typed_error():
    bm = BlockManager(4, BS, enable_caching=True)
    a = seq("a", list(range(9)))
    bm.match_prefix(a, "base")
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.cache_computed(a)
    a.num_computed_tokens = 4  # a bug would recompute positions of a shared block
    with pytest.raises(RequestFailedError, match="cached KV block") as e:
        bm.allocate(a, 9)
    assert e.value.status is Status.INTERNAL


# -- the engine ----------------------------------------------------------------------
def workload(seed: int) -> dict:
    """Ragged prompts over three shared prefixes across block edges, for the base and two
    adapters; each request's greedy tokens."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 256) for _ in range(n)] for n in (7, 12, 18)]
    reqs = {}
    for i in range(12):
        prompt = rng.choice(prefixes) + [rng.randrange(3, 256) for _ in range(rng.randrange(6))]
        reqs[f"r{i}"] = (prompt, greedy(rng.randrange(2, 7)), rng.choice([None, "a", "b"]))
    return reqs


@pytest.mark.parametrize("chunk", [8, 48])
def test_greedy_tokens_equal_with_the_cache_on_and_off(model, bytebpe, chunk):
    engines = [make_engine(model, bytebpe, enable_prefix_caching=on,
                           max_num_batched_tokens=chunk) for on in (True, False)]
    for e in engines:
        e.store.register("a", nola(e, 1))
        e.store.register("b", nola(e, 2))
    for wave in range(3):  # later waves find the earlier ones' blocks
        reqs = workload(wave % 2)
        on, off = (run(e, reqs) for e in engines)
        assert on == off
    stats = engines[0].stats.prefix_cache
    assert stats.hits > 0 and stats.queries > stats.hits
    assert engines[1].stats.prefix_cache.hits == 0
    for e in engines:
        check_no_leak(e)


def test_a_replaced_adapter_never_reuses_its_old_versions_blocks(model, bytebpe):
    engine, cold = make_engine(model, bytebpe), make_engine(model, bytebpe)
    prompt = list(range(40, 61))
    engine.store.register("x", nola(engine, 1))
    old = run(engine, {"old": (prompt, greedy(6), "x")})["old"]
    assert run(engine, {"again": (prompt, greedy(6), "x")})["again"] == old  # a hit
    hits = engine.stats.prefix_cache.hits
    assert hits == 20
    engine.store.register("x", nola(engine, 2), replace=True)
    cold.store.register("x", nola(cold, 2))
    want = run(cold, {"new": (prompt, greedy(6), "x")})["new"]
    assert want != old  # the versions differ, so stale KV would show
    assert run(engine, {"new": (prompt, greedy(6), "x")})["new"] == want
    assert engine.stats.prefix_cache.hits == hits  # nothing of the old version matched


def count_preemptions(engine) -> list[int]:
    """Wrap the scheduler: the returned list grows by one per preempted sequence."""
    preempted: list[int] = []
    schedule = engine.scheduler.schedule

    def counted():
        out = schedule()
        preempted.extend(1 for _ in out.preempted)
        return out

    engine.scheduler.schedule = counted
    return preempted


def test_no_leak_after_mixed_runs_aborts_and_preemptions(model, bytebpe):
    engine = make_engine(model, bytebpe, kv_cache_bytes=13 * 2048, max_num_batched_tokens=16)
    bm = engine.scheduler.block_manager
    assert bm.num_blocks == 12  # 2 layers x 4 positions x 2 heads x 16 dims x K,V x fp32
    # (13 blocks' bytes: one is the scratch block)
    preempted = count_preemptions(engine)
    engine.store.register("a", nola(engine, 1))
    rng = random.Random(3)
    shared = [rng.randrange(3, 256) for _ in range(13)]
    for wave in range(4):
        for i in range(8):
            prompt = shared[:rng.randrange(4, 14)] + [rng.randrange(3, 256)] * rng.randrange(3)
            engine.add_request(f"w{wave}-{i}", prompt, greedy(rng.randrange(1, 12)),
                               rng.choice([None, "a"]))
        for step in range(400):
            if not engine.has_unfinished():
                break
            if step == 3:
                for rid in list(engine.requests)[::3]:
                    engine.abort(rid)
            engine.step()
        check_no_leak(engine)
    assert preempted and bm.cache.stats.hits > 0


def test_preempted_request_recomputes_from_its_cached_prefix(model, bytebpe):
    engine, cold = make_engine(model, bytebpe), make_engine(model, bytebpe,
                                                            enable_prefix_caching=False)
    prompt = list(range(3, 23))
    want = run(cold, {"r": (prompt, greedy(8), None)})["r"]
    engine.add_request("r", prompt, greedy(8), None)
    got = [t for _ in range(3) for out in engine.step() for t in out.token_ids]
    engine.scheduler._preempt(engine.requests["r"].seq, SchedulerOutput())
    bm, matched = engine.scheduler.block_manager, []
    match = bm.match_prefix
    bm.match_prefix = lambda s, identity: matched.append(match(s, identity)) or matched[-1]
    stats = engine.stats.prefix_cache
    while engine.has_unfinished():
        got += [t for out in engine.step() for t in out.token_ids]
    assert got == want
    assert matched == [20]  # 22 tokens: 5 full blocks
    after = engine.stats.prefix_cache  # a request's lookup is counted once, as vLLM
    assert (after.queries, after.hits) == (stats.queries, stats.hits)  # skips a recompute's
    check_no_leak(engine)


def test_a_later_request_shares_the_running_ones_blocks(model, bytebpe):
    engine = make_engine(model, bytebpe)
    prompt = list(range(3, 20))  # 17 tokens: four full blocks
    engine.add_request("first", prompt, greedy(10), None)
    engine.step()
    engine.add_request("second", prompt, greedy(10), None)
    engine.step()
    first, second = (engine.requests[r].seq.block_table for r in ("first", "second"))
    assert second[:4] == first[:4] and second[4] != first[4]
    while engine.has_unfinished():
        engine.step()
    check_no_leak(engine)


def test_requests_arriving_together_share_the_prompt_blocks_one_computes(model, bytebpe):
    """``n`` choices of one prompt (or one system prompt sent by many at once): the first
    computes the full blocks, the others wait one step and share them, for the base model
    and an adapter; tokens as with the cache off."""
    prompt = list(range(3, 30))  # 27 tokens: six full blocks the others can share
    reqs = {f"{adapter}-{i}": (prompt, SamplingParams(max_tokens=5, seed=i), adapter)
            for adapter in (None, "a") for i in range(4)}
    engines = [make_engine(model, bytebpe, enable_prefix_caching=on) for on in (True, False)]
    for e in engines:
        e.store.register("a", nola(e, 1))
    on, off = (run(e, reqs) for e in engines)
    assert on == off
    stats = engines[0].stats.prefix_cache
    assert stats.hits == 2 * 3 * 6 * 4  # two weights x three followers x six blocks of 4
    check_no_leak(engines[0])


def test_the_key_and_flag_turn_it_off(model, bytebpe):
    from nolaserve.clients.cli import build_parser

    args = build_parser().parse_args(["serve", "--no-enable-prefix-caching"])
    assert args.cfg_enable_prefix_caching is False
    assert Config(registry_path=":memory:").enable_prefix_caching
    engine = make_engine(model, bytebpe, enable_prefix_caching=False)
    assert engine.scheduler.block_manager.cache is None
    assert engine.scheduler.prefix_identity is None
    invariant = make_engine(model, bytebpe, batch_invariant=True)
    assert invariant.scheduler.block_manager.cache is None


@pytest.mark.parametrize("on", [True, False])
def test_vllm_gets_the_same_key(monkeypatch, on):
    stub_engine_args(monkeypatch)
    args = engine_args(Config(registry_path=":memory:", enable_prefix_caching=on), "/m", "cpu")
    assert args["enable_prefix_caching"] is on


def test_metrics_count_tokens_as_vllm_does(model, bytebpe):
    from prometheus_client import generate_latest

    from nolaserve.server.metrics import Metrics

    engine = make_engine(model, bytebpe)
    metrics = Metrics()
    metrics.bind(engine)
    prompt = list(range(3, 14))  # 11 tokens: two full blocks before the last token's
    run(engine, {"a": (prompt, greedy(2), None)})
    run(engine, {"b": (prompt, greedy(2), None)})
    text = generate_latest(metrics.registry).decode()
    name = engine.model_name
    assert f'vllm:prefix_cache_queries_total{{model_name="{name}"}} 22.0' in text
    assert f'vllm:prefix_cache_hits_total{{model_name="{name}"}} 8.0' in text
    assert "nolaserve_prefix_cache_blocks 3.0" in text  # a's 12 positions; b adds none


def test_cached_blocks_taken_off_the_free_list_do_not_overcommit():
    """A hit whose cached blocks were all the free ones leaves no block for the rest of a
    long prompt's chunk: the request gives them back and runs from its start, for which
    there is room, instead of failing the step, or of waiting while it holds the adapter
    slot it was granted (requests parked for that slot could hold the blocks it needs)."""
    bm = BlockManager(6, BS, enable_caching=True)
    sched = Scheduler(bm, 8, 8, prefix_identity=lambda s: "base")
    first, other = seq("first", list(range(12))), seq("other", list(range(50, 62)))
    for s in (first, other):
        sched.add(s)
        while s.num_computed_tokens < 12:
            for sc in sched.schedule().scheduled:
                sc.seq.num_computed_tokens += sc.num_new_tokens
    sched.finish(first, FinishReason.LENGTH)  # its 3 blocks cached-free; other holds 3
    assert bm.cache.num_free == 3 and bm.num_free_blocks == 3
    late = seq("late", list(range(16)))  # 12 cached tokens + 4 that need a 4th block
    sched.add(late)
    (scheduled,) = sched.schedule().scheduled
    assert scheduled.seq is late and scheduled.num_new_tokens == 8
    assert late.num_computed_tokens == 0 and len(late.block_table) == 2
    assert bm.num_free_blocks == 1


def test_time_slicing_and_a_long_cached_prompt_never_wedge(model):
    """An outside review's wedge: one slot, time slicing, 10 KV blocks of 8. H (8 blocks)
    and V (1) of adapter y run; T of adapter x arrives ranked between them, a 32-token
    prompt whose first block is cached and the one free block. Time slicing parked H and V
    for T once the scheduler said T could run (by displacing V); T ran a chunk and then
    waited for the blocks H held, holding the slot H waited for. Every request ends."""
    block_size = 8
    block = bytes_per_block(model.config, block_size, torch.float32)
    engine = make_engine(model, None, num_slots=1, admission_quantum_steps=1,
                         block_size=block_size, max_num_batched_tokens=16,
                         kv_cache_bytes=11 * block)  # one is the scratch block
    engine.tokenizer = type("T", (), {"decode": lambda self, ids, **kw: ""})()
    for i, name in enumerate("xy"):
        engine.store.register(name, nola(engine, i))
    bm = engine.scheduler.block_manager

    def steps(n: int, until=lambda: not engine.has_unfinished()) -> None:
        for _ in range(n):
            if until():
                return
            engine.admission.wait(60)
            engine.step()

    prefix = list(range(10, 18))
    engine.add_request("X0", prefix + list(range(40, 48)), greedy(1), "x")
    steps(2)
    engine.add_request("H", list(range(50, 50 + block_size * 7 + 1)), greedy(4), "y")
    engine.add_request("V", [5], greedy(6), "y")
    steps(8, lambda: bm.num_free_blocks == 1 and all(
        engine.requests[r].seq.output_token_ids for r in ("H", "V")))
    engine.add_request("T", prefix + list(range(100, 124)), greedy(4), "x")
    steps(200)
    assert not engine.has_unfinished()
    check_no_leak(engine)
    engine.close()


def soak_engine(model, rng: random.Random):
    """An engine of 1 or 2 slots over 4 adapters, time slicing and prefix caching on, a
    few KV blocks, drawn from ``rng``."""
    cfg = dict(num_slots=rng.choice([1, 2]), max_num_seqs=rng.choice([2, 3, 4, 6]),
               block_size=rng.choice([2, 4]), max_num_batched_tokens=rng.choice([8, 16, 32]),
               admission_quantum_steps=rng.choice([1, 2]),
               admission_aging_steps=rng.choice([2, 16]), enable_prefix_caching=True,
               kv_cache_bytes=rng.choice([12, 20, 30]) * 1024,
               warm_cache_bytes=rng.choice([256 << 20, 0]))
    engine = make_engine(model, None, **cfg)
    engine.tokenizer = type("T", (), {"decode": lambda self, ids, **kw: ""})()
    for i, name in enumerate("abcd"):
        engine.store.register(name, random_nola(engine.store.spec, seed=i, rank=4,
                                                num_basis=16, coeff_std=0.5).to_bytes())
    return engine


def drive(engine, plan: list[tuple]) -> dict[str, list[int]]:
    """Each request of ``plan`` (id, adapter, prompt, params, arrival step) added at its
    step; the tokens of each, once all ended (a wedged engine fails the test)."""
    plan, tokens = sorted(plan, key=lambda p: p[4]), {}
    for step in range(4000):
        while plan and plan[0][4] <= step:
            rid, adapter, prompt, params, _ = plan.pop(0)
            engine.add_request(rid, prompt, params, adapter)
        if not plan and not engine.has_unfinished():
            return tokens
        engine.admission.wait(60)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    pytest.fail(f"the engine never drained: {sorted(engine.requests)} are left")


@pytest.mark.parametrize("seed", [1, 28, 29, 39, 113, 127, 209, 339, 1048, 235, 7, 64])
def test_random_workloads_with_time_slicing_and_prefix_caching_drain_as_run_alone(
        model, seed):
    """An outside review's engine soak (these seeds wedged it: 1, 28, 29, 39, 113 and 127,
    before and after displacement; 209 and 339 when a base-model request preempted parked
    ones for its blocks; 1048 when time slicing parked a request in the middle of its
    recompute, after each chunk; 235 when it parked one for a target that a higher-ranked
    request kept out): 4-14 requests of 4 adapters sharing prompt prefixes,
    arriving over 20 steps at an engine of 1-2 slots and a few KV blocks. All end, with
    the tokens each gets alone, and every block is free again."""
    rng = random.Random(seed)
    engine = soak_engine(model, rng)
    shared = [rng.randrange(3, 300) for _ in range(40)]
    plan = []
    for i in range(rng.randint(4, 14)):
        n = rng.randint(1, 24)
        prompt = shared[:rng.randint(0, n)]
        prompt += [rng.randrange(3, 300) for _ in range(n - len(prompt))]
        plan.append((f"r{i}", rng.choice([None, "a", "b", "c", "d"]), prompt,
                     greedy(rng.randint(1, 20)), rng.randint(0, 20)))
    cap = engine.scheduler.block_manager.max_tokens
    plan = [p for p in plan if len(p[2]) + p[3].max_tokens <= cap]
    together = drive(engine, plan)
    check_no_leak(engine)
    engine.close()
    engine = soak_engine(model, random.Random(seed))
    try:
        for p in plan:
            assert drive(engine, [(*p[:4], 0)]) == {p[0]: together[p[0]]}, p[0]
    finally:
        engine.close()


def test_freeing_counts_only_the_blocks_no_other_sequence_holds():
    bm = BlockManager(8, BS, enable_caching=True)
    a, b = computed(bm, "a", 9), seq("b", list(range(9)))
    b.num_computed_tokens = bm.match_prefix(b, "base")  # a's first two blocks
    bm.allocate(b, 9)
    assert list(bm.freeing([a])) == [1]  # a's third block: b holds the shared two
    assert list(bm.freeing([b, a])) == [1, 4]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(4, 16),
       max_num_seqs=st.integers(1, 5))
def test_random_loop_with_shared_prefixes_and_displacement_drains_without_leaks(
        seed, num_blocks, max_num_seqs):
    """Requests of three adapters sharing prompt prefixes, arriving over time into a small
    KV cache, so that newcomers displace lower-ranked running ones whose blocks others
    share: every reference count matches the block tables, and all drains."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, BS, enable_caching=True)
    sched = Scheduler(bm, max_num_seqs, 8, prefix_identity=lambda s: s.adapter_id or "base")
    shared = [rng.randrange(100) for _ in range(12)]
    pending = []
    for i in range(20):
        prompt = shared[:rng.randrange(1, 12)] + [rng.randrange(100)]
        pending.append((rng.randrange(30), Sequence(
            f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 3 * BS)),
            rng.choice([None, "a", "b"]))))
    for step_no in range(2000):
        for _, s in filter(lambda p: p[0] == step_no, pending):
            sched.add(s)
        if step_no > 30 and not sched.has_unfinished():
            break
        out = sched.schedule()
        held = Counter(b for s in sched.running for b in s.block_table)
        assert held == bm._refs and all(not s.block_table for s in sched.waiting)
        for item in out.scheduled:
            samples = item.samples
            item.seq.num_computed_tokens += item.num_new_tokens
            if samples:
                item.seq.output_token_ids.append(rng.randrange(100))
                if len(item.seq.output_token_ids) >= item.seq.params.max_tokens:
                    sched.finish(item.seq, FinishReason.LENGTH)
    else:
        pytest.fail("requests never drained")
    assert not bm._refs and bm.num_free_blocks == num_blocks
    assert all(s.finish_reason in (FinishReason.LENGTH, FinishReason.ERROR) for _, s in pending)


def test_cache_salt_shares_blocks_only_between_requests_with_the_same_salt(model, bytebpe):
    """vLLM's ``cache_salt``: one tenant's request never hits another's cached prompt, so
    its latency cannot reveal what the other sent; the same salt (or none) still shares."""
    engine = make_engine(model, bytebpe)
    engine.store.register("x", nola(engine, 1))
    prompt = list(range(40, 61))  # 21 tokens: five full blocks shareable
    hits = []
    for rid, salt, adapter in (("a", "tenant-a", None), ("b", "tenant-b", None),
                               ("none", None, None), ("a2", "tenant-a", None),
                               ("none2", None, None), ("ax", "tenant-a", "x"),
                               ("ax2", "tenant-a", "x")):
        run(engine, {rid: (prompt, greedy(2, cache_salt=salt), adapter)})
        hits.append(engine.stats.prefix_cache.hits)
    assert [b - a for a, b in zip([0] + hits, hits)] == [0, 0, 0, 20, 20, 0, 20]
    with pytest.raises(InvalidRequestError, match="cache_salt must be a string of 1 to 1024"):
        engine.add_request("bad", prompt, greedy(2, cache_salt=""))
