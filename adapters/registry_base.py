"""The registry interface. ``Registry`` holds every rule both backends share, written
once in SQL that SQLite and PostgreSQL both accept (``registry_sql.py``):

- register and register_many are atomic (an RMM basis with its tasks: all or nothing) and
  durable once they return (the acknowledgement is the database's commit);
- a taken id is refused unless ``replace``; an RMM basis that tasks name cannot change alone;
- ``list`` pages in id order; ``count`` and ``list`` read the ``adapters`` table only: the
  bytes live in ``adapter_blobs``;
- every register, replace and delete bumps the adapter's version in ``adapter_versions``
  (one counter per registry, taken under the write lock, so versions commit in order):
  ``changes_since(v)`` is what other processes poll (``registry_watch.py``);
- scoping: a registry opened with ``scope`` (the base model's fingerprint, an opaque
  string) writes it into each row and reads only rows of that scope plus unscoped ones; a
  row of another scope looks absent and its id cannot be taken;
- the schema carries its version; ``registry_schema.py`` migrates older ones at open.

Backends (``registry_sqlite.py``, ``registry_pg.py``) supply connections, transactions
and the fault mapping: a database that cannot be reached raises
``RegistryUnavailableError`` (UNAVAILABLE). Pure Python: no tensors here.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

from . import registry_sql as sql
from .errors import (
    AdapterDamagedError,
    AdapterError,
    AdapterInUseError,
    AdapterNotFoundError,
    InvalidAdapterError,
    short,
)
from .ids import ADAPTER_ID_PATTERN
from .registry_rows import (
    AdapterRecord,
    NewAdapter,
    check_write,
    decode_token,
    encode_token,
    few,
    not_found,
    record_of,
    row_problems,
    validated_row,
)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
Change = tuple[str, int]  # (adapter id, version)


class Registry(ABC):
    """Thread-safe adapter registry. Use as a context manager or call ``close``.

    A backend implements ``_writing`` (a connection inside a write transaction that holds
    the registry's write lock), ``_reading`` (a connection to read from), ``_run`` (one
    statement), ``_announce`` (tell other processes about a committed version), ``close``
    and ``verify``.
    """

    def __init__(self, scope: str | None) -> None:
        self.scope = scope  # None: every row; else this base model's (module docstring)
        self._in_scope, self._scope_args = sql.scope_clause(scope)
        self._own: set[int] | None = None  # versions this object wrote, once watched
        # held by a write from before its transaction until its version is in ``_own``:
        # ``foreign_changes_since`` never sees a write of ours committed but not recorded
        self._recording = threading.Lock()

    # -- what a backend supplies -----------------------------------------------------

    @abstractmethod
    def _writing(self) -> AbstractContextManager[Any]: ...

    @abstractmethod
    def _reading(self) -> AbstractContextManager[Any]: ...

    @abstractmethod
    def _run(self, conn: Any, sql: str, args: tuple = ()) -> Any:
        """Execute one statement written with ``?`` placeholders; returns the cursor."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection; later calls fail."""

    @abstractmethod
    def verify(self) -> list[str]:
        """Check the stored bytes of every row against its size and sha256 (plus the
        backend's own integrity check); returns the problems found."""

    def _announce(self, conn: Any, version: int) -> None:
        """Inside the write transaction: tell listeners ``version`` commits (default: no
        one listens; pollers see it through ``changes_since``)."""

    def listener(self) -> Any | None:
        """An object whose ``wait(timeout)`` returns True when another process announced
        a change, or None when the backend has no announcements (then only polling)."""
        return None

    def track_own_writes(self) -> None:
        """From now on remember the versions this object writes, so that a watcher of
        this process skips its own changes (``foreign_changes_since``)."""
        if self._own is None:
            self._own = set()

    def _wrote(self, version: int) -> None:
        if self._own is not None:
            self._own.add(version)

    @property
    def location(self) -> str:
        """Where the registry lives, for messages (no credentials)."""
        return type(self).__name__

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
        with self._recording:
            version = self._commit_rows(rows, replace, now)
            self._wrote(version)
        return [AdapterRecord(i, k, size, sha, json.loads(m), p, now, self.scope)
                for i, k, _, size, sha, m, p in rows]

    def _commit_rows(self, rows: list[tuple], replace: bool, now: float) -> int:
        with self._writing() as conn:
            for row in rows:
                self._check_write(conn, row, rows, replace)
            version = self._next_version(conn)
            for adapter_id, kind, data, size, sha, meta, parent in rows:
                self._run(conn, sql.UPSERT, (adapter_id, kind, size, sha, meta, parent, now,
                                          self.scope))
                self._run(conn, sql.UPSERT_BLOB, (adapter_id, data))
                self._run(conn, sql.BUMP, (adapter_id, version, 0))
            self._announce(conn, version)
        return version

    def delete(self, adapter_id: str) -> None:
        """Remove an adapter. ``AdapterInUseError`` if tasks still name it as parent."""
        with self._recording:
            self._wrote(self._commit_delete(adapter_id))

    def _commit_delete(self, adapter_id: str) -> int:
        with self._writing() as conn:
            self._get(conn, adapter_id)
            users = self._dependents(conn, adapter_id)
            if users:
                raise AdapterInUseError(
                    f"adapter {short(adapter_id)} is the basis of {few(users)}; delete those first"
                )
            version = self._next_version(conn)
            self._run(conn, "DELETE FROM adapter_blobs WHERE id = ?", (adapter_id,))
            self._run(conn, "DELETE FROM adapters WHERE id = ?", (adapter_id,))
            self._run(conn, sql.BUMP, (adapter_id, version, 1))
            self._announce(conn, version)
        return version

    def _next_version(self, conn: Any) -> int:
        """One past the newest version; the write lock makes versions commit in order."""
        return self._run(conn, sql.NEXT_VERSION).fetchone()[0]

    def _check_write(self, conn: Any, row: tuple, batch: list[tuple], replace: bool) -> None:
        owner = self._run(conn, f"SELECT {sql.SCOPE_COLUMN} FROM adapters WHERE id = ?",
                          (row[0],)).fetchone()
        check_write(row, batch, replace, self.scope, owner,
                    lambda i: self._dependents(conn, i), lambda i: self._kind_of(conn, i))

    # -- reads --------------------------------------------------------------------------

    def get(self, adapter_id: str) -> AdapterRecord:
        """The record of ``adapter_id`` or ``AdapterNotFoundError``."""
        with self._reading() as conn:
            return self._get(conn, adapter_id)

    def data(self, adapter_id: str) -> bytes:
        """The stored adapter file bytes, checked against their recorded sha256 (a damaged
        file or database is ``AdapterDamagedError``, never a silently different adapter)."""
        with self._reading() as conn:
            row = _storable(adapter_id) and self._run(
                conn, "SELECT b.data, a.sha256 FROM adapter_blobs b JOIN adapters a ON "
                f"a.id = b.id WHERE a.id = ?{self._in_scope}",
                (adapter_id, *self._scope_args)).fetchone()
            if not row:
                raise self._not_found(conn, adapter_id)
        data = bytes(row[0])
        if hashlib.sha256(data).hexdigest() != row[1]:
            raise AdapterDamagedError(
                f"the registry's bytes of adapter {short(adapter_id)} do not match their "
                f"sha256 ({self.location} is damaged): register it again with replace, or "
                "restore the registry; `nolaserve registry check` lists what is damaged")
        return data

    def contains(self, adapter_id: str) -> bool:
        """Whether ``adapter_id`` is registered."""
        with self._reading() as conn:
            return self._kind_of(conn, adapter_id) is not None

    __contains__ = contains

    def count(self) -> int:
        """Number of registered adapters."""
        with self._reading() as conn:
            return self._run(conn, f"SELECT COUNT(*) FROM adapters WHERE TRUE{self._in_scope}",
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
            rows = self._run(conn, f"SELECT {sql.COLUMNS} FROM adapters WHERE id > ?"
                             f"{self._in_scope} ORDER BY id LIMIT ?",
                             (after, *self._scope_args, page_size + 1)).fetchall()
        records = [record_of(r) for r in rows[:page_size]]
        token = encode_token(records[-1].id) if len(rows) > page_size else ""
        return records, token

    def dependents(self, adapter_id: str) -> list[str]:
        """Ids of the rows that name ``adapter_id`` as parent, sorted."""
        with self._reading() as conn:
            self._get(conn, adapter_id)
            return self._dependents(conn, adapter_id)

    def changes_since(self, version: int) -> tuple[list[Change], int]:
        """``(adapter id, version)`` of every register, replace and delete committed after
        ``version``, oldest first, and the newest version (``version`` if none)."""
        with self._reading() as conn:
            rows = self._run(conn, sql.CHANGES_SINCE, (version,)).fetchall()
        changes = [(r[0], r[1]) for r in rows]
        return changes, max([version, *(v for _, v in changes)])

    def foreign_changes_since(self, version: int) -> tuple[list[Change], int]:
        """``changes_since`` less this object's own writes since ``track_own_writes``
        (each own version is skipped once, then forgotten)."""
        with self._recording:
            changes, newest = self.changes_since(version)
            own = self._own or set()
            foreign = [c for c in changes if c[1] not in own]
            own.difference_update(v for _, v in changes)
        return foreign, newest

    def version(self) -> int:
        """The newest committed version (0 for a registry never written)."""
        with self._reading() as conn:
            return self._run(conn, sql.NEWEST_VERSION).fetchone()[0]

    def _check_rows(self, conn: Any) -> list[str]:
        """Every row's stored bytes against its size and sha256."""
        return row_problems(self._run(conn, sql.ROWS_WITH_BYTES))

    # -- scoped lookups (``conn``: the write transaction's or a reader's) -------------

    def _get(self, conn: Any, adapter_id: str) -> AdapterRecord:
        if not _storable(adapter_id):
            raise not_found(adapter_id)
        row = self._run(conn, f"SELECT {sql.COLUMNS} FROM adapters WHERE id = ?{self._in_scope}",
                        (adapter_id, *self._scope_args)).fetchone()
        if row is None:
            raise self._not_found(conn, adapter_id)
        return record_of(row)

    def _kind_of(self, conn: Any, adapter_id: str) -> str | None:
        if not _storable(adapter_id):
            return None
        row = self._run(conn, f"SELECT kind FROM adapters WHERE id = ?{self._in_scope}",
                        (adapter_id, *self._scope_args)).fetchone()
        return None if row is None else row[0]

    def _dependents(self, conn: Any, adapter_id: str) -> list[str]:
        rows = self._run(conn, "SELECT id FROM adapters WHERE parent = ? ORDER BY id",
                         (adapter_id,)).fetchall()
        return [r[0] for r in rows]

    def _not_found(self, conn: Any, adapter_id: str) -> AdapterError:
        elsewhere = self.scope is not None and _storable(adapter_id) and self._run(
            conn, "SELECT 1 FROM adapters WHERE id = ?", (adapter_id,)).fetchone() is not None
        if elsewhere:
            return AdapterNotFoundError(
                f"no adapter {short(adapter_id)} for this base model: that id belongs to an "
                "adapter of another base model in this registry")
        return not_found(adapter_id)


def _storable(adapter_id: Any) -> bool:
    """Whether ``adapter_id`` can name a row: every id registered matches
    ``ADAPTER_ID_PATTERN`` (it always has), so any other (a lone surrogate, which no
    database driver encodes) is not found without a query."""
    return isinstance(adapter_id, str) and ADAPTER_ID_PATTERN.fullmatch(adapter_id) is not None
