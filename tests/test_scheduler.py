"""Scheduler and block manager: budget, chunked prefill, admission, preemption, cancellation.
No torch: an engine loop is simulated by advancing ``num_computed_tokens`` by hand."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nolaserve.server.engine.block_manager import BlockManager, OutOfBlocksError
from nolaserve.server.engine.fair_tags import FairTags
from nolaserve.server.engine.scheduler import Scheduler, SchedulerOutput
from nolaserve.server.engine.sequence import (
    FinishReason,
    SamplingParams,
    Sequence,
    SequenceStatus,
)


def make_seq(rid: str, prompt_len: int, max_tokens: int = 4,
             adapter: str | None = None) -> Sequence:
    return Sequence(rid, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens),
                    adapter)


def make_sched(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, ready=None):
    bm = BlockManager(num_blocks, block_size)
    kwargs = {} if ready is None else {"adapter_ready": ready}
    return Scheduler(bm, max_num_seqs, budget, **kwargs)


def run_step(sched: Scheduler, out: SchedulerOutput) -> None:
    """What the engine does after the model ran: advance, sample, finish at max_tokens."""
    for item in out.scheduled:
        seq = item.seq
        samples = item.samples
        seq.num_computed_tokens += item.num_new_tokens
        if samples:
            seq.output_token_ids.append(7)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                sched.finish(seq, FinishReason.LENGTH)


def step(sched: Scheduler) -> SchedulerOutput:
    out = sched.schedule()
    run_step(sched, out)
    return out


def tokens_of(out: SchedulerOutput) -> dict[str, int]:
    return {item.seq.request_id: item.num_new_tokens for item in out.scheduled}


# ---------------------------------------------------------------- block manager


def test_block_manager_allocate_extend_free():
    bm = BlockManager(num_blocks=5, block_size=4)
    seq = make_seq("a", 6)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    bm.allocate(seq, 6)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 3
    bm.allocate(seq, 8)  # already covered
    assert len(seq.block_table) == 2
    bm.allocate(seq, 9)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    other = make_seq("b", 12)
    assert not bm.can_allocate(other, 12)
    with pytest.raises(OutOfBlocksError, match="only 2 of 5"):
        bm.allocate(other, 12)
    assert other.block_table == [] and bm.num_free_blocks == 2  # nothing half-allocated
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 5
    bm.allocate(other, 12)
    assert len(other.block_table) == 3


def test_block_manager_rejects_bad_input():
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)
    bm = BlockManager(4, 4)
    seq = make_seq("a", 4)
    seq.block_table = [3]  # never handed out
    with pytest.raises(ValueError, match="not allocated"):
        bm.free(seq)


def test_modules_import_no_torch():
    code = (
        "import sys\n"
        "import nolaserve.server.engine.block_manager, nolaserve.server.engine.scheduler\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert res.stdout.strip() == "False"


# ---------------------------------------------------------------- scheduling policy


def test_budget_respected_every_step():
    sched = make_sched(budget=10, max_num_seqs=6)
    for i in range(12):
        sched.add(make_seq(f"r{i}", 3 + 2 * i, max_tokens=5))
    for _ in range(200):
        if not sched.has_unfinished():
            break
        out = step(sched)
        assert out.num_batched_tokens == sum(tokens_of(out).values()) <= 10
        assert all(n > 0 for n in tokens_of(out).values())
        assert sched.num_running <= 6
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 64


def test_chunked_prefill_never_stalls_decode():
    sched = make_sched(budget=16)
    a = make_seq("a", 4, max_tokens=20)
    sched.add(a)
    assert tokens_of(step(sched)) == {"a": 4}
    b = make_seq("b", 50, max_tokens=2)
    sched.add(b)
    chunks = []
    while b.num_computed_tokens < 50:
        out = step(sched)
        assert out.scheduled[0].seq is a and out.scheduled[0].num_new_tokens == 1
        chunks.append(tokens_of(out)["b"])
        assert out.num_batched_tokens <= 16
    assert chunks == [15, 15, 15, 5]
    assert len(b.output_token_ids) == 1  # sampled at the end of the last chunk only
    assert tokens_of(step(sched)) == {"a": 1, "b": 1}  # both decode in the same step


def test_max_num_seqs_caps_running():
    sched = make_sched(max_num_seqs=2, budget=100)
    seqs = [make_seq(f"r{i}", 3, max_tokens=3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = step(sched)
    assert list(tokens_of(out)) == ["r0", "r1"] and sched.num_waiting == 2
    while seqs[0].status is not SequenceStatus.FINISHED:
        assert sched.num_running == 2
        step(sched)
    assert "r2" in tokens_of(step(sched))


def test_fcfs_order_of_admission():
    sched = make_sched(budget=8, max_num_seqs=8)
    for i in range(5):
        sched.add(make_seq(f"r{i}", 5, max_tokens=2))
    admitted: list[str] = []
    for _ in range(10):
        out = step(sched)
        admitted += [rid for rid in tokens_of(out) if rid not in admitted]
    assert admitted == ["r0", "r1", "r2", "r3", "r4"]
    assert [s.request_id for s in sched.running] == sorted(s.request_id for s in sched.running)


def test_each_adapters_first_request_comes_before_any_adapters_second():
    """Round robin across adapters, FCFS within one: a burst of one adapter's requests
    does not queue another adapter's request behind it."""
    sched = make_sched(budget=64, max_num_seqs=3)
    for i in range(4):
        sched.add(make_seq(f"a{i}", 5, max_tokens=2, adapter="a"))
    sched.add(make_seq("b0", 5, max_tokens=2, adapter="b"))
    sched.add(make_seq("base0", 5, max_tokens=2))
    sched.add(make_seq("b1", 5, max_tokens=2, adapter="b"))
    assert [s.request_id for s in sched.waiting] == ["a0", "b0", "base0", "a1", "b1", "a2", "a3"]
    assert list(tokens_of(step(sched))) == ["a0", "b0", "base0"]


def test_a_newcomer_starts_at_the_lowest_unfinished_tag_and_tags_stay_fixed():
    """An adapter with nothing unfinished starts at the lowest tag still unfinished: behind
    the requests of the round under way, ahead of the burst's later ones, never ahead of
    everything. A finish moves nobody (tags are fixed at arrival), and an adapter whose
    requests all finished starts afresh."""
    sched = make_sched(budget=8, max_num_seqs=1)
    a = [make_seq(f"a{i}", 5, max_tokens=2, adapter="a") for i in range(3)]
    for s in a:
        sched.add(s)
    sched.finish(a[0], FinishReason.CANCELLED)  # the lowest unfinished tag is now a1's
    b0, b1 = (make_seq(r, 5, max_tokens=2, adapter="b") for r in ("b0", "b1"))
    sched.add(b0)
    sched.add(b1)
    assert sched.waiting == (a[1], b0, a[2], b1)
    for s in (a[1], a[2]):
        sched.finish(s, FinishReason.CANCELLED)
    a3 = make_seq("a3", 5, max_tokens=2, adapter="a")  # a has nothing unfinished: afresh
    sched.add(a3)
    assert sched.waiting == (b0, a3, b1)


def test_a_burst_preempts_its_own_newest_requests_not_another_adapters():
    """Under KV pressure the lowest-ranked running request goes: the newest of the adapter
    with the most requests, not the last to arrive (which FCFS would preempt)."""
    sched = make_sched(num_blocks=5, block_size=4, budget=64)
    a = [make_seq(f"a{i}", 4, max_tokens=8, adapter="a") for i in range(3)]
    b = make_seq("b0", 4, max_tokens=8, adapter="b")
    for s in (*a, b):
        sched.add(s)
    assert tokens_of(step(sched)) == {"a0": 4, "b0": 4, "a1": 4, "a2": 4}
    out = step(sched)  # every one needs a 2nd block and one is free
    assert out.preempted == [a[2], a[1]] and tokens_of(out) == {"a0": 1, "b0": 1}
    assert sched.waiting == (a[1], a[2])
    for _ in range(100):
        if not sched.has_unfinished():
            break
        step(sched)
    assert all(len(s.output_token_ids) == 8 for s in (*a, b))
    assert sched.block_manager.num_free_blocks == 5


def burst_and_newcomer(num_blocks: int, max_num_seqs: int = 8, ready=None):
    """Four running requests of adapter a (3-token prompts, a block each), a fifth queued,
    then b0 of adapter b: ranked second, after a0."""
    sched = make_sched(num_blocks=num_blocks, block_size=4, max_num_seqs=max_num_seqs,
                       budget=64, ready=ready)
    a = [make_seq(f"a{i}", 3, max_tokens=8, adapter="a") for i in range(5)]
    for s in a:
        sched.add(s)
    step(sched)
    b = make_seq("b0", 3, max_tokens=8, adapter="b")
    sched.add(b)
    return sched, a, b


def test_a_waiting_request_displaces_the_lowest_ranked_running_one_for_blocks():
    """Another adapter's request that finds the KV cache full preempts the fewest
    lowest-ranked running requests that make room for it, and the work the step had
    scheduled for them goes back to the budget; nobody ranked below them is admitted."""
    sched, a, b = burst_and_newcomer(num_blocks=4)
    assert sched.running == tuple(a[:4])
    out = step(sched)
    assert out.preempted == [a[3]] and tokens_of(out) == {"a0": 1, "a1": 1, "a2": 1, "b0": 3}
    assert out.num_batched_tokens == 6 and sched.running == (a[0], b, a[1], a[2])
    assert sched.waiting == (a[3], a[4]) and a[3].block_table == []
    for _ in range(100):
        if not sched.has_unfinished():
            break
        step(sched)
    assert all(len(s.output_token_ids) == 8 for s in (*a, b))


def test_a_waiting_request_displaces_the_lowest_ranked_running_one_for_a_seat():
    sched, a, b = burst_and_newcomer(num_blocks=64, max_num_seqs=4)
    out = step(sched)
    assert out.preempted == [a[3]] and tokens_of(out) == {"a0": 1, "a1": 1, "a2": 1, "b0": 3}
    assert sched.block_manager.num_free_blocks == 60


def test_no_displacement_that_would_not_make_room():
    """Only running requests ranked below the newcomer count: b0 needs two blocks and a1,
    the only one below it, frees one. b0 waits, a1 keeps running, and b0's adapter is not
    asked for (it could not run this step)."""
    calls: list[str] = []
    sched = make_sched(num_blocks=4, block_size=4, budget=64,
                       ready=lambda s: calls.append(s.request_id) or True)
    a0, a1 = make_seq("a0", 11, max_tokens=5, adapter="a"), make_seq("a1", 3, adapter="a")
    sched.add(a0)
    sched.add(a1)
    step(sched)
    b = make_seq("b0", 7, adapter="b")
    sched.add(b)
    calls.clear()
    out = step(sched)
    assert out.preempted == [] and tokens_of(out) == {"a0": 1, "a1": 1}
    assert calls == ["a0", "a1"] and sched.waiting == (b,)


def test_a_newcomer_whose_adapter_is_not_ready_displaces_nobody():
    sched, a, b = burst_and_newcomer(4, ready=lambda s: s.adapter_id == "a")
    out = step(sched)
    assert out.preempted == [] and tokens_of(out) == {f"a{i}": 1 for i in range(4)}
    assert sched.waiting == (b, a[4])


def test_admissible_means_room_for_all_its_tokens_without_displacing_anyone():
    """Time slicing hands a slot only to a request that can reach its next token with it:
    free blocks for its whole prompt, not just its first chunk, and no displacement (an
    outside review wedged the engine: a long prompt got the slot, ran one chunk, then
    waited for blocks held by the requests parked for it, which waited for its slot)."""
    sched, a, b = burst_and_newcomer(num_blocks=5)  # a0-a4 hold a block each
    sched.max_num_batched_tokens = 4
    long = make_seq("long", 12, adapter="c")  # 3 blocks; its first chunk needs 1
    sched.add(long)
    assert not sched.admissible(b)  # it could displace a4, a3, a2 or a1
    assert sched.admissible(a[0])  # running (parked)
    for s in a[3:]:
        sched.finish(s, FinishReason.CANCELLED)
    assert sched.admissible(b) and not sched.admissible(long)  # 2 free blocks
    sched.finish(a[2], FinishReason.CANCELLED)
    assert sched.admissible(long)


def test_admissible_leaves_room_for_the_waiting_requests_admitted_before_it():
    """Those ranked above it that need no slot take a seat and blocks first; those that
    wait for a slot are skipped unless overdue, where admission stops (an outside
    review's soak: a request was parked step after step for a target that a higher-ranked
    one, holding the slot it kept through a preemption, then kept out)."""
    overdue: set[str] = set()
    sched = make_sched(num_blocks=8, max_num_seqs=2, ready=lambda s: False)
    sched.adapter_overdue = lambda s: s.request_id in overdue
    running = make_seq("run", 4, adapter="a")
    sched.add(running)
    sched.adapter_ready = lambda s: True
    step(sched)  # run holds a seat and 2 blocks
    ahead, target = make_seq("ahead", 4, adapter="b"), make_seq("target", 4, adapter="c")
    for s in (ahead, target):
        sched.add(s)
    assert sched.admissible(target)  # ahead waits for a slot: skipped
    overdue.add("ahead")
    assert not sched.admissible(target)  # admission stops at it
    overdue.clear()
    ahead.adapter_slot = 0  # it kept its slot: admitted first, to the last seat
    assert not sched.admissible(target) and sched.admissible(ahead)
    sched.max_num_seqs = 3
    assert sched.admissible(target)
    target.prompt_token_ids += [1] * 24  # 7 blocks, all that are free: with ahead's, 8
    assert not sched.admissible(target)
    ahead.adapter_slot = -1
    assert sched.admissible(target)


def test_a_step_admits_those_ranked_above_the_request_it_preempted():
    """A step that preempts a running request for blocks still admits a waiting request
    ranked above it, whose blocks fit, but none ranked below it."""
    sched = make_sched(num_blocks=4, block_size=4, budget=64)
    a = [make_seq(f"a{i}", 4, max_tokens=8, adapter="a") for i in range(3)]
    for s in a:
        sched.add(s)
    step(sched)  # a0, a1, a2 hold a block each, one is free
    b = make_seq("b0", 3, max_tokens=8, adapter="b")
    sched.add(b)  # ranked after a0
    out = step(sched)  # a0 and a1 need a 2nd block: a2 goes; b0 needs one: a1 goes
    assert out.preempted == [a[2], a[1]]
    assert tokens_of(out) == {"a0": 1, "b0": 3} and sched.waiting == (a[1], a[2])


def test_cold_adapter_is_skipped_then_admitted():
    ready = {"hot1", "hot2"}
    sched = make_sched(ready=lambda s: s.request_id in ready)
    cold, hot1, hot2 = make_seq("cold", 3), make_seq("hot1", 3), make_seq("hot2", 3)
    for s in (cold, hot1, hot2):
        sched.add(s)
    out = step(sched)
    assert list(tokens_of(out)) == ["hot1", "hot2"]  # FCFS among ready ones
    assert cold.status is SequenceStatus.WAITING and sched.waiting == (cold,)
    assert "cold" not in tokens_of(step(sched))
    ready.add("cold")
    assert tokens_of(step(sched))["cold"] == 3
    assert cold.status is SequenceStatus.RUNNING


def test_a_running_sequence_whose_adapter_is_not_ready_sits_out_and_keeps_its_blocks():
    """A parked sequence (its adapter gave its slot to another request) is skipped while it
    is not ready, keeps its KV blocks and its progress, and resumes where it stopped."""
    ready = {"a", "b"}
    sched = make_sched(ready=lambda s: s.request_id in ready)
    a, b = make_seq("a", 3, max_tokens=8), make_seq("b", 3, max_tokens=8)
    sched.add(a)
    sched.add(b)
    step(sched)
    ready.discard("a")
    blocks, computed = list(a.block_table), a.num_computed_tokens
    assert tokens_of(step(sched)) == {"b": 1}
    assert sched.running == (a, b) and a.status is SequenceStatus.RUNNING
    assert (a.block_table, a.num_computed_tokens) == (blocks, computed)
    ready.add("a")
    assert tokens_of(step(sched)) == {"a": 1, "b": 1}


def test_adapter_ready_not_called_when_nothing_fits():
    calls: list[str] = []
    sched = make_sched(max_num_seqs=1, ready=lambda s: calls.append(s.request_id) or True)
    sched.add(make_seq("a", 3))
    sched.add(make_seq("b", 3))
    sched.schedule()
    assert calls == ["a"]  # b is not probed: max_num_seqs is reached


def test_preemption_most_recent_requeued_at_front_and_finishes():
    sched = make_sched(num_blocks=4, block_size=4, budget=64)
    a, b, c = make_seq("a", 4, max_tokens=8), make_seq("b", 4, max_tokens=8), make_seq("c", 2)
    for s in (a, b, c):
        sched.add(s)
    assert tokens_of(step(sched)) == {"a": 4, "b": 4, "c": 2}
    assert sched.block_manager.num_free_blocks == 1
    out = step(sched)  # a needs a 2nd block (the free one), b needs one: c (newest) goes
    assert out.preempted == [c] and tokens_of(out) == {"a": 1, "b": 1}
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert c.status is SequenceStatus.WAITING and c.output_token_ids == [7]
    for _ in range(3):
        step(sched)
    out = step(sched)  # a needs a 3rd block: b goes, to the front, ahead of c
    assert out.preempted == [b] and tokens_of(out) == {"a": 1}
    assert sched.waiting == (b, c) and b.num_computed_tokens == 0
    assert len(b.output_token_ids) == 5  # kept, recomputed as part of its prefix later
    for _ in range(100):
        if not sched.has_unfinished():
            break
        step(sched)
    assert all(s.finish_reason is FinishReason.LENGTH for s in (a, b, c))
    assert [len(s.output_token_ids) for s in (a, b, c)] == [8, 8, 4]
    assert sched.block_manager.num_free_blocks == 4


@pytest.mark.parametrize("adapter", ["b", None])
def test_a_seq_that_cannot_grow_preempts_parked_ones_before_itself(adapter):
    """Parked requests (running, but their adapter gave its slot away) hold blocks they
    cannot use now: a request holding a slot that cannot grow preempts them, though they
    rank above it, before itself (it went back and forth between its first chunk and a
    preemption, its slot kept, while the requests parked for that slot held the blocks of
    its second). A base-model request holds no slot they wait for: it preempts itself
    (preempting them for it made a livelock with time slicing)."""
    parked: set[str] = set()
    sched = make_sched(num_blocks=4, block_size=4, budget=4,
                       ready=lambda s: s.request_id not in parked)
    a = make_seq("a", 12, max_tokens=4, adapter="a")
    sched.add(a)
    for _ in range(3):
        step(sched)  # a's prompt in 3 chunks: 3 blocks, and a sampled token
    parked.add("a")
    a.adapter_slot = -1  # AdapterAdmission.time_slice parked it
    b = make_seq("b", 8, max_tokens=1, adapter=adapter)
    b.adapter_slot = 0 if adapter else -1  # in the slot a gave up
    sched.add(b)
    assert tokens_of(step(sched)) == {"b": 4}  # its first chunk takes the free block
    out = sched.schedule()  # its second needs one more
    victim = a if adapter else b
    assert out.preempted == [victim] and victim.block_table == []
    assert tokens_of(out) == ({"b": 4} if adapter else {})


def test_seq_that_cannot_grow_preempts_itself():
    sched = make_sched(num_blocks=3, block_size=2, budget=64)
    a, b = make_seq("a", 3, max_tokens=3), make_seq("b", 2, max_tokens=3)
    sched.add(a)
    sched.add(b)
    assert tokens_of(step(sched)) == {"a": 3, "b": 2}
    out = step(sched)  # a fits in its 2nd block; b is newest and needs a 3rd block
    assert out.preempted == [b] and tokens_of(out) == {"a": 1}
    assert sched.waiting == (b,) and b.block_table == []


def test_abort_frees_blocks_immediately():
    sched = make_sched(num_blocks=8, block_size=4)
    run, wait = make_seq("run", 10), make_seq("wait", 3)
    sched.add(run)
    sched.schedule()
    sched.add(wait)
    assert sched.block_manager.num_free_blocks == 5
    sched.finish(run, FinishReason.CANCELLED)
    assert sched.block_manager.num_free_blocks == 8 and run.block_table == []
    assert run.is_finished and run.finish_reason is FinishReason.CANCELLED
    sched.finish(wait, FinishReason.CANCELLED)
    sched.finish(wait, FinishReason.CANCELLED)  # idempotent
    assert sched.num_waiting == 0 and sched.num_running == 0 and not sched.has_unfinished()
    assert not sched.schedule().scheduled


def test_never_fitting_request_errors():
    sched = make_sched(num_blocks=4, block_size=4)
    big, empty, ok = make_seq("big", 14, max_tokens=3), make_seq("empty", 0), make_seq("ok", 3)
    for s in (big, empty, ok):
        sched.add(s)
    out = sched.schedule()
    assert out.errored == [big, empty] and tokens_of(out) == {"ok": 3}
    assert big.finish_reason is FinishReason.ERROR and "holds 16 tokens" in big.error
    assert "17 tokens" in big.error and "empty prompt" in empty.error
    assert sched.num_waiting == 0


def test_add_twice_and_bad_config_raise():
    sched = make_sched()
    seq = make_seq("a", 3)
    sched.add(seq)
    with pytest.raises(ValueError, match="already added"):
        sched.add(seq)
    with pytest.raises(ValueError):
        Scheduler(BlockManager(4, 4), 0, 8)
    with pytest.raises(ValueError):
        Scheduler(BlockManager(4, 4), 4, 0)


# ---------------------------------------------------------------- random engine loop


def check_invariants(sched: Scheduler, out: SchedulerOutput, before: dict, budget: int):
    bm = sched.block_manager
    held = [b for s in sched.running for b in s.block_table]
    assert len(held) == len(set(held)), "block handed out twice"
    assert len(held) + bm.num_free_blocks == bm.num_blocks
    assert all(not s.block_table for s in sched.waiting)
    assert out.num_batched_tokens <= budget and sched.num_running <= sched.max_num_seqs
    for item in out.scheduled:
        s = item.seq
        assert s.num_computed_tokens == before.get(s, 0), "scheduler moved progress"
        assert 0 < item.num_new_tokens <= s.num_tokens - s.num_computed_tokens
        need = s.num_computed_tokens + item.num_new_tokens
        assert len(s.block_table) == bm.blocks_needed(need)
    for s in out.preempted:
        assert s.num_computed_tokens == 0 and s.status is SequenceStatus.WAITING


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_blocks=st.integers(1, 24),
    block_size=st.integers(1, 8),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(1, 40),
    num_requests=st.integers(1, 25),
)
def test_random_engine_loop_drains(seed, num_blocks, block_size, max_num_seqs, budget,
                                   num_requests):
    rng = random.Random(seed)
    capacity = num_blocks * block_size
    step_no = 0
    ready_at: dict[Sequence, int] = {}
    sched = Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget,
                      adapter_ready=lambda s: step_no >= ready_at[s])
    pending = []
    for i in range(num_requests):
        seq = make_seq(f"r{i}", rng.randint(0, capacity), rng.randint(1, capacity),
                       rng.choice([None, "a", "b", "c"]))
        ready_at[seq] = rng.choice([0, 0, 0, rng.randint(0, 30)])
        pending.append((rng.randint(0, 40), seq))
    for step_no in range(5000):
        for arrive, seq in pending:
            if arrive == step_no:
                sched.add(seq)
        if step_no > 40 and not sched.has_unfinished():
            break
        before = {s: s.num_computed_tokens for s in sched.running}
        first = sched.running[0] if sched.running else None
        out = sched.schedule()
        check_invariants(sched, out, before, budget)
        if first is not None and not first.is_finished:  # it progresses, or one ranked
            displaced = first in out.preempted  # above it took its place, and progresses
            lead = sched.running[0] if displaced else first
            assert out.scheduled[0].seq is lead, "the first-ranked request must progress"
        run_step(sched, out)
        if rng.random() < 0.05:
            live = [s for t, s in pending if t <= step_no and not s.is_finished]
            if live:
                sched.finish(rng.choice(live), FinishReason.CANCELLED)
    else:
        pytest.fail("requests never drained")
    assert sched.block_manager.num_free_blocks == num_blocks
    for _, seq in pending:
        assert seq.is_finished and seq.block_table == []
        total = seq.num_prompt_tokens + seq.params.max_tokens
        fits = seq.num_prompt_tokens > 0 and total <= capacity
        if seq.finish_reason is FinishReason.ERROR:
            assert not fits
        elif seq.finish_reason is FinishReason.LENGTH:
            assert len(seq.output_token_ids) == seq.params.max_tokens


def test_an_overdue_parked_request_holds_back_newcomers_that_need_a_slot():
    """A running request parked off its slot (time slicing) that has waited past the aging
    bound: no waiting request that needs a slot is admitted until it runs again, so the
    slots running ones free go to it, not to a stream of newcomers (found by the churn
    soak: a parked request starved while short requests kept taking every freed slot).
    Those that take no new slot still run: a base-model request, and one that kept its
    slot through a preemption (holding it back could leave no slot for the parked one)."""
    parked: set[str] = set()
    overdue: set[str] = set()

    def ready(seq: Sequence) -> bool:
        if seq.request_id in parked:
            return False
        seq.adapter_slot = 0
        return True

    def adapted(rid: str, slot: int = -1) -> Sequence:
        seq = make_seq(rid, 4, max_tokens=8)
        seq.adapter_id, seq.adapter_slot = "x", slot
        return seq

    sched = make_sched(ready=ready)
    sched.adapter_overdue = lambda s: s.request_id in overdue
    a = adapted("a")
    sched.add(a)
    step(sched)
    parked.add("a")
    a.adapter_slot = -1
    sched.add(adapted("b"))
    assert "b" in tokens_of(step(sched))  # parked, not overdue: newcomers run
    overdue.add("a")
    for seq in (adapted("c"), make_seq("base", 4), adapted("kept", slot=0)):
        sched.add(seq)
    assert tokens_of(step(sched)) == {"b": 1, "base": 4, "kept": 4}  # c waits for a
    parked.discard("a")
    assert set(tokens_of(step(sched))) == {"a", "b", "c", "base", "kept"}


def test_fair_tags_lowest_follows_out_of_order_ends():
    """``FairTags`` alone (the vLLM backend's priorities): the lowest unfinished tag moves
    only when the sequences holding it end, in whatever order they end."""
    tags = FairTags()
    a = [tags.tag("a") for _ in range(3)]
    assert a == [0, 1, 2] and tags.tag(None) == 0  # the base model starts at the lowest
    tags.done("a", 1)
    tags.done("a", 0)
    assert tags.lowest() == 0  # the base model's request still holds tag 0
    tags.done(None, 0)
    assert tags.lowest() == 2 and tags.tag("b") == 2 and tags.tag("a") == 3
    for adapter, tag in (("a", 2), ("b", 2), ("a", 3)):
        tags.done(adapter, tag)
    assert tags.lowest() == 0 and tags.tag("a") == 0  # nothing unfinished: afresh
