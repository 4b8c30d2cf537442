"""The attention function that runs transformers' own modeling code on a packed, unpadded
batch over the paged KV cache (``kv_cache.KVCache``).

The runner packs every scheduled sequence's new tokens into one row (``input_ids`` and
``position_ids`` of shape ``[1, T]``), decode tokens (``q_len == 1``) first, then the
prefill chunks; a decode-only step has one row per sequence, padded to its bucket. The
model is switched to ``ATTN_IMPLEMENTATION``; each attention layer then calls
``paged_attention_forward`` with its RoPE'd ``q``/``k``/``v`` and the runner's
``StepBuffers``, which the runner passes as the ``attn_metadata`` keyword of the model
forward (transformers hands unknown forward kwargs down to the attention function).

Two paths compute the same thing: on CUDA the Triton kernel (``paged_triton``) reads K/V
in place through the block table for every token at once; the torch path (CPU) gathers
each group of decode sequences of similar length (``length_groups``: padding stays under
2x, never to the longest of the whole batch) and each prefill chunk's context, then calls
SDPA.

The name is registered only with ``AttentionInterface``, deliberately not with
``AttentionMaskInterface``: for an implementation absent from the mask registry,
transformers 5.x's ``create_causal_mask`` returns ``None`` before doing any work, so no
causal or padding mask is ever built; the masks come from the step's sequence lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .step_buffers import StepBuffers

ATTN_IMPLEMENTATION = "nolaserve_paged"


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


@dataclass(frozen=True, eq=False)
class TorchBatch:
    """One gather-then-SDPA unit of the torch path: query rows ``[start, start + rows)``;
    ``tables [n, nb]``; ``mask`` True = attend; ``stale`` = ``~mask`` per key."""

    start: int
    rows: int
    tables: torch.Tensor | None  # None: a prefill chunk that is its whole context
    mask: torch.Tensor | None  # decode [n, 1, 1, L]; prefill [q_len, L]
    stale: torch.Tensor | None  # [n, L, 1, 1]
    decode: bool


def torch_units(step: StepBuffers) -> tuple[TorchBatch, ...]:
    """The torch path's gathers of a packed step (``step.plan``), their masks made on the
    device from the step's sequence lengths (no host tensors)."""
    plan, bs = step.plan.attention, step.block_size
    units = []
    for row, n, nb in plan.groups:  # decode rows: row i is sequence i
        key_pos = torch.arange(nb * bs, device=step.device)
        mask = key_pos < step.seq_lens[row:row + n].view(-1, 1)  # [n, L]
        tables = step.block_tables[step.seq_rows[row:row + n], :nb]
        units.append(TorchBatch(row, n, tables, mask.view(n, 1, 1, -1),
                                (~mask).view(n, -1, 1, 1), True))
    for row, q_len, start, nb, i in plan.prefills:
        if start == 0:  # the context is exactly the new tokens: plain causal attention
            units.append(TorchBatch(row, q_len, None, None, None, False))
            continue
        key_pos = torch.arange(nb * bs, device=step.device)
        query_pos = torch.arange(start, start + q_len, device=step.device).view(-1, 1)
        stale = (key_pos >= start + q_len).view(1, -1, 1, 1)
        tables = step.block_tables[step.seq_rows[i:i + 1], :nb]
        units.append(TorchBatch(row, q_len, tables, key_pos <= query_pos, stale, False))
    return tuple(units)


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0, *,
                            attn_metadata: StepBuffers | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [1, H, T, D]``, ``key``/``value``
    ``[1, Hkv, T, D]`` (RoPE applied) -> ``([1, T, H, D], None)``, like
    ``eager_attention_forward``. Writes the step's keys/values into the cache, then each
    sequence attends to its whole cached context, causally. ``attn_metadata`` is the
    runner's ``StepBuffers``, filled for the step."""
    if attention_mask is not None or kwargs.get("softcap") is not None:
        raise ValueError(f"{ATTN_IMPLEMENTATION!r} attention supports neither model-built "
                         f"masks nor logit soft-capping")
    if scaling is None:
        scaling = query.shape[3] ** -0.5
    step = attn_metadata
    if not isinstance(step, StepBuffers):
        raise ValueError(f"{ATTN_IMPLEMENTATION!r} attention needs the step's attn_metadata; "
                         f"run the model through ModelRunner")
    window = kwargs.get("sliding_window")
    if window is not None and step.plan is not None and \
            step.plan.attention.max_ctx_len > window:
        raise ValueError(f"context of {step.plan.attention.max_ctx_len} tokens exceeds the "
                         f"sliding window ({window}), which paged attention does not implement")
    return attend(step, module.layer_idx, query, key, value, scaling), None


def attend(step: StepBuffers, layer: int, query: torch.Tensor, key: torch.Tensor,
           value: torch.Tensor, scaling: float) -> torch.Tensor:
    """``paged_attention_forward``'s work for one layer: the cache write, then the Triton
    kernel, or the torch path (a decode step's rows, or a packed step's units); returns
    ``[1, T, H, D]``. A decode step reads only the step's tensors and ``step.shape``, so
    a CUDA graph can replay it."""
    cache = step.cache
    cache.write(layer, step.kv_slot, key[0].transpose(0, 1), value[0].transpose(0, 1))
    q = query[0].transpose(0, 1)  # [T, H, D], last dimension contiguous
    if step.kernel is not None:
        out = step.kernel(q, cache.k[layer], cache.v[layer], step.kernel_tables(),
                          step.token_rows, step.positions, scaling)
    elif step.shape is not None:
        width = step.shape.width
        key_pos = torch.arange(width * cache.block_size, device=q.device)
        mask = key_pos < step.seq_lens.view(-1, 1)  # [n, L]
        n = mask.shape[0]
        out = _decode_rows(cache, layer, q, step.block_tables[step.token_rows, :width],
                           mask.view(n, 1, 1, -1), (~mask).view(n, -1, 1, 1), scaling)
    else:
        out = _torch_attention(step, layer, query, key, value, scaling)
    return out.unsqueeze(0)


def _decode_rows(cache: KVCache, layer: int, q: torch.Tensor, tables: torch.Tensor,
                 mask: torch.Tensor, stale: torch.Tensor, scaling: float) -> torch.Tensor:
    """One query token per sequence, ``q [n, H, D]``, over its gathered context
    ``tables [n, nb]``; ``mask`` ``[n, 1, 1, L]`` True = attend, ``stale`` its negation
    ``[n, L, 1, 1]``. Returns ``[n, H, D]``."""
    n, H, D = q.shape
    k, v = cache.gather(layer, tables)  # [n, L, Hkv, D]
    # Select, not multiply: a masked key/value may hold anything (another request's
    # values, NaN); zeroed, it gets weight 0 and adds 0 (0 * NaN would be NaN).
    k.masked_fill_(stale, 0)
    v.masked_fill_(stale, 0)
    # One query per sequence: the G = H / Hkv heads sharing a KV head become G rows.
    Hkv = k.shape[2]
    qd = q.reshape(n, Hkv, H // Hkv, D)
    o = F.scaled_dot_product_attention(qd, k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, scale=scaling)
    return o.reshape(n, H, D)


def _torch_attention(step: StepBuffers, layer: int, query: torch.Tensor,
                     key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    q = query[0]  # [H, T, D]
    H, T, D = q.shape
    Hkv = key.shape[1]
    out = q.new_empty(T, H, D)  # [T, H, D]
    gqa = Hkv != H
    for u in step.attn_units:
        if u.decode:
            rows = slice(u.start, u.start + u.rows)
            out[rows] = _decode_rows(step.cache, layer, q[:, rows].transpose(0, 1),
                                     u.tables, u.mask, u.stale, scaling)
            continue
        rows = slice(u.start, u.start + u.rows)
        qp = query[:, :, rows]  # [1, H, q_len, D]
        if u.tables is None:
            o = F.scaled_dot_product_attention(qp, key[:, :, rows], value[:, :, rows],
                                               is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            k, v = step.cache.gather(layer, u.tables)  # [1, L, Hkv, D]
            k.masked_fill_(u.stale, 0)  # positions past the context: stale, maybe NaN
            v.masked_fill_(u.stale, 0)
            o = F.scaled_dot_product_attention(qp, k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=u.mask, scale=scaling, enable_gqa=gqa)
        out[rows] = o[0].transpose(0, 1)  # [q_len, H, D]
    return out


def register_attention() -> str:
    """Register ``paged_attention_forward`` with transformers (idempotent); returns its name
    for ``model.set_attn_implementation``."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
