"""What the Triton backends share (``triton_lora.sgmv``, ``triton_multi.sgmv_multi``): tile
sizes, the launcher checks, the host-side grid shape and the jitted expand step. A leaf
below both kernels, so neither reaches into the other's private names."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .batch import LoraBatch
from .checks import check_lora_args

MAX_FUSED_RANK = 64
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_K = 64  # input columns per shrink step
BLOCK_O = 64  # output columns per expand step
TARGET_PROGRAMS = 528  # ~4 programs per SM of an H100 (132 SMs): enough to fill the GPU


def check_triton_args(y, x, A, B, scale, batch: LoraBatch) -> None:
    """A launcher's own checks (it may be called without ``add_lora``'s): those of
    ``add_lora``, then what the Triton kernels need."""
    check_lora_args(y, x, A, B, scale, batch)
    if x.dtype not in DTYPES:
        raise ValueError(f"the Triton backend takes fp16, bf16 or fp32, got {x.dtype}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton backend needs CUDA tensors, got {x.device}")
    for name, t in (("sorted_tokens", batch.sorted_tokens), ("seg_slot_index",
                                                              batch.seg_slot_index)):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError(f"batch.{name} must be contiguous int64, got {t.dtype}")
    if not scale.is_contiguous():
        raise ValueError("scale must be contiguous")


def blocks(batch: LoraBatch, d_out: int) -> tuple[int, int, int]:
    """``(BLOCK_T, token tiles per segment, output columns per program)``, host-only."""
    starts = batch.seg_starts
    longest = max(b - a for a, b in zip(starts, starts[1:]))
    block_t = 16 if longest <= 16 else (32 if longest <= 32 else 64)
    tiles = triton.cdiv(longest, block_t)
    busy = sum(triton.cdiv(b - a, block_t) for a, b in zip(starts, starts[1:]))
    out_tiles = triton.cdiv(d_out, BLOCK_O)
    chunks = max(1, min(out_tiles, TARGET_PROGRAMS // busy))  # fewer chunks: less recompute
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
