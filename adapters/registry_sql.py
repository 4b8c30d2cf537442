"""The statements both registry backends run, written once with ``?`` placeholders in SQL
that SQLite and PostgreSQL both accept (the PostgreSQL backend rewrites the placeholders).
The tables are those of ``registry_schema.py``."""

from __future__ import annotations

SCOPE_COLUMN = "base_model_fingerprint"
COLUMNS = f"id, kind, size, sha256, metadata, parent, created_at, {SCOPE_COLUMN}"
UPSERT = (f"INSERT INTO adapters ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
          "ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, size = excluded.size, "
          "sha256 = excluded.sha256, metadata = excluded.metadata, parent = excluded.parent, "
          f"created_at = excluded.created_at, {SCOPE_COLUMN} = excluded.{SCOPE_COLUMN}")
UPSERT_BLOB = ("INSERT INTO adapter_blobs (id, data) VALUES (?, ?) "
               "ON CONFLICT (id) DO UPDATE SET data = excluded.data")
BUMP = ("INSERT INTO adapter_versions (id, version, deleted) VALUES (?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET version = excluded.version, deleted = excluded.deleted")
NEWEST_VERSION = "SELECT COALESCE(MAX(version), 0) FROM adapter_versions"
NEXT_VERSION = "SELECT COALESCE(MAX(version), 0) + 1 FROM adapter_versions"
CHANGES_SINCE = "SELECT id, version FROM adapter_versions WHERE version > ? ORDER BY version"
ROWS_WITH_BYTES = ("SELECT a.id, a.size, a.sha256, b.data FROM adapters a "
                   "LEFT JOIN adapter_blobs b ON a.id = b.id ORDER BY a.id")


def scope_clause(scope: str | None) -> tuple[str, tuple]:
    """The ``AND ...`` condition (and its arguments) that keeps a query to the rows of
    ``scope`` plus unscoped ones; nothing for a registry without a scope."""
    if scope is None:
        return "", ()
    return f" AND ({SCOPE_COLUMN} IS NULL OR {SCOPE_COLUMN} = ?)", (scope,)
