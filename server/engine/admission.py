"""Adapter admission: a request is scheduled only once its adapter holds a device slot.

Hot adapters are taken without blocking; a cold one is materialized (factors regenerated,
or copied from the warm tier, and written into a slot) on worker threads while the step
loop keeps decoding everyone else. The load starts when the request is *accepted*
(``accepted``: a prefetch, in queue order), not when the scheduler reaches it; a prefetch
takes only a free slot or an idle one that no queued request wants, and leaves the slot
idle, so it never holds or evicts a slot that running or queued requests need. Every
queued request ``want``s its adapter: evictions prefer adapters nobody is waiting for.

Time slicing: when a request waits because every slot is busy, ``time_slice`` parks the
running requests of the adapter that has held its slot longest, once each of them has
produced a token and run ``quantum_steps`` steps since it got the slot. A parked request
keeps its KV blocks and its place among the running ones, but gives back its slot and
stays out of the batch until its adapter is in a slot again (a copy from the warm tier).
The slot is handed to the request that has waited longest: until that request's load
settles (or ``quantum_steps`` steps pass), no request of the parked adapter takes a slot.
So a cold request waits for one load, not for a whole request to finish; the parked ones
pay in time per output token.

Aging: a request whose adapter found every slot busy ``aging_steps`` times is *overdue*;
the scheduler then admits nobody behind it (``Scheduler.adapter_overdue``), so running
requests finish, free their slots, and it gets one. Parsing adapter bytes is not kept off
the step loop: ``Engine.add_request`` validates the adapter first, on the thread that calls
it (a worker thread under ``AsyncEngine``).
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from nolaserve.adapters.errors import NoFreeSlotError
from nolaserve.adapters.store import AdapterStore

from .sequence import Sequence

log = logging.getLogger("nolaserve.engine")
DEFAULT_AGING_STEPS = 16
DEFAULT_QUANTUM_STEPS = 8


class AdapterAdmission:
    """``ready(seq)`` is the scheduler's admission test, ``overdue(seq)`` its aging test;
    ``accepted(seq)`` starts the prefetch; ``release(seq)`` returns the slot;
    ``time_slice(running)`` runs once before each step. All of them run on the step thread;
    loads run on ``workers`` threads (FIFO). ``quantum_steps=0``: never park."""

    def __init__(self, store: AdapterStore | None, aging_steps: int = DEFAULT_AGING_STEPS,
                 workers: int = 2, quantum_steps: int = DEFAULT_QUANTUM_STEPS):
        if aging_steps < 1 or workers < 1 or quantum_steps < 0:
            raise ValueError(f"aging_steps ({aging_steps}) and workers ({workers}) must be "
                             f">= 1, quantum_steps ({quantum_steps}) >= 0")
        self.store, self.aging_steps, self.quantum_steps = store, aging_steps, quantum_steps
        self._steps = 0  # time_slice calls
        self._since: dict[Sequence, int] = {}  # the step each seq holding a slot got it
        self._handoff: _Handoff | None = None
        self.parked = 0  # requests parked so far
        self._worker = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-load")
        self._loads: dict[Sequence, Future] = {}
        self._prefetches: dict[str, Future] = {}  # adapter id -> its prefetch
        self._wanting: set[Sequence] = set()  # queued, counted in the store's ``want``
        self._slot_waits: dict[Sequence, int] = {}  # loads that found every slot busy
        self.failed: list[tuple[Sequence, Exception]] = []  # drained by the engine

    def accepted(self, seq: Sequence) -> None:
        """``seq`` was queued: mark its adapter wanted and start loading it now."""
        if not seq.needs_adapter:
            return
        self.store.want(seq.adapter_id)
        self._wanting.add(seq)
        running = self._prefetches.get(seq.adapter_id)
        if running is None or running.done():
            self._prefetches[seq.adapter_id] = self._worker.submit(self._prefetch,
                                                                   seq.adapter_id)
        if not self.store.can_take(seq.adapter_id):
            self._busy(seq)  # the next time_slice may hand it a slot

    def ready(self, seq: Sequence) -> bool:
        if not seq.needs_adapter:
            return True
        if self._handoff is not None and seq.adapter_id == self._handoff.adapter_id:
            return False  # its adapter's slot is being handed to another request
        if seq in self._loads:
            return self._collect(seq)
        slot = self.store.try_acquire(seq.adapter_id)
        if slot is not None:
            self._admitted(seq, slot)
            return True
        if not self.store.can_take(seq.adapter_id):
            self._busy(seq)  # every slot busy: no load to start
            return False
        prefetch = self._prefetches.get(seq.adapter_id)
        if prefetch is not None and not prefetch.done():
            return False  # its prefetch is loading it (or queued to)
        self._prefetches.pop(seq.adapter_id, None)
        self._loads[seq] = self._worker.submit(self.store.acquire, seq.adapter_id)
        return False

    def overdue(self, seq: Sequence) -> bool:
        """Whether ``seq`` waited past the aging bound for a slot: admit nobody behind it."""
        return self._slot_waits.get(seq, 0) >= self.aging_steps

    def time_slice(self, running: tuple[Sequence, ...]) -> None:
        """Before a step: if a request waits for a slot (every slot was busy) and no handoff
        is under way, park the running requests of the adapter that has held its slot
        longest, among those whose requests each have a token and ``quantum_steps`` steps
        in it (none is pinned); its slot goes to the request that has waited longest."""
        self._steps += 1
        handoff = self._handoff
        if handoff is not None and self._steps - handoff.step > self.quantum_steps:
            self._handoff = handoff = None  # its target never took the slot: give up
        if not self.quantum_steps or handoff is not None:
            return
        target = next((s for s in self._slot_waits if s not in self._loads), None)
        victims = self._victims(running) if target is not None else []
        if victims:
            self._handoff = _Handoff(target, victims[0].adapter_id, self._steps)
            for seq in victims:
                self._park(seq)
            # its load starts now, not when the scheduler reaches it (a step later)
            self._loads[target] = self._worker.submit(self.store.acquire, target.adapter_id)

    def _victims(self, running: tuple[Sequence, ...]) -> list[Sequence]:
        """The running requests of the adapter to park, or [] if none may be."""
        by_adapter: dict[str, list[Sequence]] = {}
        for seq in running:
            if seq.adapter_id is not None and seq.adapter_slot >= 0:
                by_adapter.setdefault(seq.adapter_id, []).append(seq)
        pinned = self.store.slot_snapshot().pinned if by_adapter else frozenset()
        ripe = [(max(self._since[s] for s in seqs), seqs) for adapter, seqs in by_adapter.items()
                if adapter not in pinned and all(self._ripe(s) for s in seqs)]
        return min(ripe, key=lambda r: r[0])[1] if ripe else []

    def _ripe(self, seq: Sequence) -> bool:
        return bool(seq.output_token_ids) and \
            self._steps - self._since[seq] >= self.quantum_steps

    def _park(self, seq: Sequence) -> None:
        self.store.release(seq.adapter_slot)
        seq.adapter_slot = -1
        del self._since[seq]
        self.store.want(seq.adapter_id)
        self._wanting.add(seq)
        self.parked += 1

    def _end_handoff(self, seq: Sequence) -> None:
        if self._handoff is not None and self._handoff.target is seq:
            self._handoff = None

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
        self._end_handoff(seq)
        prefetch = self._prefetches.get(seq.adapter_id) if seq.adapter_id else None
        if prefetch is not None and prefetch.done():
            del self._prefetches[seq.adapter_id]
        load = self._loads.pop(seq, None)
        if load is not None:
            load.add_done_callback(self._release_future)
        if seq.adapter_slot >= 0:
            self.store.release(seq.adapter_slot)
            seq.adapter_slot = -1

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
        self._end_handoff(seq)

    def _unwant(self, seq: Sequence) -> None:
        if seq in self._wanting:
            self._wanting.remove(seq)
            self.store.unwant(seq.adapter_id)

    def _collect(self, seq: Sequence) -> bool:
        load = self._loads[seq]
        if not load.done():
            return False
        del self._loads[seq]
        try:
            slot = load.result()
        except NoFreeSlotError:
            self._busy(seq)
            self._end_handoff(seq)  # another load took the slot handed to it
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
        self._worker.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class _Handoff:
    """``adapter_id``'s requests were parked at ``step`` so that ``target`` gets a slot."""

    target: Sequence
    adapter_id: str
    step: int
