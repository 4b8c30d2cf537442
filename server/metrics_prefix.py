"""The prefix cache's series: vLLM's two counters, in tokens as vLLM counts them (every
prompt token looked up at admission, and those found cached), and our gauge of cached
blocks. Only the native engine exports them; vLLM's backend exports its own."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .engine.prefix_cache import PrefixCacheStats


def prefix_cache_series(stats: PrefixCacheStats, model_name: str) -> Iterator[Metric]:
    for name, doc, value in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of "
             "queried tokens.", stats.queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached "
             "tokens.", stats.hits)):
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([model_name], value)
        yield family
    yield GaugeMetricFamily("nolaserve_prefix_cache_blocks", "KV blocks holding a cached "
                            "full token block (held by requests or evictable)",
                            stats.cached_blocks)
