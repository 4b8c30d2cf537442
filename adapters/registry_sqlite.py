"""The SQLite backend of the registry: the embedded default for one machine.

WAL mode with ``synchronous=FULL``: once ``register`` returns, the row survives ``kill -9``
and power loss; a write interrupted before that leaves nothing. Writes go through one
connection guarded by a lock (``BEGIN IMMEDIATE``, so versions commit in order even with
several processes on one file). On a file, every reading thread has its own read-only
connection and takes no lock: in WAL mode a read never waits for a write's transaction or
fsync, so a registration burst never stalls a lookup or a metrics scrape. ``":memory:"``
(tests) has one connection for both, under the lock.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import RegistryUnavailableError
from .registry_base import Registry
from .registry_schema import migrate


class SqliteRegistry(Registry):
    """The registry in one SQLite file (or ``":memory:"``)."""

    types = {"blob": "BLOB", "real": "REAL", "id": "TEXT"}

    def __init__(self, path: str | os.PathLike = ":memory:", scope: str | None = None) -> None:
        super().__init__(scope)
        self._path = self.path = os.fspath(path)
        self._lock = threading.Lock()
        with self._faults("open"):
            self._conn = sqlite3.connect(
                self._path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
        self._shared_reads = self._path in (":memory:", "")
        self._idle: list[sqlite3.Connection] = []  # read connections not in use
        self._closed = False
        with self._writing() as conn:
            migrate(self, conn)

    @property
    def location(self) -> str:
        return f"SQLite file {self._path}"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in [self._conn, *self._idle]:
                conn.close()  # one in use closes when its read ends
            self._idle.clear()

    def verify(self) -> list[str]:
        """SQLite's ``integrity_check`` plus the size and sha256 of every row."""
        with self._lock:
            problems = [r[0] for r in self._conn.execute("PRAGMA integrity_check")]
            problems = [] if problems == ["ok"] else problems
            return problems + self._check_rows(self._conn)

    def _run(self, conn: sqlite3.Connection, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        return conn.execute(sql, args)

    def _tables(self, conn: sqlite3.Connection) -> set[str]:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def _columns(self, conn: sqlite3.Connection, table: str) -> set[str]:
        return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """The write connection in ``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any
        exception), under the lock."""
        with self._lock, self._faults("write"):
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _faults(self, doing: str) -> Iterator[None]:
        """SQLite's own failures (a read-only or missing file or directory, a full disk,
        a damaged file, a lock held past the timeout) as ``RegistryUnavailableError``
        naming the file: a status that says what to fix, not an internal error."""
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise  # a constraint, or a closed registry: this process's own doing
        except sqlite3.DatabaseError as e:
            fix = ("registry_path must name a writable file in an existing directory (its "
                   "-wal and -shm files beside it writable too)"
                   if isinstance(e, sqlite3.OperationalError) else
                   "the file is damaged or not a registry: `nolaserve registry check "
                   "FILE` says what is wrong; restore it, or give another registry_path")
            raise RegistryUnavailableError(f"cannot {doing} the adapter registry, SQLite "
                                           f"file {self._path!r}: {e}; {fix}") from e

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A connection to read from: an idle one of the pool, or the shared one under the
        lock. The pool grows to the most reads at once and no further: a connection per
        thread leaked one file descriptor per metrics scrape (a new thread each)."""
        if self._shared_reads:
            with self._lock, self._faults("read"):
                yield self._conn
            return
        with self._lock:
            if self._closed:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            conn = self._idle.pop() if self._idle else None
        with self._faults("read"):
            if conn is None:
                conn = sqlite3.connect(self._path, check_same_thread=False,
                                       isolation_level=None, timeout=30.0)
                conn.execute("PRAGMA query_only=ON")
            try:
                yield conn
            finally:
                with self._lock:
                    if self._closed:
                        conn.close()
                    else:
                        self._idle.append(conn)
