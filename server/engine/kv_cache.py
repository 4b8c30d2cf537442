"""The paged KV cache: keys and values of every layer in fixed-size blocks, and how many
blocks a memory budget holds."""

from __future__ import annotations

import torch


class KVCache:
    """Key/value storage in fixed-size blocks for every layer.

    ``k`` and ``v`` are ``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]``;
    the token at position ``p`` of a sequence with block table ``bt`` lives in KV slot
    ``bt[p // block_size] * block_size + p % block_size`` (a row of a layer's
    ``[num_blocks * block_size, Hkv, D]`` view; not to be confused with an adapter slot).
    One more block, ``scratch_block`` (id ``num_blocks``), is held by no sequence: the
    padding rows of a decode bucket write and read only there.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if min(num_layers, num_blocks, block_size, num_kv_heads, head_dim) < 1:
            raise ValueError(
                f"KV cache dimensions must be >= 1, got layers={num_layers} blocks={num_blocks} "
                f"block_size={block_size} kv_heads={num_kv_heads} head_dim={head_dim}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks
        shape = (num_layers, num_blocks + 1, block_size, num_kv_heads, head_dim)
        # Uninitialized: attention never reads a position before it is written (masked or
        # not loaded), and on CPU untouched pages are never committed.
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Bytes of keys plus values that one block takes over all layers."""
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, layer: int, kv_slot: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store the step's keys/values ``[T, Hkv, D]`` at KV slots ``kv_slot [T]``."""
        kl, vl = self.k[layer], self.v[layer]
        kl.view(-1, *kl.shape[2:]).index_copy_(0, kv_slot, k)
        vl.view(-1, *vl.shape[2:]).index_copy_(0, kv_slot, v)

    def gather(self, layer: int,
               block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``block_tables [N, nb]``: two ``[N, nb * block_size, Hkv, D]``
        copies, position ``p`` of row ``i`` at index ``p``."""
        n, nb = block_tables.shape
        idx = block_tables.reshape(-1)
        kl, vl = self.k[layer], self.v[layer]  # [num_blocks, bs, Hkv, D]
        k = kl.index_select(0, idx).view(n, nb * self.block_size, *kl.shape[2:])
        v = vl.index_select(0, idx).view(n, nb * self.block_size, *vl.shape[2:])
        return k, v


def kv_cache_blocks(budget_bytes: int, num_layers: int, block_size: int, num_kv_heads: int,
                    head_dim: int, dtype: torch.dtype) -> int:
    """How many blocks fit in ``budget_bytes`` (keys and values of every layer)."""
    per_block = KVCache.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
    return max(0, int(budget_bytes) // per_block)
