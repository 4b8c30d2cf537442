"""The order in which queued adapter loads start: cheapest first, with a bound on how long
a costly one may be overtaken. Pure Python, no threads.

First in, first out let one tenant's large loads (a NOLA adapter with k = 4096, r = 16
takes seconds to regenerate) hold every other tenant's small load behind all of them. Here
a free worker takes the queued job of least estimated cost (``AdapterStore.load_cost``;
first come among equals), unless a job is *due*: one that ``max_bypass`` later jobs have
overtaken. Due jobs start first, oldest first. So a small load waits for the loads
already running, not for the queued large ones; and no job is overtaken by more than
``max_bypass`` later ones (``max_bypass=0`` is first in, first out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
DEFAULT_MAX_BYPASS = 4


@dataclass
class _Job(Generic[T]):
    item: T
    cost: int
    bypassed: int = 0  # later jobs that started before this one


class LoadQueue(Generic[T]):
    """Queued jobs in arrival order; ``pop`` picks the next to start. Not thread-safe:
    its owner holds a lock (like ``SlotTable``)."""

    def __init__(self, max_bypass: int = DEFAULT_MAX_BYPASS) -> None:
        if max_bypass < 0:
            raise ValueError(f"max_bypass must be >= 0, got {max_bypass}")
        self.max_bypass = max_bypass
        self._jobs: list[_Job[T]] = []  # oldest first

    def __len__(self) -> int:
        return len(self._jobs)

    def push(self, item: T, cost: int) -> None:
        """Queue ``item`` whose load is estimated to cost ``cost`` (>= 0, any unit)."""
        if cost < 0:
            raise ValueError(f"a load's cost must be >= 0, got {cost}")
        self._jobs.append(_Job(item, cost))

    def pop(self) -> T:
        """Remove and return the job to start next: the oldest due one, else the cheapest
        (the oldest among equals). Every older job it overtakes counts one bypass."""
        if not self._jobs:
            raise IndexError("pop from an empty LoadQueue")
        jobs = self._jobs
        index = next((i for i, j in enumerate(jobs) if j.bypassed >= self.max_bypass), None)
        if index is None:
            index = min(range(len(jobs)), key=lambda i: jobs[i].cost)  # first minimum
        for job in jobs[:index]:
            job.bypassed += 1
        return jobs.pop(index).item

    def drain(self) -> list[T]:
        """Remove and return every queued job, oldest first."""
        items = [j.item for j in self._jobs]
        self._jobs.clear()
        return items
