"""What vLLM tells about its steps, kept for nolaserve's metrics: a vLLM stat logger
(the ``stat_loggers`` argument of ``AsyncLLM``) records each iteration's scheduler state
(queues, KV-cache use, adapters running and waiting) and feeds the step observers
(``nolaserve_batch_tokens``, ``nolaserve_batch_distinct_adapters``); ``vllm_metrics``
re-exports vLLM's own Prometheus series (``vllm:*``) beside nolaserve's, without the
ones nolaserve already exports under the same name.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .engine_types import StepStats


@dataclass(frozen=True)
class SchedulerSnapshot:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 1
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()


def adapter_of(version: str) -> str:
    """The adapter id in a version name ``<adapter id>@<sha256[:12]>``."""
    return version.rpartition("@")[0] or version


class VllmStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = SchedulerSnapshot()
        self.num_blocks = 1  # vLLM's KV blocks; known once the engine has started
        self.step_observers: list[Callable[[StepStats], None]] = []

    def snapshot(self) -> SchedulerSnapshot:
        with self._lock:
            return self._last

    def record(self, scheduler_stats, iteration_stats) -> None:
        """One vLLM iteration (called by the stat logger, on the event loop)."""
        if scheduler_stats is not None:
            s = scheduler_stats
            total = max(1, self.num_blocks)
            snap = SchedulerSnapshot(
                s.num_running_reqs, s.num_waiting_reqs, round(s.kv_cache_usage * total),
                total, _adapters(s.running_lora_adapters), _adapters(s.waiting_lora_adapters))
            with self._lock:
                self._last = snap
        if iteration_stats is None or not self.step_observers:
            return
        tokens = iteration_stats.num_generation_tokens + iteration_stats.num_prompt_tokens
        if tokens:
            last = self.snapshot()
            step = StepStats(last.running, tokens, len(set(last.running_adapters)))
            for observe in self.step_observers:
                observe(step)

    def logger_factory(self):
        """A vLLM ``StatLoggerFactory`` whose loggers record into this object."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class NolaserveStatLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                stats.num_blocks = vllm_config.cache_config.num_gpu_blocks or 1

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                       engine_idx: int = 0) -> None:
                stats.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return NolaserveStatLogger

    def vllm_metrics(self, emitted: set[str]) -> Iterator:
        """vLLM's Prometheus families (``vllm:*``) whose names nolaserve does not emit."""
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        for family in get_prometheus_registry().collect():
            if family.name.startswith("vllm:") and family.name not in emitted:
                yield family


def _adapters(counts: dict[str, int]) -> tuple[str, ...]:
    return tuple(adapter_of(name) for name, n in counts.items() if n)
