"""Adapter admission: a request is scheduled only once its adapter holds a device slot.

Hot adapters are taken without blocking; a cold one is materialized (factors regenerated,
or copied from the warm tier, and written into a slot) on worker threads while the step
loop keeps decoding everyone else. The load starts when the request is *accepted*
(``accepted``: a prefetch), not when the scheduler reaches it; queued loads start in
``LoadQueue`` order, cheapest first, so one tenant's costly loads do not hold another's
small one behind all of them; a prefetch takes only a free slot or an idle one that no
queued request wants, and leaves the slot idle, so it never holds or evicts a slot that
running or queued requests need; evictions prefer adapters no queued request ``want``s.

Time slicing: when requests wait because every slot is busy, ``time_slice`` parks the
running requests of the slots held longest, once each of them has produced a token and run
``quantum_steps`` steps since it got the slot: one slot for each waiting request whose
factors are a copy away (in the warm tier, or held by a parked one) and that the scheduler
could run to its next token now (room in ``max_num_seqs`` and free KV blocks for all its
tokens: a slot never goes to a request that cannot use it, or parked requests holding the
KV blocks it needs would wait for that slot forever; after each schedule ``settle`` takes
back every slot a waiting request holds), overdue ones first, then those with the fewest
tokens. A parked request keeps its KV blocks and its place among the running ones, gives
back its slot, holds its factors (the warm tier's entry, by reference, or a host copy of
the slot) and sits steps out until they are copied into a slot again, under the key of
those weights (one slot for every request parked off them): a replace or delete meanwhile
does not change its weights. The waiting request's copy runs at once, on the step thread (a
few ms), so the slot is not left idle for a step: a cold request waits for one copy, not
for a whole request to finish; the parked ones pay in time per output token.

Aging: a request whose adapter found every slot busy ``aging_steps`` times is *overdue*;
the scheduler then admits nobody behind it (``Scheduler.adapter_overdue``), so running
requests finish, free their slots, and it gets one. Parsing adapter bytes is kept off the
step loop: the adapter is checked before the request reaches it (``AsyncEngine.check``, on a
worker thread; ``Engine.add_request`` on its caller's thread when called directly).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from nolaserve.adapters import cpu_threads
from nolaserve.adapters.errors import AdapterNotFoundError, NoFreeSlotError, short
from nolaserve.adapters.spec import AdapterFactors
from nolaserve.adapters.store import AdapterStore

from .load_queue import LoadQueue
from .prefix_cache import BASE_IDENTITY, salted
from .sequence import Sequence, SequenceStatus

log = logging.getLogger("nolaserve.engine")
DEFAULT_AGING_STEPS = 16
DEFAULT_QUANTUM_STEPS = 2


class AdapterAdmission:
    """``ready(seq)`` is the scheduler's admission test, ``overdue(seq)`` its aging test;
    ``accepted(seq)`` starts the prefetch; ``release(seq)`` returns the slot;
    ``time_slice(running)`` runs once before each step. All of them run on the step thread;
    loads run on ``workers`` threads, in ``LoadQueue`` order. ``quantum_steps=0``: never
    park."""

    def __init__(self, store: AdapterStore | None, aging_steps: int = DEFAULT_AGING_STEPS,
                 workers: int = 2, quantum_steps: int = DEFAULT_QUANTUM_STEPS):
        if aging_steps < 1 or workers < 1 or quantum_steps < 0:
            raise ValueError(f"aging_steps ({aging_steps}) and workers ({workers}) must be "
                             f">= 1, quantum_steps ({quantum_steps}) >= 0")
        self.store, self.aging_steps, self.quantum_steps = store, aging_steps, quantum_steps
        self._steps = 0  # time_slice calls
        self._since: dict[Sequence, int] = {}  # the step each seq holding a slot got it
        self.parked = 0  # requests parked so far
        self._worker = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-load",
                                          initializer=cpu_threads.serial)
        self._queue: LoadQueue[tuple[Future, Callable, tuple]] = LoadQueue()
        self._queue_lock = threading.Lock()
        self._loads: dict[Sequence, Future] = {}
        self._prefetches: dict[str, Future] = {}  # adapter id -> its prefetch
        self._left: set[str] = set()  # ids whose requests left before their prefetch ended
        self._wanting: dict[Sequence, str] = {}  # waiting seq -> the key it ``want``s
        self._held: dict[Sequence, tuple[str, AdapterFactors]] = {}  # parked: key, factors
        self._slot_waits: dict[Sequence, int] = {}  # loads that found every slot busy
        self._asked: set[Sequence] = set()  # reached by this step's schedule (``ready``)
        self.failed: list[tuple[Sequence, Exception]] = []  # drained by the engine

    def accepted(self, seq: Sequence) -> None:
        """``seq`` was queued: mark its adapter wanted and start loading it now."""
        if not seq.needs_adapter:
            return
        self._want(seq, seq.adapter_id)
        running = self._prefetches.get(seq.adapter_id)
        if running is None or running.done():
            self._prefetches[seq.adapter_id] = self._submit(
                self.store.load_cost(seq.adapter_id), self._prefetch, seq.adapter_id)
        if not self.store.can_take(seq.adapter_id):
            self._busy(seq)  # the next time_slice may hand it a slot

    def ready(self, seq: Sequence) -> bool:
        self._asked.add(seq)
        if not seq.needs_adapter:
            return True
        if seq.adapter_slot < 0 and seq not in self._held and \
                self.store.deletes.since(seq.adapter_id, seq.checked_at):
            self.failed.append((seq, AdapterNotFoundError(
                f"no adapter is registered under id {short(seq.adapter_id)} for this "
                "request: it was deleted after the request was accepted")))
            return False
        key = self._key(seq)
        if seq in self._loads:
            return self._collect(seq)
        slot = self.store.try_acquire(key)
        if slot is not None:
            self._admitted(seq, slot)
            return True
        if not self.store.can_take(key):
            self._busy(seq)  # every slot busy: no load to start
            return False
        if seq not in self._held:  # a parked one loads its own factors: no prefetch
            prefetch = self._prefetches.get(key)
            if prefetch is not None and not prefetch.done():
                return False  # its prefetch is loading it (or queued to)
            self._prefetches.pop(key, None)
        self._load(seq)
        return False

    def cache_identity(self, seq: Sequence) -> str:
        """The prefix cache's key for the weights in ``seq``'s slot: ``id@version``/base,
        salted with the request's ``cache_salt``."""
        version = self.store.slots.version_of(seq.adapter_slot) if seq.adapter_id else None
        return salted(BASE_IDENTITY if version is None else f"{seq.adapter_id}@{version}",
                      seq.params.cache_salt)

    def overdue(self, seq: Sequence) -> bool:
        """Whether ``seq`` waited past the aging bound for a slot: admit nobody behind it."""
        return self._slot_waits.get(seq, 0) >= self.aging_steps

    def time_slice(self, running: tuple[Sequence, ...],
                   admissible: Callable[[Sequence], bool] = lambda s: True) -> None:
        """Before a step: hand slots to the requests that wait because every slot was busy,
        whose factors are at hand and that the scheduler could run to their next token now
        (``admissible``: room in ``max_num_seqs`` and free KV blocks for all their tokens;
        ``_targets``), one slot each while ripe
        ones last (``_victims``): park that slot's requests, then load the waiting one's
        factors into a slot on this thread, a copy, so the scheduler admits it in this
        step (``settle`` takes back a slot the scheduler then did not use)."""
        self._steps += 1
        if not self.quantum_steps:
            return
        for target in filter(admissible, self._targets()):
            victims = self._victims(running)
            if victims is None:
                return
            seqs, held = victims
            for seq in seqs:
                self._park(seq, held)
            self._load_now(target)

    def settle(self, waiting: tuple[Sequence, ...], preempted: list[Sequence]) -> None:
        """After the step's schedule, no slot waits for a request the scheduler did not
        reach (behind an overdue one, or one that waits for KV blocks: in rank order, as the
        scheduler admits) while the requests that could run (parked ones, an overdue one) wait for a
        slot: nothing would progress, ever. A finished load nobody collected gives its
        reference back (the slot stays loaded, idle: the request's next ``ready`` finds
        it there unless another needed it); a waiting request holding a slot that this
        step did not reach is parked, its weights held, as a running one's. One
        ``preempted`` in this step keeps its slot for the next, which reaches it first."""
        for seq, load in list(self._loads.items()):
            if seq.status is SequenceStatus.WAITING and load.done() and \
                    load.exception() is None:
                del self._loads[seq]
                self._release_future(load)
        for seq in waiting:
            if seq.adapter_slot >= 0 and seq not in self._asked and seq not in preempted:
                self._park(seq, self._hold(seq))
        self._asked.clear()

    def _targets(self) -> list[Sequence]:
        """Requests that found every slot busy and whose factors are a copy away (held by
        a parked one, or in the warm tier): overdue ones first, then those with fewer
        tokens so far (a first token before a parked request's next one), then the one
        that has waited longest."""
        waiting = [s for s in self._slot_waits if s not in self._loads
                   and (s in self._held or self.store.warm_holds(s.adapter_id))]
        return sorted(waiting, key=lambda s: (not self.overdue(s), len(s.output_token_ids)))

    def _victims(self, running: tuple[Sequence, ...]
                 ) -> tuple[list[Sequence], tuple[str, AdapterFactors]] | None:
        """The requests to park (all those of one slot) and the key and factors they will
        resume with, or None. A request parked for the first time gets the key of its
        slot's weights (``<adapter id>#parked-<version>``: no adapter id has a ``#``) and
        holds the factors of
        its slot (``AdapterStore.held_factors``: the warm tier's entry by reference, or a
        host copy of the slot), so that a replace or delete meanwhile does not change its
        weights."""
        by_slot: dict[int, list[Sequence]] = {}
        for seq in running:
            if seq.adapter_id is not None and seq.adapter_slot >= 0:
                by_slot.setdefault(seq.adapter_slot, []).append(seq)
        pinned = self.store.slot_snapshot().pinned if by_slot else frozenset()
        oldest = min(((max(self._since[s] for s in seqs), slot, seqs)
                      for slot, seqs in by_slot.items()
                      if self._key(seqs[0]) not in pinned and all(map(self._ripe, seqs))),
                     default=None)
        return None if oldest is None else (oldest[2], self._hold(oldest[2][0]))

    def _hold(self, seq: Sequence) -> tuple[str, AdapterFactors]:
        """The key and factors ``seq`` resumes with once parked: the key of the weights in
        its slot (their version), so that requests parked off the same weights resume in
        one slot, not in a slot each."""
        held = self._held.get(seq)
        if held is None:
            version = self.store.slots.version_of(seq.adapter_slot)
            held = (f"{seq.adapter_id}#parked-{version}",
                    self.store.held_factors(seq.adapter_id, seq.adapter_slot))
        return held

    def _ripe(self, seq: Sequence) -> bool:
        """Decoding (a first token, and no prompt or recompute left to compute: parked
        after each chunk of the recompute that a preemption left it, an outside review's
        soak request lost its slot and blocks over and over, never reaching its next
        token) for ``quantum_steps`` steps in its slot."""
        return bool(seq.output_token_ids) and \
            seq.num_computed_tokens + 1 >= seq.num_tokens and \
            self._steps - self._since[seq] >= self.quantum_steps

    def _park(self, seq: Sequence, held: tuple[str, AdapterFactors]) -> None:
        self.store.release(seq.adapter_slot)
        seq.adapter_slot = -1
        self._since.pop(seq, None)
        self._held[seq] = held
        self._want(seq, held[0])
        self.parked += 1

    def _key(self, seq: Sequence) -> str:
        """The slot key ``seq`` takes: its adapter id, or once parked its weights' key."""
        held = self._held.get(seq)
        return seq.adapter_id if held is None else held[0]

    def _load(self, seq: Sequence) -> None:
        """Start ``seq``'s admission-time load on a worker."""
        args = self._load_args(seq)
        self._loads[seq] = self._submit(self.store.load_cost(*args), self.store.acquire, *args)

    def _submit(self, cost: int, fn: Callable, *args) -> Future:
        """Queue ``fn(*args)``, of estimated ``cost``, for the workers."""
        future: Future = Future()
        with self._queue_lock:
            self._queue.push((future, fn, args), cost)
        self._worker.submit(self._run_next)
        return future

    def _run_next(self) -> None:
        """On a worker, once per ``_submit``: run the job the queue puts first."""
        with self._queue_lock:
            future, fn, args = self._queue.pop()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # as ThreadPoolExecutor does: the caller sees it
                future.set_exception(e)

    def _load_now(self, seq: Sequence) -> None:
        """``_load`` on this thread: its result is there for the scheduler's ``ready``."""
        load: Future = Future()
        try:
            load.set_result(self.store.acquire(*self._load_args(seq)))
        except Exception as e:  # ``_collect`` sorts it out, as for a worker's load
            load.set_exception(e)
        self._loads[seq] = load

    def _load_args(self, seq: Sequence) -> tuple:
        """``acquire``'s arguments for ``seq``: its adapter, or once parked its own key and
        factors."""
        held = self._held.get(seq)
        return (seq.adapter_id,) if held is None else held

    def wait(self, timeout: float) -> None:
        """Block until a pending load finishes (or ``timeout``), instead of spinning."""
        pending = [f for f in (*self._loads.values(), *self._prefetches.values())
                   if not f.done()]
        if pending:
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    def release(self, seq: Sequence) -> None:
        """Give back the seq's slot, or the slot its pending load will return."""
        self._unwant(seq)
        self._slot_waits.pop(seq, None)
        self._since.pop(seq, None)
        self._held.pop(seq, None)
        self._asked.discard(seq)
        if seq.adapter_id in self._prefetches:
            self._left.add(seq.adapter_id)
        self._forget_prefetches()
        load = self._loads.pop(seq, None)
        if load is not None:
            load.add_done_callback(self._release_future)
        if seq.adapter_slot >= 0:
            self.store.release(seq.adapter_slot)
            seq.adapter_slot = -1

    def _forget_prefetches(self) -> None:
        """Drop the ended prefetches of ids whose requests left: an id never asked for
        again (deleted) kept its entry for good. Those still loading wait for a later
        release (a prefetch only warms the caches: a request finding none loads itself)."""
        for adapter_id in list(self._left):
            prefetch = self._prefetches.get(adapter_id)
            if prefetch is None or prefetch.done():
                self._prefetches.pop(adapter_id, None)
                self._left.discard(adapter_id)

    def _prefetch(self, adapter_id: str) -> None:
        try:
            self.store.prefetch(adapter_id)
        except Exception as e:  # deleted, broken: its request's own acquire reports it
            log.debug("prefetch of %r failed: %r", adapter_id, e)

    def _admitted(self, seq: Sequence, slot: int) -> None:
        seq.adapter_slot = slot
        self._since[seq] = self._steps
        self._unwant(seq)
        self._slot_waits.pop(seq, None)

    def _want(self, seq: Sequence, key: str) -> None:
        self.store.want(key)
        self._wanting[seq] = key

    def _unwant(self, seq: Sequence) -> None:
        key = self._wanting.pop(seq, None)
        if key is not None:
            self.store.unwant(key)

    def _collect(self, seq: Sequence) -> bool:
        load = self._loads[seq]
        if not load.done():
            return False
        del self._loads[seq]
        try:
            slot = load.result()
        except NoFreeSlotError:
            self._busy(seq)
            return False  # every slot busy: try again on a later step
        except Exception as e:  # unknown, deleted or broken adapter: fail this request only
            self.failed.append((seq, e))
            return False
        self._admitted(seq, slot)
        return True

    def _busy(self, seq: Sequence) -> None:
        """``seq``'s adapter found every slot busy once more (the aging count)."""
        self._slot_waits[seq] = self._slot_waits.get(seq, 0) + 1

    def _release_future(self, load: Future) -> None:
        if not load.cancelled() and load.exception() is None:
            self.store.release(load.result())

    def close(self) -> None:
        """Wait for the running loads; cancel the queued ones."""
        self._worker.shutdown(wait=True, cancel_futures=True)
        with self._queue_lock:
            for future, _, _ in self._queue.drain():
                future.cancel()

