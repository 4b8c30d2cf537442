"""Adapter ids (no torch: the registry and the pure-Python bookkeeping use them)."""

import re

from .errors import InvalidAdapterIdError, short

MAX_ID_CHARS = 128
ADAPTER_ID_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._:/-]{{0,{MAX_ID_CHARS - 1}}}$")


def check_adapter_id(adapter_id: str) -> str:
    if not isinstance(adapter_id, str) or not ADAPTER_ID_PATTERN.fullmatch(adapter_id):
        raise InvalidAdapterIdError(
            f"invalid adapter id {short(adapter_id)}: use 1-{MAX_ID_CHARS} characters from "
            "[A-Za-z0-9._:/-], starting with a letter or digit"
        )
    return adapter_id


def check_new_adapter_id(adapter_id: str, base_model: str) -> str:
    """``check_adapter_id`` for an id being registered, which must also be a plain path
    (ids already registered keep serving) and not collide with a model name: the base
    model's own id names the base model, and ``<base id>:<x>`` (SGLang's form) names the
    adapter ``x``."""
    check_adapter_id(adapter_id)
    if any(part in ("", ".", "..") for part in adapter_id.split("/")):
        raise InvalidAdapterIdError(
            f"adapter id {short(adapter_id)} has an empty, '.' or '..' part between its "
            "slashes: an id may look like a path (org/name), but a plain one")
    if adapter_id == base_model or adapter_id.startswith(base_model + ":"):
        raise InvalidAdapterIdError(
            f"adapter id {short(adapter_id)} equals the base model's id or starts with "
            f"'{base_model}:', which requests use to name the base model or another "
            "adapter: register it under another id")
    return adapter_id
