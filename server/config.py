"""The one configuration dataclass of nolaserve, validated on construction.

Every key, its default and its meaning are listed in docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

import yaml


@dataclass
class Config:
    # model
    model: str = ""  # local dir, hub id or .gguf path; "" = the embedded SmolLM2-135M-Instruct
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16
    cache_dir: str = "~/.cache/nolaserve"  # converted models, default registry
    target_modules: list[str] = field(default_factory=list)  # [] = every linear in a layer
    # adapters
    registry_path: str = ""  # "" = <cache_dir>/registry.db; ":memory:" for a throwaway one
    num_slots: int = 32
    max_rank: int = 16
    max_num_basis: int = 4096
    host_cache_entries: int = 10_000
    host_cache_bytes: int = 2 << 30
    # scheduling and KV cache
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    batch_invariant: bool = False  # each request's output independent of its batch (slower)
    block_size: int = 16
    kv_cache_bytes: int = 512 << 20
    # request limits
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 2048
    max_queued_requests: int = 1024
    max_message_bytes: int = 64 << 20
    # service
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090  # Prometheus text format over HTTP; 0 = off
    http_port: int = 8000  # the OpenAI-compatible HTTP API; 0 = off
    adapter_dirs: list[str] = field(default_factory=list)  # load_lora_adapter reads only here
    # Tokens: prefer the environment (NOLASERVE_ADMIN_TOKEN, NOLASERVE_INFERENCE_TOKEN) or a
    # file; a --admin-token flag is visible to every local user in /proc/<pid>/cmdline.
    admin_token: str = field(default="", repr=False)  # non-empty: Admin RPCs need a bearer
    inference_token: str = field(default="", repr=False)  # same for Inference RPCs
    admin_token_file: str = ""  # read admin_token from this file (surrounding space dropped)
    inference_token_file: str = ""  # same for inference_token
    tls_cert: str = ""  # PEM paths; both set = TLS
    tls_key: str = ""
    grace_period_s: float = 30.0  # SIGTERM: in-flight requests get this long to finish

    def __post_init__(self) -> None:
        positive = ("num_slots", "max_rank", "max_num_basis", "host_cache_entries",
                    "host_cache_bytes", "max_num_seqs", "max_num_batched_tokens", "block_size",
                    "kv_cache_bytes", "max_prompt_tokens", "max_tokens_limit",
                    "max_queued_requests", "max_message_bytes")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"config dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        for name in ("port", "metrics_port", "http_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"config {name} must be in [0, 65535]")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("config tls_cert and tls_key must be given together")
        if not self.grace_period_s >= 0:
            raise ValueError(f"config grace_period_s must be >= 0, got {self.grace_period_s}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(
                f"config device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )
        for key in ("admin_token", "inference_token"):
            path = getattr(self, f"{key}_file")
            if path and getattr(self, key):
                raise ValueError(f"config sets both {key} and {key}_file: keep one")
            if path:
                setattr(self, key, _read_token(path, f"{key}_file"))

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides: object) -> Config:
        """The YAML file at ``path`` (a mapping of keys above), then ``overrides`` (CLI
        flags; ``None`` values are ignored). Unknown keys and wrong types raise
        ``ValueError`` naming the key."""
        values: dict = {}
        if path is not None:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: the config file must be a YAML mapping of keys")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key, env in TOKEN_ENV.items():  # the environment, unless set another way
            if not values.get(key) and not values.get(f"{key}_file") and os.environ.get(env):
                values[key] = os.environ[env]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in fields:
                raise ValueError(f"unknown config key {key!r}; see docs/configuration.md")
            _check_type(key, value, typing.get_type_hints(cls)[key])
        return cls(**values)


TOKEN_ENV = {"admin_token": "NOLASERVE_ADMIN_TOKEN",
             "inference_token": "NOLASERVE_INFERENCE_TOKEN"}


def _read_token(path: str, key: str) -> str:
    try:
        with open(os.path.expanduser(path)) as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"config {key}: cannot read {path}: {e.strerror}") from None
    if not token:
        raise ValueError(f"config {key}: {path} is empty")
    return token


def _check_type(key: str, value: object, hint: object) -> None:
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
