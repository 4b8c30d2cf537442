"""Checks of config values read from YAML or flags: the file's keys, types, token files."""

from __future__ import annotations

import os
import re
import reprlib
import ssl
import types
import typing

import yaml


class _OnceLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that sets a key twice (YAML's spec forbids
    it; PyYAML keeps the last, so an earlier, maybe invalid, value was never checked)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *defaults``: may override
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(f"{self.name}, line {key_node.start_mark.line + 1}: config "
                                 f"key {key!r} is set twice: keep one")
            seen.append(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | os.PathLike) -> object:
    """The YAML document of the file at ``path``, each mapping's keys set once."""
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.load(f, Loader=_OnceLoader)
        except yaml.constructor.ConstructorError as e:  # a tag safe YAML does not build
            mark = e.problem_mark
            raise ValueError(f"{mark.name}, line {mark.line + 1}: {e.problem}: write plain "
                             "values (strings, numbers, lists, mappings), without tags "
                             "such as !!python/object") from None
        except RecursionError:
            raise ValueError(f"{path}: the YAML nests too deep to read: a config is a "
                             "mapping of plain values") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): "
                             "save it as UTF-8") from None


def read_token(path: str, key: str) -> str:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"config {key}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config {key}: {path} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start}): write the token as text") from None
    if not token:
        raise ValueError(f"config {key}: {path} is empty")
    return token


_SSL_REASONS = {  # OpenSSL's words -> what they mean here
    "KEY_VALUES_MISMATCH": "the key is not the certificate's",
    "NO_CERTIFICATE_ASSIGNED": "the key is not the certificate's (another key type)",
    "PEM lib": "a file is not PEM of its kind (tls_cert a certificate, tls_key a private key)",
}


def check_tls_pair(cert: str, key: str) -> None:
    """``ValueError`` unless ``cert`` and ``key`` are readable PEM files of one key pair
    (else the servers fail later, reported as a port that cannot be bound)."""
    def no_passphrase() -> bytes:  # else OpenSSL asks for it on the terminal
        raise ValueError("the key is encrypted: give it unencrypted (openssl pkey -in KEY "
                         "-out PLAIN)")

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            cert, key, password=no_passphrase)
    except ValueError as e:
        raise ValueError(f"config tls_key {key!r}: {e}") from None
    except OSError as e:  # ssl.SSLError too
        what = e.strerror if not isinstance(e, ssl.SSLError) else next(
            (why for text, why in _SSL_REASONS.items() if text in str(e)), str(e))
        raise ValueError(f"config tls_cert {cert!r} and tls_key {key!r} are not a PEM "
                         f"certificate and its private key: {what}") from None


BYTE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
              "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
BYTES_WANTED = 'an integer number of bytes, or a size such as "1 GiB" or "256MiB"'


def parse_bytes(key: str, value: object) -> object:
    """A ``*_bytes`` key's value: an int as it is; a size string such as ``"1 GiB"``
    (``BYTE_UNITS``) in bytes; anything else as it is, for the type check to refuse."""
    if not isinstance(value, str):
        return value
    size = _SIZE.fullmatch(value)
    if size is None or (size.group(2) or "B") not in BYTE_UNITS:
        raise ValueError(f"config {key} must be {BYTES_WANTED} (units "
                         f"{', '.join(BYTE_UNITS)}), got {value!r}")
    return int(float(size.group(1)) * BYTE_UNITS[size.group(2) or "B"])


def check_type(key: str, value: object, hint: object) -> None:
    origin = typing.get_origin(hint)
    if key.endswith("_bytes"):  # a size string is parsed when the Config is built
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
    elif origin is list:
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
        raise ValueError(f"config {key} must be {_wanted(key, hint)}, got {_shown(value)}")


def _shown(value: object) -> str:
    """``repr(value)``, bounded: YAML aliases nine deep make billions of items (a 386-byte
    file hung the check that printed them)."""
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxlist, shown.maxdict = 2, 4, 4
    shown.maxstring = shown.maxother = shown.maxlong = 64
    return shown.repr(value)


def _wanted(key: str, hint: object) -> str:
    """What a value of ``hint`` is, in words."""
    if key.endswith("_bytes"):
        return BYTES_WANTED
    if typing.get_origin(hint) is list:
        return "a list of strings (YAML [a, b], or the flag followed by them)"
    if isinstance(hint, types.UnionType):
        return " or ".join(_wanted("", h) for h in typing.get_args(hint))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(hint, str(hint))
