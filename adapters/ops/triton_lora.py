"""Triton backend of ``add_lora``: one fused SGMV kernel (shrink and expand in one launch).

Same signature and meaning as the torch backends, ``(y, x, A, B, scale, batch) -> y``::

    for i in range(T):
        if idx[i] >= 0:  # -1: the row is never loaded nor stored
            y[i] += (x[i] @ A[idx[i]].T) @ B[idx[i]].T * scale[idx[i]]

Tokens are grouped by slot with ``batch.sorted_tokens`` (the segments of ``LoraBatch``);
each program takes ``BLOCK_T`` tokens of one segment, computes their ``[BLOCK_T, r_max]``
shrink in fp32 registers once, then expands it over a chunk of the output columns. Only
rows of active tokens are written, each by exactly one program, so no atomics are needed.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests). Ranks
above ``MAX_FUSED_RANK`` do not fit the fused kernel's registers: they go to the torch
``segment`` backend (cuBLAS per slot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_common as tc
from .batch import LoraBatch
from .torch_lora import segment
from .triton_common import segment_tile, shrink_expand


@triton.jit
def _sgmv_kernel(
    y, x, A, B, scale, tokens, seg_slots, seg_starts, d_in, d_out, r_max, out_chunk,
    sy0, sy1, sx0, sx1, sa0, sa1, sa2, sb0, sb1, sb2,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr, FP32: tl.constexpr,
):
    """Program ``(seg, tile, chunk)``, with ``rows = sorted_tokens[a:b]`` (its tokens of
    segment ``seg``, slot ``s``) and ``cols`` (its chunk of the output columns)::

        v = (x[rows].float() @ A[s].float().T) * scale[s]            # [BLOCK_T, r_max]
        y[rows, cols] = (y[rows, cols].float() + v @ B[s, cols].T).to(y.dtype)

    ``v`` is rounded to ``x``'s dtype before the expand for fp16/bf16 (tensor cores);
    fp32 uses IEEE fp32 dots (no TF32).
    """
    slot, tok, row_ok, busy = segment_tile(tokens, seg_slots, seg_starts, BLOCK_T)
    if busy:
        shrink_expand(y, x, A, B, scale, slot, tok, row_ok, tl.program_id(2), d_in, d_out,
                      r_max, out_chunk, sy0, sy1, sx0, sx1, sa0, sa1, sa2, sb0, sb1, sb2,
                      BLOCK_T, BLOCK_K, BLOCK_R, BLOCK_O, FP32)


def sgmv(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor, batch: LoraBatch) -> Tensor:
    """``add_lora`` on the GPU in one launch (see the module docstring for the semantics).

    fp16/bf16/fp32 with fp32 accumulation; any strides for ``x``, ``y``, ``A`` and ``B``
    (``y`` may be a column slice of a fused qkv output). ``r_max > MAX_FUSED_RANK`` runs
    ``segment``. Raises ``ValueError`` on bad shapes, dtypes or devices.
    """
    tc.check_triton_args(y, x, A, B, scale, batch)
    return sgmv_launch(y, x, A, B, scale, batch)


def sgmv_launch(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
                batch: LoraBatch) -> Tensor:
    """``sgmv`` without its checks, for a caller that validated the shapes once (the
    engine: at wrap time and once per step)."""
    if not batch.has_adapters:
        return y
    r_max = A.shape[1]
    if r_max > tc.MAX_FUSED_RANK:
        return segment(y, x, A, B, scale, batch)
    seg_starts = batch.seg_start_index
    block_t, tiles, out_chunk = tc.blocks(batch, y.shape[1], y.device)
    grid = (batch.num_segments, tiles, triton.cdiv(y.shape[1], out_chunk))
    _sgmv_kernel[grid](
        y, x, A, B, scale, batch.sorted_tokens, batch.seg_slot_index, seg_starts,
        x.shape[1], y.shape[1], r_max, out_chunk,
        *y.stride(), *x.stride(), *A.stride(), *B.stride(),
        BLOCK_T=block_t, BLOCK_K=tc.BLOCK_K, BLOCK_R=max(16, triton.next_power_of_2(r_max)),
        BLOCK_O=tc.BLOCK_O, FP32=x.dtype == torch.float32,
    )
    return y
