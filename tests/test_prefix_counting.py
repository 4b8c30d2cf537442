"""The prefix cache's counters count each request's lookup once, as the admission kept it:
a hit given back because the rest did not fit counts as a miss (the request runs from its
start), and a recompute after preemption is not counted again."""

from __future__ import annotations

from nolaserve.server.engine.block_manager import BlockManager
from nolaserve.server.engine.scheduler import Scheduler, SchedulerOutput
from nolaserve.server.engine.sequence import FinishReason, SamplingParams, Sequence

BS = 4


def _seq(rid: str, prompt: list[int]) -> Sequence:
    return Sequence(rid, prompt, SamplingParams(max_tokens=4))


def _compute(sched: Scheduler, seq: Sequence, tokens: int) -> None:
    while seq.num_computed_tokens < tokens:
        for sc in sched.schedule().scheduled:
            sc.seq.num_computed_tokens += sc.num_new_tokens


def test_a_hit_given_back_counts_once_as_a_miss():
    bm = BlockManager(6, BS, enable_caching=True)
    sched = Scheduler(bm, 8, 8, prefix_identity=lambda s: "base")
    first, other = _seq("first", list(range(12))), _seq("other", list(range(50, 62)))
    for s in (first, other):
        sched.add(s)
        _compute(sched, s, 12)
    sched.finish(first, FinishReason.LENGTH)  # its 3 blocks cached-free; other holds 3
    before = bm.cache.stats
    late = _seq("late", list(range(16)))  # 12 cached tokens + 4 that need a 4th block
    sched.add(late)
    (scheduled,) = sched.schedule().scheduled  # no block for the rest of its chunk after
    assert scheduled.seq is late and late.num_computed_tokens == 0  # the hit: from 0
    sched.finish(other, FinishReason.LENGTH)
    _compute(sched, late, 16)  # preempted (it could not grow) and recomputed meanwhile
    after = bm.cache.stats
    assert (after.queries - before.queries, after.hits - before.hits) == (16, 0)


def test_a_recompute_after_preemption_is_not_counted_again():
    bm = BlockManager(16, BS, enable_caching=True)
    sched = Scheduler(bm, 8, 8, prefix_identity=lambda s: "base")
    s = _seq("s", list(range(12)))
    sched.add(s)
    _compute(sched, s, 12)
    counted = bm.cache.stats
    assert (counted.queries, counted.hits) == (12, 0)
    sched._preempt(s, SchedulerOutput())
    _compute(sched, s, 12)  # re-admitted from its cached prefix
    after = bm.cache.stats
    assert (after.queries, after.hits) == (12, 0)
