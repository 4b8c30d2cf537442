"""The warm tier: materialized factors of recently loaded adapters, kept in host memory so
that reloading an evicted adapter into a slot is a copy, not a regeneration.

The entries live in a ``HostCache`` bounded by ``warm_cache_bytes``; each holds the factors
already cast to the slot pool's dtype (fp16/bf16 when the server runs in half precision),
in pinned memory on CUDA, so that a slot filled from the tier holds exactly the bits a
regeneration would have written.
"""

from __future__ import annotations

import torch

from .cache import HostCache
from .spec import AdapterFactors, ModuleFactors

MAX_WARM_ENTRIES = 1 << 20  # the byte budget is the real bound


def warm_tier(max_bytes: int) -> HostCache | None:
    """A host LRU of materialized factors bounded by ``max_bytes``; None when 0 (off)."""
    if max_bytes < 0:
        raise ValueError(f"warm_cache_bytes must be >= 0, got {max_bytes}")
    return HostCache(MAX_WARM_ENTRIES, max_bytes) if max_bytes else None


def host_copy(factors: AdapterFactors, dtype: torch.dtype, pin: bool) -> AdapterFactors:
    """``factors`` copied to the host in ``dtype`` (the slot pool's), pinned if ``pin``,
    under the same version; the copy shares no memory with ``factors`` (a slot's views)."""
    def host(t: torch.Tensor) -> torch.Tensor:
        t = t.to("cpu", dtype, memory_format=torch.contiguous_format, copy=True)
        return t.pin_memory() if pin else t

    return AdapterFactors({key: ModuleFactors(host(f.A), host(f.B), f.scale)
                           for key, f in factors.modules.items()}, version=factors.version)
