"""The registry's schema, as numbered migrations that both backends run at open.

``schema_version`` holds the version a database is at; each migration moves it up by one
inside the registry's write transaction (both SQLite and PostgreSQL have transactional
DDL), so a crash mid-migration leaves the older schema whole, and replicas that start
together migrate once. Files of SQLite registries from before this table existed are
recognised by their columns (version 1: no scope column; 2: with it).

    1  adapters (bytes in a ``data`` column)
    2  + base_model_fingerprint (scoping) and its index
    3  bytes move to adapter_blobs, so listing and counting never read them;
       + adapter_versions, the per-adapter version every write bumps (change notification)
"""

from __future__ import annotations

from typing import Any, Protocol

from .errors import RegistrySchemaError

_V1 = [
    "CREATE TABLE adapters (id {id} PRIMARY KEY, kind TEXT NOT NULL, data {blob} NOT NULL, "
    "size INTEGER NOT NULL, sha256 TEXT NOT NULL, metadata TEXT NOT NULL, parent TEXT, "
    "created_at {real} NOT NULL)",
    "CREATE INDEX adapters_parent ON adapters(parent) WHERE parent IS NOT NULL",
]
_V2 = [
    "ALTER TABLE adapters ADD COLUMN base_model_fingerprint TEXT",
    "CREATE INDEX adapters_scope ON adapters(base_model_fingerprint, id)",
]
_V3 = [
    "CREATE TABLE adapter_blobs (id {id} PRIMARY KEY, data {blob} NOT NULL)",
    "INSERT INTO adapter_blobs (id, data) SELECT id, data FROM adapters",
    "CREATE TABLE adapters_v3 (id {id} PRIMARY KEY, kind TEXT NOT NULL, "
    "size INTEGER NOT NULL, sha256 TEXT NOT NULL, metadata TEXT NOT NULL, parent TEXT, "
    "created_at {real} NOT NULL, base_model_fingerprint TEXT)",
    "INSERT INTO adapters_v3 SELECT id, kind, size, sha256, metadata, parent, created_at, "
    "base_model_fingerprint FROM adapters",
    "DROP TABLE adapters",
    "ALTER TABLE adapters_v3 RENAME TO adapters",
    "CREATE INDEX adapters_parent ON adapters(parent) WHERE parent IS NOT NULL",
    "CREATE INDEX adapters_scope ON adapters(base_model_fingerprint, id)",
    "CREATE TABLE adapter_versions (id {id} PRIMARY KEY, version BIGINT NOT NULL, "
    "deleted INTEGER NOT NULL)",
    "CREATE INDEX adapter_versions_version ON adapter_versions(version)",
    "INSERT INTO adapter_versions (id, version, deleted) SELECT id, 0, 0 FROM adapters",
]
MIGRATIONS = [_V1, _V2, _V3]
SCHEMA_VERSION = len(MIGRATIONS)


class Dialect(Protocol):
    """What a backend tells the migrations: its type names and its catalogue."""

    types: dict[str, str]  # {"blob": ..., "real": ..., "id": ...}

    def _run(self, conn: Any, sql: str, args: tuple = ()) -> Any: ...

    def _tables(self, conn: Any) -> set[str]: ...

    def _columns(self, conn: Any, table: str) -> set[str]: ...


def current_version(db: Dialect, conn: Any) -> int:
    tables = db._tables(conn)
    if "schema_version" in tables:
        row = db._run(conn, "SELECT MAX(version) FROM schema_version").fetchone()
        if row is not None and row[0] is not None:
            return row[0]
    if "adapters" not in tables:
        return 0
    return 2 if "base_model_fingerprint" in db._columns(conn, "adapters") else 1


def migrate(db: Dialect, conn: Any) -> int:
    """Bring the database (inside the caller's write transaction) to ``SCHEMA_VERSION``,
    keeping every row; returns the version it was at."""
    found = current_version(db, conn)
    if found > SCHEMA_VERSION:
        raise RegistrySchemaError(
            f"the registry's schema is version {found}, newer than this nolaserve's "
            f"{SCHEMA_VERSION}: upgrade nolaserve (a newer replica migrated it)")
    if found == SCHEMA_VERSION:
        return found
    db._run(conn, "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    for statements in MIGRATIONS[found:]:
        for sql in statements:
            db._run(conn, sql.format(**db.types))
    db._run(conn, "DELETE FROM schema_version")
    db._run(conn, "INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    return found
