"""Triton paged attention: every new token attends to its sequence's cached keys and values
read in place through the block table (no gather, no padding, no mask tensor).

Equal to this torch code (``paged_reference``), for every token ``t`` and head ``h``::

    seq, n = token_seq[t], positions[t] + 1          # causal: keys 0..positions[t]
    kv = [block_tables[seq, p // bs] * bs + p % bs for p in range(n)]
    s = (q[t, h] @ k_cache[kv, h // G].T) * scale     # G = H // Hkv query heads per KV head
    out[t, h] = softmax(s) @ v_cache[kv, h // G]

Decode tokens (``positions[t] + 1`` = the context length) and chunked-prefill tokens (each
its own causal limit) go through the same launch. Program ``(t, kv head, split)`` computes
the ``G`` query heads that share one KV head (one ``[G, D]`` tile, so each K/V block is
read once for all of them) with an online softmax over its split of the context, one KV
block at a time, in fp32. Each token's own context is cut into ``splits`` equal runs of
blocks, at least ``MIN_SPLIT_BLOCKS`` each (flash-decoding; the runs follow the context,
not the table's width, so a short context in a wide table still spreads over programs):
each program leaves its partial ``(max, sum, acc)``, and a second launch of one program
per (token, head) merges them::

    w[i] = exp(m[i] - max(m))                # splits without a key have m = -inf, w = 0
    out = sum(w[i] * acc[i]) / sum(w[i] * l[i])

With one split the first launch normalizes and stores ``out`` itself. The grid depends
only on the tensors' shapes (``T``, ``Hkv``, the block table's width), never on their
values. Only positions below the limit are loaded: a stale or NaN value in an unused block
or past the end of the last block is never read.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nolaserve.adapters.gpu import sm_count, triton_interpreted

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PROGRAMS_PER_SM = 4  # the splits aim at this many programs per SM
MIN_SPLIT_BLOCKS = 4  # KV blocks per split at least: shorter splits cost more to merge


@triton.jit
def _paged_attention_kernel(
    out, part_m, part_l, part_acc, q, k_cache, v_cache, block_tables, token_seq, positions,
    scale, G, D, sq0, sq1, so0, so1, sk0, sk1, sk2, sbt,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, NATIVE: tl.constexpr,
    MIN_BLOCKS: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)  # KV head; query heads h * G .. h * G + G - 1
    seq = tl.load(token_seq + t)
    n_ctx = tl.load(positions + t) + 1
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head = h * G + g
    gd_ok = (g < G)[:, None] & (d < D)[None, :]
    qt = tl.load(q + t * sq0 + head[:, None] * sq1 + d[None, :], mask=gd_ok, other=0.0)
    if not NATIVE:
        qt = qt.to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    n_blocks = tl.cdiv(n_ctx, BLOCK_SIZE)
    per_split = tl.maximum(tl.cdiv(n_blocks, tl.num_programs(2)), MIN_BLOCKS)
    b0 = tl.program_id(2) * per_split
    for b in range(b0, tl.minimum(b0 + per_split, n_blocks)):
        block = tl.load(block_tables + seq * sbt + b).to(tl.int64)
        ok = (n < BLOCK_SIZE) & (b * BLOCK_SIZE + n < n_ctx)  # [BN]
        offs = block * sk0 + n[:, None] * sk1 + h * sk2 + d[None, :]
        kv_ok = ok[:, None] & (d < D)[None, :]
        kt = tl.load(k_cache + offs, mask=kv_ok, other=0.0)  # [BN, BD]
        vt = tl.load(v_cache + offs, mask=kv_ok, other=0.0)
        if NATIVE:  # fp16/bf16 products are exact in the fp32 accumulator
            s = tl.dot(qt, tl.trans(kt)) * scale  # [BG, BN]
        else:
            s = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision="ieee") * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if NATIVE:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        m = m_new
    if SPLIT:  # partials [T, H, splits] and [T, H, splits, BLOCK_D], fp32, contiguous
        row = (t * tl.num_programs(1) * G + head) * tl.num_programs(2) + tl.program_id(2)
        tl.store(part_m + row, m, mask=g < G)
        tl.store(part_l + row, l_sum, mask=g < G)
        tl.store(part_acc + row[:, None] * BLOCK_D + d[None, :], acc, mask=gd_ok)
    else:
        o = acc / l_sum[:, None]
        tl.store(out + t * so0 + head[:, None] * so1 + d[None, :], o.to(out.dtype.element_ty),
                 mask=gd_ok)


@triton.jit
def _merge_kernel(out, part_m, part_l, part_acc, D, so0, so1, SPLITS: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(t, head)``: the module docstring's merge of its ``SPLITS`` partials."""
    t = tl.program_id(0)
    head = tl.program_id(1)
    i = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row = (t * tl.num_programs(1) + head) * SPLITS + i  # [BS]
    i_ok = i < SPLITS
    m = tl.load(part_m + row, mask=i_ok, other=float("-inf"))
    w = tl.exp(m - tl.max(m, axis=0))  # [BS]; -inf splits weigh 0
    w = tl.where(i_ok & (m > float("-inf")), w, 0.0)
    l_sum = tl.sum(w * tl.load(part_l + row, mask=i_ok, other=0.0), axis=0)
    acc = tl.load(part_acc + row[:, None] * BLOCK_D + d[None, :], mask=i_ok[:, None], other=0.0)
    o = tl.sum(w[:, None] * acc, axis=0) / l_sum  # [BD]
    tl.store(out + t * so0 + head * so1 + d, o.to(out.dtype.element_ty), mask=d < D)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, token_seq: torch.Tensor,
                    positions: torch.Tensor, scale: float,
                    out: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """``out [T, H, D]`` = each token's causal attention over its cached context (the
    module docstring). ``q [T, H, D]``; ``k_cache``/``v_cache`` one layer's
    ``[num_blocks, block_size, Hkv, D]``; ``block_tables [N, max_nb]``; ``token_seq`` and
    ``positions`` ``[T]`` integer. The keys/values of the step's own tokens must already be
    in the cache. ``splits``: how many runs the context is cut into (``None``: as
    ``num_splits`` picks from the shapes). Raises ``ValueError`` on shapes, dtypes or
    devices it does not take."""
    _check(q, k_cache, v_cache, block_tables, token_seq, positions)
    T, H, D = q.shape
    _, block_size, hkv, _ = k_cache.shape
    out = torch.empty_like(q) if out is None else out
    if T == 0:
        return out
    max_nb = block_tables.shape[1]
    splits = num_splits(T, hkv, max_nb, q.device) if splits is None else splits
    if not 1 <= splits <= max(1, max_nb):
        raise ValueError(f"splits must be in [1, {max(1, max_nb)}] (the block table's "
                         f"width), got {splits}")
    block_d = max(16, triton.next_power_of_2(D))
    parts = [torch.empty(T, H, splits, *shape, device=q.device, dtype=torch.float32)
             for shape in ((), (), (block_d,))] if splits > 1 else [out] * 3
    _paged_attention_kernel[(T, hkv, splits)](
        out, *parts, q, k_cache, v_cache, block_tables, token_seq, positions, float(scale),
        H // hkv, D, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        BLOCK_SIZE=block_size, BLOCK_N=max(16, triton.next_power_of_2(block_size)),
        BLOCK_G=max(16, triton.next_power_of_2(H // hkv)), BLOCK_D=block_d,
        SPLIT=splits > 1, NATIVE=_native_dots(q), MIN_BLOCKS=MIN_SPLIT_BLOCKS,
    )
    if splits > 1:
        _merge_kernel[(T, H)](out, *parts, D, out.stride(0), out.stride(1), SPLITS=splits,
                              BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d)
    return out


def num_splits(tokens: int, kv_heads: int, max_blocks: int, device: torch.device) -> int:
    """Context splits for a launch, from shapes only: enough programs to fill the device
    (``PROGRAMS_PER_SM`` per SM), each split at least ``MIN_SPLIT_BLOCKS`` KV blocks."""
    want = triton.cdiv(PROGRAMS_PER_SM * sm_count(device), tokens * kv_heads)
    return max(1, min(want, max_blocks // MIN_SPLIT_BLOCKS))


def _native_dots(q: torch.Tensor) -> bool:
    """fp16/bf16 dots on the tensor cores (fp32 accumulation); fp32 stays IEEE. The
    interpreter's bf16 ``tl.dot`` is broken, so bf16 is upcast there."""
    return q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and not triton_interpreted())


def _check(q, k_cache, v_cache, block_tables, token_seq, positions) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be [T, H, D] and the caches [blocks, block_size, Hkv, D]; "
                         f"got q {list(q.shape)}, k {list(k_cache.shape)}, "
                         f"v {list(v_cache.shape)}")
    H, D, hkv = q.shape[1], q.shape[2], k_cache.shape[2]
    if k_cache.shape[3] != D or H % hkv:
        raise ValueError(f"q has {H} heads of {D}; the cache {hkv} heads of {k_cache.shape[3]}")
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q and the caches must share fp16, bf16 or fp32; got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("q's and the caches' last dimension must be contiguous, and the two "
                         "caches share strides")
    for name, t in (("block_tables", block_tables), ("token_seq", token_seq),
                    ("positions", positions)):
        if t.dtype not in (torch.int32, torch.int64) or t.stride(-1) != 1:
            raise ValueError(f"{name} must be int32/int64, last dimension contiguous")
    if token_seq.shape != (q.shape[0],) or positions.shape != (q.shape[0],):
        raise ValueError(f"token_seq and positions must be [{q.shape[0]}]")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, token_seq, positions)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"Triton paged attention needs CUDA tensors, got {q.device}")


def paged_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, token_seq: torch.Tensor,
                    positions: torch.Tensor, scale: float) -> torch.Tensor:
    """The module docstring's torch loop, in fp32, rounded once to ``q``'s dtype."""
    T, H, D = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for t in range(T):
        seq, n = int(token_seq[t]), int(positions[t]) + 1
        slots = [int(block_tables[seq, p // bs]) * bs + p % bs for p in range(n)]
        k = k_cache.reshape(-1, hkv, D)[slots].float()  # [n, Hkv, D]
        v = v_cache.reshape(-1, hkv, D)[slots].float()
        k, v = k.repeat_interleave(H // hkv, 1), v.repeat_interleave(H // hkv, 1)  # [n, H, D]
        s = torch.einsum("hd,nhd->hn", q[t].float(), k) * scale
        out[t] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out
