"""Adapter admission: a request is scheduled only once its adapter holds a device slot.

Hot adapters are taken without blocking; a cold one is materialized (factors regenerated
and copied into a slot) on a worker thread while the step loop keeps decoding everyone
else. Parsing its bytes is not kept off the step loop: ``Engine.add_request`` validates
the adapter first, on the thread that calls it (the step thread under ``AsyncEngine``),
and that parse fills the host cache the worker then reads.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from nolaserve.adapters.errors import NoFreeSlotError
from nolaserve.adapters.store import AdapterStore

from .sequence import Sequence


class AdapterAdmission:
    """``ready(seq)`` is the scheduler's admission test; ``release(seq)`` returns the slot."""

    def __init__(self, store: AdapterStore | None):
        self.store = store
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load")
        self._loads: dict[Sequence, Future] = {}
        self.failed: list[tuple[Sequence, Exception]] = []  # drained by the engine

    def ready(self, seq: Sequence) -> bool:
        if not seq.needs_adapter:
            return True
        if seq in self._loads:
            return self._collect(seq)
        slot = self.store.try_acquire(seq.adapter_id)
        if slot is not None:
            seq.adapter_slot = slot
            return True
        self._loads[seq] = self._worker.submit(self.store.acquire, seq.adapter_id)
        return False

    def wait(self, timeout: float) -> None:
        """Block until a pending load finishes (or ``timeout``), instead of spinning."""
        if self._loads:
            wait(list(self._loads.values()), timeout=timeout, return_when=FIRST_COMPLETED)

    def release(self, seq: Sequence) -> None:
        """Give back the seq's slot, or the slot its pending load will return."""
        load = self._loads.pop(seq, None)
        if load is not None:
            load.add_done_callback(self._release_future)
        if seq.adapter_slot >= 0:
            self.store.release(seq.adapter_slot)
            seq.adapter_slot = -1

    def _collect(self, seq: Sequence) -> bool:
        load = self._loads[seq]
        if not load.done():
            return False
        del self._loads[seq]
        try:
            seq.adapter_slot = load.result()
        except NoFreeSlotError:
            return False  # every slot busy: try again on a later step
        except Exception as e:  # unknown, deleted or broken adapter: fail this request only
            self.failed.append((seq, e))
            return False
        return True

    def _release_future(self, load: Future) -> None:
        if load.exception() is None:
            self.store.release(load.result())

    def close(self) -> None:
        self._worker.shutdown(wait=True)
