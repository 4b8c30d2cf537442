"""Change notification between processes sharing a registry: LISTEN/NOTIFY wakes the
watcher, the poll catches what a notification missed, a process skips its own writes, and
the watcher reports the database going down and coming back."""

from __future__ import annotations

import queue
import threading

import pytest
from server_helpers import HANG_GUARD

from nolaserve.adapters.registry import open_registry
from nolaserve.adapters.registry_watch import RegistryWatcher


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'reg.db'}"
    return request.getfixturevalue("pg_url")


def next_change(changes: queue.Queue) -> str:
    return changes.get(timeout=HANG_GUARD)  # a hang guard, not a speed requirement


@pytest.mark.parametrize("listen", [True, False])
def test_other_processes_writes_reach_the_watcher_and_its_own_do_not(url, listen):
    """With listen=False only the poll runs: the safety net alone delivers every change."""
    changes: queue.Queue = queue.Queue()
    with open_registry(url) as here, open_registry(url) as there:
        here.register("before", "lora", b"0")  # older than the watcher: not a change
        watcher = RegistryWatcher(here, changes.put, interval_s=0.2, listen=listen).start()
        try:
            here.register("mine", "lora", b"1")  # this process's own: skipped ...
            here.delete("mine")  # ... deletions too
            there.register("a", "lora", b"1")
            assert next_change(changes) == "a"
            there.register("a", "lora", b"2", replace=True)
            assert next_change(changes) == "a"
            there.register("b", "lora", b"1")
            assert next_change(changes) == "b"
            there.delete("b")
            assert next_change(changes) == "b"
            assert watcher.up is True
        finally:
            watcher.stop()
    assert changes.empty()


def test_a_read_between_an_own_writes_commit_and_its_record_still_skips_it(url, monkeypatch):
    """The race CI once hit: the NOTIFY woke the watcher after the commit and before the
    writer recorded its version, so the watcher took this process's write for another's.
    Here the watcher's refresh starts at exactly that moment; it must wait for the record."""
    changes: queue.Queue = queue.Queue()
    with open_registry(url) as here:
        watcher = RegistryWatcher(here, changes.put, interval_s=60, listen=False)
        record, reader = here._wrote, threading.Thread(target=watcher.refresh)

        def refresh_first(version: int) -> None:
            reader.start()
            reader.join(timeout=0.5)  # blocks on the recording lock; without it, done
            record(version)

        monkeypatch.setattr(here, "_wrote", refresh_first)
        here.register("mine", "lora", b"1")
        reader.join(timeout=HANG_GUARD)
        assert watcher.applied == here.version() and changes.empty()


def test_the_watcher_reports_the_database_down_and_back_and_catches_up(pg_url):
    import pg_helpers

    pg_helpers.control_dir()
    health: queue.Queue = queue.Queue()
    changes: queue.Queue = queue.Queue()
    with open_registry(pg_url) as here:
        watcher = RegistryWatcher(here, changes.put, interval_s=0.2,
                                  on_health=lambda up, msg: health.put((up, msg))).start()
        try:
            assert health.get(timeout=HANG_GUARD) == (True, "")
            pg_helpers.stop_postgres()
            try:
                up, message = health.get(timeout=HANG_GUARD)
                assert not up and "unreachable" in message and "PostgreSQL" in message
            finally:
                pg_helpers.start_postgres()
            assert health.get(timeout=HANG_GUARD) == (True, "")
            with open_registry(pg_url) as there:  # a write after the outage still arrives
                there.register("after", "lora", b"1")
            assert next_change(changes) == "after"
        finally:
            watcher.stop()
