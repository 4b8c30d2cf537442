"""Split-K ``add_lora_multi``: up to three modules that share ``x`` (q, k, v; gate, up) in
two launches, with the meaning of looping ``triton_sgmv.sgmv_split`` over them::

    for y, A, B, scale in zip(ys, As, Bs, scales):
        for i in range(T):
            if idx[i] >= 0:  # -1: the row is never loaded nor stored
                y[i] += ((x[i] @ A[idx[i]].T) * scale[idx[i]]) @ B[idx[i]].T

- shrink, program ``(i, kc)``: as ``triton_sgmv``'s, but each ``[BLOCK_T, BLOCK_K]`` tile
  of ``x`` is loaded once and fed to every module's ``A`` tile (one partial buffer each);
- expand, program ``(i, oc)``: ``oc`` runs over the output tiles of module 0, then 1, then
  2, so every module's columns are spread over the one launch.

Grids: ``(positions, ceil(in / BLOCK_K))`` and ``(positions, sum of output tiles)``, shapes
only. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_common as tc
from .batch import LoraBatch, SlotRuns
from .torch_lora import gather_rows
from .triton_lora import sgmv_launch
from .triton_multi import check_multi
from .triton_sgmv import (
    BLOCK_K,
    BLOCK_O,
    BLOCK_T,
    a_tile,
    expand_run,
    put_part,
    run_of,
    x_rows,
)

MAX_MODULES = 3  # per launch pair; more are launched in groups of three


@triton.jit
def _shrink_multi_kernel(
    x, order, slots, ends, T, d_in, sx0, sx1,
    p0, A0, r0, sa00, sa01, sa02, p1, A1, r1, sa10, sa11, sa12,
    p2, A2, r2, sa20, sa21, sa22,
    M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BR0: tl.constexpr, BR1: tl.constexpr, BR2: tl.constexpr, FP32: tl.constexpr,
):
    i = tl.program_id(0)
    kc = tl.program_id(1)
    slot, end, lead = run_of(slots, ends, i)
    if lead:
        at0 = a_tile(A0, slot, kc, d_in, r0, sa00, sa01, sa02, BLOCK_K, BR0)
        at1 = a_tile(A1, slot, kc, d_in, r1, sa10, sa11, sa12, BLOCK_K, BR1) if M > 1 else at0
        at2 = a_tile(A2, slot, kc, d_in, r2, sa20, sa21, sa22, BLOCK_K, BR2) if M > 2 else at0
        for t0 in range(i, end, BLOCK_T):
            rows, xt = x_rows(x, order, t0, end, kc, d_in, sx0, sx1, BLOCK_T, BLOCK_K)
            put_part(p0, xt, at0, rows, end, kc, T, BR0, FP32)
            if M > 1:
                put_part(p1, xt, at1, rows, end, kc, T, BR1, FP32)
            if M > 2:
                put_part(p2, xt, at2, rows, end, kc, T, BR2, FP32)


@triton.jit
def _expand_multi_kernel(
    order, slots, ends, T, splits, n0, n1,
    y0, p0, B0, sc0, d0, r0, sy00, sy01, sb00, sb01, sb02,
    y1, p1, B1, sc1, d1, r1, sy10, sy11, sb10, sb11, sb12,
    y2, p2, B2, sc2, d2, r2, sy20, sy21, sb20, sb21, sb22,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
    BR0: tl.constexpr, BR1: tl.constexpr, BR2: tl.constexpr, FP32: tl.constexpr,
):
    i = tl.program_id(0)
    oc = tl.program_id(1)  # module 0's n0 tiles, then module 1's n1, then module 2's
    slot, end, lead = run_of(slots, ends, i)
    if lead:
        if oc < n0:
            expand_run(y0, p0, B0, sc0, order, slot, i, end, oc, T, d0, r0, splits,
                       sy00, sy01, sb00, sb01, sb02, BLOCK_T, BLOCK_O, BR0, FP32)
        elif oc < n0 + n1:
            expand_run(y1, p1, B1, sc1, order, slot, i, end, oc - n0, T, d1, r1, splits,
                       sy10, sy11, sb10, sb11, sb12, BLOCK_T, BLOCK_O, BR1, FP32)
        else:
            expand_run(y2, p2, B2, sc2, order, slot, i, end, oc - n0 - n1, T, d2, r2, splits,
                       sy20, sy21, sb20, sb21, sb22, BLOCK_T, BLOCK_O, BR2, FP32)


def sgmv_multi_split(ys: Sequence[Tensor], x: Tensor, As: Sequence[Tensor],
                     Bs: Sequence[Tensor], scales: Sequence[Tensor],
                     batch: LoraBatch) -> Sequence[Tensor]:
    """``add_lora_multi`` on CUDA (the module docstring), with ``triton_multi``'s checks:
    shapes, dtypes, devices, and outputs that must not share storage. Returns ``ys``."""
    check_multi(ys, x, As, Bs, scales, batch)
    return sgmv_multi_split_launch(ys, x, As, Bs, scales, batch)


def sgmv_multi_split_launch(ys: Sequence[Tensor], x: Tensor, As: Sequence[Tensor],
                            Bs: Sequence[Tensor], scales: Sequence[Tensor],
                            batch: LoraBatch) -> Sequence[Tensor]:
    """``sgmv_multi_split`` without its checks (the engine validates once). Modules with
    ranks above ``MAX_FUSED_RANK`` go to ``triton_lora.sgmv_launch`` (torch)."""
    if not batch.has_adapters:
        return ys
    fused = [m for m, A in enumerate(As) if A.shape[1] <= tc.MAX_FUSED_RANK]
    for m in sorted(set(range(len(ys))) - set(fused)):
        sgmv_launch(ys[m], x, As[m], Bs[m], scales[m], batch)
    launch_groups(ys, x, As, Bs, scales, batch.runs, fused)
    return ys


def sgmv_multi_rows(ys: Sequence[Tensor], x: Tensor, As: Sequence[Tensor],
                    Bs: Sequence[Tensor], scales: Sequence[Tensor], token_slot: Tensor,
                    runs: SlotRuns | None = None) -> Sequence[Tensor]:
    """``add_lora_multi_rows`` on CUDA (a graph bucket): one launch pair per three modules
    over ``runs`` (``SlotRuns.of(token_slot)`` when None), grids from shapes only; modules
    with ranks above ``MAX_FUSED_RANK`` go to ``gather_rows``. Returns ``ys``."""
    if not ys or not ys[0].shape[0]:
        return ys
    fused = [m for m, A in enumerate(As) if A.shape[1] <= tc.MAX_FUSED_RANK]
    for m in sorted(set(range(len(ys))) - set(fused)):
        gather_rows(ys[m], x, As[m], Bs[m], scales[m], token_slot)
    launch_groups(ys, x, As, Bs, scales, runs or SlotRuns.of(token_slot), fused)
    return ys


def launch_groups(ys, x: Tensor, As, Bs, scales, runs: SlotRuns, fused: list[int]) -> None:
    """``launch_runs`` over the modules ``fused``, in groups of ``MAX_MODULES``."""
    for g in range(0, len(fused), MAX_MODULES):
        group = fused[g : g + MAX_MODULES]
        launch_runs([ys[m] for m in group], x, [As[m] for m in group],
                    [Bs[m] for m in group], [scales[m] for m in group], runs)


def launch_runs(ys, x: Tensor, As, Bs, scales, runs: SlotRuns) -> None:
    """The two launches for up to ``MAX_MODULES`` modules; unused modules repeat module 0's
    arguments (never read)."""
    n, d_in = runs.order.shape[0], x.shape[1]
    splits = triton.cdiv(d_in, BLOCK_K)
    block_r = [max(16, triton.next_power_of_2(A.shape[1])) for A in As]
    parts = [torch.empty(splits, n, br, device=x.device, dtype=torch.float32) for br in block_r]
    pick = [m if m < len(ys) else 0 for m in range(MAX_MODULES)]
    tiles = [triton.cdiv(ys[m].shape[1], BLOCK_O) if m < len(ys) else 0
             for m in range(MAX_MODULES)]
    fp32 = x.dtype == torch.float32
    shrink_args = [a for m in pick for a in (parts[m], As[m], As[m].shape[1], *As[m].stride())]
    _shrink_multi_kernel[(n, splits)](
        x, runs.order, runs.slots, runs.ends, n, d_in, *x.stride(), *shrink_args,
        M=len(ys), BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, BR0=block_r[pick[0]],
        BR1=block_r[pick[1]], BR2=block_r[pick[2]], FP32=fp32)
    expand_args = [a for m in pick for a in (ys[m], parts[m], Bs[m], scales[m], ys[m].shape[1],
                                             As[m].shape[1], *ys[m].stride(), *Bs[m].stride())]
    _expand_multi_kernel[(n, sum(tiles))](
        runs.order, runs.slots, runs.ends, n, splits, tiles[0], tiles[1], *expand_args,
        BLOCK_T=BLOCK_T, BLOCK_O=BLOCK_O, BR0=block_r[pick[0]], BR1=block_r[pick[1]],
        BR2=block_r[pick[2]], FP32=fp32)
