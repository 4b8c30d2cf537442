"""AdapterAdmission alone, over a fake store whose loads a test holds and releases: what a
queued request wants, when a load is collected, the aging count, the idle wait, the
worker pool and its shutdown. Events and counts, never seconds: a pass never waits for a
guard, and a wait that ignores its bound hangs (mutmut counts that caught)."""

import gc
import threading
import weakref
from collections import Counter

import pytest
from engine_helpers import greedy

from nolaserve.adapters.errors import AdapterNotFoundError, NoFreeSlotError
from nolaserve.server.engine.admission import AdapterAdmission
from nolaserve.server.engine.sequence import Sequence

GUARD = 60.0  # seconds an event may take before the test fails
HELD = 3600.0  # seconds a held load waits for its cue: longer than any wait of a test
NOT_YET = 0.2  # how long a test looks for a thread that must not start


class HeldLoads:
    """A fake store. Its prefetch finds no idle slot (once ``prefetch_gate`` is open); its
    admission-time load of adapter x (one of "abc") waits for ``go[x]``, then raises
    ``fails[x]`` if set, else returns slot 3. It records what it is told."""

    made: list["HeldLoads"] = []  # released at each test's teardown

    def __init__(self, fails: dict[str, Exception] | None = None) -> None:
        HeldLoads.made.append(self)
        self.started = {x: threading.Event() for x in "abc"}
        self.go = {x: threading.Event() for x in "abc"}
        self.prefetch_gate = threading.Event()
        self.prefetch_gate.set()
        self.fails = fails or {}
        self.released: list[int] = []
        self.wanted: Counter[str] = Counter()
        self.prefetches: Counter[str] = Counter()
        self.threads: set[str] = set()

    def want(self, adapter_id):
        self.wanted[adapter_id] += 1

    def unwant(self, adapter_id):
        self.wanted[adapter_id] -= 1

    def prefetch(self, adapter_id):
        self.prefetches[adapter_id] += 1
        self.prefetch_gate.wait(HELD)
        return False

    def try_acquire(self, adapter_id):
        return None

    def acquire(self, adapter_id):
        self.threads.add(threading.current_thread().name)
        self.started[adapter_id].set()
        self.go[adapter_id].wait(HELD)
        if adapter_id in self.fails:
            raise self.fails[adapter_id]
        return 3

    def release(self, slot):
        self.released.append(slot)

    def release_all(self) -> None:
        self.prefetch_gate.set()
        for go in self.go.values():
            go.set()


@pytest.fixture(autouse=True)
def release_held_loads():
    """A test that fails must not leave loads held for an hour: the worker threads would
    hold up the interpreter's exit."""
    yield
    for store in HeldLoads.made:
        store.release_all()
    HeldLoads.made.clear()


def seq_of(adapter_id: str) -> Sequence:
    return Sequence(f"s{adapter_id}", [1, 2], greedy(2), adapter_id)


def start_held_loads(admission: AdapterAdmission, store: HeldLoads, *seqs: Sequence) -> None:
    for seq in seqs:
        assert not admission.ready(seq)  # submits its load (no prefetch ran) ...
        assert store.started[seq.adapter_id].wait(GUARD)  # ... which runs, held


def attempt(admission: AdapterAdmission, seq: Sequence) -> bool:
    """One admission attempt whose load has already been cued: submit it, let it finish,
    collect it."""
    assert not admission.ready(seq)
    admission.wait(GUARD)
    return admission.ready(seq)


@pytest.mark.parametrize("aging_steps, workers", [(0, 1), (1, 0)])
def test_a_zero_aging_bound_or_worker_count_is_refused(aging_steps, workers):
    with pytest.raises(ValueError, match=r"aging_steps \(\d\) and workers \(\d\) must be >= 1"):
        AdapterAdmission(HeldLoads(), aging_steps, workers)
    AdapterAdmission(HeldLoads(), aging_steps=1, workers=1).close()  # the least allowed


@pytest.mark.parametrize("fails", [False, True])
def test_a_request_aborted_during_its_load_gets_its_slot_returned(fails):
    """A request aborted while its admission-time load runs holds nothing afterwards: the
    slot the load returns is released once, and a failed load releases nothing."""
    store = HeldLoads({"a": NoFreeSlotError("every slot is busy")} if fails else None)
    admission = AdapterAdmission(store)
    seq = seq_of("a")
    admission.accepted(seq)
    admission.wait(GUARD)  # the prefetch found no slot
    start_held_loads(admission, store, seq)
    admission.release(seq)  # aborted meanwhile
    store.go["a"].set()
    admission.close()  # waits for the load and its callback
    assert store.released == ([] if fails else [3])


def test_a_queued_request_is_wanted_until_admitted_and_its_adapter_prefetched_once():
    """Evictions spare adapters that queued requests want: each accepted request counts in
    ``want`` until it is admitted or leaves. Requests for one adapter share one prefetch."""
    store = HeldLoads()
    store.prefetch_gate.clear()
    admission = AdapterAdmission(store)
    first, second = seq_of("a"), Sequence("s2", [1, 2], greedy(2), "a")
    admission.accepted(first)
    admission.accepted(second)  # while the first one's prefetch runs
    assert store.wanted == {"a": 2}
    assert not admission.ready(first)  # waits for the prefetch ...
    assert not store.started["a"].wait(NOT_YET)  # ... rather than load a second time
    store.prefetch_gate.set()
    admission.wait(GUARD)
    store.go["a"].set()
    assert attempt(admission, first) and first.adapter_slot == 3
    assert store.wanted == {"a": 1}  # admitted: no longer waiting
    admission.release(second)  # left the queue
    assert store.wanted == {"a": 0}
    admission.close()
    assert store.prefetches == {"a": 1}


def test_the_aging_bound_counts_each_attempt_that_found_every_slot_busy_once():
    store = HeldLoads({"a": NoFreeSlotError("every slot is busy")})
    store.go["a"].set()
    seq = seq_of("a")
    assert not AdapterAdmission(store, aging_steps=1).overdue(seq)  # never waited yet
    admission = AdapterAdmission(store, aging_steps=2)
    assert not attempt(admission, seq) and not admission.overdue(seq)  # 1 of 2
    assert not attempt(admission, seq) and admission.overdue(seq)  # 2 of 2: overdue
    del store.fails["a"]
    assert attempt(admission, seq) and seq.adapter_slot == 3
    assert not admission.overdue(seq)  # a slot at last: the count starts over
    admission.close()


def test_a_request_that_left_is_not_kept():
    """No leak under churn: a released request is not referenced any more, whether it left
    from the queue or after its load found every slot busy."""
    store = HeldLoads({"a": NoFreeSlotError("every slot is busy")})
    store.go["a"].set()
    admission = AdapterAdmission(store)
    waited, queued = seq_of("a"), seq_of("b")
    assert not attempt(admission, waited)
    admission.accepted(queued)
    admission.release(waited)
    admission.release(queued)
    admission.close()
    store.fails.clear()  # the one error raised holds the frames it passed through
    refs = [weakref.ref(waited), weakref.ref(queued)]
    del waited, queued
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_a_failed_load_fails_its_request_only():
    error = AdapterNotFoundError("deleted")
    store = HeldLoads({"a": error})
    store.go["a"].set()
    store.go["b"].set()
    admission = AdapterAdmission(store)
    a, b = seq_of("a"), seq_of("b")
    assert not attempt(admission, a)
    assert admission.failed == [(a, error)]
    assert attempt(admission, b) and b.adapter_slot == 3
    admission.close()


def test_loads_run_on_two_named_worker_threads():
    """Loads are bounded: two at a time (a warm-tier copy need not wait behind one
    regeneration); a third waits for one of them to finish."""
    store = HeldLoads()
    admission = AdapterAdmission(store)
    a, b, c = (seq_of(x) for x in "abc")
    start_held_loads(admission, store, a, b)  # both run at once
    assert not admission.ready(c)
    assert not store.started["c"].wait(NOT_YET)  # no third worker
    store.go["a"].set()
    assert store.started["c"].wait(GUARD)  # takes the worker a's load left
    for x in "bc":
        store.go[x].set()
    admission.close()
    assert store.threads and all(t.startswith("adapter-load") for t in store.threads)


def test_close_waits_for_running_loads_and_cancels_queued_ones():
    store = HeldLoads()
    admission = AdapterAdmission(store, workers=1)
    start_held_loads(admission, store, seq_of("a"))
    store.go["b"].set()  # were b's load to run, close would not wait an hour for it
    assert not admission.ready(seq_of("b"))  # queued behind a's load
    threading.Timer(NOT_YET, store.go["a"].set).start()  # lets close fall asleep first
    admission.close()
    assert store.go["a"].is_set()  # close returned only once a's load had finished
    assert not store.started["b"].is_set()  # and b's never started (it would hold an hour)


def test_the_idle_wait_returns_when_the_first_load_finishes():
    """With only cold requests the step loop sleeps in ``wait`` until a load finishes: not
    less (it would spin), not longer (a request would wait while its slot is ready)."""
    store = HeldLoads()
    admission = AdapterAdmission(store)
    a, b = seq_of("a"), seq_of("b")
    start_held_loads(admission, store, a, b)
    assert not admission.ready(a) and a.adapter_slot == -1  # held: not admitted
    threading.Timer(NOT_YET, store.go["a"].set).start()  # lets wait fall asleep first
    admission.wait(HELD)  # returns with a's load, not with b's (held for an hour)
    assert admission.ready(a) and a.adapter_slot == 3
    assert not admission.ready(b)
    store.go["b"].set()
    admission.close()


def test_the_idle_wait_gives_up_after_its_timeout():
    """A long load never holds the step loop past ``wait``'s timeout: requests that arrive
    meanwhile are scheduled at the next step."""
    store = HeldLoads()
    admission = AdapterAdmission(store)
    seq = seq_of("a")
    start_held_loads(admission, store, seq)
    admission.wait(0.01)  # returns while the load is held (an hour)
    assert not admission.ready(seq)
    store.go["a"].set()
    admission.close()
