"""Checks of config values read from YAML or flags: types, and token files."""

from __future__ import annotations

import os
import types
import typing


def read_token(path: str, key: str) -> str:
    try:
        with open(os.path.expanduser(path)) as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"config {key}: cannot read {path}: {e.strerror}") from None
    if not token:
        raise ValueError(f"config {key}: {path} is empty")
    return token


def check_type(key: str, value: object, hint: object) -> None:
    origin = typing.get_origin(hint)
    if origin is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(hint, types.UnionType):
        ok = isinstance(value, typing.get_args(hint))
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ValueError(f"config {key} has the wrong type: {value!r}")
