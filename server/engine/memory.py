"""How many KV blocks the engine gets: what is left of the memory budget after the model,
the adapter slot pool and the activations of the largest step.

- CUDA: ``gpu_memory_utilization`` of the device's total memory (as vLLM). A profiling
  forward of ``max_num_batched_tokens`` tokens measures the peak that weights, slots and
  activations take; memory that other processes hold is subtracted too; the rest is KV.
- CPU: ``cpu_kv_cache_fraction`` of the RAM available at startup (``MemAvailable``),
  capped at what ``max_num_seqs`` sequences of ``max_model_len`` tokens can use. The cache
  is allocated with ``torch.empty``, so pages are committed only as blocks are written.
- ``kv_cache_bytes > 0`` overrides both.

Every budget holds the cache's scratch block too (``KVCache``), so the cache allocated
never passes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kv_cache import KVCache


@dataclass(frozen=True)
class KVSizing:
    """What the cache got and why, for the startup log and ``nolaserve info``."""

    num_blocks: int
    block_size: int
    budget_bytes: int
    source: str  # "kv_cache_bytes", "gpu_memory_utilization 0.9", ...

    @property
    def max_tokens(self) -> int:
        """Token positions the whole cache holds: the longest context that fits."""
        return self.num_blocks * self.block_size


def available_ram_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo``; else physical pages (no Linux procfs)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cuda_kv_budget(device: torch.device, utilization: float, profile: Callable[[], None]) -> int:
    """Bytes left for KV blocks on ``device`` after ``profile()`` (the largest step) ran:
    ``utilization * total - peak allocated - memory held outside this process's torch``."""
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    outside = total - free - torch.cuda.memory_reserved(device)  # other processes, CUDA ctx
    torch.cuda.reset_peak_memory_stats(device)
    profile()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return int(total * utilization) - peak - outside


def size_kv_cache(*, kv_cache_bytes: int, device: torch.device, gpu_memory_utilization: float,
                  cpu_fraction: float, block_size: int, bytes_per_block: int, max_seqs: int,
                  max_model_len: int, profile: Callable[[], None]) -> KVSizing:
    """The cache for these settings (module docstring). Raises ``ValueError`` when not one
    block fits."""
    if kv_cache_bytes > 0:
        budget, source = kv_cache_bytes, "kv_cache_bytes"
    elif device.type == "cuda":
        budget = cuda_kv_budget(device, gpu_memory_utilization, profile)
        source = f"gpu_memory_utilization {gpu_memory_utilization}"
    else:
        usable = (-(-max_model_len // block_size) * max_seqs + 1) * bytes_per_block
        budget = min(int(available_ram_bytes() * cpu_fraction), usable)
        source = f"cpu_kv_cache_fraction {cpu_fraction} of available RAM"
    blocks = max(0, budget) // bytes_per_block - 1  # and KVCache's scratch block
    if blocks < 1:
        raise ValueError(f"the KV cache budget ({source}: {max(0, budget)} B) holds no block "
                         f"of {bytes_per_block} B beside the scratch block; raise it or set "
                         "kv_cache_bytes")
    return KVSizing(blocks, block_size, budget, source)


def bytes_per_block(text_config, block_size: int, dtype: torch.dtype) -> int:
    """KV bytes of one block over all layers of a transformers text config."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return KVCache.bytes_per_block(text_config.num_hidden_layers, block_size, kv_heads,
                                   head_dim, dtype)
