"""The PostgreSQL backend of the registry: one database shared by every replica.

psycopg 3 over a connection pool (``psycopg_pool``), autocommit connections, explicit
transactions for writes. A write transaction first takes a transaction-scoped advisory
lock, so writes from every replica are serialized: duplicate-id checks are exact across
replicas and versions commit in order (a poller never skips one). The acknowledgement of
a registration is the commit (``synchronous_commit`` as the server sets it, ``on`` by
default): a replica killed after it loses nothing. Each write also sends
``NOTIFY nolaserve_adapters`` with its version, delivered at commit to every listener.

A database that cannot be reached (refused, timed out, dropped mid-query) raises
``RegistryUnavailableError``; the pool reconnects by itself once it is back. So does a read
that gets no answer within ``timeout_s`` (a hung database, or a network that drops its
replies, would otherwise block it forever: reads run on daemon threads, ``_answered``, and
one that never returns holds only its thread and connection). After a fault, calls fail
at once for ``retry_s`` seconds instead of each waiting ``timeout_s`` (the hot path of a
request reads the registry: it must not stall while the database is down); the first
call after that tries the database again. The URL's
password never appears in a message; prefer ``PGPASSWORD`` or ``~/.pgpass`` to a password
in the URL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from .daemon_pool import DaemonPool
from .errors import RegistryUnavailableError
from .registry_base import Change, Registry
from .registry_rows import AdapterRecord
from .registry_schema import migrate

CHANNEL = "nolaserve_adapters"
_WRITE_LOCK = 0x6E6F6C61  # "nola": the advisory lock every write transaction takes
_FAULTS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


def _detail(error: Exception) -> str:
    """The first line of a database fault: what happened."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class PostgresRegistry(Registry):
    """The registry in a PostgreSQL database (``postgresql://user@host:port/db``)."""

    # ids compare bytewise ("C"), as in SQLite: the same page order on both backends
    types = {"blob": "BYTEA", "real": "DOUBLE PRECISION", "id": 'TEXT COLLATE "C"'}

    def __init__(self, url: str, scope: str | None = None, *, pool_size: int = 16,
                 timeout_s: float = 5.0, retry_s: float = 1.0) -> None:
        super().__init__(scope)
        self._url, self._timeout, self._retry_s = url, timeout_s, retry_s
        self._down: tuple[float, str] | None = None  # (when, message) of the last fault
        try:
            info = conninfo_to_dict(url)
        except psycopg.ProgrammingError as e:
            raise ValueError(f"registry_url is not a PostgreSQL URL: {e}") from None
        self._where = (f"PostgreSQL at {info.get('host', 'localhost')}:"
                       f"{info.get('port', 5432)}/{info.get('dbname', '')}")
        self._connect_args = {"autocommit": True,
                              "connect_timeout": max(2, round(timeout_s))}
        self._readers = DaemonPool(pool_size, "registry-read")
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False,
                                    kwargs=self._connect_args, timeout=timeout_s,
                                    check=ConnectionPool.check_connection,
                                    name="nolaserve-registry")
        try:  # one connection first: its error names the cause (the pool's: "incomplete")
            psycopg.connect(url, **self._connect_args).close()
        except _FAULTS as e:
            raise RegistryUnavailableError(f"the adapter registry ({self._where}) is "
                                           f"unreachable: {_detail(e)}") from None
        with self._faults():
            self._pool.open(wait=True, timeout=timeout_s)
        try:
            with self._writing() as conn:
                migrate(self, conn)
        except BaseException:
            self._pool.close()
            raise

    @property
    def location(self) -> str:
        return self._where

    def close(self) -> None:
        self._pool.close()

    def verify(self) -> list[str]:
        with self._reading() as conn:
            return self._check_rows(conn)

    def listener(self) -> Listener:
        """A connection of its own that LISTENs on the change channel."""
        return Listener(self)

    # -- reads, each within timeout_s ----------------------------------------------------

    def get(self, adapter_id: str) -> AdapterRecord:
        return self._answered(super().get, adapter_id)

    def data(self, adapter_id: str) -> bytes:
        return self._answered(super().data, adapter_id)

    def contains(self, adapter_id: str) -> bool:
        return self._answered(super().contains, adapter_id)

    __contains__ = contains

    def count(self) -> int:
        return self._answered(super().count)

    def list(self, page_size: int = 0, page_token: str = "") -> tuple[list[AdapterRecord], str]:
        return self._answered(super().list, page_size, page_token)

    def changes_since(self, version: int) -> tuple[list[Change], int]:
        return self._answered(super().changes_since, version)  # the watcher's: its health

    def _answered(self, read: Callable, *args):
        """``read(*args)`` on a reader thread, or ``RegistryUnavailableError`` once it has
        not answered in ``timeout_s`` (its thread waits on, holding its connection)."""
        self._check_down()
        try:
            return self._readers.submit(read, *args).result(timeout=self._timeout)
        except FutureTimeout:
            raise self._fault(f"no answer in {self._timeout:g} s") from None

    # -- the backend's primitives ------------------------------------------------------

    def _run(self, conn: psycopg.Connection, sql: str, args: tuple = ()) -> psycopg.Cursor:
        return conn.execute(sql.replace("?", "%s"), args)

    def _tables(self, conn: psycopg.Connection) -> set[str]:
        rows = conn.execute("SELECT tablename FROM pg_tables "
                            "WHERE schemaname = current_schema()").fetchall()
        return {r[0] for r in rows}

    def _columns(self, conn: psycopg.Connection, table: str) -> set[str]:
        rows = conn.execute("SELECT column_name FROM information_schema.columns WHERE "
                            "table_schema = current_schema() AND table_name = %s",
                            (table,)).fetchall()
        return {r[0] for r in rows}

    def _announce(self, conn: psycopg.Connection, version: int) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(version)))

    @contextmanager
    def _faults(self) -> Iterator[None]:
        self._check_down()
        try:
            yield
        except _FAULTS as e:
            raise self._fault(_detail(e)) from None
        self._down = None

    def _check_down(self) -> None:
        """``RegistryUnavailableError`` within ``retry_s`` of the last fault."""
        down = self._down
        if down is not None and time.monotonic() - down[0] < self._retry_s:
            raise RegistryUnavailableError(down[1])

    def _fault(self, detail: str) -> RegistryUnavailableError:
        """The error of a fault (``detail``: what happened), remembered for ``retry_s``."""
        message = (f"the adapter registry ({self._where}) is unreachable: {detail[:200]}. "
                   "Adapters this replica already holds keep serving; registrations and "
                   "adapters it does not hold fail until the database is back (retrying "
                   "the same registration is safe)")
        self._down = (time.monotonic(), message)
        return RegistryUnavailableError(message)

    @contextmanager
    def _writing(self) -> Iterator[psycopg.Connection]:
        with self._faults(), self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            yield conn

    @contextmanager
    def _reading(self) -> Iterator[psycopg.Connection]:
        with self._faults(), self._pool.connection() as conn:
            yield conn


class Listener:
    """``LISTEN nolaserve_adapters`` on a dedicated connection; ``wait`` returns when a
    change is announced or the timeout passes."""

    def __init__(self, registry: PostgresRegistry) -> None:
        self._registry = registry
        with registry._faults():
            self._conn = psycopg.connect(registry._url, **registry._connect_args)
            self._conn.execute(f"LISTEN {CHANNEL}")

    def wait(self, timeout: float) -> bool:
        """True if at least one change was announced within ``timeout`` seconds (every
        queued announcement is consumed); ``RegistryUnavailableError`` if the connection
        broke."""
        with self._registry._faults():
            got = any(True for _ in self._conn.notifies(timeout=timeout, stop_after=1))
            if got:  # the rest of a burst: one refresh covers them all
                for _ in self._conn.notifies(timeout=0.0):
                    pass
            return got

    def close(self) -> None:
        self._conn.close()
