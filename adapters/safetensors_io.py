"""Strict reading of untrusted safetensors bytes and typed access to their metadata.

Every adapter format is a safetensors file; this module turns any way such bytes can be
wrong (truncated, mutated, wrong dtype, absurd shapes, missing keys) into an
``InvalidAdapterError`` that names the problem, before any tensor is allocated.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from collections.abc import Callable

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from .errors import InvalidAdapterError, short

MAX_HEADER_BYTES = 16 << 20
# Free-text metadata: bytes of UTF-8 at most (docs/adapter-format.md). Registration refuses
# more; listings cut what an older registry may hold to the same size.
MAX_TEXT_BYTES = {"description": 4096, "base_model": 1024}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1}


def read(data: bytes, what: str = "adapter",
         strict: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Parse safetensors bytes into ``(metadata, tensors)`` or raise ``InvalidAdapterError``.
    ``strict`` (a file being registered): a key written twice in one JSON object of the
    header is refused; a file the registry holds is read as it was accepted (the last
    one wins, as the ``safetensors`` package reads it)."""
    header = _read_header(data, what, strict)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidAdapterError(f"{what}: __metadata__ must map strings to strings")
    body = len(data) - 8 - int.from_bytes(data[:8], "little")
    for name, info in header.items():
        _check_entry(name, info, body, what)
    try:
        tensors = _st_load(bytes(data))
    except Exception as e:  # safetensors raises its own error types
        raise InvalidAdapterError(f"{what}: not a valid safetensors file: {e}") from None
    return metadata, tensors


def read_format(data: bytes, what: str = "adapter") -> str:
    """The ``format`` metadata of safetensors bytes, read from the header alone."""
    metadata = _read_header(data, what, strict=False).get("__metadata__") or {}
    fmt = metadata.get("format") if isinstance(metadata, dict) else None
    if not isinstance(fmt, str):
        raise InvalidAdapterError(f"{what}: metadata key 'format' is missing")
    return fmt


def write(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Safetensors bytes with the header keys sorted, so equal content gives equal bytes
    (safetensors itself writes metadata in a random order, which would change a sha256)."""
    data = _st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    header += " " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header.encode() + data[8 + n :]


def _read_header(data: bytes, what: str, strict: bool) -> dict:
    if len(data) < 8:
        raise InvalidAdapterError(f"{what}: {len(data)} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > len(data) - 8:
        raise InvalidAdapterError(
            f"{what}: safetensors header claims {n} bytes but the file has {len(data) - 8} "
            "after the length prefix (truncated or not a safetensors file)"
        )
    if n > MAX_HEADER_BYTES:
        raise InvalidAdapterError(
            f"{what}: the safetensors header is {n} bytes, over the limit of "
            f"{MAX_HEADER_BYTES} (16 MiB): shorten its metadata")
    raw = bytes(data[8 : 8 + n])
    # Invalid UTF-8 decodes to lone surrogates, as an escaped "\ud800" parses: _check_utf8
    # then names the string that holds one.
    try:
        header = json.loads(raw.decode("utf-8", "surrogateescape"),
                            object_pairs_hook=_unique_keys(f"{what}: the safetensors header")
                            if strict else None,
                            parse_int=functools.partial(_header_int, what))
    except InvalidAdapterError:
        raise
    except RecursionError:
        raise InvalidAdapterError(f"{what}: safetensors header nests JSON too deeply") from None
    except ValueError as e:
        raise InvalidAdapterError(f"{what}: safetensors header is not valid JSON: "
                                  f"{_utf8_error(raw) or e}") from None
    if not isinstance(header, dict):
        raise InvalidAdapterError(f"{what}: safetensors header must be a JSON object")
    _check_utf8(header, what)
    return header


def _unique_keys(where: str) -> Callable[[list[tuple[str, object]]], dict]:
    """A ``json`` object hook that refuses a key written twice in one object."""
    def unique(pairs: list[tuple[str, object]]) -> dict:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise InvalidAdapterError(f"{where} holds the key {short(key)} twice; write "
                                          "each key once")
            out[key] = value
        return out
    return unique


def _header_int(what: str, text: str) -> int:
    """A JSON integer of the header: shapes and offsets are below 2^64 (20 digits), so a
    longer one is refused before ``int`` (which refuses over 4,300 digits in its own words)."""
    if len(text.lstrip("-")) > 20:
        raise InvalidAdapterError(f"{what}: safetensors header holds a {len(text)}-digit "
                                  "integer; shapes and data offsets must be below 2^64")
    return int(text)


def _utf8_error(raw: bytes) -> str:
    """The decoder's message if ``raw`` is not valid UTF-8 (outside a JSON string, where
    the JSON error would only point at a surrogate), else ""."""
    try:
        raw.decode()
    except UnicodeDecodeError as e:
        return str(e)
    return ""


def _check_utf8(header: dict, what: str) -> None:
    """Name the first metadata key, metadata value or tensor name that is not valid UTF-8."""
    metadata = header.get("__metadata__")
    for key, value in metadata.items() if isinstance(metadata, dict) else ():
        if not _is_utf8(key):
            raise InvalidAdapterError(f"{what}: metadata key {short(key)} is not valid UTF-8")
        if isinstance(value, str) and not _is_utf8(value):
            raise InvalidAdapterError(f"{what}: metadata {short(key)} is not valid UTF-8 (a "
                                      "byte sequence UTF-8 forbids, or a lone surrogate); "
                                      "write plain text")
    for name in header:
        if not _is_utf8(name):
            raise InvalidAdapterError(f"{what}: tensor name {short(name)} is not valid UTF-8")


def _is_utf8(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (invalid UTF-8 or an escaped one)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_entry(name: str, info: object, body: int, what: str) -> None:
    if not isinstance(info, dict):
        raise InvalidAdapterError(f"{what}: tensor {short(name)} has a malformed header entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _ITEMSIZE:
        raise InvalidAdapterError(f"{what}: tensor {short(name)} has unsupported dtype "
                                  f"{short(dtype)}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise InvalidAdapterError(f"{what}: tensor {short(name)} has an invalid shape "
                                  f"{short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1] <= body):
        raise InvalidAdapterError(f"{what}: tensor {short(name)} has data offsets outside the file")
    if math.prod(shape) * _ITEMSIZE[dtype] != offsets[1] - offsets[0]:
        raise InvalidAdapterError(
            f"{what}: tensor {short(name)} declares shape {shape} but holds "
            f"{offsets[1] - offsets[0]} bytes"
        )


_INTEGER = re.compile(r"0|[1-9][0-9]*")
# Unambiguous (no two ways to match one string), so a long non-number fails in linear time.
_FLOAT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


class Metadata:
    """Typed, validated access to a file's string metadata. ``strict`` (a file being
    registered): numbers must be written as the format says, integers in plain decimal
    without leading zeros and floats as decimal literals (``16``, ``-2.5``, ``1e-3``), and
    a JSON value holds no key twice; a file already in the registry is read as it was
    accepted then."""

    def __init__(self, metadata: dict[str, str], what: str, strict: bool = True):
        self.raw, self.what, self.strict = metadata, what, strict

    def str(self, key: str, default: str | None = None) -> str:
        value = self.raw.get(key, default)
        if value is None:
            raise InvalidAdapterError(f"{self.what}: metadata key {short(key)} is missing")
        return value

    def text(self, key: str) -> str:
        """Optional free text (``MAX_TEXT_BYTES``), "" when absent."""
        return check_text(key, self.raw.get(key, ""), self.what)

    def int(self, key: str, lo: int, hi: int) -> int:
        text = self.str(key)
        if not text.isascii() or not text.isdigit() or self.strict and not _INTEGER.fullmatch(text):
            raise InvalidAdapterError(
                f"{self.what}: metadata {short(key)} must be a decimal integer without "
                f"leading zeros, got {short(text)}"
            )
        digits = text.lstrip("0") or "0"  # leading zeros: a file read as it was accepted
        if len(digits) > len(str(hi)):  # before int(), which refuses over 4,300 digits
            raise InvalidAdapterError(
                f"{self.what}: metadata {short(key)} has {len(text)} digits; it must be in "
                f"[{lo}, {hi}]"
            )
        value = int(digits)
        if not lo <= value <= hi:
            raise InvalidAdapterError(
                f"{self.what}: metadata {short(key)} = {value} is outside [{lo}, {hi}]"
            )
        return value

    def float(self, key: str) -> float:
        text = self.str(key)
        try:
            if self.strict and not _FLOAT.fullmatch(text):
                raise ValueError(text)
            value = float(text)
        except ValueError:
            raise InvalidAdapterError(
                f"{self.what}: metadata {short(key)} must be a decimal number such as 16, "
                f"-2.5 or 1e-3, got {short(text)}"
            ) from None
        if not math.isfinite(value):
            raise InvalidAdapterError(f"{self.what}: metadata {short(key)} must be finite")
        return value

    def json(self, key: str, kind: type) -> object:
        text = self.str(key)
        hook = _unique_keys(f"{self.what}: metadata {short(key)}") if self.strict else None
        try:
            value = json.loads(text, object_pairs_hook=hook)
        except InvalidAdapterError:
            raise
        except (ValueError, RecursionError):
            raise InvalidAdapterError(f"{self.what}: metadata {short(key)} is not valid "
                                      f"JSON") from None
        if not isinstance(value, kind):
            raise InvalidAdapterError(
                f"{self.what}: metadata {short(key)} must be a JSON {kind.__name__}"
            )
        return value

    def check_format(self, fmt: str, version: str = "1") -> None:
        if self.str("format") != fmt:
            raise InvalidAdapterError(
                f"{self.what}: metadata 'format' is {short(self.raw['format'])}, expected "
                f"{fmt!r}"
            )
        if self.str("format_version") != version:
            raise InvalidAdapterError(
                f"{self.what}: unsupported format_version {short(self.raw['format_version'])} "
                f"for {fmt}; this server reads version {version}"
            )


def check_text(key: str, value: str, what: str) -> str:
    """``value`` if it is valid UTF-8 of at most ``MAX_TEXT_BYTES[key]`` bytes, else
    ``InvalidAdapterError`` naming the field and the limit."""
    limit = MAX_TEXT_BYTES[key]
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise InvalidAdapterError(f"{what}: metadata {key!r} is not valid UTF-8 (a lone "
                                  "surrogate); write plain text") from None
    if size > limit:
        raise InvalidAdapterError(f"{what}: metadata {key!r} has {size} bytes; the limit is "
                                  f"{limit} bytes of UTF-8: shorten it")
    return value


def cut_text(key: str, value: str) -> str:
    """``value`` as valid UTF-8 of at most ``MAX_TEXT_BYTES[key]`` bytes (for listing what
    an older registry holds; a cut one ends with " [cut]")."""
    data, limit = value.encode(errors="replace"), MAX_TEXT_BYTES[key]
    if len(data) > limit:
        return data[: limit - 6].decode(errors="ignore") + " [cut]"
    return data.decode()


def tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], what: str,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The named tensor, checked for dtype, shape and finiteness."""
    if name not in tensors:
        raise InvalidAdapterError(f"{what}: tensor {short(name)} is missing")
    t = tensors[name]
    if t.dtype != dtype:
        raise InvalidAdapterError(f"{what}: tensor {short(name)} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise InvalidAdapterError(
            f"{what}: tensor {short(name)} has shape {list(t.shape)}, expected {list(shape)}"
        )
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise InvalidAdapterError(f"{what}: tensor {short(name)} contains NaN or Inf")
    return t


def module_shapes(meta: Metadata, targets: list[str]) -> dict[str, tuple[int, int]]:
    """Read ``module_shapes`` (name -> [in, out]) and check it covers exactly ``targets``."""
    raw = meta.json("module_shapes", dict)
    if sorted(raw) != sorted(targets):
        raise InvalidAdapterError(
            f"{meta.what}: module_shapes keys {sorted(raw)} must equal target_modules {targets}"
        )
    shapes = {}
    for name, shape in raw.items():
        if not (isinstance(shape, list) and len(shape) == 2
                and all(type(d) is int and 0 < d <= 1 << 20 for d in shape)):
            raise InvalidAdapterError(
                f"{meta.what}: module_shapes[{short(name)}] must be [in_features, out_features]"
            )
        shapes[name] = (shape[0], shape[1])
    return shapes


def target_modules(meta: Metadata) -> list[str]:
    targets = meta.json("target_modules", list)
    if not targets or not all(isinstance(t, str) and t for t in targets) \
            or len(set(targets)) != len(targets):
        raise InvalidAdapterError(
            f"{meta.what}: target_modules must be a non-empty JSON list of distinct names"
        )
    return targets
