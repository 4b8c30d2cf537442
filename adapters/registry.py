"""Durable adapter registry: one SQLite row per adapter, holding its file bytes.

SQLite runs in WAL mode with ``synchronous=FULL``: once ``register`` returns, the row
survives ``kill -9`` and power loss; a write interrupted before that leaves nothing.
Pure Python: no tensors here.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from .errors import (
    AdapterExistsError,
    AdapterInUseError,
    AdapterNotFoundError,
    InvalidAdapterError,
    short,
)
from .registry_rows import (
    AdapterRecord,
    NewAdapter,
    decode_token,
    encode_token,
    few,
    not_found,
    record_of,
    validated_row,
)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_COLUMNS = "id, kind, size, sha256, metadata, parent, created_at"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    data BLOB NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    metadata TEXT NOT NULL,
    parent TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS adapters_parent ON adapters(parent) WHERE parent IS NOT NULL;
"""


class Registry:
    """Thread-safe adapter registry over SQLite.

    Writes go through one connection guarded by a lock. On a file, every reading thread
    has its own read-only connection and takes no lock: in WAL mode a read never waits
    for a write's transaction or fsync, so a registration burst never stalls a lookup or
    a metrics scrape. ``":memory:"`` (tests) has one connection for both, under the lock.
    Use as a context manager or call ``close``.
    """

    def __init__(self, path: str | os.PathLike = ":memory:") -> None:
        self._path = os.fspath(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self._path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        self._shared_reads = self._path == ":memory:" or self._path == ""
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._closed = False

    def close(self) -> None:
        """Close every connection; later calls fail."""
        with self._lock:
            self._closed = True
            for conn in [self._conn, *self._readers]:
                conn.close()
            self._readers.clear()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A connection to read from: this thread's own, or the shared one under the lock."""
        if self._shared_reads:
            with self._lock:
                yield self._conn
            return
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
            conn.execute("PRAGMA query_only=ON")
            with self._lock:
                if self._closed:
                    conn.close()
                    raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
                self._readers.append(conn)
            self._local.conn = conn
        yield conn

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes -------------------------------------------------------------------------

    def register(self, adapter_id: str, kind: str, data: bytes, metadata: dict | None = None,
                 parent: str | None = None, replace: bool = False) -> AdapterRecord:
        """Store one adapter atomically and return its record.

        Raises ``InvalidAdapterIdError`` for a bad id, ``AdapterExistsError`` for a taken id
        unless ``replace``, ``AdapterInUseError`` when replacing a basis that tasks name as
        parent, ``AdapterNotFoundError`` for an unknown parent.
        """
        item = NewAdapter(adapter_id, kind, data, {} if metadata is None else metadata, parent)
        return self.register_many([item], replace=replace)[0]

    def register_many(self, items: Iterable[NewAdapter],
                      replace: bool = False) -> list[AdapterRecord]:
        """Store several adapters (an RMM basis and its tasks) in one transaction: all or
        nothing. A basis may be replaced together with every task that names it."""
        rows = [validated_row(item) for item in items]
        ids = [r[0] for r in rows]
        if len(set(ids)) != len(ids):
            raise InvalidAdapterError(f"register_many: duplicate ids in one batch: {ids}")
        now = time.time()
        with self._lock, _transaction(self._conn):
            for row in rows:
                self._check_write(row, rows, replace)
            self._conn.executemany(
                "INSERT OR REPLACE INTO adapters "
                "(id, kind, data, size, sha256, metadata, parent, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(*row, now) for row in rows],
            )
        return [AdapterRecord(i, k, size, sha, json.loads(m), p, now)
                for i, k, _, size, sha, m, p in rows]

    def delete(self, adapter_id: str) -> None:
        """Remove an adapter. ``AdapterInUseError`` if tasks still name it as parent."""
        with self._lock, _transaction(self._conn):
            _get(self._conn, adapter_id)
            users = _dependents(self._conn, adapter_id)
            if users:
                raise AdapterInUseError(
                    f"adapter {short(adapter_id)} is the basis of {few(users)}; delete those first"
                )
            self._conn.execute("DELETE FROM adapters WHERE id = ?", (adapter_id,))

    def _check_write(self, row: tuple, batch: list[tuple], replace: bool) -> None:
        adapter_id, kind, parent = row[0], row[1], row[6]
        exists = self._conn.execute(
            "SELECT 1 FROM adapters WHERE id = ?", (adapter_id,)).fetchone() is not None
        if exists and not replace:
            raise AdapterExistsError(
                f"adapter {short(adapter_id)} is already registered; pass replace=true to overwrite"
            )
        batch_ids = {r[0] for r in batch}
        if exists:
            users = [u for u in _dependents(self._conn, adapter_id) if u not in batch_ids]
            if users:
                raise AdapterInUseError(
                    f"cannot replace {short(adapter_id)}: it is the basis of {few(users)}; "
                    "replace them in the same batch or delete them first"
                )
        if parent is not None:
            parent_kind = next((r[1] for r in batch if r[0] == parent), None)
            parent_kind = parent_kind or _kind_of(self._conn, parent)
            if parent_kind is None:
                raise AdapterNotFoundError(
                    f"{kind} {short(adapter_id)} names basis {short(parent)}, which is not "
                    f"registered"
                )
            if parent_kind != "rmm-basis":
                raise InvalidAdapterError(
                    f"{short(adapter_id)} names {short(parent)} as its basis, but that is a "
                    f"{parent_kind}"
                )

    # -- reads --------------------------------------------------------------------------

    def get(self, adapter_id: str) -> AdapterRecord:
        """The record of ``adapter_id`` or ``AdapterNotFoundError``."""
        with self._reading() as conn:
            return _get(conn, adapter_id)

    def data(self, adapter_id: str) -> bytes:
        """The stored adapter file bytes."""
        with self._reading() as conn:
            row = conn.execute("SELECT data FROM adapters WHERE id = ?", (adapter_id,)).fetchone()
        if row is None:
            raise not_found(adapter_id)
        return bytes(row[0])

    def contains(self, adapter_id: str) -> bool:
        """Whether ``adapter_id`` is registered."""
        with self._reading() as conn:
            return _kind_of(conn, adapter_id) is not None

    __contains__ = contains

    def count(self) -> int:
        """Number of registered adapters."""
        with self._reading() as conn:
            return conn.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]

    def list(self, page_size: int = DEFAULT_PAGE_SIZE,
             page_token: str = "") -> tuple[list[AdapterRecord], str]:
        """One page of records in id order and the token of the next page ("" at the end).

        ``page_size`` 0 means the default; otherwise it must lie in 1..1000.
        """
        if isinstance(page_size, bool) or not isinstance(page_size, int) or not (
            0 <= page_size <= MAX_PAGE_SIZE
        ):
            raise InvalidAdapterError(f"page_size must be 1..{MAX_PAGE_SIZE}, got "
                                      f"{short(page_size)}")
        page_size = page_size or DEFAULT_PAGE_SIZE
        after = decode_token(page_token)
        with self._reading() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM adapters WHERE id > ? ORDER BY id LIMIT ?",
                (after, page_size + 1),
            ).fetchall()
        records = [record_of(r) for r in rows[:page_size]]
        token = encode_token(records[-1].id) if len(rows) > page_size else ""
        return records, token

    def dependents(self, adapter_id: str) -> list[str]:
        """Ids of the rows that name ``adapter_id`` as parent, sorted."""
        with self._reading() as conn:
            _get(conn, adapter_id)
            return _dependents(conn, adapter_id)

    def verify(self) -> list[str]:
        """Check the database: SQLite's ``integrity_check`` plus the size and sha256 of every
        row. Returns the problems found (empty when all is well)."""
        with self._lock:
            problems = [r[0] for r in self._conn.execute("PRAGMA integrity_check")]
            problems = [] if problems == ["ok"] else problems
            cursor = self._conn.execute("SELECT id, size, sha256, data FROM adapters")
            for adapter_id, size, sha, data in cursor:
                if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
                    problems.append(f"adapter {short(adapter_id)}: stored bytes do not match "
                                    "their size or sha256")
        return problems



def _get(conn: sqlite3.Connection, adapter_id: str) -> AdapterRecord:
    row = conn.execute(f"SELECT {_COLUMNS} FROM adapters WHERE id = ?",
                       (adapter_id,)).fetchone()
    if row is None:
        raise not_found(adapter_id)
    return record_of(row)


def _kind_of(conn: sqlite3.Connection, adapter_id: str) -> str | None:
    row = conn.execute("SELECT kind FROM adapters WHERE id = ?", (adapter_id,)).fetchone()
    return None if row is None else row[0]


def _dependents(conn: sqlite3.Connection, adapter_id: str) -> list[str]:
    rows = conn.execute("SELECT id FROM adapters WHERE parent = ? ORDER BY id", (adapter_id,))
    return [r[0] for r in rows]


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def iter_all(registry: Registry, page_size: int = MAX_PAGE_SIZE) -> Iterator[AdapterRecord]:
    """Every record, page by page (each page a separate read)."""
    token = ""
    while True:
        records, token = registry.list(page_size, token)
        yield from records
        if not token:
            return
