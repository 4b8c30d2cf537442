"""Continuous-batching scheduler with chunked prefill and preemption by recompute.
Pure Python (no torch).

Sequences are ranked fairly across adapters by ``(tag, arrival)``, fixed for their life
(``fair_tags``: start-time fair queuing, round robin across adapters, first come, first
served within one; with one adapter, plain FCFS). Each ``schedule()`` call fills one step's
token budget: running sequences first, in rank order (a decoding sequence needs one token, a
partly prefilled one gets the next chunk of its prompt), then waiting sequences in rank
order, as far as budget, ``max_num_seqs``, KV blocks and adapter readiness allow. When a
running sequence cannot get its blocks, the lowest-ranked running sequence is preempted: its
blocks are freed and it is recomputed later (from its cached prefix, with prefix caching),
so the highest-ranked request always makes progress, and a burst of one adapter's requests
preempts its own later ones before another adapter's first; parked sequences (their adapter
gave its slot away) go before one holding a slot that needs the blocks, whatever their rank,
since they cannot use their blocks until they get a slot back. A waiting sequence that finds
no seat or too few free blocks displaces running sequences ranked below it, the lowest
first, if that makes room (as vLLM's V0 priority scheduling did): another adapter's request
does not wait for a burst's long requests to end. A step admits nobody ranked at or below a
sequence it preempted, so freed blocks are not handed straight back out (no thrashing): rank
decides who runs, and only a higher-ranked sequence takes a lower one's place.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .fair_tags import FairTags
from .sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSeq:
    """Compute tokens ``[seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens)``
    of ``seq.token_ids`` this step; their KV blocks are already allocated. The engine samples
    a token for ``seq`` iff that range ends at ``seq.num_tokens``."""

    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step produces the sequence's next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """One step's work: ``scheduled`` running sequences first (rank order), then newly
    admitted ones. ``preempted`` went back to the waiting queue, in their rank; ``errored``
    were finished with ``FinishReason.ERROR`` because they can never fit the KV cache."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    errored: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0


class Scheduler:
    """Decides which sequences run each step and how many tokens each computes.

    ``adapter_ready(seq)`` gates admission: a waiting sequence whose adapter is not ready is
    skipped (the queue does not stall behind a cold adapter: hot ones run first); ready ones
    keep rank order. A running sequence whose adapter is not ready (it was parked:
    ``AdapterAdmission.time_slice``) keeps its blocks and sits the step out. It is asked
    only of a sequence that the budget (and, if waiting, a seat and KV blocks, free or
    displacing lower-ranked running sequences) would let run this step, so it may have side
    effects (take a slot, start loading the adapter). ``adapter_overdue(seq)``, asked of a
    skipped sequence, is the aging bound: when true, no sequence behind it is admitted this
    step, as for one that waits for KV blocks, so that it cannot be overtaken forever; for a
    parked running sequence, no waiting one that needs a slot is admitted.
    The scheduler never advances ``num_computed_tokens`` (the engine does, after the model
    ran); it only resets it to 0 on preemption.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        adapter_ready: Callable[[Sequence], bool] = lambda s: True,
        fixed_chunks: bool = False,
        adapter_overdue: Callable[[Sequence], bool] = lambda s: False,
        prefix_identity: Callable[[Sequence], str] | None = None,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.adapter_ready = adapter_ready
        self.adapter_overdue = adapter_overdue
        # With prefix caching: the identity of the weights computing a sequence's KV, asked
        # once its adapter is ready; its cached prefix is then not computed again.
        self.prefix_identity = prefix_identity
        # Prefill chunks always end at multiples of max_num_batched_tokens (a sequence
        # waits rather than take a shorter chunk), as when it runs alone: batch-invariant.
        self.fixed_chunks = fixed_chunks
        self._waiting: list[Sequence] = []  # both sorted by rank
        self._running: list[Sequence] = []
        self._rank: dict[Sequence, tuple[int, int]] = {}  # (tag, arrival) of each unfinished
        self._tags = FairTags()
        self._unfit: dict[Sequence, str] = {}  # added, never to run: errored next schedule
        self._counter = itertools.count()
        self.preemptions = 0  # running sequences preempted (for KV blocks or a seat), so far

    # ------------------------------------------------------------------ queues

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for admission (new or preempted)."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Admitted sequences holding KV blocks."""
        return len(self._running)

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        """The waiting queue in rank order (a snapshot)."""
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Sequence, ...]:
        """Running sequences in rank order (a snapshot)."""
        return tuple(self._running)

    def has_unfinished(self) -> bool:
        """Whether any sequence is waiting or running (or is yet to be errored)."""
        return bool(self._waiting or self._running or self._unfit)

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` by its fair-queuing tag (``FairTags``); one that can never fit the KV
        cache is errored by the next ``schedule()`` instead."""
        if seq in self._rank or seq in self._unfit:
            raise ValueError(f"request {seq.request_id!r} was already added")
        seq.status = SequenceStatus.WAITING
        error = self._unfittable(seq)
        if error is not None:
            self._unfit[seq] = error
            return
        self._rank[seq] = (self._tags.tag(seq.adapter_id), next(self._counter))
        bisect.insort(self._waiting, seq, key=self._rank.__getitem__)

    def finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """Remove ``seq`` from its queue, free its blocks and mark it finished with
        ``reason``. A no-op for a sequence that is already finished."""
        if seq.is_finished:
            return
        if seq in self._rank:
            if seq.status is SequenceStatus.RUNNING:
                self._running.remove(seq)
            else:
                self._waiting.remove(seq)
            self._forget(seq)
        self._unfit.pop(seq, None)
        self.block_manager.cache_computed(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error

    def _forget(self, seq: Sequence) -> None:
        self._tags.done(seq.adapter_id, self._rank.pop(seq)[0])

    def admissible(self, seq: Sequence) -> bool:
        """Whether ``seq`` could run to its next token once its adapter is ready (time
        slicing hands it a slot only then): it is running (parked), or ``max_num_seqs``
        and the free KV blocks have room for all its tokens after the waiting sequences
        ranked above it that the next schedule admits first (those that need no slot),
        and none ranked above it is overdue (admission stops there). Not just its next
        chunk, and not by displacing others: an outside review's long prompt got a slot
        for its first chunk, then waited for blocks that the requests parked for it held,
        while they waited for its slot. And not before those ranked above it: its soak
        parked a decoding request step after step for one that a higher-ranked request,
        readmitted with the slot it kept, then kept out."""
        if seq.status is SequenceStatus.RUNNING:
            return True
        seats = self.max_num_seqs - len(self._running)
        blocks = self.block_manager.num_free_blocks
        above = bisect.bisect_left(self._waiting, self._rank[seq], key=self._rank.__getitem__)
        for other in [*self._waiting[:above], seq]:
            if other is not seq and other.needs_adapter:
                if self.adapter_overdue(other):
                    return False
                continue
            seats -= 1
            blocks -= self.block_manager.missing(other, other.num_tokens)
            if seats < 0 or blocks < 0:
                return False
        return True

    # ---------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        """Plan one step and allocate the KV blocks it writes."""
        out = SchedulerOutput()
        for seq in self._running:  # the blocks the last step filled can be shared now
            self.block_manager.cache_computed(seq)
        for seq, error in list(self._unfit.items()):
            self.finish(seq, FinishReason.ERROR, error)
            out.errored.append(seq)
        parked_overdue = self._schedule_running(out)
        self._admit_waiting(out, take_slots=not parked_overdue)
        return out

    def _unfittable(self, seq: Sequence) -> str | None:
        """Why ``seq`` can never run, or None if it can."""
        if seq.num_prompt_tokens == 0:
            return "request has an empty prompt"
        bm = self.block_manager
        total = seq.num_prompt_tokens + seq.params.max_tokens
        if bm.blocks_needed(total) <= bm.num_blocks:
            return None
        return (
            f"request needs {total} tokens (prompt {seq.num_prompt_tokens} + max_tokens "
            f"{seq.params.max_tokens}) but the KV cache holds {bm.max_tokens} tokens "
            f"({bm.num_blocks} blocks of {bm.block_size})"
        )

    def _schedule_running(self, out: SchedulerOutput) -> bool:
        """Schedule the running sequences; True if a parked one is overdue (aging): then
        no waiting sequence that needs a slot is admitted this step, so the slots that
        running ones free go to it rather than to newcomers, which would otherwise
        overtake it forever."""
        i, parked_overdue = 0, False
        idle: list[Sequence] = []  # parked: skipped, their blocks unused this step
        while i < len(self._running):
            budget = self.max_num_batched_tokens - out.num_batched_tokens
            if budget <= 0:
                return parked_overdue
            seq = self._running[i]
            num_new = self._chunk(seq, budget)
            if num_new <= 0:  # nothing to compute (or no fixed chunk fits) this step
                i += 1
                continue
            if not self.adapter_ready(seq):  # parked: its adapter lost its slot
                parked_overdue = parked_overdue or self.adapter_overdue(seq)
                idle.append(seq)
                i += 1
                continue
            before = len(idle)
            if not self._make_room(seq, seq.num_computed_tokens + num_new, out, idle):
                return parked_overdue  # seq itself was preempted; the last running one
            i -= before - len(idle)  # parked ones ranked above seq left the list
            self._schedule(seq, num_new, out)
            i += 1
        return parked_overdue

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput,
                   idle: list[Sequence]) -> bool:
        """Preempt the lowest-ranked running sequences until ``seq`` can cover
        ``num_tokens`` positions; before ``seq`` itself, if it holds an adapter slot, the
        ``idle`` ones (parked, ranked above it, lowest first): they hold blocks but wait
        for a slot, maybe the one ``seq`` holds (an outside review's long prompt went back
        and forth between its first chunk and preempting itself, its slot kept, while the
        requests parked for it held the blocks of its second). A base-model ``seq`` holds
        no slot they wait for, and preempting them for it made a livelock. False if
        ``seq`` itself had to go."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = self._running[-1]
            if victim is seq and idle and seq.adapter_slot >= 0:
                victim = idle.pop()
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.preemptions += 1
        self._running.remove(seq)
        self.block_manager.cache_computed(seq)  # its recompute may find them again
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        bisect.insort(self._waiting, seq, key=self._rank.__getitem__)
        out.preempted.append(seq)

    def _admit_waiting(self, out: SchedulerOutput, take_slots: bool) -> None:
        """Admit waiting sequences in rank order, down to the first one preempted this step.
        ``take_slots=False``: only those that need no new adapter slot (base model, or one
        still holding its slot after a preemption), so an overdue parked sequence gets the
        next slot to free."""
        floor = min(map(self._rank.__getitem__, out.preempted), default=None)
        admitted: list[Sequence] = []
        for seq in self._waiting:  # a sequence displaced meanwhile goes back behind seq
            # (ranked below it), where the floor ends the loop
            budget = self.max_num_batched_tokens - out.num_batched_tokens
            if budget <= 0 or (floor is not None and self._rank[seq] >= floor):
                break
            if not take_slots and seq.needs_adapter:
                continue
            num_new = self._chunk(seq, budget)
            if num_new <= 0:
                break  # in rank order: its fixed chunk does not fit what is left of the budget
            if self._displaced(seq, seq.num_computed_tokens + num_new) is None:
                break  # lower-ranked requests do not overtake one that waits for room
            if not self.adapter_ready(seq):
                if self.adapter_overdue(seq):
                    break  # aging: later requests do not overtake it any longer
                continue
            if not self._take_prefix(seq, out):
                continue  # next step it shares the blocks another computes now
            num_new = self._chunk(seq, budget)  # after its cached prefix: shorter
            victims = self._displaced(seq, seq.num_computed_tokens + num_new)
            if victims is None:
                num_new, victims = self._without_prefix(seq, budget)
            if victims:
                self._displace(victims, out)
                floor = min(map(self._rank.__getitem__, out.preempted))
            if self._caches(seq):
                self.block_manager.count_lookup(seq, seq.num_computed_tokens)
            if seq.num_cached_tokens < 0:  # vLLM's num_cached_tokens: at first admission
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self._running, seq, key=self._rank.__getitem__)
            self._schedule(seq, num_new, out)
            admitted.append(seq)
        for seq in admitted:
            self._waiting.remove(seq)

    def _displaced(self, seq: Sequence, num_tokens: int) -> list[Sequence] | None:
        """The running sequences that waiting ``seq`` preempts to get a seat and cover
        ``num_tokens`` positions: those ranked below it, lowest first, until there is room
        ([] when a seat and the blocks are free); None if even all of them leave too
        little."""
        bm = self.block_manager
        blocks = bm.missing(seq, num_tokens) - bm.num_free_blocks
        seats = len(self._running) + 1 - self.max_num_seqs
        if blocks <= 0 and seats <= 0:
            return []
        below = bisect.bisect(self._running, self._rank[seq], key=self._rank.__getitem__)
        lowest_first = self._running[below:][::-1]
        for n, freed in enumerate(bm.freeing(lowest_first), 1):
            if freed >= blocks and n >= seats:
                return lowest_first[:n]
        return None

    def _caches(self, seq: Sequence) -> bool:
        """Whether ``seq`` starts from the prefix cache. Prompt logprobs need the logits of
        every prompt position, so such a request computes its cached prefix again (vLLM
        skips the cache for it too)."""
        return self.prefix_identity is not None and seq.params.prompt_logprobs is None

    def _take_prefix(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Start ``seq`` after its cached prefix (when it ``_caches``); False, taking
        nothing, if a sequence scheduled this step computes its next uncached block now:
        it waits a step and shares it."""
        if not self._caches(seq):
            return True
        identity = self.prefix_identity(seq)
        bm = self.block_manager
        if bm.computed_by(seq, identity, [s.seq for s in out.scheduled]):
            return False
        seq.num_computed_tokens = bm.match_prefix(seq, identity)
        return True

    def _without_prefix(self, seq: Sequence, budget: int) -> tuple[int, list[Sequence]]:
        """``seq`` gives back the cached blocks it took and runs from its start, with the
        sequences it displaces for that: the blocks came off the free list, and its chunk
        (a long prompt's, cut by the budget) needs as many new blocks as before. The check
        before its adapter was asked for found room for this, so the adapter slot it may
        have taken is used: it never waits holding a slot that the requests parked for it
        wait for, while they hold the blocks it needs (an outside review's soak wedged so)."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        num_new = self._chunk(seq, budget)
        return num_new, self._displaced(seq, num_new)

    def _displace(self, victims: list[Sequence], out: SchedulerOutput) -> None:
        """Preempt ``victims``, taking back the work this step had scheduled for them."""
        for victim in victims:
            self._preempt(victim, out)
        if victims:
            dropped = [s for s in out.scheduled if s.seq in victims]
            out.scheduled = [s for s in out.scheduled if s.seq not in victims]
            out.num_batched_tokens -= sum(s.num_new_tokens for s in dropped)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of ``seq`` to compute now: as many as the budget allows, or with
        ``fixed_chunks`` its next whole chunk or nothing."""
        left = seq.num_tokens - seq.num_computed_tokens
        if not self.fixed_chunks:
            return min(left, budget)
        chunk = min(left, self.max_num_batched_tokens)
        return chunk if chunk <= budget else 0

    def _schedule(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> None:
        self.block_manager.allocate(seq, seq.num_computed_tokens + num_new)
        out.scheduled.append(ScheduledSeq(seq, num_new))
        out.num_batched_tokens += num_new
