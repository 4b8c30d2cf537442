"""The decode step's inputs at fixed sizes, owned by the runner: what a CUDA graph captured
for a batch bucket reads on every replay, and what the same code reads eagerly on CPU.

A decode step of ``n`` sequences runs as a bucket of ``rows >= n`` (``decode_buckets``):
rows ``[n, rows)`` are padding that reads and writes only the cache's scratch block
(``KVCache.scratch_block``, held by no sequence), has no adapter and is never sampled.
Every tensor lives in one flat int64 buffer on the device, filled from one host buffer
(pinned on CUDA) by one copy per step. The host buffer is rewritten only after the step
that last read it has handed its sampled tokens back, which waits for that copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .kv_cache import KVCache

SMALL_BUCKETS = (1, 2, 4, 8, 16)
BUCKET_STEP = 16  # buckets above the small ones are multiples of this


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes a decode step is padded to: 1, 2, 4, 8, 16, then steps of 16, the last
    ``max_num_seqs`` itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = {b for b in SMALL_BUCKETS if b < max_num_seqs}
    sizes.update(range(2 * BUCKET_STEP, max_num_seqs, BUCKET_STEP))
    return sorted(sizes | {max_num_seqs})


def bucket_of(n: int, buckets: list[int]) -> int:
    """The smallest bucket that holds ``n`` rows."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} rows exceed the largest decode bucket ({buckets[-1]})")


def width_of(num_blocks: int, max_blocks: int) -> int:
    """The KV blocks per row that the torch attention gathers for a step whose longest
    context spans ``num_blocks``: the next power of two, at most ``max_blocks``."""
    return min(max_blocks, 1 << max(0, num_blocks - 1).bit_length())


@dataclass(frozen=True)
class DecodeShape:
    """What is fixed for one captured graph: ``rows`` (the bucket), ``width`` (KV blocks the
    torch attention gathers per row; 0 with the Triton kernel, which reads the lengths)
    and ``lora`` (the wrapped linears that add their deltas: all of them in a graph)."""

    rows: int
    width: int
    lora: frozenset[str]


class StepBuffers:
    """Fixed-size device tensors of a decode step (``[max_rows]`` each unless noted):

    ``input_ids``, ``positions`` (the new token's position), ``kv_slot`` (where its key and
    value go), ``token_slot`` (adapter slot, -1 none), ``seq_lens`` (context length after
    this token), ``rows`` (``arange``: row i is sequence i) and ``block_tables``
    ``[max_rows, max_blocks]``. ``shape`` is the step's ``DecodeShape``: the only thing the
    forward reads besides the tensors (and the cache and attention kernel, fixed)."""

    FIELDS = ("input_ids", "positions", "kv_slot", "token_slot", "seq_lens", "rows")

    def __init__(self, max_rows: int, max_blocks: int, cache: KVCache,
                 kernel: Callable | None) -> None:
        self.max_rows, self.max_blocks = max_rows, max_blocks
        self.cache, self.kernel = cache, kernel  # what the attention layers use
        self.block_size, self.scratch_block = cache.block_size, cache.scratch_block
        device = cache.k.device
        size = len(self.FIELDS) * max_rows + max_rows * max_blocks
        self._host = torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda")
        self._device = self._host if device.type == "cpu" else torch.zeros(
            size, dtype=torch.long, device=device)
        self._np = self._host.numpy()
        self.shape = DecodeShape(max_rows, 0, frozenset())
        for i, name in enumerate(self.FIELDS):
            setattr(self, name, self._device[i * max_rows:(i + 1) * max_rows])
        self.block_tables = self._device[len(self.FIELDS) * max_rows:].view(max_rows, max_blocks)
        self._pad(0)
        self._field("rows")[:] = np.arange(max_rows)

    def fill(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]],
             adapter_slots: list[int], shape: DecodeShape) -> None:
        """Write a decode step of ``len(token_ids)`` sequences (one new token each, at
        ``positions``) into the buffers, padded to ``shape.rows``, and copy them over."""
        n, bs = len(token_ids), self.block_size
        tables = self._np[len(self.FIELDS) * self.max_rows:].reshape(self.max_rows, -1)
        kv_slot = self._field("kv_slot")
        for i, (p, table) in enumerate(zip(positions, block_tables)):
            used = p // bs + 1
            tables[i, :used] = table[:used]
            kv_slot[i] = table[p // bs] * bs + p % bs
        self._field("input_ids")[:n] = token_ids
        self._field("positions")[:n] = positions
        self._field("seq_lens")[:n] = np.asarray(positions) + 1
        self._field("token_slot")[:n] = adapter_slots
        self._pad(n)
        self.shape = shape
        if self._device is not self._host:
            self._device.copy_(self._host, non_blocking=True)

    def _field(self, name: str) -> np.ndarray:
        i = self.FIELDS.index(name)
        return self._np[i * self.max_rows:(i + 1) * self.max_rows]

    def _pad(self, n: int) -> None:
        """Rows ``[n, max_rows)``: token 0 at position 0 of the scratch block, no adapter."""
        tables = self._np[len(self.FIELDS) * self.max_rows:].reshape(self.max_rows, -1)
        tables[n:, 0] = self.scratch_block
        self._field("kv_slot")[n:] = self.scratch_block * self.block_size
        for name, value in (("input_ids", 0), ("positions", 0), ("seq_lens", 1),
                            ("token_slot", -1)):
            self._field(name)[n:] = value
