"""HostCache: LRU order, count and byte capacity, pop, stats, shared loads."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from nolaserve.adapters.cache import CacheStats, HostCache
from nolaserve.adapters.spec import AdapterFactors, ModuleFactors


@dataclass
class Blob:
    name: str
    nbytes: int


def load(c: HostCache, key: str, obj) -> bool:
    """``obj`` loaded under ``key`` (after ``pop``, as ``AdapterStore`` replaces one);
    whether the cache kept it."""
    c.pop(key)
    assert c.get_or_load(key, lambda _: obj) is obj
    return key in c


def test_get_load_and_stats():
    c = HostCache()
    assert c.get("a") is None
    a = Blob("a", 10)
    assert load(c, "a", a) is True  # a miss too
    assert c.get("a") is a and "a" in c and len(c) == 1
    assert c.stats == CacheStats(hits=1, misses=2, evictions=0, entries=1, bytes=10)


def test_evicts_least_recently_used_by_count():
    c = HostCache(max_entries=3)
    for k in "abc":
        load(c, k, Blob(k, 1))
    c.get("a")  # order now b, c, a
    load(c, "d", Blob("d", 1))
    assert "b" not in c and all(k in c for k in "acd")
    load(c, "c", Blob("c2", 1))  # replacing refreshes: order a, d, c
    load(c, "e", Blob("e", 1))
    load(c, "f", Blob("f", 1))
    assert sorted(c._entries) == ["c", "e", "f"]
    assert c.stats.evictions == 3 and c.stats.entries == 3


def test_byte_capacity():
    c = HostCache(max_bytes=100)
    load(c, "a", Blob("a", 40))
    load(c, "b", Blob("b", 40))
    load(c, "c", Blob("c", 30))  # 110 > 100: a goes
    assert "a" not in c and c.stats.bytes == 70
    load(c, "b", Blob("b", 60))  # replace updates the byte count: 60 + 30
    assert c.stats.bytes == 90 and c.stats.entries == 2
    big = Blob("big", 101)
    assert load(c, "big", big) is False  # too large alone: not cached, nothing evicted
    assert "big" not in c and c.stats.bytes == 90 and c.stats.evictions == 1
    assert c.get_or_load("big", lambda _: big) is big and "big" not in c
    load(c, "b", Blob("b", 101))  # an oversized replacement drops the old entry too
    assert "b" not in c and c.stats.bytes == 30


def test_pop():
    c = HostCache()
    a = Blob("a", 5)
    load(c, "a", a)
    assert c.pop("a") is a and c.pop("a") is None
    assert c.stats.entries == 0 and c.stats.bytes == 0


def test_takes_nbytes_from_the_object():
    f = AdapterFactors({(0, "q"): ModuleFactors(torch.zeros(4, 8), torch.zeros(8, 4), 1.0)})
    c = HostCache()
    load(c, "f", f)
    assert c.stats.bytes == f.nbytes == 256
    with pytest.raises(TypeError, match="nbytes"):
        load(c, "x", object())
    with pytest.raises(ValueError):
        HostCache(max_entries=0)


def test_get_or_load_caches_and_propagates_errors():
    c = HostCache()
    calls = []

    def loader(i):
        calls.append(i)
        return Blob(i, 1)

    first = c.get_or_load("a", loader)
    assert c.get_or_load("a", loader) is first and calls == ["a"]

    def failing(i):
        raise KeyError(i)

    with pytest.raises(KeyError):
        c.get_or_load("b", failing)
    assert "b" not in c and c.get_or_load("b", loader).name == "b"


def test_concurrent_loads_of_one_id_share_one_call():
    c = HostCache()
    calls = []
    gate = threading.Event()

    def loader(i):
        calls.append(i)
        gate.wait(5)
        return Blob(i, 1)

    results = []
    threads = [threading.Thread(target=lambda: results.append(c.get_or_load("x", loader)))
               for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join()
    assert calls == ["x"] and len(results) == 6 and all(r is results[0] for r in results)
    assert c.stats.misses == 1  # one parse, one miss: the callers that waited count none


def test_pop_during_load_keeps_the_stale_result_out():
    c = HostCache()
    started, gate = threading.Event(), threading.Event()

    def loader(i):
        started.set()
        gate.wait(5)
        return Blob("old", 1)

    out = []
    t = threading.Thread(target=lambda: out.append(c.get_or_load("x", loader)))
    t.start()
    started.wait(5)
    c.pop("x")  # the adapter was replaced while its old bytes were being parsed
    gate.set()
    t.join()
    assert out[0].name == "old" and "x" not in c


def test_threads_hammering_keep_bytes_consistent():
    c = HostCache(max_entries=8, max_bytes=50)

    def work(t):
        for n in range(300):
            k = f"k{(n * 7 + t) % 13}"
            c.get_or_load(k, lambda i: Blob(i, len(i)))
            if n % 17 == 0:
                c.pop(k)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = c.stats
    assert s.bytes == sum(n for _, n in c._entries.values()) <= 50
    assert s.entries <= 8 and s.hits + s.misses == 1200
