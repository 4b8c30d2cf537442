"""Other processes' registry writes, applied to this one; and the registry's health.

A ``RegistryWatcher`` thread keeps the newest registry version it has applied. It wakes
when the backend announces a change (PostgreSQL ``LISTEN``) and at least every
``interval_s`` seconds regardless (the poll, a safety net against a missed announcement),
reads ``changes_since`` and calls ``on_change(adapter_id)`` for each adapter another
process registered, replaced or deleted: the store drops its parsed copy and marks its
slot stale, exactly as for a local replace. So a change acknowledged anywhere is applied
here within ``interval_s`` plus one query, and usually within milliseconds.

Every read it makes is also the registry's health check: ``on_health(up, message)`` is
called whenever the registry goes down or comes back. While it is down the watcher
retries every ``interval_s``; once back, ``changes_since`` applies everything written in
between, deletes included. Pure Python: no tensors.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from .errors import RegistryUnavailableError
from .registry_base import Registry

log = logging.getLogger("nolaserve.registry")


class RegistryWatcher:
    """Applies changes from other processes; ``start`` it, ``stop`` it."""

    def __init__(self, registry: Registry, on_change: Callable[[str], None], *,
                 interval_s: float = 1.0,
                 on_health: Callable[[bool, str], None] | None = None,
                 listen: bool = True) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.registry, self.on_change, self.interval_s = registry, on_change, interval_s
        self.on_health, self.listen = on_health, listen
        self.up: bool | None = None  # None until the first read
        self.message = ""
        registry.track_own_writes()
        self.applied = registry.version()  # what this process read is at least this new
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-watch", daemon=True)

    def start(self) -> RegistryWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def refresh(self) -> list[str]:
        """Apply every change after ``applied`` now; returns the ids handed to
        ``on_change`` (raises ``RegistryUnavailableError``)."""
        changes, newest = self.registry.foreign_changes_since(self.applied)
        foreign = [adapter_id for adapter_id, _ in changes]
        for adapter_id in dict.fromkeys(foreign):
            self.on_change(adapter_id)
        self.applied = newest
        return foreign

    def _run(self) -> None:
        listener = None
        while not self._stop.is_set():
            try:
                if self.listen and listener is None:
                    listener = self.registry.listener()
                self.refresh()
                self._health(True, "")
                if listener is None:
                    self._stop.wait(self.interval_s)
                else:
                    listener.wait(self.interval_s)
            except RegistryUnavailableError as e:
                listener = _closed(listener)
                self._health(False, str(e))
                self._stop.wait(self.interval_s)
            except Exception as e:  # a bug must not end the thread: log it and keep polling
                log.exception("registry watcher failed; retrying")
                listener = _closed(listener)
                self._health(False, f"the registry watcher failed: {e!r:.200}")
                self._stop.wait(self.interval_s)
        _closed(listener)

    def _health(self, up: bool, message: str) -> None:
        if up == self.up:
            return
        self.up, self.message = up, message
        if up:
            log.info("the adapter registry (%s) is reachable", self.registry.location)
        else:
            log.error("%s", message)
        if self.on_health is not None:
            self.on_health(up, message)


def _closed(listener) -> None:
    if listener is not None:
        with contextlib.suppress(Exception):
            listener.close()
    return None
