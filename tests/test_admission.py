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

from nolaserve.adapters.cache import DeleteLog
from nolaserve.adapters.errors import AdapterNotFoundError, NoFreeSlotError
from nolaserve.adapters.slots import SlotSnapshot
from nolaserve.server.engine.admission import AdapterAdmission
from nolaserve.server.engine.sequence import Sequence

GUARD = 60.0  # seconds an event may take before the test fails
HELD = 3600.0  # seconds a held load waits for its cue: longer than any wait of a test
NOT_YET = 0.2  # how long a test looks for a thread that must not start


class HeldLoads:
    """A fake store. Its prefetch finds no idle slot (once ``prefetch_gate`` is open); its
    admission-time load of adapter x (one of "abcde") waits for ``go[x]``, then raises
    ``fails[x]`` if set, else returns slot 3 (a parked key ``x#parked-<n>`` counts as x);
    adapters in ``hot`` are taken at once, in their slot; ``can_take`` says there is room
    unless ``full``; it holds factors ``"factors of x"`` for x in its slot (its ``hot``
    one, else 3), ``"copy of slot s"`` for x in another slot s (a replace moved x, or the
    warm tier holds no entry for it) and for x in ``copied``; its warm tier holds every
    adapter not in ``cold``; loading x costs ``costs[x]`` (default 1). It records what it is
    told."""

    made: list["HeldLoads"] = []  # released at each test's teardown

    def __init__(self, fails: dict[str, Exception] | None = None) -> None:
        HeldLoads.made.append(self)
        self.started = {x: threading.Event() for x in "abcde"}
        self.go = {x: threading.Event() for x in "abcde"}
        self.prefetch_gate = threading.Event()
        self.prefetch_gate.set()
        self.fails = fails or {}
        self.released: list[int] = []
        self.wanted: Counter[str] = Counter()
        self.prefetches: Counter[str] = Counter()
        self.threads: set[str] = set()
        self.hot: dict[str, int] = {}
        self.pinned: frozenset[str] = frozenset()
        self.full = False
        self.copied: set[str] = set()
        self.cold: set[str] = set()
        self.loaded: list[tuple[str, object]] = []  # (key, factors) of each acquire
        self.looked: list[str] = []  # the key of each try_acquire
        self.costs: dict[str, int] = {}
        self.order: list[str] = []  # the adapter of each acquire, in the order they started
        self.deletes = DeleteLog()  # the real one: nothing is deleted here

    def want(self, adapter_id):
        self.wanted[adapter_id] += 1

    def unwant(self, adapter_id):
        self.wanted[adapter_id] -= 1

    def prefetch(self, adapter_id):
        self.prefetches[adapter_id] += 1
        self.prefetch_gate.wait(HELD)
        return False

    def load_cost(self, key, factors=None):
        return self.costs.get(key.partition("#")[0], 1)

    def try_acquire(self, adapter_id):
        self.looked.append(adapter_id)
        return self.hot.get(adapter_id)

    def can_take(self, adapter_id):
        return not self.full or adapter_id in self.hot

    def slot_snapshot(self):
        return SlotSnapshot(frozenset(self.hot), self.pinned)

    def acquire(self, key, factors=None):
        adapter_id = key.partition("#")[0]
        self.threads.add(threading.current_thread().name)
        self.loaded.append((key, factors))
        self.order.append(adapter_id)
        self.started[adapter_id].set()
        self.go[adapter_id].wait(HELD)
        if adapter_id in self.fails:
            raise self.fails[adapter_id]
        return 3

    @property
    def slots(self):
        return self

    def version_of(self, slot):
        return "0"  # one version of each adapter: parked requests of it share a key

    def held_factors(self, adapter_id, slot):
        if adapter_id in self.copied or slot != self.hot.get(adapter_id, 3):
            return f"copy of slot {slot}"
        return f"factors of {adapter_id}"

    def warm_holds(self, adapter_id):
        return adapter_id not in self.cold

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


def first_token(seq: Sequence) -> None:
    """``seq`` as the step that sampled its first token leaves it: decoding."""
    seq.output_token_ids.append(7)
    seq.num_computed_tokens = seq.num_tokens - 1


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


def test_a_prefetch_whose_request_left_first_is_not_kept():
    """An id never asked for again (deleted) kept the entry of a prefetch that ended after
    its request left (an outside probe's soak suspected it): a later release drops it."""
    store = HeldLoads()
    store.prefetch_gate.clear()
    admission = AdapterAdmission(store)
    gone, other = seq_of("a"), seq_of("b")
    admission.accepted(gone)
    admission.release(gone)  # its prefetch still loading
    assert "a" in admission._prefetches
    store.prefetch_gate.set()
    admission._prefetches["a"].result(timeout=HELD)
    admission.accepted(other)
    admission._prefetches["b"].result(timeout=HELD)
    admission.release(other)
    assert admission._prefetches == {} and admission._left == set()
    admission.close()


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


def test_a_small_load_queued_behind_large_ones_starts_next():
    """Issue #29: one tenant's large loads (b, c, d) queued behind a running one (a) do not
    hold another tenant's small load (e) behind all of them: e starts as soon as a's worker
    is free, and the large ones then run in arrival order."""
    store = HeldLoads()
    store.costs = {x: 1000 for x in "abcd"} | {"e": 1}
    admission = AdapterAdmission(store, workers=1)
    start_held_loads(admission, store, seq_of("a"))
    for x in "bcde":
        assert not admission.ready(seq_of(x))  # queued behind a's load
    for x in "abcde":
        store.go[x].set()
    assert store.started["d"].wait(GUARD)  # the last one to start
    admission.close()
    assert store.order == list("aebcd")


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


def busy_slots(quantum_steps: int, pinned: frozenset[str] = frozenset(), aging_steps: int = 16):
    """Adapters a (slot 0) and b (slot 1) hot and each taken by a running request, a at
    step 0 and b at step 1; the request for c found every slot busy once (its load fails
    with that until a test drops ``store.fails["c"]``)."""
    store = HeldLoads({"c": NoFreeSlotError("every slot is busy")})
    store.hot, store.pinned = {"a": 0, "b": 1}, pinned
    store.go["c"].set()
    admission = AdapterAdmission(store, quantum_steps=quantum_steps, aging_steps=aging_steps)
    a, b, c = seq_of("a"), seq_of("b"), seq_of("c")
    assert admission.ready(a)
    admission.time_slice((a,))
    assert admission.ready(b)
    assert not attempt(admission, c)
    store.started["c"].clear()
    return store, admission, a, b, c


def test_time_slicing_parks_the_slot_held_longest_once_ripe_and_loads_the_waiting_one_now():
    """Parked: the requests of the slot whose requests each have a token and
    ``quantum_steps`` steps in it, the one taken first. The slot is given back and the
    parked ones want their own key. The waiting request's load (a copy: its factors are in
    the warm tier) runs on the step's thread, so the scheduler admits it in this step."""
    store, admission, a, b, c = busy_slots(quantum_steps=3)
    del store.fails["c"]
    first_token(a)
    admission.time_slice((a, b))  # step 2: a has held its slot 2 steps of 3
    assert (a.adapter_slot, b.adapter_slot, admission.parked) == (0, 1, 0)
    first_token(b)
    admission.time_slice((a, b))  # step 3: a ripe (3 steps); b has had 2
    assert (a.adapter_slot, b.adapter_slot, admission.parked) == (-1, 1, 1)
    assert store.released == [0] and store.wanted == {"a#parked-0": 1}
    assert store.loaded[-1] == ("c", None) and "MainThread" in store.threads
    assert admission.ready(c) and c.adapter_slot == 3
    admission.close()


def waiting_for_a_slot(admission: AdapterAdmission, store: HeldLoads, adapter_id: str,
                       looks: int = 1) -> Sequence:
    """A request for ``adapter_id`` that found every slot busy ``looks`` times; its
    factors are at hand unless the adapter is in ``store.cold``."""
    seq = seq_of(adapter_id)
    store.fails[adapter_id] = NoFreeSlotError("every slot is busy")
    store.go[adapter_id].set()
    for _ in range(looks):
        assert not attempt(admission, seq)
    del store.fails[adapter_id]
    return seq


@pytest.mark.parametrize("overdue", [False, True])
def test_each_ripe_slot_goes_to_a_waiting_request_overdue_then_fewest_tokens_first(overdue):
    """One step hands over as many slots as are ripe, one to each waiting request whose
    factors are at hand: overdue ones first, then those with the fewest tokens (a first
    token before a parked request's next one), then the one that waited longest. A
    request whose adapter the warm tier lacks (a regeneration, not a copy) is handed none:
    its prefetch fills the tier first."""
    store, admission, a, b, c = busy_slots(quantum_steps=1, aging_steps=2)
    admission.release(c)
    store.cold.add("d")
    e = waiting_for_a_slot(admission, store, "e", looks=2 if overdue else 1)
    e.output_token_ids.append(7)  # a request that ran before (parked, or preempted)
    d = waiting_for_a_slot(admission, store, "d")
    c = waiting_for_a_slot(admission, store, "c")
    first_token(a)
    admission.time_slice((a, b))  # only a is ripe: one slot to hand over
    first = e if overdue else c
    assert store.loaded[-1] == (first.adapter_id, None)
    assert admission.ready(first) and not admission.ready(d)
    first_token(b)
    admission.time_slice((a, b))  # b too: the other one of c and e gets it
    second = c if overdue else e
    assert store.loaded[-1] == (second.adapter_id, None) and admission.ready(second)
    assert admission.parked == 2 and store.loaded.count(("d", None)) == 1  # its look only
    admission.close()


def test_a_handed_over_copy_that_fails_fails_its_request_only():
    """The waiting request's adapter was deleted meanwhile: its copy, on the step thread,
    raises; the request fails as for a worker's load, and the step goes on."""
    store, admission, a, b, c = busy_slots(quantum_steps=1)
    gone = AdapterNotFoundError("adapter 'c' not found")
    store.fails["c"] = gone
    first_token(a)
    admission.time_slice((a, b))
    assert not admission.ready(c) and admission.failed == [(c, gone)]
    admission.close()


def test_a_request_that_leaves_after_a_slot_was_loaded_for_it_gives_the_slot_back():
    store, admission, a, b, c = busy_slots(quantum_steps=1)
    del store.fails["c"]
    first_token(a)
    admission.time_slice((a, b))  # a parked, c's slot loaded ...
    admission.release(c)  # ... and c leaves before the scheduler admits it
    assert store.released == [0, 3]
    admission.close()


def test_time_slicing_never_parks_a_request_before_its_first_token():
    store, admission, a, b, c = busy_slots(quantum_steps=1)
    for _ in range(5):
        admission.time_slice((a, b))  # ripe by steps, but neither has a token
    assert (a.adapter_slot, b.adapter_slot, admission.parked) == (0, 1, 0)
    first_token(b)
    admission.time_slice((a, b))
    assert (a.adapter_slot, b.adapter_slot) == (0, -1)  # a still waits for its token
    admission.close()


@pytest.mark.parametrize("held", ["warm entry", "copy of the slot"])
def test_time_slicing_parks_with_the_factors_the_store_holds_but_never_a_pinned_adapter(held):
    """A parked request holds what the store hands it for its slot: the warm tier's entry,
    or a copy of the slot when the warm tier has none (off, evicted, regenerated on the
    device): every slot can be time-sliced. A pinned adapter's slot never is."""
    store, admission, a, b, c = busy_slots(quantum_steps=1, pinned=frozenset({"a"}))
    del store.fails["c"]
    if held != "warm entry":
        store.copied.add("b")
    first_token(a)
    admission.time_slice((a, b))
    assert a.adapter_slot == 0 and admission.parked == 0  # and b has no token
    first_token(b)
    admission.time_slice((a, b))
    assert b.adapter_slot == -1 and admission.parked == 1
    assert admission.ready(c)
    admission.release(c)
    store.go["b"].set()
    assert attempt(admission, b)
    want = "factors of b" if held == "warm entry" else "copy of slot 1"
    assert store.loaded[-1] == ("b#parked-0", want)
    for seq in (a, b):
        admission.release(seq)
    admission.close()


def test_time_slicing_parks_nobody_when_no_request_waits_for_a_slot():
    store, admission, a, b, c = busy_slots(quantum_steps=1)
    admission.release(c)
    first_token(a)
    admission.time_slice((a, b))
    assert a.adapter_slot == 0 and admission.parked == 0
    admission.close()


def test_with_every_slot_busy_no_load_starts_and_each_look_counts_toward_aging():
    """Acceptance and each admission attempt that find every slot busy count once toward
    the aging bound, and start no load (it could only fail); once a slot is free the load
    runs."""
    store = HeldLoads()
    store.full = True
    store.go["a"].set()
    admission = AdapterAdmission(store, aging_steps=3)
    seq = seq_of("a")
    admission.accepted(seq)  # 1
    admission.wait(GUARD)  # its prefetch (which finds no slot) returned
    assert not admission.ready(seq) and not admission.overdue(seq)  # 2
    assert not admission.ready(seq) and admission.overdue(seq)  # 3
    assert not store.started["a"].is_set()
    store.full = False
    assert attempt(admission, seq) and seq.adapter_slot == 3
    admission.close()


@pytest.mark.parametrize("quantum_steps", [-1, 0])
def test_a_negative_quantum_is_refused_and_zero_turns_time_slicing_off(quantum_steps):
    if quantum_steps < 0:
        with pytest.raises(ValueError, match=r"quantum_steps \(-1\) >= 0"):
            AdapterAdmission(HeldLoads(), quantum_steps=quantum_steps)
        return
    store, admission, a, b, c = busy_slots(quantum_steps=0)
    first_token(a)
    for _ in range(3):
        admission.time_slice((a, b))
    assert a.adapter_slot == 0 and admission.parked == 0
    admission.close()


def test_a_request_without_an_adapter_or_holding_its_slot_is_ready_and_slot_0_returned():
    store = HeldLoads()
    store.full, store.hot = True, {"a": 0}
    admission = AdapterAdmission(store, aging_steps=1)
    assert admission.ready(Sequence("base", [1], greedy(1), None))
    seq = seq_of("a")
    admission.accepted(seq)  # every slot busy, but "a" is in one: no wait counted
    assert not admission.overdue(seq)
    assert admission.ready(seq) and admission.ready(seq)  # holds slot 0 from now on
    admission.release(seq)
    assert store.released == [0] and seq.adapter_slot == -1  # slot 0 too is given back
    admission.close()
    ref = weakref.ref(seq)
    del seq
    gc.collect()
    assert ref() is None  # an admitted request is not kept once released


def test_a_parked_request_is_parked_again_under_its_own_key_and_forgotten_once_released():
    """Resumed and parked again, a request keeps its key and the factors it held first
    (not what the store holds now); once released, nothing of it is wanted or kept."""
    store, admission, a, b, c = busy_slots(quantum_steps=1)
    del store.fails["c"]
    store.go["a"].set()
    first_token(a)
    admission.time_slice((a, b))  # step 2: a parked for c (b has no token yet)
    assert admission.ready(c)
    admission.release(c)
    assert attempt(admission, a) and a.adapter_slot == 3  # a free slot: a resumes
    assert store.loaded[-1] == ("a#parked-0", "factors of a")
    store.copied.add("a")  # what the store holds for "a" now is no longer a's
    d = waiting_for_a_slot(admission, store, "d")
    admission.time_slice((a, b))  # step 3: a ripe again (a step in its slot): parked for d
    assert (a.adapter_slot, b.adapter_slot, admission.parked) == (-1, 1, 2)
    assert store.loaded[-1] == ("d", None)
    assert store.wanted["a#parked-0"] == 1 and "a#parked-1" not in store.wanted
    admission.release(a)
    assert store.wanted["a#parked-0"] == 0
    for seq in (b, d):
        admission.release(seq)
    admission.close()
    ref = weakref.ref(a)
    del a
    gc.collect()
    assert ref() is None


def test_a_slot_ripens_after_quantum_steps_counted_from_when_it_was_taken():
    store, admission, a, b, c = busy_slots(quantum_steps=3)  # b took slot 1 at step 1
    first_token(b)  # a has no token: never parked
    for _ in range(2):
        admission.time_slice((a, b))  # steps 2 and 3: b has had 1, then 2 steps
        assert b.adapter_slot == 1
    admission.time_slice((a, b))  # step 4: 3 steps
    assert b.adapter_slot == -1
    admission.close()


def test_a_request_recomputing_after_a_preemption_is_not_ripe_until_it_decodes():
    """Its tokens from before the preemption do not make it ripe: parked after each
    chunk of its recompute, an outside review's soak request (seed 1048) lost its slot and
    its blocks over and over, never reaching its next token."""
    store, admission, a, b, c = busy_slots(quantum_steps=1)
    first_token(b)
    b.output_token_ids += [8, 9]  # preempted, readmitted: 2 of its 4 tokens computed again
    b.num_computed_tokens = 2
    admission.time_slice((a, b))
    assert b.adapter_slot == 1
    b.num_computed_tokens = b.num_tokens - 1  # the recompute done: decoding
    admission.time_slice((a, b))
    assert b.adapter_slot == -1
    admission.close()


def test_time_slicing_parks_nobody_for_a_request_the_scheduler_could_not_run():
    """A waiting request that could not run with a slot (``max_num_seqs`` full, or too few
    KV blocks: ``Scheduler.admissible``) gets none: parking a ripe slot for it would leave
    the parked requests waiting for a slot it cannot use."""
    store, admission, a, b, c = busy_slots(quantum_steps=1)
    del store.fails["c"]
    first_token(a)
    first_token(b)
    admission.time_slice((a, b), admissible=lambda s: s is not c)
    assert (a.adapter_slot, b.adapter_slot, admission.parked) == (0, 1, 0)
    admission.time_slice((a, b), admissible=lambda s: True)
    assert (a.adapter_slot, admission.parked) == (-1, 1)
    admission.close()


def test_settle_takes_back_a_finished_load_nobody_collected():
    """The scheduler did not reach the request time slicing loaded a slot for (one before it
    waits for KV blocks): after the schedule the load's reference goes back, the slot left
    loaded and idle, so that a request that can run may take it."""
    store, admission, a, b, c = busy_slots(quantum_steps=1)
    del store.fails["c"]
    first_token(a)
    admission.time_slice((a, b))
    assert a.adapter_slot == -1 and store.loaded[-1] == ("c", None)
    admission.settle((c,), [])  # c is still waiting
    assert store.released == [0, 3] and c not in admission._loads and c.adapter_slot == -1
    admission.close()


def test_settle_leaves_a_load_in_flight_alone_and_never_waits_for_it():
    """A load still running after the schedule stays its request's (it collects it when
    reached); settle returns at once: the step thread never waits for a load."""
    store = HeldLoads()
    admission = AdapterAdmission(store)
    a = seq_of("a")
    start_held_loads(admission, store, a)  # a's load runs, held until go["a"]
    settled = threading.Thread(target=admission.settle, args=((a,), []))
    settled.start()
    settled.join(GUARD / 10)
    finished = not settled.is_alive()
    store.go["a"].set()
    assert finished and a in admission._loads and store.released == []
    admission.wait(GUARD)
    assert admission.ready(a)
    admission.release(a)
    admission.close()


def test_settle_parks_a_waiting_request_holding_a_slot_that_the_step_did_not_reach():
    """A request holding its slot while waiting (kept through a preemption, or admitted but
    not scheduled) keeps it through a step that reached it (``ready``) or preempted it;
    after a step that did neither, it is parked, its weights held, the slot given back."""
    store, admission, a, b, c = busy_slots(quantum_steps=1)
    admission.settle((a,), [])  # a: waiting, holding slot 0, reached by this step
    admission.settle((a,), [a])  # preempted in this one
    assert a.adapter_slot == 0 and admission.parked == 0
    admission.settle((a,), [])  # neither
    assert a.adapter_slot == -1 and admission.parked == 1 and store.released == [0]
    assert store.wanted["a#parked-0"] == 1
    admission.close()
