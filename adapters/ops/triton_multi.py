"""Triton backend of ``add_lora_multi``: up to three modules that share one input (q, k, v)
in one launch, with each tile of ``x`` loaded once for all of their shrinks.

Same meaning as looping ``sgmv`` (``triton_lora.py``) over the modules::

    for y, A, B, scale in zip(ys, As, Bs, scales):
        for i in range(T):
            if idx[i] >= 0:  # -1: the row is never loaded nor stored
                y[i] += (x[i] @ A[idx[i]].T) @ B[idx[i]].T * scale[idx[i]]

The grid is ``sgmv``'s, ``(segment, token tile, output chunk)``, and every program serves
all the modules: it streams ``x[rows]`` over ``in`` once, feeding each ``[BLOCK_T, BLOCK_K]``
tile to every module's shrink (one fp32 ``[BLOCK_T, r_max_m]`` accumulator each), then
expands chunk ``c`` of each module's output columns (module ``m`` is cut into as many
chunks as the others, of ``out_chunk_m`` columns). A module axis in the grid would give
each module its own programs and so its own reads of ``x``: what this kernel avoids.
Only rows of active tokens are written, each column by exactly one program: no atomics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import triton_common as tc
from .batch import LoraBatch
from .checks import check_module_lists
from .triton_common import expand, segment_tile, shrink, x_tile
from .triton_lora import sgmv_launch

MAX_MODULES = 3  # per launch; more are launched in groups of three


@triton.jit
def _sgmv_multi_kernel(
    x, tokens, seg_slots, seg_starts, d_in, sx0, sx1,
    y0, A0, B0, sc0, d_out0, r0, chunk0, sy00, sy01, sa00, sa01, sa02, sb00, sb01, sb02,
    y1, A1, B1, sc1, d_out1, r1, chunk1, sy10, sy11, sa10, sa11, sa12, sb10, sb11, sb12,
    y2, A2, B2, sc2, d_out2, r2, chunk2, sy20, sy21, sa20, sa21, sa22, sb20, sb21, sb22,
    M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_R0: tl.constexpr, BLOCK_R1: tl.constexpr, BLOCK_R2: tl.constexpr,
    FP32: tl.constexpr,
):
    """Program ``(seg, tile, c)``: rows ``sorted_tokens[a:b]`` of segment ``seg`` (slot
    ``s``); for each module ``m < M`` (unused modules' arguments repeat module 0's)::

        v_m = x[rows].float() @ A_m[s].float().T                     # [BLOCK_T, r_m]
        y_m[rows, cols_m(c)] += v_m * scale_m[s] @ B_m[s, cols_m(c)].T
    """
    slot, tok, row_ok, busy = segment_tile(tokens, seg_slots, seg_starts, BLOCK_T)
    if busy:
        v0 = tl.zeros([BLOCK_T, BLOCK_R0], dtype=tl.float32)
        v1 = tl.zeros([BLOCK_T, BLOCK_R1], dtype=tl.float32)
        v2 = tl.zeros([BLOCK_T, BLOCK_R2], dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            xt, k, k_ok = x_tile(x, tok, row_ok, k0, d_in, sx0, sx1, BLOCK_K)  # loaded once
            v0 = shrink(v0, xt, A0, slot, k, k_ok, r0, sa00, sa01, sa02, BLOCK_R0, FP32)
            if M > 1:
                v1 = shrink(v1, xt, A1, slot, k, k_ok, r1, sa10, sa11, sa12, BLOCK_R1, FP32)
            if M > 2:
                v2 = shrink(v2, xt, A2, slot, k, k_ok, r2, sa20, sa21, sa22, BLOCK_R2, FP32)
        c = tl.program_id(2)
        expand(v0, y0, B0, sc0, slot, tok, row_ok, c, chunk0, d_out0, r0,
               sy00, sy01, sb00, sb01, sb02, BLOCK_R0, BLOCK_O, FP32)
        if M > 1:
            expand(v1, y1, B1, sc1, slot, tok, row_ok, c, chunk1, d_out1, r1,
                   sy10, sy11, sb10, sb11, sb12, BLOCK_R1, BLOCK_O, FP32)
        if M > 2:
            expand(v2, y2, B2, sc2, slot, tok, row_ok, c, chunk2, d_out2, r2,
                   sy20, sy21, sb20, sb21, sb22, BLOCK_R2, BLOCK_O, FP32)


def check_multi(ys, x, As, Bs, scales, batch: LoraBatch) -> None:
    """Each module passes ``sgmv``'s checks; outputs may not share storage."""
    check_module_lists(ys, As, Bs, scales)
    for y, A, B, scale in zip(ys, As, Bs, scales):
        tc.check_triton_args(y, x, A, B, scale, batch)
    ptrs = [y.data_ptr() for y in ys if y.numel()]
    if len(set(ptrs)) != len(ptrs):
        raise ValueError("the outputs ys must not overlap (column slices of one tensor are fine)")


def _launch(ys, x, As, Bs, scales, batch: LoraBatch, seg_starts: torch.Tensor) -> None:
    """One kernel launch for up to ``MAX_MODULES`` modules."""
    d_max = max(1, *(y.shape[1] for y in ys))
    block_t, tiles, widest = tc.blocks(batch, d_max, x.device)
    chunks = triton.cdiv(d_max, widest)  # every module is cut into this many chunks
    args, block_r = [], []
    for m in range(MAX_MODULES):
        i = m if m < len(ys) else 0  # unused modules repeat module 0 (never read)
        y, A, B, scale = ys[i], As[i], Bs[i], scales[i]
        out_chunk = triton.cdiv(triton.cdiv(y.shape[1], tc.BLOCK_O), chunks) * tc.BLOCK_O
        args += [y, A, B, scale, y.shape[1], A.shape[1], out_chunk,
                 *y.stride(), *A.stride(), *B.stride()]
        block_r.append(max(16, triton.next_power_of_2(A.shape[1])))
    _sgmv_multi_kernel[(batch.num_segments, tiles, chunks)](
        x, batch.sorted_tokens, batch.seg_slot_index, seg_starts, x.shape[1], *x.stride(),
        *args,
        M=len(ys), BLOCK_T=block_t, BLOCK_K=tc.BLOCK_K, BLOCK_O=tc.BLOCK_O,
        BLOCK_R0=block_r[0], BLOCK_R1=block_r[1], BLOCK_R2=block_r[2],
        FP32=x.dtype == torch.float32,
    )


def sgmv_multi(
    ys: Sequence[torch.Tensor],  # M x [T, out_m]
    x: torch.Tensor,  # [T, in]
    As: Sequence[torch.Tensor],  # M x [S_m, r_m, in]
    Bs: Sequence[torch.Tensor],  # M x [S_m, out_m, r_m]
    scales: Sequence[torch.Tensor],  # M x [S_m]
    batch: LoraBatch,
) -> Sequence[torch.Tensor]:
    """``add_lora_multi`` on the GPU: ``ceil(M / 3)`` launches (see the module docstring).

    Per module the conventions of ``sgmv``: fp16/bf16/fp32 with fp32 accumulation, any
    strides, its own ``out`` and ``r_max``. Modules with ``r_max > MAX_FUSED_RANK`` run
    ``sgmv`` (hence ``segment``) on their own. Returns ``ys``; raises ``ValueError`` on bad
    shapes, dtypes or devices, or on outputs that share storage.
    """
    check_multi(ys, x, As, Bs, scales, batch)
    return sgmv_multi_launch(ys, x, As, Bs, scales, batch)


def sgmv_multi_launch(ys: Sequence[torch.Tensor], x: torch.Tensor,
                      As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                      scales: Sequence[torch.Tensor], batch: LoraBatch
                      ) -> Sequence[torch.Tensor]:
    """``sgmv_multi`` without its checks (the engine validates once, see ``sgmv_launch``)."""
    if not batch.has_adapters:
        return ys
    fused = [m for m, A in enumerate(As) if A.shape[1] <= tc.MAX_FUSED_RANK]
    for m in sorted(set(range(len(ys))) - set(fused)):
        sgmv_launch(ys[m], x, As[m], Bs[m], scales[m], batch)
    seg_starts = batch.seg_start_index
    for g in range(0, len(fused), MAX_MODULES):
        group = fused[g : g + MAX_MODULES]
        _launch([ys[m] for m in group], x, [As[m] for m in group], [Bs[m] for m in group],
                [scales[m] for m in group], batch, seg_starts)
    return ys
