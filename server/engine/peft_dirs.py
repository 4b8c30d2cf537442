"""A bounded directory of materialized adapters, one PEFT LoRA directory per adapter
version (``<root>/<version>``), for an engine that loads adapters from paths (vLLM).

Bytes on disk are bounded by ``max_bytes``: least recently used directories go first, but
never one in use (``acquire`` without its ``release``): a directory vLLM may still read
stays. When everything is in use the budget is exceeded rather than a user broken.
Directories are written under a temporary name and renamed, so a reader never sees half a
directory. Pure Python and the file system; thread-safe.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from nolaserve.adapters.errors import LimitExceededError
from nolaserve.adapters.single_flight import Flight


@dataclass(frozen=True)
class DirStats:
    hits: int
    misses: int
    evictions: int
    write_seconds: float
    entries: int
    bytes: int


def default_root() -> Path:
    """A fresh directory on tmpfs (``/dev/shm``) where there is one, else in the temp dir."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="nolaserve-peft-", dir=base))


class PeftDirCache:
    """``acquire(version, write)`` -> the directory of ``version``, written by
    ``write(path) -> bytes`` on a miss; pair every acquire with ``release(version)``."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.root, self.max_bytes = Path(root), max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # version -> bytes, LRU first
        self._users: dict[str, int] = {}
        self._doomed: set[str] = set()  # discarded while in use: removed at the last release
        self._loads: dict[str, Flight] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._write_seconds = 0.0

    def acquire(self, version: str, write: Callable[[Path], int]) -> Path:
        path = self.path_of(version)
        with self._lock:
            self._users[version] = self._users.get(version, 0) + 1
            self._doomed.discard(version)
            if version in self._sizes:
                self._sizes.move_to_end(version)
                self._hits += 1
                return path
            flight = self._loads.get(version)
            mine = flight is None
            if mine:
                flight = self._loads[version] = Flight()
                self._misses += 1
        try:
            if mine:
                flight.run(lambda: self._write(path, write),
                           lambda size, error: self._settle(version, size))
            else:
                flight.wait()
        except BaseException:
            self.release(version)
            raise
        return path

    def _write(self, path: Path, write: Callable[[Path], int]) -> int:
        start = time.perf_counter()
        with self._disk_full_is_a_limit():
            staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.root))
            try:
                size = write(staging)
                shutil.rmtree(path, ignore_errors=True)
                staging.rename(path)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        with self._lock:
            self._write_seconds += time.perf_counter() - start
        return size

    @contextlib.contextmanager
    def _disk_full_is_a_limit(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise LimitExceededError(
                f"no space left under {self.root} for an adapter directory ({e.strerror}); "
                "lower peft_cache_bytes or free space there, then retry") from None

    def _settle(self, version: str, size: int | None) -> None:
        with self._lock:
            self._loads.pop(version, None)
            if size is not None:
                self._sizes[version] = size
                self._bytes += size
                self._evict()

    def release(self, version: str) -> None:
        with self._lock:
            left = self._users.get(version, 0) - 1
            if left > 0:
                self._users[version] = left
                return
            self._users.pop(version, None)
            if version in self._doomed:
                self._doomed.discard(version)
                self._remove(version)
            self._evict()

    def discard(self, version: str) -> None:
        """Remove ``version`` (its adapter was replaced or deleted): now if unused, else at
        its last ``release``."""
        with self._lock:
            if self._users.get(version):
                self._doomed.add(version)
            else:
                self._remove(version)

    def path_of(self, version: str) -> Path:
        """The directory of ``version`` (an RMM task's ``/`` is escaped: one level)."""
        return self.root / quote(version, safe="@-_.")

    def in_use(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._users)

    @property
    def stats(self) -> DirStats:
        with self._lock:
            return DirStats(self._hits, self._misses, self._evictions, self._write_seconds,
                            len(self._sizes), self._bytes)

    def close(self) -> None:
        """Remove every directory and the root."""
        with self._lock:
            self._sizes.clear()
            self._bytes = 0
        shutil.rmtree(self.root, ignore_errors=True)

    def _evict(self) -> None:
        for version in list(self._sizes):
            if self._bytes <= self.max_bytes:
                return
            if version not in self._users:
                self._remove(version)
                self._evictions += 1

    def _remove(self, version: str) -> None:
        size = self._sizes.pop(version, None)
        if size is not None:
            self._bytes -= size
            shutil.rmtree(self.path_of(version), ignore_errors=True)
