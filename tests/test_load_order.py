"""Fair cold loads across tenants (issue #29): queued loads start cheapest first, and no
load is overtaken by more than ``max_bypass`` later ones. The queue alone, the store's
cost estimates, and the admission over a real store with a held regeneration. Events and
orders, never seconds."""

import threading

import pytest
from engine_helpers import greedy

from nolaserve.adapters import kinds
from nolaserve.adapters.nola import NolaAdapter, random_nola
from nolaserve.adapters.registry_sqlite import SqliteRegistry
from nolaserve.adapters.spec import BaseModelSpec
from nolaserve.adapters.store import AdapterStore
from nolaserve.server.engine.admission import AdapterAdmission
from nolaserve.server.engine.load_queue import DEFAULT_MAX_BYPASS, LoadQueue
from nolaserve.server.engine.sequence import Sequence

SPEC = BaseModelSpec(num_layers=2, module_shapes={"q": (16, 16), "v": (16, 8)}, max_rank=8)
GUARD = 60.0  # seconds an event may take before the test fails; a pass never waits for it
LARGE, SMALL = 1000, 1


def pops(queue: LoadQueue, n: int) -> list:
    return [queue.pop() for _ in range(n)]


def test_a_small_job_queued_after_several_large_ones_starts_first():
    queue = LoadQueue()
    for name in ("big1", "big2", "big3", "big4"):
        queue.push(name, LARGE)
    queue.push("small", SMALL)
    assert pops(queue, 5) == ["small", "big1", "big2", "big3", "big4"]
    assert len(queue) == 0


def test_equal_costs_start_in_arrival_order():
    queue = LoadQueue()
    for name in "abc":
        queue.push(name, 5)
    assert pops(queue, 3) == list("abc")


@pytest.mark.parametrize("max_bypass", [0, 1, DEFAULT_MAX_BYPASS])
def test_a_large_job_is_overtaken_by_at_most_max_bypass_later_jobs(max_bypass):
    """A steady stream of small jobs (one arrives each time one starts) never starves a
    large one: it starts once ``max_bypass`` of them went first; 0 is first in, first out."""
    queue = LoadQueue(max_bypass)
    queue.push("large", LARGE)
    started = []
    for i in range(3 * DEFAULT_MAX_BYPASS):
        queue.push(f"small{i}", SMALL)
        started.append(queue.pop())
    assert started.index("large") == max_bypass


def test_due_jobs_start_oldest_first_then_the_cheapest():
    queue = LoadQueue(max_bypass=1)
    queue.push("big1", LARGE)
    queue.push("big2", LARGE + 1)
    queue.push("small1", SMALL)
    assert queue.pop() == "small1"  # both large ones overtaken once: due
    queue.push("small2", SMALL)
    assert pops(queue, 3) == ["big1", "big2", "small2"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="max_bypass must be >= 0"):
        LoadQueue(-1)
    with pytest.raises(ValueError, match="cost must be >= 0"):
        LoadQueue().push("x", -1)
    with pytest.raises(IndexError, match="empty LoadQueue"):
        LoadQueue().pop()
    queue = LoadQueue()
    queue.push("x", 1)
    assert queue.drain() == ["x"] and len(queue) == 0


def nola(seed: int, rank: int, num_basis: int) -> bytes:
    return random_nola(SPEC, seed=seed, rank=rank, num_basis=num_basis).to_bytes()


def test_the_store_estimates_a_load_from_what_it_holds():
    store = AdapterStore(SPEC, SqliteRegistry(":memory:"), num_slots=2, warm_cache_bytes=1 << 20)
    store.register("large", nola(1, rank=8, num_basis=4096))
    store.register("small", nola(2, rank=1, num_basis=16))
    assert store.load_cost("large") == kinds.worst_load_cost(SPEC)  # not parsed yet
    for x in ("large", "small"):
        store.parsed(x)
    large, small = store.load_cost("large"), store.load_cost("small")
    assert large == kinds.load_cost(store.parsed("large")) == 4 * 2 * 8 * 4096 * (16 + 16 + 16 + 8)
    assert 0 < small < large
    store.release(store.acquire("large"))
    assert store.load_cost("large") == 0  # in a slot: nothing to load
    factors = store.warm.peek("large")
    assert store.load_cost("large#parked-0", factors) == factors.nbytes  # a copy
    store.close()


def test_a_small_adapters_cold_load_completes_before_queued_large_ones(monkeypatch):
    """Through the store and the admission: four large NOLA adapters are accepted first
    (the first one's regeneration held), then a small one; the small one regenerates
    next, before the three queued large ones."""
    store = AdapterStore(SPEC, SqliteRegistry(":memory:"), num_slots=8)
    seeds = {"big1": 1, "big2": 2, "big3": 3, "big4": 4, "small": 5}
    for name, seed in seeds.items():
        store.register(name, nola(seed, *((1, 16) if name == "small" else (8, 4096))))
        store.parsed(name)  # as Engine.add_request's check does before acceptance
    names = {seed: name for name, seed in seeds.items()}
    order, first, held, all_done = [], threading.Event(), threading.Event(), threading.Event()
    materialize = NolaAdapter.materialize

    def spy(self, *args, **kwargs):
        order.append(names[self.seed])
        if len(order) == 1:
            first.set()
            assert held.wait(GUARD)
        factors = materialize(self, *args, **kwargs)
        if len(order) == len(seeds):
            all_done.set()
        return factors

    monkeypatch.setattr(NolaAdapter, "materialize", spy)
    admission = AdapterAdmission(store, workers=1)
    for name in seeds:
        admission.accepted(Sequence(f"r-{name}", [1, 2], greedy(2), name))
        assert first.wait(GUARD)  # big1's load runs (held) before the others queue
    held.set()
    assert all_done.wait(GUARD)
    admission.close()
    assert order == ["big1", "small", "big2", "big3", "big4"]
    store.close()

