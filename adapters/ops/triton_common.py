"""What the Triton backends share (``triton_lora.sgmv``, ``triton_multi.sgmv_multi``): tile
sizes, the launcher checks, the host-side grid shape and the jitted expand step. A leaf
below both kernels, so neither reaches into the other's private names."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gpu import sm_count, triton_interpreted
from .batch import LoraBatch
from .checks import check_lora_args

MAX_FUSED_RANK = 64
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_K = 64  # input columns per shrink step
BLOCK_O = 64  # output columns per expand step
PROGRAMS_PER_SM = 4  # programs the grid aims at per SM of the device: enough to fill it


def check_triton_args(y, x, A, B, scale, batch: LoraBatch) -> None:
    """A launcher's own checks (it may be called without ``add_lora``'s): those of
    ``add_lora``, then what the Triton kernels need."""
    check_lora_args(y, x, A, B, scale, batch)
    if x.dtype not in DTYPES:
        raise ValueError(f"the Triton backend takes fp16, bf16 or fp32, got {x.dtype}")
    if x.device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"the Triton backend needs CUDA tensors, got {x.device}")
    for name, t in (("sorted_tokens", batch.sorted_tokens),
                    ("seg_slot_index", batch.seg_slot_index),
                    ("seg_start_index", batch.seg_start_index)):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError(f"batch.{name} must be contiguous int64, got {t.dtype}")
    if not scale.is_contiguous():
        raise ValueError("scale must be contiguous")


def blocks(batch: LoraBatch, d_out: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_T, token tiles per segment, output columns per program)``, host-only: the
    output is cut into as few chunks as fill ``PROGRAMS_PER_SM`` programs per SM."""
    block_t, tiles, busy = batch.tiles
    out_tiles = triton.cdiv(d_out, BLOCK_O)
    target = PROGRAMS_PER_SM * sm_count(device)
    chunks = max(1, min(out_tiles, target // busy))  # fewer chunks: less recompute
    return block_t, tiles, triton.cdiv(out_tiles, chunks) * BLOCK_O


@triton.jit
def expand(v, y, B, scale, slot, tok, row_ok, chunk, out_chunk, d_out, r_max,
           sy0, sy1, sb0, sb1, sb2, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
           FP32: tl.constexpr):
    """``y[rows, cols] += (v * scale[slot]) @ B[slot, cols].T`` over this program's chunk
    ``cols`` of one module's output columns; ``sgmv``'s expand, rounding included."""
    v = v * tl.load(scale + slot).to(tl.float32)
    if not FP32:
        v = v.to(y.dtype.element_ty)  # tensor cores; fp32 stays IEEE
    r = tl.arange(0, BLOCK_R)
    r_ok = r < r_max
    o_begin = chunk * out_chunk
    o_end = tl.minimum(o_begin + out_chunk, d_out)
    for o0 in range(o_begin, o_end, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        o_ok = o < o_end
        bt = tl.load(B + slot * sb0 + o[None, :] * sb1 + r[:, None] * sb2,
                     mask=r_ok[:, None] & o_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_O]
        d = tl.dot(v, bt, input_precision="ieee") if FP32 else tl.dot(v, bt)
        ptr = y + tok[:, None] * sy0 + o[None, :] * sy1
        m = row_ok[:, None] & o_ok[None, :]
        yt = tl.load(ptr, mask=m)
        tl.store(ptr, (yt.to(tl.float32) + d).to(yt.dtype), mask=m)


@triton.jit
def segment_tile(tokens, seg_slots, seg_starts, BLOCK_T: tl.constexpr):
    """Every SGMV kernel's prologue: program ``(seg, tile, ...)`` takes rows
    ``sorted_tokens[t0 : t0 + BLOCK_T]`` of segment ``seg``, clipped to the segment.

    Returns ``(slot, tok, row_ok, busy)``: the segment's slot, the ``[BLOCK_T]`` token
    indices of the rows, which rows are real, and whether the tile holds any row (a
    segment shorter than the longest has idle tiles)."""
    seg = tl.program_id(0)
    start = tl.load(seg_starts + seg)
    end = tl.load(seg_starts + seg + 1)  # seg_starts [N + 1]
    t0 = start + tl.program_id(1) * BLOCK_T
    slot = tl.load(seg_slots + seg)
    rows = t0 + tl.arange(0, BLOCK_T)
    row_ok = rows < end
    tok = tl.load(tokens + rows, mask=row_ok, other=0)  # [BLOCK_T] token indices
    return slot, tok, row_ok, t0 < end


@triton.jit
def x_tile(x, tok, row_ok, k0, d_in, sx0, sx1, BLOCK_K: tl.constexpr):
    """``(xt, k, k_ok)``: the ``[BLOCK_T, BLOCK_K]`` tile ``x[tok, k0 : k0 + BLOCK_K]``
    (zeros outside the rows and columns), its column indices and which are real."""
    k = k0 + tl.arange(0, BLOCK_K)
    k_ok = k < d_in
    xt = tl.load(x + tok[:, None] * sx0 + k[None, :] * sx1,
                 mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    return xt, k, k_ok


@triton.jit
def shrink(v, xt, A, slot, k, k_ok, r_max, sa0, sa1, sa2,
           BLOCK_R: tl.constexpr, FP32: tl.constexpr):
    """``v += xt @ A[slot, :, k].T`` for one ``[BLOCK_T, BLOCK_K]`` tile ``xt`` of ``x``."""
    r = tl.arange(0, BLOCK_R)
    at = tl.load(A + slot * sa0 + r[None, :] * sa1 + k[:, None] * sa2,
                 mask=(r < r_max)[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
    return tl.dot(xt, at, v, input_precision="ieee") if FP32 else tl.dot(xt, at, v)


@triton.jit
def shrink_expand(y, x, A, B, scale, slot, tok, row_ok, chunk, d_in, d_out, r_max,
                  out_chunk, sy0, sy1, sx0, sx1, sa0, sa1, sa2, sb0, sb1, sb2,
                  ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_O: tl.constexpr, FP32: tl.constexpr):
    """One slot's whole delta for ``ROWS`` rows ``tok`` (``row_ok`` the real ones) over
    output chunk ``chunk``: the shrink in fp32 over every input column, then ``expand``."""
    v = tl.zeros([ROWS, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        xt, k, k_ok = x_tile(x, tok, row_ok, k0, d_in, sx0, sx1, BLOCK_K)
        v = shrink(v, xt, A, slot, k, k_ok, r_max, sa0, sa1, sa2, BLOCK_R, FP32)
    expand(v, y, B, scale, slot, tok, row_ok, chunk, out_chunk, d_out, r_max,
           sy0, sy1, sb0, sb1, sb2, BLOCK_R, BLOCK_O, FP32)
