"""Adapter bytes from a local path: a nolaserve adapter file, or a PEFT LoRA directory
converted on the fly. A server confines the paths it reads to its ``adapter_dirs``, so a
caller cannot make it read arbitrary files; the offline ``LLM`` reads any path.

    read_adapter_source(path, allowed_dirs=["/srv/adapters"], max_bytes=64 << 20) -> bytes

The path is opened once and checked by its descriptor; everything is read through that
descriptor (``files.py``), so a directory swapped for a symlink mid-load is never followed
outside ``adapter_dirs``.
"""

from __future__ import annotations

import os

from .files import is_dir, open_checked, os_errors, read_fd
from .peft_import import import_peft_fd


def read_adapter_source(path: str | os.PathLike, allowed_dirs: list[str] | None,
                        max_bytes: int) -> bytes:
    """The adapter file bytes at ``path``: the file itself, or, for a PEFT LoRA directory,
    its conversion to a nolaserve LoRA file. ``allowed_dirs=None`` reads any path; a list
    confines ``path`` and every file read under it (symlinks included) to those dirs. Any
    ``OSError`` becomes a typed error naming the path."""
    with os_errors(path), open_checked(path, allowed_dirs) as fd:
        if is_dir(fd):
            return import_peft_fd(fd, path, allowed_dirs, max_bytes).to_bytes()
        return read_fd(fd, os.fspath(path), max_bytes)
