"""Durable adapter registry: one SQLite row per adapter, holding its file bytes.

SQLite runs in WAL mode with ``synchronous=FULL``: once ``register`` returns, the row
survives ``kill -9`` and power loss; a write interrupted before that leaves nothing.
Pure Python: no tensors here.

Scoping: a registry opened with ``scope`` (the base model's fingerprint; the registry
treats it as an opaque string) writes it into each row it registers and reads only rows
of that scope, plus rows without one (written before scoping existed, or by an unscoped
registry). A row of another scope looks absent, and its id cannot be taken. Files of the
older schema gain the column when opened (``NULL`` for their rows) and lose nothing.
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
    AdapterError,
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
_COLUMNS = "id, kind, size, sha256, metadata, parent, created_at, base_model_fingerprint"
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
_SCOPE_COLUMN = "base_model_fingerprint"  # added in place to files of the first schema


class Registry:
    """Thread-safe adapter registry over SQLite.

    Writes go through one connection guarded by a lock. On a file, every reading thread
    has its own read-only connection and takes no lock: in WAL mode a read never waits
    for a write's transaction or fsync, so a registration burst never stalls a lookup or
    a metrics scrape. ``":memory:"`` (tests) has one connection for both, under the lock.
    Use as a context manager or call ``close``.
    """

    def __init__(self, path: str | os.PathLike = ":memory:", scope: str | None = None) -> None:
        self._path = self.path = os.fspath(path)
        self.scope = scope  # None: every row; else this base model's (module docstring)
        # appended to WHERE clauses: this scope's rows and unscoped ones
        self._in_scope = "" if scope is None else (
            f" AND ({_SCOPE_COLUMN} IS NULL OR {_SCOPE_COLUMN} = ?)")
        self._scope_args: tuple = () if scope is None else (scope,)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self._path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        _migrate(self._conn)
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
                f"(id, kind, data, size, sha256, metadata, parent, created_at, {_SCOPE_COLUMN}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*row, now, self.scope) for row in rows],
            )
        return [AdapterRecord(i, k, size, sha, json.loads(m), p, now, self.scope)
                for i, k, _, size, sha, m, p in rows]

    def delete(self, adapter_id: str) -> None:
        """Remove an adapter. ``AdapterInUseError`` if tasks still name it as parent."""
        with self._lock, _transaction(self._conn):
            self._get(self._conn, adapter_id)
            users = _dependents(self._conn, adapter_id)
            if users:
                raise AdapterInUseError(
                    f"adapter {short(adapter_id)} is the basis of {few(users)}; delete those first"
                )
            self._conn.execute("DELETE FROM adapters WHERE id = ?", (adapter_id,))

    def _check_write(self, row: tuple, batch: list[tuple], replace: bool) -> None:
        adapter_id, kind, parent = row[0], row[1], row[6]
        owner = self._conn.execute(
            f"SELECT {_SCOPE_COLUMN} FROM adapters WHERE id = ?", (adapter_id,)).fetchone()
        exists = owner is not None
        if exists and self.scope is not None and owner[0] not in (None, self.scope):
            raise AdapterExistsError(
                f"adapter id {short(adapter_id)} is taken by an adapter of another base model "
                "in this registry file; pick another id")
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
            parent_kind = parent_kind or self._kind_of(self._conn, parent)
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
            return self._get(conn, adapter_id)

    def data(self, adapter_id: str) -> bytes:
        """The stored adapter file bytes."""
        with self._reading() as conn:
            row = conn.execute(f"SELECT data FROM adapters WHERE id = ?{self._in_scope}",
                               (adapter_id, *self._scope_args)).fetchone()
            if row is None:
                raise self._not_found(conn, adapter_id)
        return bytes(row[0])

    def contains(self, adapter_id: str) -> bool:
        """Whether ``adapter_id`` is registered."""
        with self._reading() as conn:
            return self._kind_of(conn, adapter_id) is not None

    __contains__ = contains

    def count(self) -> int:
        """Number of registered adapters."""
        with self._reading() as conn:
            return conn.execute(f"SELECT COUNT(*) FROM adapters WHERE 1{self._in_scope}",
                                self._scope_args).fetchone()[0]

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
                f"SELECT {_COLUMNS} FROM adapters WHERE id > ?{self._in_scope} "
                "ORDER BY id LIMIT ?",
                (after, *self._scope_args, page_size + 1),
            ).fetchall()
        records = [record_of(r) for r in rows[:page_size]]
        token = encode_token(records[-1].id) if len(rows) > page_size else ""
        return records, token

    def dependents(self, adapter_id: str) -> list[str]:
        """Ids of the rows that name ``adapter_id`` as parent, sorted."""
        with self._reading() as conn:
            self._get(conn, adapter_id)
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

    # -- scoped lookups (``conn``: the write connection under the lock, or a reader) ---

    def _get(self, conn: sqlite3.Connection, adapter_id: str) -> AdapterRecord:
        row = conn.execute(f"SELECT {_COLUMNS} FROM adapters WHERE id = ?{self._in_scope}",
                           (adapter_id, *self._scope_args)).fetchone()
        if row is None:
            raise self._not_found(conn, adapter_id)
        return record_of(row)

    def _kind_of(self, conn: sqlite3.Connection, adapter_id: str) -> str | None:
        row = conn.execute(f"SELECT kind FROM adapters WHERE id = ?{self._in_scope}",
                           (adapter_id, *self._scope_args)).fetchone()
        return None if row is None else row[0]

    def _not_found(self, conn: sqlite3.Connection, adapter_id: str) -> AdapterError:
        elsewhere = self.scope is not None and conn.execute(
            "SELECT 1 FROM adapters WHERE id = ?", (adapter_id,)).fetchone() is not None
        if elsewhere:
            return AdapterNotFoundError(
                f"no adapter {short(adapter_id)} for this base model: that id belongs to an "
                "adapter of another base model in this registry file")
        return not_found(adapter_id)


def _dependents(conn: sqlite3.Connection, adapter_id: str) -> list[str]:
    rows = conn.execute("SELECT id FROM adapters WHERE parent = ? ORDER BY id", (adapter_id,))
    return [r[0] for r in rows]


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a file of an older schema up to date in place, keeping every row."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(adapters)")}
    if _SCOPE_COLUMN not in columns:
        with _transaction(conn):
            columns = {r[1] for r in conn.execute("PRAGMA table_info(adapters)")}
            if _SCOPE_COLUMN not in columns:  # another process may have just done it
                conn.execute(f"ALTER TABLE adapters ADD COLUMN {_SCOPE_COLUMN} TEXT")
    conn.execute(f"CREATE INDEX IF NOT EXISTS adapters_scope ON adapters({_SCOPE_COLUMN}, id)")


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
