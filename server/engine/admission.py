"""Adapter admission: a request is scheduled only once its adapter holds a device slot.

Hot adapters are taken without blocking; a cold one is materialized (factors regenerated,
or copied from the warm tier, and written into a slot) on worker threads while the step
loop keeps decoding everyone else. The load starts when the request is *accepted*
(``accepted``: a prefetch, in queue order), not when the scheduler reaches it; a prefetch
takes only a free slot or an idle one that no queued request wants, and leaves the slot
idle, so it never holds or evicts a slot that running or queued requests need. Every
queued request ``want``s its adapter: evictions prefer adapters nobody is waiting for.

Aging: a request whose adapter found every slot busy ``aging_steps`` times is *overdue*;
the scheduler then admits nobody behind it (``Scheduler.adapter_overdue``), so running
requests finish, free their slots, and it gets one. Parsing adapter bytes is not kept off
the step loop: ``Engine.add_request`` validates the adapter first, on the thread that calls
it (a worker thread under ``AsyncEngine``).
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from nolaserve.adapters.errors import NoFreeSlotError
from nolaserve.adapters.store import AdapterStore

from .sequence import Sequence

log = logging.getLogger("nolaserve.engine")
DEFAULT_AGING_STEPS = 16


class AdapterAdmission:
    """``ready(seq)`` is the scheduler's admission test, ``overdue(seq)`` its aging test;
    ``accepted(seq)`` starts the prefetch; ``release(seq)`` returns the slot. All of them
    run on the step thread; loads run on ``workers`` threads (FIFO)."""

    def __init__(self, store: AdapterStore | None, aging_steps: int = DEFAULT_AGING_STEPS,
                 workers: int = 2):
        if aging_steps < 1 or workers < 1:
            raise ValueError(f"aging_steps ({aging_steps}) and workers ({workers}) must be "
                             ">= 1")
        self.store, self.aging_steps = store, aging_steps
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

    def ready(self, seq: Sequence) -> bool:
        if not seq.needs_adapter:
            return True
        if seq in self._loads:
            return self._collect(seq)
        slot = self.store.try_acquire(seq.adapter_id)
        if slot is not None:
            self._admitted(seq, slot)
            return True
        prefetch = self._prefetches.get(seq.adapter_id)
        if prefetch is not None and not prefetch.done():
            return False  # its prefetch is loading it (or queued to)
        self._prefetches.pop(seq.adapter_id, None)
        self._loads[seq] = self._worker.submit(self.store.acquire, seq.adapter_id)
        return False

    def overdue(self, seq: Sequence) -> bool:
        """Whether ``seq`` waited past the aging bound for a slot: admit nobody behind it."""
        return self._slot_waits.get(seq, 0) >= self.aging_steps

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
        self._unwant(seq)
        self._slot_waits.pop(seq, None)

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
            self._slot_waits[seq] = self._slot_waits.get(seq, 0) + 1
            return False  # every slot busy: try again on a later step
        except Exception as e:  # unknown, deleted or broken adapter: fail this request only
            self.failed.append((seq, e))
            return False
        self._admitted(seq, slot)
        return True

    def _release_future(self, load: Future) -> None:
        if not load.cancelled() and load.exception() is None:
            self.store.release(load.result())

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
