"""Adapter ids (no torch: the registry and the pure-Python bookkeeping use them)."""

import re

from .errors import InvalidAdapterIdError, short

ADAPTER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def check_adapter_id(adapter_id: str) -> str:
    if not isinstance(adapter_id, str) or not ADAPTER_ID_PATTERN.fullmatch(adapter_id):
        raise InvalidAdapterIdError(
            f"invalid adapter id {short(adapter_id)}: use 1-128 characters from "
            "[A-Za-z0-9._:/-], starting with a letter or digit"
        )
    return adapter_id
