"""Paged KV-cache block allocator with reference counts and automatic prefix caching.
Pure Python (no torch).

With caching on, a block that holds a full, computed token block gets a hash
(``prefix_cache.block_hash``); a new request's block table starts with the cached blocks of
its longest matching prefix (``match_prefix``), shared by reference count. A block no
request holds stays cached (an LRU) until a new block is needed and no uncached one is
free. A request never shares the block holding its last prompt token (that token is always
computed, so there are logits to sample), so it writes only blocks of its own: a shared
block is never written, and no copy-on-write is needed (``allocate`` checks it: an
INTERNAL ``RequestFailedError`` if a step would).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from nolaserve.adapters.errors import RequestFailedError, Status

from .prefix_cache import PrefixCache, PrefixCacheStats, chain_hashes
from .sequence import Sequence


class OutOfBlocksError(RuntimeError):
    """An allocation asked for more free KV blocks than there are."""


@dataclass
class _Hashes:
    identity: str  # the weights that compute this sequence's KV
    hashes: list[bytes]  # of its first full blocks (at least those registered)
    registered: int = 0  # leading blocks of its table that are in the cache


class BlockManager:
    """Hands out KV-cache blocks of ``block_size`` token positions each.

    Invariant: every block id in ``[0, num_blocks)`` is uncached-free, cached-free (in the
    prefix cache's LRU) or held, with a reference count equal to the number of block tables
    it is in; block ``seq.block_table[i]`` holds the KV of positions
    ``[i * block_size, (i + 1) * block_size)`` of that sequence.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))  # free and not cached
        self._refs: dict[int, int] = {}  # held block -> reference count
        self.cache = PrefixCache() if enable_caching else None
        self._seqs: dict[Sequence, _Hashes] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence (cached ones included: they are evictable)."""
        return len(self._free) + (self.cache.num_free if self.cache else 0)

    @property
    def max_tokens(self) -> int:
        """Token positions the whole cache holds."""
        return self.num_blocks * self.block_size

    @property
    def cache_stats(self) -> PrefixCacheStats:
        """The prefix cache's counters (all 0 when caching is off)."""
        return self.cache.stats if self.cache else PrefixCacheStats()

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that cover ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)

    def missing(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks ``seq`` lacks to cover ``num_tokens`` positions."""
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``allocate(seq, num_tokens)`` would succeed now."""
        return self.missing(seq, num_tokens) <= self.num_free_blocks

    def freeing(self, seqs: Iterable[Sequence]) -> Iterator[int]:
        """For each of ``seqs`` in turn: the blocks that freeing it and those before it
        would free, those no other sequence holds (a shared prefix block stays held)."""
        taken: Counter[int] = Counter()
        freed = 0
        for seq in seqs:
            for block in seq.block_table:
                taken[block] += 1
                freed += taken[block] == self._refs[block]
            yield freed

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Extend ``seq.block_table`` to cover its first ``num_tokens`` positions (no-op if it
        already does), for a step that writes positions from ``seq.num_computed_tokens`` on.
        Raises ``OutOfBlocksError`` and allocates nothing if too few are free."""
        missing = self.missing(seq, num_tokens)
        if missing > self.num_free_blocks:
            raise OutOfBlocksError(
                f"request {seq.request_id!r} needs {missing} more KV blocks for "
                f"{num_tokens} tokens, only {self.num_free_blocks} of {self.num_blocks} "
                f"are free"
            )
        first = seq.num_computed_tokens // self.block_size
        if self.cache and first < len(seq.block_table) and \
                self.cache.is_cached(seq.block_table[first]):
            raise RequestFailedError(  # a scheduling bug, never the request's fault
                f"request {seq.request_id!r} would write position {seq.num_computed_tokens} "
                f"into cached KV block {seq.block_table[first]}", Status.INTERNAL)
        for _ in range(missing):
            block = self._free.popleft() if self._free else self.cache.evict()
            self._refs[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references and clear its table; blocks no one holds any longer
        become free (cached ones stay cached, the tail first in line for eviction)."""
        foreign = [b for b in seq.block_table if b not in self._refs]
        if foreign:
            raise ValueError(
                f"request {seq.request_id!r} holds blocks {foreign} that are not allocated"
            )
        self._seqs.pop(seq, None)
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            del self._refs[block]
            if self.cache and self.cache.is_cached(block):
                self.cache.release(block)
            else:
                self._free.append(block)
        seq.block_table = []  # a new list: a runner tells a new table from a grown one

    def match_prefix(self, seq: Sequence, identity: str) -> int:
        """Start ``seq``'s empty block table with the cached blocks of its longest cached
        prefix computed by ``identity``'s weights, never the block of its last token;
        returns the tokens they hold (0 with caching off)."""
        if self.cache is None:
            return 0
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"request {seq.request_id!r} already holds KV blocks")
        tokens = seq.token_ids
        usable = (len(tokens) - 1) // self.block_size * self.block_size
        hashes = chain_hashes(tokens[:usable], self.block_size, identity, [])
        for h in hashes:
            block = self.cache.get(h)
            if block is None:
                break
            self._refs[block] = self._refs.get(block, 0) + 1
            self.cache.take(block)
            seq.block_table.append(block)
        self._seqs[seq] = _Hashes(identity, hashes, len(seq.block_table))
        return len(seq.block_table) * self.block_size

    def count_lookup(self, seq: Sequence, hit: int) -> None:
        """Add ``seq``'s kept prefix lookup (``hit`` tokens cached) to the cache's counters,
        once per request: not again on a retried admission or a recompute."""
        if self.cache is None or seq.prefix_counted:
            return
        seq.prefix_counted = True
        self.cache.queries += seq.num_tokens
        self.cache.hits += hit

    def computed_by(self, seq: Sequence, identity: str, busy: list[Sequence]) -> bool:
        """Whether the first block of ``seq``'s prompt that is not cached yet is one that a
        sequence of ``busy`` (those scheduled this step) computes now, by the same weights:
        ``seq`` then waits a step and shares it (``n`` choices of one prompt, or requests
        with one system prompt, arriving together)."""
        if self.cache is None or not busy:
            return False
        usable = (seq.num_prompt_tokens - 1) // self.block_size * self.block_size
        for h in chain_hashes(seq.prompt_token_ids[:usable], self.block_size, identity, []):
            if self.cache.get(h) is None:
                return any(h in st.hashes[st.registered:] for st in map(self._seqs.get, busy)
                           if st is not None and st.identity == identity)
        return False

    def cache_computed(self, seq: Sequence) -> None:
        """Register the full blocks of ``seq`` whose KV is computed by now (a no-op with
        caching off or before ``match_prefix``)."""
        state = self._seqs.get(seq)
        full = seq.num_computed_tokens // self.block_size
        if state is None or full <= state.registered:
            return
        if len(state.hashes) < full:
            state.hashes = chain_hashes(seq.token_ids[:full * self.block_size],
                                        self.block_size, state.identity, state.hashes)
        for i in range(state.registered, full):
            self.cache.insert(seq.block_table[i], state.hashes[i])
        state.registered = full
