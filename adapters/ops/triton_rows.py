"""Per-row BGMV: the first Triton backend of ``add_lora_rows``, kept as the GPU benchmark's
baseline (``add_lora_rows`` now runs ``triton_sgmv.sgmv_rows`` over shared ``SlotRuns``,
reading each used slot's factors once per step). One program per (row, output chunk),
its grid a function of the tensors' shapes only, so a CUDA graph captures it once per
batch bucket and replays it for any adapters.

Program ``(t, chunk)`` reads ``s = token_slot[t]`` on the device and exits when it is
``-1``; else it computes the row's ``[r_max]`` shrink in fp32 and adds its expand over the
chunk's output columns (``shrink_expand`` of the SGMV kernel, rounding included, on a
16-row tile of which only row 0 is real, as ``tl.dot`` needs 16 rows).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_common as tc
from .triton_common import shrink_expand

TILE_ROWS = 16  # the smallest M of tl.dot
OUT_CHUNKS = 4  # output chunks per row: programs = rows * OUT_CHUNKS


@triton.jit
def _bgmv_kernel(
    y, x, A, B, scale, token_slot, d_in, d_out, r_max, out_chunk,
    sy0, sy1, sx0, sx1, sa0, sa1, sa2, sb0, sb1, sb2,
    TILE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr, FP32: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(token_slot + t)
    if slot >= 0:
        lane = tl.arange(0, TILE)
        row_ok = lane == 0
        tok = t + lane * 0  # [TILE] every lane names row t; only lane 0 is loaded/stored
        shrink_expand(y, x, A, B, scale, slot, tok, row_ok, tl.program_id(1), d_in, d_out,
                      r_max, out_chunk, sy0, sy1, sx0, sx1, sa0, sa1, sa2, sb0, sb1, sb2,
                      TILE, BLOCK_K, BLOCK_R, BLOCK_O, FP32)


def bgmv(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
         token_slot: Tensor) -> Tensor:
    """``add_lora_rows`` in one launch of ``rows x OUT_CHUNKS`` programs; ranks up to
    ``MAX_FUSED_RANK`` (the engine's slot pools stay below it)."""
    r_max = A.shape[1]
    if r_max > tc.MAX_FUSED_RANK:
        raise ValueError(f"add_lora_rows takes ranks up to {tc.MAX_FUSED_RANK}, got {r_max}")
    d_out = y.shape[1]
    out_chunk = triton.cdiv(triton.cdiv(d_out, OUT_CHUNKS), tc.BLOCK_O) * tc.BLOCK_O
    grid = (y.shape[0], triton.cdiv(d_out, out_chunk))
    _bgmv_kernel[grid](
        y, x, A, B, scale, token_slot, x.shape[1], d_out, r_max, out_chunk,
        *y.stride(), *x.stride(), *A.stride(), *B.stride(),
        TILE=TILE_ROWS, BLOCK_K=tc.BLOCK_K, BLOCK_R=max(16, triton.next_power_of_2(r_max)),
        BLOCK_O=tc.BLOCK_O, FP32=x.dtype == torch.float32,
    )
    return y
