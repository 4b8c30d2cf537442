"""Host-memory LRU of parsed adapters, bounded by entry count and by bytes.

Pure Python: cached objects only need an ``nbytes`` attribute (``AdapterFactors`` and the
parsed adapter kinds have one).
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .single_flight import Flight

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_BYTES = 2 << 30


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache counters and occupancy."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int


class HostCache:
    """Thread-safe LRU of parsed adapters keyed by id.

    Holds at most ``max_entries`` objects and ``max_bytes`` bytes (the sum of their
    ``nbytes``); the least recently used entries go first. An object larger than
    ``max_bytes`` is never cached.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"max_entries ({max_entries}) and max_bytes ({max_bytes}) "
                             "must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()  # id -> (obj, nbytes)
        self._loads: dict[str, Flight] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0

    def get(self, adapter_id: str) -> Any | None:
        """The cached object (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            obj = self._lookup(adapter_id)
            self._misses += obj is None
            return obj

    def peek(self, adapter_id: str) -> Any | None:
        """The cached object, or None, without touching the LRU order or the counters."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            return None if entry is None else entry[0]

    def pop(self, adapter_id: str) -> Any | None:
        """Drop ``adapter_id`` (deleted or replaced) and return its object, or None.

        A ``get_or_load`` of that id in flight keeps its result out of the cache.
        """
        with self._lock:
            self._loads.pop(adapter_id, None)
            entry = self._entries.pop(adapter_id, None)
            if entry is None:
                return None
            self._bytes -= entry[1]
            return entry[0]

    def get_or_load(self, adapter_id: str, loader: Callable[[str], Any],
                    count_hit: bool = True) -> Any:
        """The cached object, else ``loader(adapter_id)`` (called outside the lock) cached
        and returned. Concurrent callers for the same id share one loader call and its
        result or exception. A miss is counted once per loader call (callers that wait for
        it count none), a hit only with ``count_hit``."""
        with self._lock:
            obj = self._lookup(adapter_id, count_hit)
            if obj is not None:
                return obj
            flight = self._loads.get(adapter_id)
            if flight is not None:
                owner = False
            else:
                flight = self._loads[adapter_id] = Flight()
                owner = True
                self._misses += 1
        if not owner:
            return flight.wait()

        def load() -> Any:
            value = loader(adapter_id)
            _nbytes(value)  # an uncacheable value fails the load, for every waiter
            return value

        def settle(value: Any, error: BaseException | None) -> None:
            with self._lock:
                if self._loads.get(adapter_id) is not flight:
                    return  # popped meanwhile (deleted or replaced): keep it out
                del self._loads[adapter_id]
                if error is None:
                    self._insert(adapter_id, value, _nbytes(value))

        return flight.run(load, settle)

    @property
    def stats(self) -> CacheStats:
        """Counters since creation and the current occupancy."""
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, len(self._entries),
                              self._bytes)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, adapter_id: object) -> bool:
        """Membership without touching the LRU order or the counters."""
        return adapter_id in self._entries

    # -- helpers (called with the lock held) ------------------------------------------

    def _lookup(self, adapter_id: str, count_hit: bool = True) -> Any | None:
        entry = self._entries.get(adapter_id)
        if entry is None:
            return None
        self._hits += count_hit
        self._entries.move_to_end(adapter_id)
        return entry[0]

    def _insert(self, adapter_id: str, obj: Any, nbytes: int) -> bool:
        old = self._entries.pop(adapter_id, None)
        if old is not None:
            self._bytes -= old[1]
        if nbytes > self.max_bytes:
            return False
        self._entries[adapter_id] = (obj, nbytes)
        self._bytes += nbytes
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self._bytes -= freed
            self._evictions += 1
        return True


def _nbytes(obj: Any) -> int:
    try:
        nbytes = operator.index(obj.nbytes)
    except (AttributeError, TypeError):
        nbytes = -1
    if nbytes < 0:
        raise TypeError(f"cannot cache {type(obj).__name__}: it needs an integer 'nbytes' "
                        "attribute >= 0")
    return nbytes


class RecentRecords:
    """The last value put under each of the ``max_entries`` most recently put keys
    (thread-safe): the store's last registry record of each recent adapter."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def pop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)


class DeleteLog:
    """Which adapter ids were deleted after a moment (thread-safe): ``now()`` is a moment
    (the count of deletes so far), ``since(id, moment)`` whether ``id`` was deleted after
    it. The ``max_entries`` most recently deleted ids are kept: an older delete reads as
    none."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._lock = threading.Lock()
        self._now = 0
        self._last = RecentRecords(max_entries)  # id -> the moment of its last delete

    def now(self) -> int:
        return self._now

    def note(self, adapter_id: str) -> None:
        with self._lock:
            self._now += 1
            self._last.put(adapter_id, self._now)

    def since(self, adapter_id: str, moment: int) -> bool:
        return (self._last.get(adapter_id) or 0) > moment
