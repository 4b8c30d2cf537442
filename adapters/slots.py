"""Device slots for adapters: a fixed pool of stacked low-rank buffers that batched kernels
index by slot, filled on demand through a loader.

``SlotTable`` (slot_table.py) is the policy; ``SlotPool`` owns the tensors, calls the loader,
checks the factors (slot_checks.py) and writes them into slots.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import IncompatibleAdapterError, NoFreeSlotError, short
from .single_flight import Flight
from .slot_checks import check_factors
from .slot_direct import write_direct
from .slot_table import Acquired, SlotTable
from .spec import AdapterFactors, BaseModelSpec, DirectFactors, ModuleFactors
from .warm import host_copy


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of ``SlotPool`` counters and occupancy."""

    hits: int
    misses: int
    evictions: int
    materialize_seconds: float
    slots_used: int
    slots_total: int
    pinned: int


@dataclass(frozen=True)
class SlotSnapshot:
    """Which adapters are in a slot, read at one instant under the pool's lock."""

    ready: frozenset[str]  # resident and loaded
    pinned: frozenset[str]


class SlotPool:
    """Preallocated stacked factor buffers for ``num_slots`` adapters, filled on demand.

    For every layer and module of ``spec``: ``A [num_slots, max_rank, in]``,
    ``B [num_slots, out, max_rank]`` and ``scale [num_slots]``, so that slot ``s`` adds
    ``scale[s] * B[s] @ A[s]`` to the base weight. An adapter of rank ``r`` fills rows
    ``:r`` and zeros the rest; modules it does not adapt get zero factors and scale 0.
    Thread-safe; ``loader(adapter_id)`` is called outside the lock, once per miss.
    ``direct(adapter_id)``, if given, is asked first: ``DirectFactors`` write themselves
    into the slot (``slot_direct``: NOLA regenerated on the device in the slot's dtype);
    None falls back to ``loader`` and the copy.
    """

    def __init__(self, spec: BaseModelSpec, num_slots: int,
                 loader: Callable[[str], AdapterFactors], device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32,
                 direct: Callable[[str], DirectFactors | None] | None = None) -> None:
        self.spec = spec
        self._loader = loader
        self._direct = direct
        self._table = SlotTable(num_slots)
        self._lock = threading.Lock()
        self._loads: dict[int, Flight] = {}  # slot -> load in flight
        self._materialize_seconds = 0.0
        self._load_observers: list[Callable[[float], None]] = []
        r = spec.max_rank
        device = torch.device(device)
        # CUDA: loads run on a side stream; ``_compute`` is the stream the steps run on.
        self._dtype = dtype
        self._compute = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._slot_modules: list[frozenset[str]] = [frozenset()] * num_slots
        self._slot_versions: list[str] = [""] * num_slots  # ``AdapterFactors.version``
        self._buffers: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {
            (layer, name): (
                torch.zeros(num_slots, r, d_in, device=device, dtype=dtype),  # A
                torch.zeros(num_slots, d_out, r, device=device, dtype=dtype),  # B
                torch.zeros(num_slots, device=device, dtype=dtype),  # scale
            )
            for layer in range(spec.num_layers)
            for name, (d_in, d_out) in spec.module_shapes.items()
        }

    @property
    def num_slots(self) -> int:
        return self._table.num_slots

    @property
    def table(self) -> SlotTable:
        """The slot policy itself, for tests that check its invariants when nothing runs;
        while others run, read ``snapshot()`` or ``stats`` instead."""
        return self._table

    def snapshot(self) -> SlotSnapshot:
        """The resident and the pinned adapters, consistent with each other."""
        with self._lock:
            return SlotSnapshot(self._table.ready_ids(), self._table.pinned_ids())

    def observe_loads(self, callback: Callable[[float], None]) -> None:
        """Call ``callback(seconds)`` after each load into a slot completes (on the loading
        thread: the admission worker, or a pin's caller)."""
        self._load_observers.append(callback)

    def buffers(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A [S, r_max, in], B [S, out, r_max], scale [S])`` of one adapted linear."""
        try:
            return self._buffers[(layer, module)]
        except KeyError:
            raise IncompatibleAdapterError(
                f"layer {layer} module {short(module)} is not an adaptable linear of the base model"
            ) from None

    def acquire(self, adapter_id: str, factors: AdapterFactors | None = None) -> int:
        """The slot holding ``adapter_id``, loading it on a miss; blocks until it is ready.
        ``factors``: what a miss loads instead of calling the loader (a parked request's
        own factors, under a key of its own).

        Each call takes a reference: pass the slot to ``release`` when the request ends.
        Raises ``NoFreeSlotError`` when no slot can be had, or whatever the loader raised.
        """
        with self._lock:
            slot, found = self._table.acquire(adapter_id)
            if found is Acquired.LOAD:
                flight = self._loads[slot] = Flight()
            elif found is Acquired.WAIT:
                flight = self._loads[slot]
        if found is Acquired.HIT:
            return slot
        if found is Acquired.WAIT:
            flight.wait()
        else:
            self._load(adapter_id, slot, flight, factors)
        return slot

    def try_acquire(self, adapter_id: str) -> int | None:
        """``acquire`` if the adapter is resident and loaded (never blocks), else None."""
        with self._lock:
            if self._table.ready_slot_of(adapter_id) is None:
                return None
            return self._table.acquire(adapter_id)[0]

    def can_take(self, adapter_id: str) -> bool:
        """Whether an ``acquire`` now would find ``adapter_id`` a slot (``SlotTable``)."""
        with self._lock:
            return self._table.can_take(adapter_id)

    def release(self, slot: int) -> None:
        """Drop the reference taken by one ``acquire`` that returned ``slot``."""
        with self._lock:
            self._table.release(slot)

    def prefetch(self, adapter_id: str) -> bool:
        """Load ``adapter_id`` into a slot ahead of its request's admission and leave it
        idle (most recently used). Takes only a free slot or an idle one whose adapter no
        queued request wants: never a slot in use, pinned or wanted. False if the adapter
        was resident or loading already, or no such slot is left; the loader's errors
        propagate (the request's own acquire meets them again)."""
        with self._lock:
            if self._table.slot_of(adapter_id) is not None:
                return False
            try:
                slot, _ = self._table.acquire(adapter_id, prefetch=True)
            except NoFreeSlotError:
                return False
            flight = self._loads[slot] = Flight()
        self._load(adapter_id, slot, flight)  # a failed load aborts the slot: nothing to release
        self.release(slot)
        return True

    def want(self, adapter_id: str) -> None:
        """A queued request wants ``adapter_id``: evictions prefer other adapters."""
        with self._lock:
            self._table.want(adapter_id)

    def unwant(self, adapter_id: str) -> None:
        """The request that ``want``ed ``adapter_id`` was admitted or ended."""
        with self._lock:
            self._table.unwant(adapter_id)

    def pin(self, adapter_id: str) -> int:
        """Load ``adapter_id`` if needed and keep it resident until ``unpin``; returns its
        slot. ``LimitExceededError`` if that would leave no unpinned slot."""
        with self._lock:
            self._table.check_pin(adapter_id)
        slot = self.acquire(adapter_id)
        try:
            with self._lock:
                self._table.pin(adapter_id)
        finally:
            self.release(slot)
        return slot

    def unpin(self, adapter_id: str) -> None:
        """Let ``adapter_id`` be evicted again (a no-op if it is not pinned)."""
        with self._lock:
            self._table.unpin(adapter_id)

    def invalidate(self, adapter_id: str) -> None:
        """The adapter was deleted or replaced: later acquires load it afresh; requests
        holding its slot finish with the old weights. Its pin, if any, is dropped."""
        with self._lock:
            self._table.invalidate(adapter_id)

    @property
    def stats(self) -> PoolStats:
        """Counters since creation and the current occupancy."""
        with self._lock:
            t = self._table
            return PoolStats(t.hits, t.misses, t.evictions, self._materialize_seconds,
                             t.used, t.num_slots, t.pinned)

    def _load(self, adapter_id: str, slot: int, flight: Flight,
              factors: AdapterFactors | None = None) -> None:
        start = time.perf_counter()

        def settle(_: None, error: BaseException | None) -> None:
            with self._lock:
                del self._loads[slot]
                if error is not None:
                    self._table.abort(slot)
                    return
                self._table.loaded(slot)
                seconds = time.perf_counter() - start
                self._materialize_seconds += seconds
            for observe in self._load_observers:
                observe(seconds)

        flight.run(lambda: self._fill(slot, adapter_id, factors), settle)

    def _fill(self, slot: int, adapter_id: str, factors: AdapterFactors | None) -> None:
        """Write ``adapter_id`` into ``slot``: directly (``direct``, see the class) or
        materialized (unless ``factors`` are given), checked (``check_factors``) and copied.
        On CUDA all of it runs on the pool's side stream, which first waits for the steps
        already queued on the compute stream (they may still read the slot's old contents):
        a stream wait on an event, not a device sync. The slot is marked ready only once
        the write's event completed. The thread that loads waits, in the check's host sync
        and for that event: an admission worker or a pin's caller, or, for a time-slicing
        handoff (a copy of held factors), the step thread itself."""
        direct = self._direct(adapter_id) if factors is None and self._direct else None
        if self._stream is None:
            return self._put(slot, adapter_id, factors, direct)
        with torch.cuda.stream(self._stream):
            self._put(slot, adapter_id, factors, direct)
            written = torch.cuda.Event()
            written.record(self._stream)
        written.synchronize()

    def _put(self, slot: int, adapter_id: str, factors: AdapterFactors | None,
             direct: DirectFactors | None) -> None:
        if direct is None and factors is None:
            factors = self._loader(adapter_id)
        if self._stream is not None:
            self._stream.wait_stream(self._compute)
        if direct is None:
            check_factors(factors, self.spec, self._dtype)
            return self._write(slot, factors)
        self._slot_modules[slot] = frozenset(name for _, name in direct.ranks)
        self._slot_versions[slot] = direct.version
        write_direct(self._buffers, slot, direct, self.spec)

    def modules_of(self, slots: set[int]) -> frozenset[str]:
        """The module names that any of ``slots`` adapts (in some layer): a linear whose
        module no slot of the step adapts can skip the low-rank op."""
        return frozenset().union(*(self._slot_modules[s] for s in slots))

    def contents(self, slot: int) -> AdapterFactors:
        """A host copy of what ``slot`` holds, under the version written into it: factors
        that load it again exactly (``acquire(key, factors)``). Call it holding a
        reference to ``slot``, so that nothing rewrites it meanwhile."""
        keys = [key for key in self._buffers if key[1] in self._slot_modules[slot]]
        scales = torch.stack([self._buffers[k][2][slot] for k in keys]).tolist() if keys else []
        modules = {k: ModuleFactors(self._buffers[k][0][slot], self._buffers[k][1][slot], scale)
                   for k, scale in zip(keys, scales)}
        return host_copy(AdapterFactors(modules, version=self._slot_versions[slot]),
                         self._dtype, pin=self._stream is not None)

    def version_of(self, slot: int) -> str:
        """The ``AdapterFactors.version`` written into ``slot`` (read by a holder of it)."""
        return self._slot_versions[slot]

    def _write(self, slot: int, factors: AdapterFactors) -> None:
        """Copy checked ``factors`` into ``slot``, zero-padding rank and absent modules."""
        self._slot_modules[slot] = frozenset(name for _, name in factors.modules)
        self._slot_versions[slot] = factors.version
        r_max = self.spec.max_rank
        with torch.no_grad():
            for key, (a, b, scale) in self._buffers.items():
                f = factors.modules.get(key)
                r = 0 if f is None else f.rank
                if f is not None:  # non_blocking: from pinned host memory on CUDA
                    a[slot, :r].copy_(f.A, non_blocking=True)
                    b[slot, :, :r].copy_(f.B, non_blocking=True)
                if r < r_max:  # a full-rank adapter has no padding to zero
                    a[slot, r:].zero_()
                    b[slot, :, r:].zero_()
                scale[slot] = 0.0 if f is None else float(f.scale)
