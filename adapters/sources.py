"""Adapter bytes from a local path: a nolaserve adapter file, or a PEFT LoRA directory
converted on the fly. A server confines the paths it reads to its ``adapter_dirs``, so a
caller cannot make it read arbitrary files; the offline ``LLM`` reads any path.

    read_adapter_source(path, allowed_dirs=["/srv/adapters"], max_bytes=64 << 20) -> bytes
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidAdapterError, LimitExceededError, PathNotAllowedError
from .peft_import import import_peft

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def confine(path: str | os.PathLike, allowed_dirs: list[str]) -> Path:
    """``path`` with symlinks resolved, if it lies in one of ``allowed_dirs`` (resolved the
    same way); else ``PathNotAllowedError``. Nothing is opened, only paths are resolved."""
    if not allowed_dirs:
        raise PathNotAllowedError(
            "this server reads no adapter paths: set the config key adapter_dirs to the "
            "directories it may load from, or send the adapter bytes (POST /v1/adapters)")
    real = Path(os.path.realpath(path))
    for allowed in allowed_dirs:
        root = Path(os.path.realpath(allowed))
        if real == root or root in real.parents:
            return real
    raise PathNotAllowedError(
        f"{str(path)!r} is outside the server's adapter_dirs ({', '.join(allowed_dirs)}); "
        "put the adapter under one of them")


def read_adapter_source(path: str | os.PathLike, allowed_dirs: list[str] | None,
                        max_bytes: int) -> bytes:
    """The adapter file bytes at ``path``: the file itself, or, for a PEFT LoRA directory,
    its conversion to a nolaserve LoRA file. ``allowed_dirs=None`` reads any path; a list
    confines ``path`` and every file read under it (symlinks included) to those dirs."""
    real = confine(path, allowed_dirs) if allowed_dirs is not None else Path(path)
    if real.is_dir():
        files = [real / name for name in PEFT_FILES]
        for f in files:
            if allowed_dirs is not None and f.exists():
                confine(f, allowed_dirs)
            if f.is_file():
                _check_size(f, max_bytes)
        return import_peft(real).to_bytes()
    if not real.is_file():
        raise InvalidAdapterError(f"{str(path)!r} is neither an adapter file nor a PEFT "
                                  "LoRA directory")
    _check_size(real, max_bytes)
    return real.read_bytes()


def _check_size(path: Path, max_bytes: int) -> None:
    size = path.stat().st_size
    if size > max_bytes:
        raise LimitExceededError(f"{path.name} has {size} bytes; the limit is {max_bytes} "
                                 "(config max_message_bytes)")
