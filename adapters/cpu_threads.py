"""Which threads run torch's CPU kernels in parallel: the one that steps the model.

torch's CPU wheel parallelizes with GNU OpenMP, which gives each thread that runs a
parallel op a team of worker threads of its own and keeps it for that thread's life. Once
a process holds more OpenMP threads than cores, libgomp stops spinning at barriers and
sleeps on a futex at every one instead (its "throttled" spin count). A second team is
enough on any machine: a SmolLM2 decode step on a 2-core CPU, stepped on a thread other
than the one that built the engine, ran 15-20% slower with 20x the context switches
(docs/benchmarks.md, 2026-12-06, "one OpenMP team").

So a process keeps one team: the step thread's (``parallel``). Helper threads that touch
tensors (adapter loads, NOLA regeneration, the server's executor) run torch on themselves
alone (``serial``, as their pool's initializer), and the thread that builds the engine
ends with the build, its team with it. Pure bookkeeping: no tensors.
"""

from __future__ import annotations

import torch

# the parallelism of the process as imported (OMP_NUM_THREADS, else torch's default)
PARALLEL_THREADS = torch.get_num_threads()


def serial() -> None:
    """Run this thread's torch ops on it alone: it starts no OpenMP team. (This also sets
    the count of threads that have not run torch yet; ``parallel`` sets its own.)"""
    _set(1)


def parallel() -> None:
    """Run this thread's torch ops on ``PARALLEL_THREADS`` threads (the step thread)."""
    _set(PARALLEL_THREADS)


def _set(threads: int) -> None:
    # torch reads the process-wide count into each thread at its first parallel op
    # (``lazy_init_num_threads``), over anything set before: make that happen first
    torch.get_num_threads()
    torch.set_num_threads(threads)
