"""Start-time fair queuing across adapters, with a unit cost per sequence. Pure Python.

Both backends rank sequences by ``(tag, arrival)``: the native scheduler runs, admits and
preempts in that order, and vLLM gets the tag as a request's ``priority`` (its
``scheduling_policy="priority"`` orders by ``(priority, arrival)`` the same way). A new
sequence's tag is one past its adapter's newest unfinished sequence's tag, and never below
the lowest tag still unfinished, where an adapter with nothing unfinished starts (the base
model counts as one adapter). So a burst of one adapter takes consecutive tags and another
adapter's request lands among the burst's first, not behind the whole burst: round robin
across adapters, first come, first served within one (with one adapter, plain FCFS).
Tags never change, so a finish reorders nothing.
"""

from __future__ import annotations

import heapq
from collections import Counter


class FairTags:
    """Hands out tags (``tag``) and takes them back when their sequence ends (``done``).
    Not thread-safe: one owner (the step thread, or vLLM's event loop)."""

    def __init__(self) -> None:
        # each adapter with unfinished sequences: [its newest one's tag, how many]
        self._adapters: dict[str | None, list[int]] = {}
        self._live: Counter[int] = Counter()  # unfinished sequences by tag
        self._heap: list[int] = []  # the live tags, and dead ones not yet popped

    def tag(self, adapter_id: str | None) -> int:
        """The tag of a new sequence of ``adapter_id`` (None: the base model)."""
        newest = self._adapters.setdefault(adapter_id, [-1, 0])
        newest[0] = max(self.lowest(), newest[0] + 1)
        newest[1] += 1
        if not self._live[newest[0]]:
            heapq.heappush(self._heap, newest[0])
        self._live[newest[0]] += 1
        return newest[0]

    def done(self, adapter_id: str | None, tag: int) -> None:
        """The sequence ``tag`` gave to ``adapter_id`` has ended (finished, failed or
        cancelled)."""
        newest = self._adapters[adapter_id]
        newest[1] -= 1
        if not newest[1]:  # nothing of it unfinished: it starts afresh next time
            del self._adapters[adapter_id]
        self._live[tag] -= 1
        if not self._live[tag]:
            del self._live[tag]

    def lowest(self) -> int:
        """The lowest tag still unfinished (0 when none is)."""
        while self._heap and self._heap[0] not in self._live:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else 0
