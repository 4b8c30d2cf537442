"""Device slots: the SlotTable policy and the SlotPool buffers, loads and concurrency."""

from __future__ import annotations

import random
import threading
import time
import zlib

import pytest
import torch

from nolaserve.adapters.errors import (
    AdapterError,
    AdapterNotFoundError,
    IncompatibleAdapterError,
    LimitExceededError,
    NoFreeSlotError,
)
from nolaserve.adapters.slot_table import Acquired, SlotTable
from nolaserve.adapters.slots import SlotPool
from nolaserve.adapters.spec import AdapterFactors, BaseModelSpec, ModuleFactors

SPEC = BaseModelSpec(num_layers=2, module_shapes={"q": (8, 4), "o": (4, 8)}, max_rank=4)


def factors(adapter_id: str, rank: int | None = None, version: int = 0,
            keys: list[tuple[int, str]] | None = None) -> AdapterFactors:
    """Deterministic random factors for ``adapter_id`` (rank 1..4, a subset of modules)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{adapter_id}/{version}".encode()))
    r = rank or int(torch.randint(1, 5, (), generator=g))
    all_keys = [(layer, m) for layer in range(2) for m in ("q", "o")]
    keys = keys or [k for k in all_keys if torch.rand((), generator=g) < 0.7] or all_keys[:1]
    mods = {}
    for layer, m in keys:
        d_in, d_out = SPEC.module_shapes[m]
        mods[(layer, m)] = ModuleFactors(torch.randn(r, d_in, generator=g),
                                         torch.randn(d_out, r, generator=g),
                                         float(torch.rand((), generator=g)) + 0.5)
    return AdapterFactors(mods)


class Loader:
    """Counts calls per id; ``versions`` bumps what an id loads to (a replaced adapter)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.versions: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, adapter_id: str) -> AdapterFactors:
        with self.lock:
            self.calls.append(adapter_id)
        return factors(adapter_id, version=self.versions.get(adapter_id, 0))


def slot_matches(pool: SlotPool, slot: int, f: AdapterFactors) -> bool:
    """Whether ``slot`` holds exactly ``f``, zero-padded to max_rank, zeros elsewhere."""
    for layer in range(SPEC.num_layers):
        for m, (d_in, d_out) in SPEC.module_shapes.items():
            a, b, s = pool.buffers(layer, m)
            want_a, want_b, want_s = torch.zeros(4, d_in), torch.zeros(d_out, 4), 0.0
            mf = f.modules.get((layer, m))
            if mf is not None:
                want_a[: mf.rank], want_b[:, : mf.rank], want_s = mf.A, mf.B, mf.scale
            if not (torch.equal(a[slot], want_a) and torch.equal(b[slot], want_b)
                    and float(s[slot]) == pytest.approx(want_s)):
                return False
    return True


def make_pool(num_slots: int = 3, loader=None) -> tuple[SlotPool, Loader]:
    loader = loader or Loader()
    return SlotPool(SPEC, num_slots, loader), loader


def test_buffers_are_preallocated_and_zero():
    pool, _ = make_pool(5)
    a, b, s = pool.buffers(1, "o")
    assert a.shape == (5, 4, 4) and b.shape == (5, 8, 4) and s.shape == (5,)
    assert not a.any() and not b.any() and not s.any() and a.dtype == torch.float32
    with pytest.raises(IncompatibleAdapterError):
        pool.buffers(2, "q")


def test_hit_miss_and_eviction_counters():
    pool, loader = make_pool(2)
    for i in ["a", "a", "b", "c", "a"]:
        pool.release(pool.acquire(i))
    s = pool.stats
    assert (s.hits, s.misses, s.evictions) == (1, 4, 2)
    assert (s.slots_used, s.slots_total, s.pinned) == (2, 2, 0)
    assert loader.calls == ["a", "b", "c", "a"] and s.materialize_seconds > 0


def test_lru_victim_and_contents():
    pool, _ = make_pool(3)
    slots = {i: pool.acquire(i) for i in "abc"}
    for i in "bac":
        pool.release(slots[i])  # idle order: b, a, c
    pool.release(pool.acquire("b"))  # touch: a, c, b
    d = pool.acquire("d")
    assert d == slots["a"] and pool.table.slot_of("a") is None
    assert slot_matches(pool, d, factors("d"))
    for i in "bc":
        assert pool.table.slot_of(i) == slots[i] and slot_matches(pool, slots[i], factors(i))


def test_in_use_slots_are_never_evicted_and_no_free_slot():
    pool, _ = make_pool(2)
    assert pool.can_take("held")  # free slots
    held = pool.acquire("held")
    for n in range(10):
        pool.release(pool.acquire(f"x{n}"))
    assert pool.table.slot_of("held") == held and slot_matches(pool, held, factors("held"))
    assert pool.can_take("third")  # x9's slot is idle
    other = pool.acquire("other")
    assert not pool.can_take("third") and pool.can_take("other")  # "other" is resident
    with pytest.raises(NoFreeSlotError, match="all 2 adapter slots are in use or pinned"):
        pool.acquire("third")
    pool.table.check_invariants()
    pool.release(other)
    assert pool.can_take("third")
    pool.release(pool.acquire("third"))
    pool.release(held)
    assert pool.table.refcount(held) == 0


def test_acquire_with_factors_loads_them_without_the_loader():
    pool, loader = make_pool(2)
    own = factors("x", version=1)
    slot = pool.acquire("x#parked-0", own)
    assert loader.calls == [] and slot_matches(pool, slot, own)
    assert pool.acquire("x#parked-0", factors("y")) == slot  # a hit: nothing is loaded
    assert slot_matches(pool, slot, own)


def test_pin_rules():
    pool, loader = make_pool(3)
    pool.pin("a")  # not resident: loads it
    assert loader.calls == ["a"] and pool.table.is_pinned("a")
    pool.pin("a")  # idempotent
    pool.pin("b")
    assert pool.stats.pinned == 2
    with pytest.raises(LimitExceededError, match="at least one must stay unpinned"):
        pool.pin("c")
    assert "c" not in loader.calls
    for n in range(5):
        pool.release(pool.acquire(f"x{n}"))  # churn through the one unpinned slot
    assert pool.table.slot_of("a") is not None and pool.table.slot_of("b") is not None
    busy = pool.acquire("busy")
    with pytest.raises(NoFreeSlotError, match="2 pinned"):
        pool.acquire("y")
    pool.release(busy)
    pool.unpin("a")
    pool.unpin("a")
    pool.unpin("never-seen")
    pool.pin("c")
    pool.release(pool.acquire("y"))  # a is the LRU idle slot now
    assert pool.table.slot_of("a") is None and pool.stats.pinned == 2
    pool.table.check_invariants()


def test_table_pin_needs_a_resident_adapter():
    t = SlotTable(2)
    with pytest.raises(AdapterNotFoundError):
        t.pin("x")
    with pytest.raises(ValueError):
        SlotTable(0)


def test_invalidate_while_in_use():
    pool, loader = make_pool(3)
    old = pool.acquire("a")
    loader.versions["a"] = 1  # replaced in the registry
    pool.invalidate("a")
    new = pool.acquire("a")
    assert new != old and loader.calls == ["a", "a"]
    assert slot_matches(pool, old, factors("a"))
    assert slot_matches(pool, new, factors("a", version=1))
    assert pool.stats.slots_used == 2
    pool.release(old)  # the last user of the old weights: the slot is freed
    assert pool.stats.slots_used == 1 and pool.table.slot_of("a") == new
    pool.release(new)
    pool.release(pool.acquire("a"))
    assert loader.calls == ["a", "a"]
    pool.table.check_invariants()


def test_invalidate_idle_and_pinned():
    pool, loader = make_pool(3)
    pool.release(pool.acquire("a"))
    pool.invalidate("a")
    assert pool.stats.slots_used == 0 and pool.table.slot_of("a") is None
    pool.pin("b")
    pool.invalidate("b")
    pool.invalidate("unknown")
    assert pool.stats.pinned == 0 and pool.stats.slots_used == 0
    with pytest.raises(AdapterError, match="no acquired reference"):
        pool.release(0)


def test_invalidate_during_load():
    started, gate = threading.Event(), threading.Event()
    inner = Loader()

    def slow(adapter_id):
        started.set()
        gate.wait(5)
        return inner(adapter_id)

    pool, _ = make_pool(3, slow)
    out = []
    t = threading.Thread(target=lambda: out.append(pool.acquire("a")))
    t.start()
    started.wait(5)
    pool.invalidate("a")
    gate.set()
    t.join()
    pool.release(out[0])  # stale: freed at the last release
    assert pool.stats.slots_used == 0
    pool.release(pool.acquire("a"))
    assert inner.calls == ["a", "a"]


@pytest.mark.parametrize("bad", [
    lambda i: _rank5(),
    lambda i: AdapterFactors({(2, "q"): factors(i, keys=[(0, "q")]).modules[(0, "q")]}),
    lambda i: AdapterFactors({(0, "k"): factors(i, keys=[(0, "q")]).modules[(0, "q")]}),
    lambda i: AdapterFactors({(0, "o"): factors(i, keys=[(0, "q")]).modules[(0, "q")]}),
    lambda i: 1 / 0,
])
def test_loader_failure_frees_the_slot(bad):
    pool = SlotPool(SPEC, 2, lambda i: factors(i) if i == "held" else bad(i))
    held = pool.acquire("held")
    with pytest.raises((IncompatibleAdapterError, ZeroDivisionError)):
        pool.acquire("broken")
    assert pool.table.slot_of("broken") is None and pool.stats.slots_used == 1
    pool.table.check_invariants()
    pool.release(held)


def _rank5() -> AdapterFactors:
    return AdapterFactors({(0, "q"): ModuleFactors(torch.ones(5, 8), torch.ones(4, 5), 1.0)})


def test_padding_clears_leftovers_of_a_higher_rank_adapter():
    full = factors("big", rank=4, keys=[(0, "q"), (0, "o"), (1, "q"), (1, "o")])
    small = factors("small", rank=2, keys=[(1, "o")])
    table = {"big": full, "small": small}
    pool = SlotPool(SPEC, 1, table.__getitem__)
    slot = pool.acquire("big")
    assert slot_matches(pool, slot, full)
    pool.release(slot)
    assert pool.acquire("small") == slot
    assert slot_matches(pool, slot, small)
    a, _, s = pool.buffers(0, "q")
    assert not a[slot].any() and float(s[slot]) == 0.0


def test_concurrent_acquire_of_a_cold_id_loads_once():
    calls = []

    def slow(adapter_id):
        calls.append(adapter_id)
        time.sleep(0.2)
        return factors(adapter_id)

    pool = SlotPool(SPEC, 4, slow)
    barrier, got = threading.Barrier(8), []

    def work():
        barrier.wait()
        got.append(pool.acquire("cold"))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["cold"] and len(set(got)) == 1 and len(got) == 8
    assert pool.table.refcount(got[0]) == 8 and slot_matches(pool, got[0], factors("cold"))
    for s in got:
        pool.release(s)
    assert pool.stats.hits == 7 and pool.stats.misses == 1


def test_loader_error_reaches_every_waiter():
    gate = threading.Event()

    def failing(adapter_id):
        gate.wait(5)
        raise OSError("disk on fire")

    pool = SlotPool(SPEC, 2, failing)
    errors = []

    def work():
        try:
            pool.acquire("x")
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join()
    assert len(errors) == 4 and pool.stats.slots_used == 0
    pool.table.check_invariants()


def test_threads_acquiring_and_releasing_stay_consistent():
    pool, loader = make_pool(8)
    ids = [f"id{i}" for i in range(20)]
    failures = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(200):
            i = rng.choice(ids)
            slot = pool.acquire(i)
            if not slot_matches(pool, slot, factors(i)):
                failures.append((i, slot))
            if rng.random() < 0.05:
                pool.invalidate(i)
            pool.release(slot)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert all(pool.table.refcount(s) == 0 for s in range(8))
    pool.table.check_invariants()
    s = pool.stats
    assert s.hits + s.misses == 1600 and s.misses == len(loader.calls) and s.evictions > 0


def test_table_acquire_states():
    t = SlotTable(2)
    assert t.acquire("a") == (0, Acquired.LOAD)
    assert t.acquire("a") == (0, Acquired.WAIT)
    t.loaded(0)
    assert t.acquire("a") == (0, Acquired.HIT)
    assert t.refcount(0) == 3 and (t.hits, t.misses) == (2, 1)
    t.abort(0)
    assert t.used == 0 and t.slot_of("a") is None
    t.check_invariants()


def test_try_acquire_only_takes_ready_slots():
    calls = []
    pool = SlotPool(SPEC, 2, lambda i: calls.append(i) or factors(i))
    assert pool.try_acquire("a") is None and not calls
    slot = pool.acquire("a")
    assert pool.try_acquire("a") == slot and pool.table.refcount(slot) == 2
    pool.release(slot)
    pool.release(slot)
    assert pool.table.refcount(slot) == 0 and calls == ["a"]


def test_pin_count_follows_unpin_and_invalidate():
    """The pin counter (which bounds pins to num_slots - 1) drops by one per unpin, and an
    invalidated pinned adapter leaves no pinned slot behind."""
    t = SlotTable(5)
    for name in "abc":
        slot, _ = t.acquire(name)
        t.loaded(slot)
        t.release(slot)
        t.pin(name)
    t.unpin("a")
    assert t.pinned == 2 and t.pinned_ids() == {"b", "c"}
    slot, _ = t.acquire("b")  # in use while invalidated: turns stale, and unpinned
    t.invalidate("b")
    assert t.pinned == 1 and not t._slots[slot].pinned
    t.release(slot)
    t.check_invariants()
    assert t.pinned == 1 and t.pinned_ids() == {"c"}


def test_a_pin_taken_while_loading_goes_with_a_failed_load():
    """A slot pinned while its load ran, whose load then failed, takes its pin with it: the
    counter (the pin limit, the pinned-slots metric) never counts a phantom pin."""
    t = SlotTable(3)
    slot, how = t.acquire("a")
    assert how is Acquired.LOAD
    t.pin("a")
    t.abort(slot)
    t.check_invariants()
    assert t.pinned == 0 and t.pinned_ids() == set()
    for name in "pq":  # two real pins of three slots: the limit is not reached early
        slot, _ = t.acquire(name)
        t.loaded(slot)
        t.release(slot)
    t.pin("p")
    t.pin("q")
    assert t.pinned == 2
