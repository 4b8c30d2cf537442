"""Automatic prefix caching: which KV blocks hold which full token blocks. Pure Python.

A full block's hash chains its parent's hash, the identity of the weights that computed
its KV and its tokens: ``sha256(parent | identity | tokens)``. Equal hashes mean the same
tokens at the same positions after the same prefix, computed by the same weights, so the
KV is the same. The identity is the content version in the request's adapter slot
(``AdapterAdmission.cache_identity``), or ``"base"``: a replaced or deleted adapter's
blocks never match again and age out of the LRU. A request with vLLM's ``cache_salt``
adds the salt's hash to it (``salted``): only requests with the same salt share blocks,
so one tenant cannot learn another's prompts from how fast its own are served.

``PrefixCache`` maps hashes to block ids and keeps the *cached-free* blocks (no request
holds them, their KV is still valid) in LRU order; ``BlockManager`` owns reference counts
and evicts from here only when it needs a block and no uncached one is free.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

BASE_IDENTITY = "base"


def salted(identity: str, salt: str | None) -> str:
    """``identity`` for a request with ``cache_salt`` ``salt`` (None: no salt). Adapter ids
    hold no ``#``, so a salted identity never equals another one."""
    if salt is None:
        return identity
    return f"{identity}#{hashlib.sha256(salt.encode(errors='surrogatepass')).hexdigest()}"


def block_hash(parent: bytes, identity: str, tokens: list[int]) -> bytes:
    """The hash of one full block: its parent's hash (``b""`` for the first block), the
    weights' identity and the block's token ids."""
    h = hashlib.sha256(parent)
    h.update(identity.encode())
    h.update(b"\0")
    h.update(array("q", tokens).tobytes())
    return h.digest()


def chain_hashes(tokens: list[int], block_size: int, identity: str,
                 known: list[bytes]) -> list[bytes]:
    """``known`` extended with the hashes of every further full block of ``tokens``."""
    hashes = list(known)
    for i in range(len(hashes), len(tokens) // block_size):
        parent = hashes[-1] if hashes else b""
        hashes.append(block_hash(parent, identity,
                                 tokens[i * block_size:(i + 1) * block_size]))
    return hashes


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters since start, as vLLM counts them: ``queries`` prompt tokens looked up,
    ``hits`` of them found cached; ``cached_blocks`` blocks whose hash is known now."""

    queries: int = 0
    hits: int = 0
    cached_blocks: int = 0


class PrefixCache:
    """Hash -> block id for blocks holding a full, computed token block, and the LRU of
    those no request holds. A block has at most one hash and a hash at most one block."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._free_lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.queries = 0
        self.hits = 0

    @property
    def num_free(self) -> int:
        """Cached blocks that no request holds (evictable)."""
        return len(self._free_lru)

    @property
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self.queries, self.hits, len(self._hash_of))

    def get(self, block_hash_: bytes) -> int | None:
        """The block holding ``block_hash_``, or None."""
        return self._block_of.get(block_hash_)

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def insert(self, block: int, block_hash_: bytes) -> None:
        """Record that ``block`` holds ``block_hash_`` (a no-op if another block already
        does: the first one stays the one later requests share)."""
        if block_hash_ in self._block_of or block in self._hash_of:
            return
        self._block_of[block_hash_] = block
        self._hash_of[block] = block_hash_

    def take(self, block: int) -> None:
        """A request now holds ``block``: it is no longer evictable."""
        self._free_lru.pop(block, None)

    def release(self, block: int) -> None:
        """No request holds ``block`` any longer: the most recently used evictable one."""
        self._free_lru[block] = None

    def evict(self) -> int | None:
        """Forget the least recently used evictable block and return it, or None."""
        if not self._free_lru:
            return None
        block, _ = self._free_lru.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block
