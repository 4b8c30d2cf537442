"""The registry's rows, apart from the backends that keep them: the record and new-item
types, how an item is checked and turned into a row, the write rules, and page tokens.
Pure Python."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .errors import (
    AdapterError,
    AdapterExistsError,
    AdapterInUseError,
    AdapterNotFoundError,
    InvalidAdapterError,
    short,
)
from .ids import check_adapter_id

KINDS = ("nola", "lora", "rmm-task", "rmm-basis")
_TOKEN_PREFIX = "v1:"


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter, without its bytes (``Registry.data`` returns those)."""

    id: str
    kind: str
    size: int
    sha256: str
    metadata: dict = field(hash=False)
    parent: str | None
    created_at: float
    base_model_fingerprint: str | None = None  # the scope it was registered under


@dataclass(frozen=True)
class NewAdapter:
    """One item of ``Registry.register_many``; ``parent`` is the basis of an ``rmm-task``."""

    id: str
    kind: str
    data: bytes
    metadata: dict = field(default_factory=dict, hash=False)
    parent: str | None = None


def validated_row(item: NewAdapter) -> tuple:
    """``item`` as a row tuple ``(id, kind, data, size, sha256, metadata_json, parent)``."""
    check_adapter_id(item.id)
    if item.kind not in KINDS:
        raise InvalidAdapterError(f"adapter {item.id!r}: kind {item.kind!r} is not one of {KINDS}")
    if not isinstance(item.data, (bytes, bytearray, memoryview)):
        raise InvalidAdapterError(f"adapter {item.id!r}: data must be bytes")
    if (item.kind == "rmm-task") != (item.parent is not None):
        raise InvalidAdapterError(
            f"adapter {item.id!r}: an rmm-task needs a parent basis and other kinds take none"
        )
    if item.parent is not None:
        check_adapter_id(item.parent)
    if not isinstance(item.metadata, dict):
        raise InvalidAdapterError(f"adapter {item.id!r}: metadata must be a JSON object")
    try:
        meta = json.dumps(item.metadata, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidAdapterError(f"adapter {item.id!r}: metadata is not JSON: {e}") from None
    data = bytes(item.data)
    return (item.id, item.kind, data, len(data), hashlib.sha256(data).hexdigest(), meta,
            item.parent)


def check_write(row: tuple, batch: list[tuple], replace: bool, scope: str | None,
                owner: tuple | None, dependents: Callable[[str], list[str]],
                kind_of: Callable[[str], str | None]) -> None:
    """Whether ``row`` (of ``batch``) may be written: ``owner`` is the stored row's
    ``(scope,)`` or None; ``dependents``/``kind_of`` look up stored rows. Raises
    ``AdapterExistsError``, ``AdapterInUseError``, ``AdapterNotFoundError`` or
    ``InvalidAdapterError``."""
    adapter_id, kind, parent = row[0], row[1], row[6]
    exists = owner is not None
    if exists and scope is not None and owner[0] not in (None, scope):
        raise AdapterExistsError(
            f"adapter id {short(adapter_id)} is taken by an adapter of another base model "
            "in this registry; pick another id")
    if exists and not replace:
        raise AdapterExistsError(
            f"adapter {short(adapter_id)} is already registered; pass replace=true to overwrite")
    batch_ids = {r[0] for r in batch}
    if exists:
        users = [u for u in dependents(adapter_id) if u not in batch_ids]
        if users:
            raise AdapterInUseError(
                f"cannot replace {short(adapter_id)}: it is the basis of {few(users)}; "
                "delete them first (or rebuild the basis under a new id)")
    if parent is not None:
        parent_kind = next((r[1] for r in batch if r[0] == parent), None) or kind_of(parent)
        if parent_kind is None:
            raise AdapterNotFoundError(
                f"{kind} {short(adapter_id)} names basis {short(parent)}, which is not "
                "registered")
        if parent_kind != "rmm-basis":
            raise InvalidAdapterError(
                f"{short(adapter_id)} names {short(parent)} as its basis, but that is a "
                f"{parent_kind}")


def row_problems(rows: Iterable[tuple]) -> list[str]:
    """Problems of ``(id, size, sha256, data)`` rows whose bytes are missing or do not
    match their size and sha256."""
    problems = []
    for adapter_id, size, sha, data in rows:
        if data is None:
            problems.append(f"adapter {short(adapter_id)}: its stored bytes are missing")
        elif len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            problems.append(f"adapter {short(adapter_id)}: stored bytes do not match "
                            "their size or sha256")
    return problems


def record_of(row: tuple) -> AdapterRecord:
    adapter_id, kind, size, sha, meta, parent, created, scope = row
    return AdapterRecord(adapter_id, kind, size, sha, json.loads(meta), parent, created, scope)


def not_found(adapter_id: str) -> AdapterError:
    return AdapterNotFoundError(f"no adapter is registered under id {short(adapter_id)}")


def few(ids: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


def encode_token(last_id: str) -> str:
    return base64.urlsafe_b64encode((_TOKEN_PREFIX + last_id).encode()).decode()


def decode_token(token: str) -> str:
    """The id after which the page starts ("" for the first page, or the token of "")."""
    if token == "":
        return ""
    try:
        text = base64.b64decode(token, altchars=b"-_", validate=True).decode()
        if not text.startswith(_TOKEN_PREFIX):
            raise ValueError(text)
        last = text[len(_TOKEN_PREFIX):]
        return last and check_adapter_id(last)
    except (TypeError, ValueError, binascii.Error):
        raise InvalidAdapterError(
            f"invalid page_token {short(token)}: pass the next_page_token of a previous page"
        ) from None
