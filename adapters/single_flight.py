"""One loader call shared by every caller that wants the same thing at the same time.

The caller that finds no ``Flight`` for its key (under its owner's lock) creates one and
``run``s the loader; the callers that find it ``wait`` and get the same value or the same
exception. ``HostCache.get_or_load`` keys flights by adapter id, ``SlotPool.acquire`` by
slot. Pure Python.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Flight(Generic[T]):
    """One loader call in flight."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def run(self, load: Callable[[], T],
            settle: Callable[[T | None, BaseException | None], None]) -> T:
        """Call ``load()``; then ``settle(value, None)`` or ``settle(None, error)`` (the
        owner's bookkeeping, done before any waiter wakes); return the value or re-raise."""
        try:
            value = load()
        except BaseException as e:
            self._error = e
            try:
                settle(None, e)
            finally:
                self._done.set()
            raise
        self._value = value
        try:
            settle(value, None)
        finally:
            self._done.set()
        return value

    def wait(self) -> T:
        """Block until ``run`` is done; its value, or its exception raised here too."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value
