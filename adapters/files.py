"""Reading adapter files from paths a caller chose, without a check-then-use race.

Each path is opened once; when the server confines reads to ``allowed_dirs``, the
descriptor's real path (``/proc/self/fd``) is what is checked, and every later read goes
through that descriptor (a PEFT directory's files are opened relative to it), never
through the caller's path again: swapping a directory for a symlink between the check and
the read cannot redirect it. Every ``OSError`` becomes a typed error naming the path.

    with open_checked(path, allowed_dirs) as fd: data = read_fd(fd, "file", max_bytes)
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidAdapterError, LimitExceededError, PathNotAllowedError, short

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not block the open
_CHUNK = 1 << 20
PATH_CHARS = 200  # a path in an error message is cut to about this many characters
_WHY = {  # errno -> what it means for an adapter path
    errno.ENOENT: "does not exist", errno.ENOTDIR: "does not exist (a parent is not a "
    "directory)", errno.ENAMETOOLONG: "is too long for the file system",
    errno.ELOOP: "has too many levels of symbolic links",
}


def confine(path: str | os.PathLike, allowed_dirs: list[str]) -> Path:
    """``path`` with symlinks resolved, if it lies in one of ``allowed_dirs`` (resolved the
    same way); else ``PathNotAllowedError``. Nothing is opened, only paths are resolved."""
    if not allowed_dirs:
        raise PathNotAllowedError(
            "this server reads no adapter paths: set the config key adapter_dirs to the "
            "directories it may load from, or send the adapter bytes (POST /v1/adapters)")
    if "\0" in os.fspath(path):
        raise InvalidAdapterError(f"adapter path {shown(path)} contains a NUL "
                                  "byte; send a valid path")
    real = Path(os.path.realpath(path))
    for allowed in allowed_dirs:
        root = Path(os.path.realpath(allowed))
        if real == root or root in real.parents:
            return real
    raise PathNotAllowedError(
        f"{shown(path)} is outside the server's adapter_dirs "
        f"({', '.join(allowed_dirs)}); put the adapter under one of them")


def shown(path: str | os.PathLike) -> str:
    """``path`` for an error message, cut to about ``PATH_CHARS`` characters."""
    return short(os.fspath(path), PATH_CHARS)


def fd_path(fd: int) -> str:
    """The real path of what ``fd`` is open on (Linux ``/proc/self/fd``)."""
    return os.readlink(f"/proc/self/fd/{fd}")


@contextlib.contextmanager
def os_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised while reading ``path`` into a typed error naming it."""
    try:
        yield
    except OSError as e:
        where = f"adapter path {shown(path)}"
        if e.errno in (errno.EACCES, errno.EPERM):
            raise PathNotAllowedError(f"{where}: the server may not read it ({e.strerror}); "
                                      "make it readable by the server") from None
        why = _WHY.get(e.errno, f"cannot be read ({e.strerror})")
        raise InvalidAdapterError(f"{where} {why}; send the path of an adapter file or PEFT "
                                  "LoRA directory") from None


@contextlib.contextmanager
def open_checked(path: str | os.PathLike, allowed_dirs: list[str] | None,
                 dir_fd: int | None = None) -> Iterator[int]:
    """A descriptor on ``path`` (relative to ``dir_fd`` if given), closed on exit. With
    ``allowed_dirs`` the path is checked first (nothing outside them is opened unless a
    race swaps it in) and the descriptor after (such a race is refused)."""
    if allowed_dirs is not None and dir_fd is None:
        confine(path, allowed_dirs)
    fd = os.open(path, _FLAGS, dir_fd=dir_fd)
    try:
        if allowed_dirs is not None:
            check_fd(fd, path, allowed_dirs)
        yield fd
    finally:
        os.close(fd)


def check_fd(fd: int, path: str | os.PathLike, allowed_dirs: list[str]) -> None:
    """``PathNotAllowedError`` unless ``fd`` is open on something inside ``allowed_dirs``."""
    try:
        real = fd_path(fd)
    except OSError:
        raise PathNotAllowedError(f"cannot tell where {shown(path)} lies (no "
                                  "/proc/self/fd); load adapters by bytes instead") from None
    try:
        confine(real, allowed_dirs)
    except PathNotAllowedError:
        raise PathNotAllowedError(
            f"{shown(path)} leads outside the server's adapter_dirs "
            f"({', '.join(allowed_dirs)}); put the adapter under one of them") from None


def is_dir(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def read_fd(fd: int, name: str, max_bytes: int | None) -> bytes:
    """All bytes of the regular file open on ``fd``; more than ``max_bytes`` (if given) is
    ``LimitExceededError``, checked before and while reading."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise InvalidAdapterError(f"{shown(name)} is not a regular file; point "
                                  "at an adapter file or a PEFT LoRA directory")
    _check_size(name, info.st_size, max_bytes)
    chunks, total = [], 0
    while chunk := os.read(fd, _CHUNK):
        chunks.append(chunk)
        total += len(chunk)
        _check_size(name, total, max_bytes)
    return b"".join(chunks)


def _check_size(name: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise LimitExceededError(f"{shown(name)} has {size} bytes or more; the limit is "
                                 f"{max_bytes} (config max_message_bytes)")
