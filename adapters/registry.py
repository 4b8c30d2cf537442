"""The durable adapter registry: one interface (``registry_base.Registry``), two backends
(``registry_sqlite``, ``registry_pg``), opened by URL.

    open_registry("sqlite:///path" | "postgresql://user@host:port/db" | path, scope)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .errors import InvalidAdapterError, short
from .registry_base import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Change, Registry
from .registry_rows import AdapterRecord
from .registry_sqlite import SqliteRegistry

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "AdapterRecord", "Change", "Registry",
           "SqliteRegistry", "iter_all", "open_registry"]


def open_registry(url: str, scope: str | None = None, **options: Any) -> Registry:
    """The registry at ``url``: ``postgresql://...`` (or ``postgres://``), ``sqlite:///path``,
    ``sqlite://:memory:``, or a bare SQLite path. ``options`` go to the backend."""
    if url.startswith(("postgresql://", "postgres://")):
        from .registry_pg import PostgresRegistry

        return PostgresRegistry(url, scope=scope, **options)
    if url.startswith("sqlite://"):  # sqlite:///abs/path.db, sqlite:///:memory:
        url = url[len("sqlite://"):]
        url = url[1:] if url == "/:memory:" else url
    elif "://" in url:
        raise InvalidAdapterError(f"registry url {short(url)}: use sqlite:///path or "
                                  "postgresql://user@host:port/db")
    return SqliteRegistry(url or ":memory:", scope=scope, **options)


def iter_all(registry: Registry, page_size: int = MAX_PAGE_SIZE) -> Iterator[AdapterRecord]:
    """Every record, page by page (each page a separate read)."""
    token = ""
    while True:
        records, token = registry.list(page_size, token)
        yield from records
        if not token:
            return
