"""Paged KV cache and the attention function that runs transformers' own modeling code on
a packed, unpadded batch.

The runner packs every scheduled sequence's new tokens into one row (``input_ids`` and
``position_ids`` of shape ``[1, T]``), decode tokens (``q_len == 1``) first, then the
prefill chunks. The model is switched to ``ATTN_IMPLEMENTATION``; each attention layer then
calls ``paged_attention_forward`` with its RoPE'd ``q``/``k``/``v`` and the step's
``AttentionMetadata``, which the runner passes as the ``attn_metadata`` keyword of the model
forward (transformers hands unknown forward kwargs down to the attention function).

The name is registered only with ``AttentionInterface``, deliberately not with
``AttentionMaskInterface``: for an implementation absent from the mask registry,
transformers 5.x's ``create_causal_mask`` returns ``None`` before doing any work, so no
causal or padding mask is ever built; the masks live in ``AttentionMetadata``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "nolaserve_paged"


class KVCache:
    """Key/value storage in fixed-size blocks for every layer.

    ``k`` and ``v`` are ``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]``;
    the token at position ``p`` of a sequence with block table ``bt`` lives in KV slot
    ``bt[p // block_size] * block_size + p % block_size`` (a row of a layer's
    ``[num_blocks * block_size, Hkv, D]`` view; not to be confused with an adapter slot).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if min(num_layers, num_blocks, block_size, num_kv_heads, head_dim) < 1:
            raise ValueError(
                f"KV cache dimensions must be >= 1, got layers={num_layers} blocks={num_blocks} "
                f"block_size={block_size} kv_heads={num_kv_heads} head_dim={head_dim}")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

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


def servable_context(text_config) -> int:
    """The longest context ``paged_attention_forward`` serves exactly for a model config:
    ``max_position_embeddings``, capped at a sliding window (within the window, sliding
    attention equals full attention). ``ValueError`` for attention logit soft-capping,
    which it does not implement."""
    if getattr(text_config, "attn_logit_softcapping", None):
        raise ValueError(
            f"the model uses attention logit soft-capping "
            f"(attn_logit_softcapping = {text_config.attn_logit_softcapping}), which "
            f"{ATTN_IMPLEMENTATION!r} attention does not implement; this model cannot be served")
    length = text_config.max_position_embeddings
    window = getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None)
    sliding = ("sliding_attention" in types) if types else \
        getattr(text_config, "use_sliding_window", True)
    if window and sliding and window < length:
        return window
    return length


def kv_cache_blocks(budget_bytes: int, num_layers: int, block_size: int, num_kv_heads: int,
                    head_dim: int, dtype: torch.dtype) -> int:
    """How many blocks fit in ``budget_bytes`` (keys and values of every layer)."""
    per_block = KVCache.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
    return max(0, int(budget_bytes) // per_block)


@dataclass(frozen=True, eq=False)
class PrefillChunk:
    """One sequence with ``q_len > 1`` new tokens at rows ``[start, start + q_len)``."""

    start: int
    q_len: int
    block_table: torch.Tensor | None  # [1, nb]; None when the chunk is the whole context
    mask: torch.Tensor | None  # [q_len, nb * block_size] bool, True = attend
    stale: torch.Tensor | None = None  # [1, nb * block_size, 1, 1] bool, key pos >= ctx_len


@dataclass(frozen=True, eq=False)
class AttentionMetadata:
    """Everything the attention layers need for one step; built once, shared by all layers.

    Rows ``[0, num_decode)`` are decode tokens, one per sequence; ``prefills`` follow.
    """

    kv_cache: KVCache
    kv_slot: torch.Tensor  # [T] int64 KV-cache slot of each new token
    num_decode: int
    decode_block_tables: torch.Tensor  # [num_decode, max_nb] int64, padded with block 0
    decode_mask: torch.Tensor  # [num_decode, 1, 1, max_nb * block_size] bool, pos < ctx_len
    # [num_decode, max_nb * block_size, 1, 1] bool, ~decode_mask: padding and stale positions
    decode_stale: torch.Tensor
    prefills: tuple[PrefillChunk, ...]
    max_ctx_len: int

    @classmethod
    def build(cls, cache: KVCache, q_lens: list[int], start_pos: list[int],
              block_tables: list[list[int]], device: torch.device) -> AttentionMetadata:
        """From per-sequence lists in packed order, decode sequences (``q_len == 1``) first.
        Raises ``ValueError`` when a block table does not cover its positions."""
        bs = cache.block_size
        kv_slot: list[int] = []
        ctx_lens = [s + q for s, q in zip(start_pos, q_lens)]
        for q, s, bt, ctx in zip(q_lens, start_pos, block_tables, ctx_lens):
            _check_table(bt, ctx, bs, cache.num_blocks)
            kv_slot += [bt[p // bs] * bs + p % bs for p in range(s, ctx)]
        n_dec = 0
        while n_dec < len(q_lens) and q_lens[n_dec] == 1:
            n_dec += 1
        if any(q < 1 for q in q_lens) or any(q == 1 for q in q_lens[n_dec:]):
            raise ValueError("every sequence needs >= 1 new token, decode (1 token) ones first")
        nb = [-(-c // bs) for c in ctx_lens]
        max_nb = max(nb[:n_dec], default=0)
        tables = torch.tensor([bt[:k] + [0] * (max_nb - k)
                               for bt, k in zip(block_tables[:n_dec], nb[:n_dec])],
                              dtype=torch.long).view(n_dec, max_nb)
        key_pos = torch.arange(max_nb * bs)
        mask = key_pos < torch.tensor(ctx_lens[:n_dec], dtype=torch.long).view(-1, 1)
        prefills, row = [], n_dec
        for q, s, bt, k in zip(q_lens[n_dec:], start_pos[n_dec:], block_tables[n_dec:],
                               nb[n_dec:]):
            prefills.append(_prefill_chunk(row, q, s, bt[:k], bs, device))
            row += q
        stale = (~mask).view(n_dec, max_nb * bs, 1, 1)
        mask = mask.view(n_dec, 1, 1, max_nb * bs)
        return cls(cache, torch.tensor(kv_slot, dtype=torch.long, device=device), n_dec,
                   tables.to(device), mask.to(device), stale.to(device), tuple(prefills),
                   max(ctx_lens, default=0))


def _check_table(block_table: list[int], ctx_len: int, block_size: int, num_blocks: int) -> None:
    needed = block_table[: -(-ctx_len // block_size)]
    if len(needed) * block_size < ctx_len:
        raise ValueError(f"block table of {len(block_table)} blocks of {block_size} cannot hold "
                         f"{ctx_len} positions")
    if needed and not (min(needed) >= 0 and max(needed) < num_blocks):
        raise ValueError(f"block ids must be in [0, {num_blocks}), got {needed}")


def _prefill_chunk(start: int, q_len: int, start_pos: int, blocks: list[int], block_size: int,
                   device: torch.device) -> PrefillChunk:
    if start_pos == 0:  # the context is exactly the new tokens: plain causal attention
        return PrefillChunk(start, q_len, None, None)
    key_pos = torch.arange(len(blocks) * block_size)
    query_pos = torch.arange(start_pos, start_pos + q_len).view(-1, 1)
    mask = key_pos <= query_pos  # [q_len, nb * bs], causal with offset start_pos
    stale = (key_pos >= start_pos + q_len).view(1, -1, 1, 1)
    table = torch.tensor([blocks], dtype=torch.long, device=device)
    return PrefillChunk(start, q_len, table, mask.to(device), stale.to(device))


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0, *,
                            attn_metadata: AttentionMetadata | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [1, H, T, D]``, ``key``/``value``
    ``[1, Hkv, T, D]`` (RoPE applied) -> ``([1, T, H, D], None)``, like
    ``eager_attention_forward``. Writes the step's keys/values into the cache, then each
    sequence attends to its whole cached context, causally."""
    meta = attn_metadata
    if meta is None:
        raise ValueError(f"{ATTN_IMPLEMENTATION!r} attention needs the step's attn_metadata; "
                         f"run the model through ModelRunner")
    if attention_mask is not None or kwargs.get("softcap") is not None:
        raise ValueError(f"{ATTN_IMPLEMENTATION!r} attention supports neither model-built "
                         f"masks nor logit soft-capping")
    window = kwargs.get("sliding_window")
    if window is not None and meta.max_ctx_len > window:
        raise ValueError(f"context of {meta.max_ctx_len} tokens exceeds the sliding window "
                         f"({window}), which paged attention does not implement")
    layer = module.layer_idx
    q = query[0]  # [H, T, D]
    meta.kv_cache.write(layer, meta.kv_slot, key[0].transpose(0, 1), value[0].transpose(0, 1))
    H, T, D = q.shape
    Hkv = key.shape[1]
    out = q.new_empty(T, H, D)  # [T, H, D]
    n = meta.num_decode
    if n:
        k, v = meta.kv_cache.gather(layer, meta.decode_block_tables)  # [n, L, Hkv, D]
        # Select, not multiply: a masked key/value may hold anything (another request's
        # values, NaN); zeroed, it gets weight 0 and adds 0 (0 * NaN would be NaN).
        k.masked_fill_(meta.decode_stale, 0)
        v.masked_fill_(meta.decode_stale, 0)
        # One query per sequence: the G = H / Hkv heads sharing a KV head become G query rows.
        qd = q[:, :n].transpose(0, 1).reshape(n, Hkv, H // Hkv, D)  # [n, Hkv, G, D]
        o = F.scaled_dot_product_attention(qd, k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=meta.decode_mask, scale=scaling)
        out[:n] = o.reshape(n, H, D)
    gqa = Hkv != H
    for p in meta.prefills:
        rows = slice(p.start, p.start + p.q_len)
        qp = query[:, :, rows]  # [1, H, q_len, D]
        if p.block_table is None:
            o = F.scaled_dot_product_attention(qp, key[:, :, rows], value[:, :, rows],
                                               is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            k, v = meta.kv_cache.gather(layer, p.block_table)  # [1, L, Hkv, D]
            k.masked_fill_(p.stale, 0)  # positions past the context: stale, maybe NaN
            v.masked_fill_(p.stale, 0)
            o = F.scaled_dot_product_attention(qp, k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=p.mask, scale=scaling, enable_gqa=gqa)
        out[rows] = o[0].transpose(0, 1)  # [q_len, H, D]
    return out.unsqueeze(0), None


def register_attention() -> str:
    """Register ``paged_attention_forward`` with transformers (idempotent); returns its name
    for ``model.set_attn_implementation``."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
