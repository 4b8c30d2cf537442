"""The adapter store: the one object the engine and the Admin service talk to.

It ties together the registry (durable bytes), the host cache (parsed, coefficient-only
adapters) and the slot pool (materialized factors on the device), and keeps the three
consistent: a registration is validated before it is written, a replace or delete drops
the parsed copy and lets in-flight users of the old slot finish.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import cpu_threads, kinds
from .cache import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    CacheStats,
    DeleteLog,
    HostCache,
    RecentRecords,
)
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    IncompatibleAdapterError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    RegistryUnavailableError,
    short,
)
from .ids import MAX_ID_CHARS, check_adapter_id, check_new_adapter_id
from .kinds import Adapter, parse_adapter, summary
from .registry import Registry
from .registry_rows import AdapterRecord, NewAdapter
from .rmm import RmmTask
from .rmm_build import build_rmm
from .slots import PoolStats, SlotPool, SlotSnapshot
from .spec import AdapterFactors, BaseModelSpec
from .warm import host_copy, warm_tier


@dataclass(frozen=True)
class RmmResult:
    """What ``AdapterStore.build_rmm`` registered: the basis, one task per source (in source
    order) and each task's relative reconstruction error of delta W."""

    basis: AdapterRecord
    tasks: list[AdapterRecord]
    errors: list[float]


@dataclass(frozen=True)
class StoreStats:
    """The counters of the host cache, the slot pool and the warm tier (None when off),
    and the registry's size."""

    host: CacheStats
    slots: PoolStats
    registered: int
    warm: CacheStats | None = None


class AdapterStore:
    """Register, look up and load adapters for one base model.

    ``materialize_threads``: threads that regenerate NOLA bases on CPU, shared by every
    load (None: one pool per load, one thread per core). ``warm_cache_bytes``: the warm
    tier's budget (warm.py), 0 = off."""

    def __init__(self, spec: BaseModelSpec, registry: Registry, *, num_slots: int = 64,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 host_max_entries: int = DEFAULT_MAX_ENTRIES,
                 host_max_bytes: int = DEFAULT_MAX_BYTES,
                 materialize_threads: int | None = None, warm_cache_bytes: int = 0,
                 slots: Callable[[AdapterStore], SlotPool] | None = None):
        """``slots``: makes the device-slot manager from the store, for an engine that
        keeps adapters on the device itself (vLLM: ``VllmLoras``); default a ``SlotPool``
        of ``num_slots`` filled through ``factors``."""
        self.spec, self.registry, self.device = spec, registry, torch.device(device)
        self.dtype = dtype
        self.host = HostCache(host_max_entries, host_max_bytes)
        self.warm = warm_tier(warm_cache_bytes)
        self._regen = (ThreadPoolExecutor(materialize_threads, thread_name_prefix="nola-regen",
                                          initializer=cpu_threads.serial)
                       if materialize_threads else None)
        direct = ((lambda i: kinds.direct(self.parsed(i, count_hit=False)))
                  if self.device.type == "cuda" else None)
        self.slots = (slots(self) if slots is not None else SlotPool(
            spec, num_slots, self.factors, device=device, dtype=dtype, direct=direct))
        # answers for hot adapters while the registry is unreachable
        self._records = RecentRecords(host_max_entries)
        self._registered = 0  # the last count read, for scrapes while it is unreachable
        self.deletes = DeleteLog()  # a request never gets a later registration of its id

    def close(self) -> None:
        """Close the registry; later calls that need it fail."""
        self.registry.close()
        if self._regen is not None:
            self._regen.shutdown(wait=False)

    # -- reads ----------------------------------------------------------------------
    def get(self, adapter_id: str) -> AdapterRecord:
        """The registered adapter's record; ``AdapterNotFoundError`` if unknown. While the
        registry is unreachable, an adapter held in the host cache answers from its last
        record (so it keeps serving); others raise ``RegistryUnavailableError``."""
        try:
            record = self.registry.get(adapter_id)
        except RegistryUnavailableError:
            record = self._records.get(adapter_id)
            if record is None or adapter_id not in self.host:
                raise
            return record
        self._records.put(adapter_id, record)
        return record

    def list_page(self, page_size: int, page_token: str
                  ) -> tuple[list[AdapterRecord], str, int]:
        """One page of records in id order, the next page's token and the total count."""
        records, token = self.registry.list(page_size, page_token)
        return records, token, self.registry.count()

    def slot_snapshot(self) -> SlotSnapshot:
        """Which adapters are in a device slot, and which are pinned, at one instant."""
        return self.slots.snapshot()

    @property
    def num_slots(self) -> int:
        return self.slots.num_slots

    @property
    def host_limits(self) -> tuple[int, int]:
        """``(max entries, max bytes)`` of the host cache of parsed adapters."""
        return self.host.max_entries, self.host.max_bytes

    @property
    def stats(self) -> StoreStats:
        """Counters; ``registered`` is the last count read while the registry is down."""
        with contextlib.suppress(RegistryUnavailableError):
            self._registered = self.registry.count()
        return StoreStats(self.host.stats, self.slots.stats, self._registered,
                          self.warm.stats if self.warm is not None else None)

    def observe_loads(self, callback) -> None:
        """``callback(seconds)`` after each adapter materialized into a device slot."""
        self.slots.observe_loads(callback)

    # -- registration ---------------------------------------------------------------
    def register(self, adapter_id: str, data: bytes, replace: bool = False) -> AdapterRecord:
        """Validate ``data`` against the base model (shapes, then magnitude bounds) and store
        it durably under ``adapter_id``. The same bytes again under the same id return the
        existing record (so a client may retry after a lost acknowledgement)."""
        check_new_adapter_id(adapter_id, self.spec.name)
        existing = self._same_bytes(adapter_id, data)
        if existing is not None:  # a retry after a lost acknowledgement: nothing to do
            return existing
        adapter = parse_adapter(data)
        adapter.validate(self.spec)
        self.spec.check_base_model(getattr(adapter, "base_model", ""))
        parent = kinds.basis_of_task(adapter, self.registry.get) \
            if isinstance(adapter, RmmTask) else None
        kinds.check_bounds(adapter, self.parsed)
        try:
            record = self.registry.register(adapter_id, adapter.kind, data, summary(adapter),
                                            parent=parent, replace=replace)
        except AdapterExistsError:  # a concurrent retry of the same bytes committed first
            existing = self._same_bytes(adapter_id, data)
            if existing is None:
                raise
            return existing
        self.forget(adapter_id)
        return record

    def _same_bytes(self, adapter_id: str, data: bytes) -> AdapterRecord | None:
        """The record of ``adapter_id`` if it holds exactly ``data`` (same sha256), else None."""
        try:
            record = self.registry.get(adapter_id)
        except AdapterNotFoundError:
            return None
        return record if record.sha256 == hashlib.sha256(data).hexdigest() else None

    def delete(self, adapter_id: str) -> None:
        """Delete an adapter; requests already holding its slot finish with it, those
        that do not yet fail at admission (``deletes``), even once the id is registered
        again."""
        self.registry.delete(adapter_id)
        self.deletes.note(adapter_id)
        self.forget(adapter_id)

    def build_rmm(self, source_ids: list[str], basis_size: int, basis_id: str) -> RmmResult:
        """Compress registered adapters into an RMM basis plus one task per source, registered
        atomically as ``basis_id`` and ``basis_id/<source id>``."""
        try:
            check_new_adapter_id(basis_id, self.spec.name)
        except InvalidAdapterIdError as e:
            raise InvalidAdapterIdError(f"basis_id: {e}") from None
        if len(set(source_ids)) != len(source_ids):
            raise InvalidAdapterError("source adapter ids must be distinct")
        for sid in source_ids:
            try:
                check_adapter_id(sid)
            except InvalidAdapterIdError as e:
                raise InvalidAdapterIdError(f"source adapter: {e}") from None
        longest = max(source_ids, key=len, default="")
        if len(basis_id) + 1 + len(longest) > MAX_ID_CHARS:
            raise InvalidAdapterIdError(
                f"the task id {short(basis_id + '/' + longest)} would have "
                f"{len(basis_id) + 1 + len(longest)} characters; at most {MAX_ID_CHARS}: use "
                "a shorter basis id")
        task_ids = [check_adapter_id(f"{basis_id}/{sid}") for sid in source_ids]
        if taken := next(filter(self.registry.contains, [basis_id, *task_ids]), None):
            raise AdapterExistsError(f"{short(taken)} is already registered: pick another "
                                     "basis id, or delete it first")
        if basis := next((s for s in source_ids if self.registry.get(s).kind ==
                          "rmm-basis"), None):
            raise IncompatibleAdapterError(
                f"source adapter {short(basis)} is an RMM basis: build from its tasks "
                f"('{basis}/<source id>') or from the adapters they came from")
        sources = {sid: self._materialize(self.parsed(sid), "cpu") for sid in source_ids}
        build = build_rmm(sources, basis_size, self.spec, basis_id=basis_id)
        items = [NewAdapter(basis_id, build.basis.kind, build.basis.to_bytes(),
                            summary(build.basis))]
        items += [NewAdapter(tid, "rmm-task", build.tasks[sid].to_bytes(),
                             summary(build.tasks[sid]), parent=basis_id)
                  for tid, sid in zip(task_ids, source_ids)]
        records = self.registry.register_many(items)
        return RmmResult(records[0], records[1:], [build.errors[sid] for sid in source_ids])

    # -- loading --------------------------------------------------------------------
    def parsed(self, adapter_id: str, count_hit: bool = True) -> Adapter:
        """The parsed adapter, from the host cache or the registry (a host-cache miss).
        ``count_hit``: a hit counts (a request's check; not the load that follows it for
        the same request)."""
        return self.host.get_or_load(
            adapter_id, lambda i: parse_adapter(self.registry.data(i), strict=False), count_hit)

    def factors(self, adapter_id: str) -> AdapterFactors:
        """An adapter's factors for a slot (the slot pool's loader): from the warm tier if
        it holds them (a copy), else materialized on the store's device."""
        if self.warm is None:
            return self._materialize(self.parsed(adapter_id, count_hit=False), self.device)
        return self.warm.get_or_load(adapter_id, self._warm_entry)

    def _warm_entry(self, adapter_id: str) -> AdapterFactors:
        factors = self._materialize(self.parsed(adapter_id, count_hit=False), self.device)
        return host_copy(factors, self.dtype, pin=self.device.type == "cuda")

    def prefetch(self, adapter_id: str) -> bool:
        """Load the adapter into an idle slot ahead of its request (``SlotPool.prefetch``).
        With no such slot, materialize it into the warm tier (if on), so that the slot it
        gets later is filled by a copy. True if it went into a slot."""
        if self.slots.prefetch(adapter_id):
            return True
        if self.warm is not None and adapter_id not in self.slots.snapshot().ready:
            self.warm.get_or_load(adapter_id, self._warm_entry)
        return False

    def load_cost(self, adapter_id: str, factors: AdapterFactors | None = None) -> int:
        """The estimated cost of ``acquire(adapter_id, factors)`` (``kinds.load_cost``),
        which orders the admission's load queue; never blocks on the registry: 0 if the
        adapter is in a slot, a copy's bytes for ``factors`` or a warm-tier entry, else the
        parsed copy's estimate, or ``worst_load_cost`` when the host cache holds none."""
        if factors is None and adapter_id in self.slots.snapshot().ready:
            return 0
        if factors is None and self.warm is not None:
            factors = self.warm.peek(adapter_id)
        if factors is not None:
            return factors.nbytes
        adapter = self.host.peek(adapter_id)
        return kinds.worst_load_cost(self.spec) if adapter is None else kinds.load_cost(adapter)

    def want(self, adapter_id: str) -> None:
        """A queued request wants the adapter: evictions prefer others (pair with unwant)."""
        self.slots.want(adapter_id)

    def unwant(self, adapter_id: str) -> None:
        self.slots.unwant(adapter_id)

    def version_factors(self, adapter_id: str, sha256: str) -> AdapterFactors | None:
        """The adapter's factors on the CPU, materialized from exactly the registered bytes
        whose sha256 is ``sha256``; None if ``adapter_id`` now holds other bytes (replaced
        since the caller read its record)."""
        data = self.registry.data(adapter_id)
        if hashlib.sha256(data).hexdigest() != sha256:
            return None
        return self._materialize(parse_adapter(data, strict=False), "cpu")

    def acquire(self, adapter_id: str, factors: AdapterFactors | None = None) -> int:
        """A device slot holding the adapter (blocking on a cold load); pair with release.
        ``factors``: load these on a miss (``held_factors``), under ``adapter_id`` as key."""
        return self.slots.acquire(adapter_id, factors)

    def held_factors(self, adapter_id: str, slot: int) -> AdapterFactors:
        """The factors in the adapter's ``slot`` (held by the caller), for requests parked
        off it: the warm tier's entry, by reference, if it is the version written into the
        slot; else a host copy of the slot (``SlotPool.contents``): the warm tier is off,
        evicted the entry, or never held this version (a NOLA adapter regenerated on the
        device; one replaced since)."""
        factors = None if self.warm is None else self.warm.peek(adapter_id)
        if factors is not None and factors.version == self.slots.version_of(slot):
            return factors
        return self.slots.contents(slot)

    def warm_holds(self, adapter_id: str) -> bool:
        """Whether the warm tier holds the adapter's factors: an ``acquire`` now is a copy
        (unless the entry is evicted first)."""
        return self.warm is not None and adapter_id in self.warm

    def try_acquire(self, adapter_id: str) -> int | None:
        """``acquire`` when the adapter is already in a slot (never blocks), else None."""
        return self.slots.try_acquire(adapter_id)

    def can_take(self, adapter_id: str) -> bool:
        """Whether ``acquire`` would find the adapter a slot now (no ``NoFreeSlotError``)."""
        return self.slots.can_take(adapter_id)

    def release(self, slot: int) -> None:
        self.slots.release(slot)

    def pin(self, adapter_id: str) -> int:
        if self.registry.get(adapter_id).kind == "rmm-basis":  # before the pin limit
            raise kinds.basis_not_served()
        return self.slots.pin(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        self.registry.get(adapter_id)
        self.slots.unpin(adapter_id)

    def _materialize(self, adapter: Adapter, device: torch.device | str) -> AdapterFactors:
        return kinds.materialize(adapter, device, self.parsed, self._regen)

    def forget(self, adapter_id: str) -> None:
        """The adapter was registered, replaced or deleted (here, or by another replica:
        ``RegistryWatcher``): drop its parsed copy and record, and mark its slot stale, so
        that requests from now on read the registry again; in-flight users of the old slot
        finish with it."""
        self._records.pop(adapter_id)
        self.host.pop(adapter_id)
        if self.warm is not None:
            self.warm.pop(adapter_id)  # before the slot: ``held_factors`` relies on it
        self.slots.invalidate(adapter_id)

