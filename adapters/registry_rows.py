"""The registry's rows, apart from the SQLite store that keeps them: the record and
new-item types, how an item is checked and turned into a row, and page tokens. Pure
Python."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field

from .errors import AdapterError, AdapterNotFoundError, InvalidAdapterError, short
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
    """The id after which the page starts ("" for the first page)."""
    if token == "":
        return ""
    try:
        text = base64.b64decode(token, altchars=b"-_", validate=True).decode()
        if not text.startswith(_TOKEN_PREFIX):
            raise ValueError(text)
        return check_adapter_id(text[len(_TOKEN_PREFIX):])
    except (TypeError, ValueError, binascii.Error):
        raise InvalidAdapterError(
            f"invalid page_token {short(token)}: pass the next_page_token of a previous page"
        ) from None
