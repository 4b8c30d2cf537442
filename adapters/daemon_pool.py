"""A pool of daemon threads for calls that may block forever."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future


class DaemonPool:
    """``submit(fn, *args)`` runs on ``threads`` daemon threads, started on first use,
    for work that may never end (a grammar compile cannot be stopped; a read from a hung
    database never returns), so the process never waits for one to exit; its ``Future``
    can be cancelled until a thread takes it."""

    def __init__(self, threads: int, name: str) -> None:
        self.threads, self.name = threads, name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._started = threading.Lock()
        self._running = False

    def submit(self, fn, *args) -> Future:
        with self._started:
            if not self._running:
                for i in range(self.threads):
                    threading.Thread(target=self._run, name=f"{self.name}-{i}",
                                     daemon=True).start()
                self._running = True
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self._queue.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - the waiter re-raises it
                    future.set_exception(e)
