"""The adapter store's device side when vLLM runs the model: adapters handed to vLLM as
PEFT LoRA directories, one per adapter *version*.

A version is named ``<adapter id>@<sha256[:12]>`` and gets its own ``lora_int_id``
(stable for the process, never reused), so a replaced adapter can never be served from
vLLM's cached weights or prefix-cache entries of the old bytes (vLLM keys both by name and
id). The store stays the source of truth: a request takes the current version
(``use``), materialized (NOLA regenerated, RMM reconstructed, LoRA as is) into a
``PeftDirCache`` directory that stays while any request or pin uses it. A replace or a
delete (``invalidate``) removes the old version from vLLM once its last request is done.

It stands where ``SlotPool`` stands for the native engine (``AdapterStore(slots=...)``):
``pin``, ``unpin``, ``invalidate``, ``snapshot``, ``stats``. vLLM is reached through
``LoraBackend``, two coroutines run on the event loop that owns the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from nolaserve.adapters.errors import (
    IncompatibleAdapterError,
    LimitExceededError,
    RequestFailedError,
    Status,
    short,
)
from nolaserve.adapters.peft_export import write_peft_dir
from nolaserve.adapters.slots import PoolStats, SlotSnapshot
from nolaserve.adapters.spec import AdapterFactors, ModuleFactors

from .peft_dirs import PeftDirCache

log = logging.getLogger("nolaserve.engine")
PIN_TIMEOUT_S = 300.0
ZERO_LORA = "@zero"  # the zero LoRA's version name (an adapter id is never empty)
_RETRIES = 3


class LoraBackend(Protocol):
    """What ``VllmLoras`` asks of vLLM (``AsyncLLM.add_lora`` / ``remove_lora``)."""

    async def add(self, version: Version) -> None: ...
    async def remove(self, lora_int_id: int) -> None: ...


@dataclass(frozen=True)
class Version:
    """One adapter's bytes as vLLM sees them: ``LoRARequest(name, lora_int_id, path)``."""

    adapter_id: str
    name: str
    lora_int_id: int
    path: str


class VllmLoras:
    def __init__(self, store, dirs: PeftDirCache, backend: LoraBackend, max_loras: int,
                 max_lora_rank: int, layer_prefix: str = "model.layers") -> None:
        self.store, self.dirs, self.backend = store, dirs, backend
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.layer_prefix = layer_prefix
        self.loop: asyncio.AbstractEventLoop | None = None  # set by the engine at start
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._int_ids: dict[str, int] = {}  # version name -> lora_int_id
        self._users: dict[str, int] = {}  # version name -> requests + pins using it
        self._current: dict[str, str] = {}  # adapter id -> the version last seen current
        self._stale: set[str] = set()  # versions replaced or deleted, still in use
        self._pinned: dict[str, Version] = {}
        self._load_observers: list[Callable[[float], None]] = []

    @property
    def num_slots(self) -> int:
        return self.max_loras

    # -- requests (on a worker thread: reads the registry, may write a directory) --------
    def use(self, adapter_id: str) -> Version:
        """The current version of ``adapter_id``, materialized; pair with ``done``."""
        for _ in range(_RETRIES):
            record = self.store.get(adapter_id)
            name = f"{adapter_id}@{record.sha256[:12]}"
            with self._lock:
                lora_int_id = self._int_ids.setdefault(name, next(self._ids))
                self._users[name] = self._users.get(name, 0) + 1
            try:
                path = self.dirs.acquire(name, lambda p: self._write(adapter_id, record, p))
            except _Changed:
                self._drop_user(name)
                continue
            except BaseException:
                self._drop_user(name)
                raise
            with self._lock:
                if name not in self._stale:
                    self._current[adapter_id] = name
            return Version(adapter_id, name, lora_int_id, str(path))
        raise RequestFailedError(f"adapter {short(adapter_id)} kept changing while it was "
                                 "loaded: retry", Status.UNAVAILABLE)

    def zero(self) -> Version:
        """A LoRA whose delta is zero (rank 1, B = 0, on one linear), kept for the process:
        base-model requests run as it on vLLM's CPU backend, whose LoRA ops index the
        weights with -1 for a token without a LoRA and so gave base tokens in a mixed batch
        the delta of the adapter in the last slot (another tenant's)."""
        module, (n_in, n_out) = next(iter(self.store.spec.module_shapes.items()))
        factors = AdapterFactors({(0, module): ModuleFactors(
            torch.zeros(1, n_in), torch.zeros(n_out, 1), 1.0)})
        with self._lock:
            lora_int_id = self._int_ids.setdefault(ZERO_LORA, next(self._ids))
        path = self.dirs.acquire(ZERO_LORA, lambda p: write_peft_dir(
            factors, p, layer_prefix=self.layer_prefix))  # never released: tiny, for good
        return Version("", ZERO_LORA, lora_int_id, str(path))

    def done(self, version: Version) -> None:
        """The request (or pin) that ``use`` served is over."""
        self.dirs.release(version.name)
        self._drop_user(version.name)

    def _write(self, adapter_id: str, record, path: Path) -> int:
        factors = self.store.version_factors(adapter_id, record.sha256)
        if factors is None:
            raise _Changed
        if factors.rank > self.max_lora_rank:
            raise IncompatibleAdapterError(
                f"adapter {short(adapter_id)} has rank {factors.rank} (as materialized) but "
                f"vLLM serves at most max_lora_rank = {self.max_lora_rank}: raise "
                "max_lora_rank")
        start = time.perf_counter()
        size = write_peft_dir(factors, path, layer_prefix=self.layer_prefix)
        seconds = time.perf_counter() - start
        for observe in self._load_observers:
            observe(seconds)
        return size

    def _drop_user(self, name: str) -> None:
        with self._lock:
            left = self._users.get(name, 0) - 1
            if left > 0:
                self._users[name] = left
                return
            self._users.pop(name, None)
            retire = name in self._stale
            self._stale.discard(name)
            lora_int_id = self._int_ids.get(name)
        if retire and lora_int_id is not None:
            self._retire(name, lora_int_id)

    # -- the slot-manager surface the store calls ---------------------------------------
    def invalidate(self, adapter_id: str) -> None:
        """``adapter_id`` was replaced or deleted: its known versions leave vLLM and the
        cache once unused (now if nobody uses them); its pin is dropped."""
        pinned = None
        with self._lock:
            old = self._current.pop(adapter_id, None)
            pinned = self._pinned.pop(adapter_id, None)
            versions = {n for n in self._int_ids if n.rpartition("@")[0] == adapter_id}
            idle = [(n, self._int_ids[n]) for n in versions if n not in self._users]
            self._stale |= versions - {n for n, _ in idle}
        if pinned is not None:
            self.done(pinned)  # may retire it right away
        for name, lora_int_id in idle:
            self._retire(name, lora_int_id)
        if old is not None:
            log.info("adapter %s changed: version %s leaves vLLM when unused", adapter_id, old)

    def pin(self, adapter_id: str) -> int:
        """Load the current version into vLLM (``add_lora``) and keep it there and in its
        directory until ``unpin``; returns its ``lora_int_id``. Not vLLM's ``pin_lora``: it
        holds a device slot that vLLM's scheduler does not know of, so one pin plus
        ``max_loras`` other adapters in one step stopped the engine (KeyError in
        ``convert_mapping``). At most ``max_loras - 1`` pins."""
        with self._lock:
            if adapter_id in self._pinned:
                return self._pinned[adapter_id].lora_int_id
            if len(self._pinned) >= self.max_loras - 1:
                raise LimitExceededError(
                    f"{len(self._pinned)} adapters are pinned and vLLM has max_loras = "
                    f"{self.max_loras}; unpin one or raise max_loras")
        version = self.use(adapter_id)
        try:
            self._call(self.backend.add(version))
        except BaseException:
            self.done(version)
            raise
        with self._lock:
            previous = self._pinned.setdefault(adapter_id, version)
        if previous is not version:
            self.done(version)
        return previous.lora_int_id

    def unpin(self, adapter_id: str) -> None:
        """vLLM has no unpin: the version is removed from vLLM (its requests in flight go
        on; vLLM reloads it from its directory when next used), a no-op if not pinned."""
        with self._lock:
            version = self._pinned.pop(adapter_id, None)
        if version is None:
            return
        self._call(self.backend.remove(version.lora_int_id))
        self.done(version)

    def snapshot(self) -> SlotSnapshot:
        with self._lock:
            return SlotSnapshot(frozenset(self._current), frozenset(self._pinned))

    def observe_loads(self, callback: Callable[[float], None]) -> None:
        """``callback(seconds)`` after each adapter version materialized to a directory."""
        self._load_observers.append(callback)

    @property
    def stats(self) -> PoolStats:
        d = self.dirs.stats
        with self._lock:
            used, pinned = len(self._users), len(self._pinned)
        return PoolStats(d.hits, d.misses, d.evictions, d.write_seconds,
                         min(used, self.max_loras), self.max_loras, pinned)

    # -- vLLM calls ------------------------------------------------------------------
    def _retire(self, name: str, lora_int_id: int) -> None:
        """Remove a replaced or deleted version from vLLM and from the directory cache."""
        self.dirs.discard(name)
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._remove_soon, lora_int_id)

    def _remove_soon(self, lora_int_id: int) -> None:
        task = asyncio.ensure_future(self.backend.remove(lora_int_id))
        task.add_done_callback(_log_failure)

    def _call(self, coro: Coroutine) -> None:
        """Run ``coro`` on the engine's loop from a worker thread and wait for it."""
        if self.loop is None:
            coro.close()
            raise RequestFailedError("the vLLM engine has not started", Status.UNAVAILABLE)
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(PIN_TIMEOUT_S)


class _Changed(Exception):
    """The adapter was replaced between reading its record and reading its bytes."""


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("removing an adapter version from vLLM failed: %r", task.exception())
