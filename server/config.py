"""The one configuration dataclass of nolaserve, validated on construction.

Every key, its default and its meaning are listed in docs/configuration.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    block_size: int = 16
    kv_cache_bytes: int = 512 << 20
    # request limits
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 2048
    max_queued_requests: int = 1024

    def __post_init__(self) -> None:
        positive = ("num_slots", "max_rank", "max_num_basis", "host_cache_entries",
                    "host_cache_bytes", "max_num_seqs", "max_num_batched_tokens", "block_size",
                    "kv_cache_bytes", "max_prompt_tokens", "max_tokens_limit",
                    "max_queued_requests")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"config dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(
                f"config device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )
