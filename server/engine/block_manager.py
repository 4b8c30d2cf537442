"""Paged KV-cache block allocator: a free list of block ids, no prefix caching.
Pure Python (no torch)."""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


class OutOfBlocksError(RuntimeError):
    """An allocation asked for more free KV blocks than there are."""


class BlockManager:
    """Hands out KV-cache blocks of ``block_size`` token positions each.

    Invariant: every block id in ``[0, num_blocks)`` is either free or in exactly one
    sequence's ``block_table``; block ``seq.block_table[i]`` holds the KV of positions
    ``[i * block_size, (i + 1) * block_size)`` of that sequence.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence."""
        return len(self._free)

    @property
    def max_tokens(self) -> int:
        """Token positions the whole cache holds."""
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that cover ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)

    def _missing(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``allocate(seq, num_tokens)`` would succeed now."""
        return self._missing(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Extend ``seq.block_table`` to cover its first ``num_tokens`` positions (no-op if it
        already does). Raises ``OutOfBlocksError`` and allocates nothing if too few are free."""
        missing = self._missing(seq, num_tokens)
        if missing > len(self._free):
            raise OutOfBlocksError(
                f"request {seq.request_id!r} needs {missing} more KV blocks for "
                f"{num_tokens} tokens, only {len(self._free)} of {self.num_blocks} are free"
            )
        for _ in range(missing):
            block = self._free.popleft()
            self._used.add(block)
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Return all of ``seq``'s blocks to the free list and clear its table."""
        foreign = [b for b in seq.block_table if b not in self._used]
        if foreign:
            raise ValueError(
                f"request {seq.request_id!r} holds blocks {foreign} that are not allocated"
            )
        for block in seq.block_table:
            self._used.discard(block)
            self._free.append(block)
        seq.block_table.clear()
