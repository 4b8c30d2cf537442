"""Which adapter lives in which device slot: the slot policy in pure Python (no torch).

Refcounts, pins, LRU eviction of idle slots (preferring adapters no queued request wants)
and invalidation; ``SlotPool`` (slots.py) owns the tensors and drives this table.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

from .errors import (
    AdapterError,
    AdapterNotFoundError,
    LimitExceededError,
    NoFreeSlotError,
    short,
)


class Acquired(enum.Enum):
    """What ``SlotTable.acquire`` found: the adapter ready in its slot, a load in flight to
    wait for, or a freshly reserved slot the caller must load."""

    HIT = "hit"
    WAIT = "wait"
    LOAD = "load"


@dataclass
class _Slot:
    adapter_id: str | None = None
    refcount: int = 0
    pinned: bool = False
    loading: bool = False
    stale: bool = False  # invalidated while in use: dropped at its last release
    unclaimed: bool = False  # loaded by a prefetch: its request's acquire is no hit


class SlotTable:
    """Which adapter occupies which of ``num_slots`` slots; no tensors.

    A slot is free, loading or ready. Ready slots with refcount 0 that are neither pinned
    nor stale are idle and kept in LRU order; a miss takes a free slot first, else the least
    recently used idle one whose adapter is not *wanted* (no queued request for it, see
    ``want``), else the least recently used idle one. A miss with ``steal=False`` (a
    prefetch) never evicts a wanted adapter. Counters: ``hits`` (acquires that started no
    load, but the first after a prefetch: that request's load was the prefetch's miss),
    ``misses`` (loads started) and ``evictions`` (resident adapters pushed out by a miss).
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be at least 1, got {num_slots}")
        self.num_slots = num_slots
        self._slots = [_Slot() for _ in range(num_slots)]
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: slot 0 is used first
        self._idle: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._by_id: dict[str, int] = {}  # current (not stale) slot of each resident id
        self._wanted: dict[str, int] = {}  # adapter id -> queued requests that want it
        self.hits = self.misses = self.evictions = 0
        self.pinned = 0

    @property
    def used(self) -> int:
        """Slots that hold an adapter (loading, ready or stale)."""
        return self.num_slots - len(self._free)

    def slot_of(self, adapter_id: str) -> int | None:
        """The current slot of ``adapter_id`` (loading or ready), or None."""
        return self._by_id.get(adapter_id)

    def ready_slot_of(self, adapter_id: str) -> int | None:
        """The slot of ``adapter_id`` if it is resident and loaded, else None."""
        slot = self._by_id.get(adapter_id)
        return None if slot is None or self._slots[slot].loading else slot

    def ready_ids(self) -> frozenset[str]:
        """The adapters resident and loaded."""
        return frozenset(i for i, s in self._by_id.items() if not self._slots[s].loading)

    def pinned_ids(self) -> frozenset[str]:
        return frozenset(i for i, s in self._by_id.items() if self._slots[s].pinned)

    def refcount(self, slot: int) -> int:
        return self._slots[slot].refcount

    def is_pinned(self, adapter_id: str) -> bool:
        slot = self._by_id.get(adapter_id)
        return slot is not None and self._slots[slot].pinned

    def want(self, adapter_id: str) -> None:
        """A queued request wants ``adapter_id``: evict it only when no other idle slot is
        left. Pair with ``unwant`` when the request is admitted or ends."""
        self._wanted[adapter_id] = self._wanted.get(adapter_id, 0) + 1

    def unwant(self, adapter_id: str) -> None:
        n = self._wanted.get(adapter_id, 0) - 1
        if n > 0:
            self._wanted[adapter_id] = n
        else:
            self._wanted.pop(adapter_id, None)

    def is_wanted(self, adapter_id: str) -> bool:
        return adapter_id in self._wanted

    def can_take(self, adapter_id: str) -> bool:
        """Whether ``acquire(adapter_id)`` would not raise ``NoFreeSlotError``: the adapter
        is resident (or loading), or a slot is free or idle."""
        return adapter_id in self._by_id or bool(self._free) or bool(self._idle)

    def acquire(self, adapter_id: str, prefetch: bool = False) -> tuple[int, Acquired]:
        """Take a reference on the slot of ``adapter_id``, reserving one on a miss.

        On ``LOAD`` the caller must fill the slot and call ``loaded`` or ``abort``; on
        ``WAIT`` another caller is loading it. Raises ``NoFreeSlotError`` when every slot is
        in use, loading, stale or pinned, or (``prefetch``) when the only idle slots hold
        wanted adapters.
        """
        slot = self._by_id.get(adapter_id)
        if slot is not None:
            s = self._slots[slot]
            s.refcount += 1
            self._idle.pop(slot, None)
            self.hits += not s.unclaimed
            s.unclaimed = False
            return slot, Acquired.WAIT if s.loading else Acquired.HIT
        slot = self._take_slot(steal=not prefetch)
        self._slots[slot] = _Slot(adapter_id, refcount=1, loading=True, unclaimed=prefetch)
        self._by_id[adapter_id] = slot
        self.misses += 1
        return slot, Acquired.LOAD

    def loaded(self, slot: int) -> None:
        """The load of ``slot`` finished: it is ready."""
        self._slots[slot].loading = False

    def abort(self, slot: int) -> None:
        """The load of ``slot`` failed: free it, dropping every reference on it (the waiters
        get the error and do not release) and its pin."""
        s = self._slots[slot]
        if self._by_id.get(s.adapter_id) == slot:
            del self._by_id[s.adapter_id]
        self.pinned -= s.pinned  # a pin taken while it loaded goes with it
        self._free_slot(slot)

    def release(self, slot: int) -> None:
        """Drop one reference on ``slot`` (as returned by ``acquire``)."""
        s = self._slots[slot]
        if s.refcount < 1 or s.loading:
            raise AdapterError(f"release of slot {slot} which holds no acquired reference")
        s.refcount -= 1
        if s.refcount == 0:
            if s.stale:
                self._free_slot(slot)
            elif not s.pinned:
                self._idle[slot] = None

    def check_pin(self, adapter_id: str) -> None:
        """Raise ``LimitExceededError`` if pinning ``adapter_id`` would leave every slot
        pinned."""
        if not self.is_pinned(adapter_id) and self.pinned + 1 >= self.num_slots:
            raise LimitExceededError(
                f"cannot pin {short(adapter_id)}: {self.pinned} of {self.num_slots} slots are "
                "pinned and at least one must stay unpinned; unpin an adapter first"
            )

    def pin(self, adapter_id: str) -> None:
        """Keep the resident ``adapter_id`` in its slot until ``unpin`` or ``invalidate``."""
        slot = self._by_id.get(adapter_id)
        if slot is None:
            raise AdapterNotFoundError(f"adapter {short(adapter_id)} is not resident; load it "
                                       f"first")
        self.check_pin(adapter_id)
        s = self._slots[slot]
        if not s.pinned:
            s.pinned = True
            self.pinned += 1
            self._idle.pop(slot, None)

    def unpin(self, adapter_id: str) -> None:
        """Make ``adapter_id`` evictable again; a no-op if it is not pinned."""
        slot = self._by_id.get(adapter_id)
        if slot is None or not self._slots[slot].pinned:
            return
        s = self._slots[slot]
        s.pinned = False
        self.pinned -= 1
        if s.refcount == 0 and not s.loading:
            self._idle[slot] = None

    def invalidate(self, adapter_id: str) -> None:
        """Forget ``adapter_id`` (deleted or replaced), pin included: an idle slot is freed
        now; one in use or loading turns stale, so that new acquires load the new version
        into another slot while current users finish with the old weights."""
        slot = self._by_id.pop(adapter_id, None)
        if slot is None:
            return
        s = self._slots[slot]
        if s.pinned:
            s.pinned = False
            self.pinned -= 1
        if s.refcount == 0:
            self._idle.pop(slot, None)
            self._free_slot(slot)
        else:
            s.stale = True

    def check_invariants(self) -> None:
        """Raise ``AdapterError`` if the bookkeeping is inconsistent (a debugging aid)."""
        free, idle = set(self._free), set(self._idle)
        problems = [len(free) != len(self._free), free & idle,
                    self.pinned != sum(s.pinned for s in self._slots)]
        for i, s in enumerate(self._slots):
            is_idle = s.adapter_id is not None and s.refcount == 0 and not (
                s.pinned or s.loading or s.stale)
            problems += [(i in free) != (s.adapter_id is None), (i in idle) != is_idle,
                         s.refcount < 0, s.loading and s.refcount < 1,
                         s.stale and (s.refcount < 1 or s.pinned),
                         s.adapter_id is not None and not s.stale
                         and self._by_id.get(s.adapter_id) != i]
        problems.append(any(self._slots[j].adapter_id != k for k, j in self._by_id.items()))
        if any(problems):
            raise AdapterError(f"slot table is inconsistent: {self._slots}")

    def _take_slot(self, steal: bool) -> int:
        if self._free:
            return self._free.pop()
        slot = next((i for i in self._idle if self._slots[i].adapter_id not in self._wanted),
                    None)
        if slot is None and steal and self._idle:
            slot = next(iter(self._idle))
        if slot is None:
            raise NoFreeSlotError(
                f"all {self.num_slots} adapter slots are in use or pinned ({self.pinned} "
                "pinned); retry when a request finishes"
            )
        del self._idle[slot]
        del self._by_id[self._slots[slot].adapter_id]
        self.evictions += 1
        return slot

    def _free_slot(self, slot: int) -> None:
        self._slots[slot] = _Slot()
        self._free.append(slot)
