"""Split-K SGMV: ``add_lora`` in two launches whose grids depend on the tensors' shapes only
(``T``, ``in``, ``out``), never on which slots the tokens use, so one CUDA graph per batch
bucket serves any adapters. Same meaning as ``triton_lora.sgmv``::

    for i in range(T):
        if idx[i] >= 0:  # -1: the row is never loaded nor stored
            s = idx[i]
            y[i] += ((x[i] @ A[s].T) * scale[s]) @ B[s].T

The tokens are grouped by slot on the device (``SlotRuns``: a stable sort of ``token_slot``
and the end of each run; the eager ``Backend`` form reuses the ``LoraBatch``'s sorted
tokens, and its grids then follow the tokens with a slot), and only the first position of
a run does work, for the whole run, so each used slot's factors are read once per launch:

- shrink, program ``(i, kc)``: the run starting at sorted position ``i`` times input
  columns ``kc * BLOCK_K ..`` of ``A[s]`` (loaded once, kept in registers for every token
  tile of the run) -> fp32 partials ``part[kc, i ..]`` of shape ``[r_max]`` per token;
- expand, program ``(i, oc)``: the run's partials summed over ``kc`` in order (no
  atomics: one fixed order), times ``scale[s]``, rounded to ``x``'s dtype for
  fp16/bf16 (tensor cores), times output columns ``oc * BLOCK_O ..`` of ``B[s]`` (loaded
  once), added to ``y`` in place.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_common as tc
from .batch import LoraBatch, SlotRuns
from .torch_lora import gather_rows
from .triton_lora import sgmv

BLOCK_T = 16  # tokens per tile (the smallest M of tl.dot)
BLOCK_K = 64  # input columns per shrink program
BLOCK_O = 64  # output columns per expand program


@triton.jit
def run_of(slots, ends, i):
    """``(slot, end, lead)``: sorted position ``i``'s slot, its run's end, and whether ``i``
    starts a run of a real slot (the only programs that work)."""
    slot = tl.load(slots + i)
    prev = tl.load(slots + tl.maximum(i - 1, 0))
    lead = (slot >= 0) & ((i == 0) | (prev != slot))
    return slot, tl.load(ends + i), lead


@triton.jit
def a_tile(A, slot, kc, d_in, r_max, sa0, sa1, sa2, BLOCK_K: tl.constexpr,
           BLOCK_R: tl.constexpr):
    """``A[slot, :, kc * BLOCK_K ..].T`` as ``[BLOCK_K, BLOCK_R]`` (zeros past ``r_max``)."""
    k = kc * BLOCK_K + tl.arange(0, BLOCK_K)
    r = tl.arange(0, BLOCK_R)
    return tl.load(A + slot * sa0 + r[None, :] * sa1 + k[:, None] * sa2,
                   mask=(r < r_max)[None, :] & (k < d_in)[:, None], other=0.0)


@triton.jit
def x_rows(x, order, t0, end, kc, d_in, sx0, sx1, BLOCK_T: tl.constexpr,
           BLOCK_K: tl.constexpr):
    """``(rows, xt)``: sorted positions ``t0 ..`` (clipped to ``end``) and their tokens'
    ``[BLOCK_T, BLOCK_K]`` tile of ``x``."""
    rows = t0 + tl.arange(0, BLOCK_T)
    row_ok = rows < end
    k = kc * BLOCK_K + tl.arange(0, BLOCK_K)
    tok = tl.load(order + rows, mask=row_ok, other=0)
    xt = tl.load(x + tok[:, None] * sx0 + k[None, :] * sx1,
                 mask=row_ok[:, None] & (k < d_in)[None, :], other=0.0)
    return rows, xt


@triton.jit
def put_part(part, xt, at, rows, end, kc, T, BLOCK_R: tl.constexpr, FP32: tl.constexpr):
    """``part[kc, rows] = xt @ at`` (fp32)."""
    v = tl.dot(xt, at, input_precision="ieee") if FP32 else tl.dot(xt, at)
    r = tl.arange(0, BLOCK_R)
    tl.store(part + (kc * T + rows[:, None]) * BLOCK_R + r[None, :], v,
             mask=(rows < end)[:, None])


@triton.jit
def expand_run(y, part, B, scale, order, slot, i, end, oc, T, d_out, r_max, splits,
               sy0, sy1, sb0, sb1, sb2, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
               BLOCK_R: tl.constexpr, FP32: tl.constexpr):
    """Output tile ``oc`` of the run ``i .. end`` on ``slot``: partials summed over the
    splits in order, times ``scale[slot]``, times ``B[slot]``'s tile (loaded once)."""
    o = oc * BLOCK_O + tl.arange(0, BLOCK_O)
    r = tl.arange(0, BLOCK_R)
    o_ok = o < d_out
    bt = tl.load(B + slot * sb0 + o[None, :] * sb1 + r[:, None] * sb2,
                 mask=(r < r_max)[:, None] & o_ok[None, :], other=0.0)  # [BR, BO]
    s = tl.load(scale + slot).to(tl.float32)
    for t0 in range(i, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < end
        v = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        for kc in range(0, splits):  # one fixed order
            v += tl.load(part + (kc * T + rows[:, None]) * BLOCK_R + r[None, :],
                         mask=row_ok[:, None], other=0.0)
        v = v * s  # rounded to y's dtype for fp16/bf16 (tensor cores); fp32 stays IEEE
        d = tl.dot(v, bt, input_precision="ieee") if FP32 else \
            tl.dot(v.to(y.dtype.element_ty), bt)
        tok = tl.load(order + rows, mask=row_ok, other=0)
        ptr = y + tok[:, None] * sy0 + o[None, :] * sy1
        m = row_ok[:, None] & o_ok[None, :]
        yt = tl.load(ptr, mask=m)
        tl.store(ptr, (yt.to(tl.float32) + d).to(yt.dtype), mask=m)


@triton.jit
def _shrink_kernel(part, x, A, order, slots, ends, T, d_in, r_max, sx0, sx1, sa0, sa1, sa2,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   FP32: tl.constexpr):
    i = tl.program_id(0)
    kc = tl.program_id(1)
    slot, end, lead = run_of(slots, ends, i)
    if lead:
        at = a_tile(A, slot, kc, d_in, r_max, sa0, sa1, sa2, BLOCK_K, BLOCK_R)  # [BK, BR]
        for t0 in range(i, end, BLOCK_T):
            rows, xt = x_rows(x, order, t0, end, kc, d_in, sx0, sx1, BLOCK_T, BLOCK_K)
            put_part(part, xt, at, rows, end, kc, T, BLOCK_R, FP32)


@triton.jit
def _expand_kernel(y, part, B, scale, order, slots, ends, T, d_out, r_max, splits,
                   sy0, sy1, sb0, sb1, sb2, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                   BLOCK_R: tl.constexpr, FP32: tl.constexpr):
    i = tl.program_id(0)
    slot, end, lead = run_of(slots, ends, i)
    if lead:
        expand_run(y, part, B, scale, order, slot, i, end, tl.program_id(1), T, d_out, r_max,
                   splits, sy0, sy1, sb0, sb1, sb2, BLOCK_T, BLOCK_O, BLOCK_R, FP32)


def sgmv_rows(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
              token_slot: Tensor, runs: SlotRuns | None = None) -> Tensor:
    """``add_lora`` from the ``[T]`` int64 token -> slot tensor alone (``add_lora_rows``'s
    signature, for a CUDA-graph bucket): two launches of ``T x ceil(in / BLOCK_K)`` and
    ``T x ceil(out / BLOCK_O)`` programs over ``runs`` (``SlotRuns.of(token_slot)`` when
    None). Ranks above ``MAX_FUSED_RANK`` go to ``gather_rows``; the caller checked the
    shapes."""
    if A.shape[1] > tc.MAX_FUSED_RANK:
        return gather_rows(y, x, A, B, scale, token_slot)
    if y.shape[0]:
        launch_runs(y, x, A, B, scale, runs or SlotRuns.of(token_slot))
    return y


def sgmv_split(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
               batch: LoraBatch) -> Tensor:
    """``add_lora``'s ``Backend`` on CUDA, with the Triton launchers' checks."""
    tc.check_triton_args(y, x, A, B, scale, batch)
    return sgmv_split_launch(y, x, A, B, scale, batch)


def sgmv_split_launch(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
                      batch: LoraBatch) -> Tensor:
    """``sgmv_split`` without its checks, for the engine's eager steps: the runs are the
    batch's own ``runs`` (no sort, one ``searchsorted`` per step; ``T_a`` positions, the
    tokens with a slot). Ranks above ``MAX_FUSED_RANK`` go to ``triton_lora.sgmv`` (torch
    ``segment``)."""
    if A.shape[1] > tc.MAX_FUSED_RANK:
        return sgmv(y, x, A, B, scale, batch)
    if batch.has_adapters:
        launch_runs(y, x, A, B, scale, batch.runs)
    return y


def launch_runs(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
                runs: SlotRuns) -> None:
    """The two launches over ``runs``' positions (the grids' first axis)."""
    r_max = A.shape[1]
    if r_max > tc.MAX_FUSED_RANK:
        raise ValueError(f"the split-K SGMV takes ranks up to {tc.MAX_FUSED_RANK}, got {r_max}; "
                         f"use triton_lora.sgmv, which falls back to torch")
    n, d_in, d_out = runs.order.shape[0], x.shape[1], y.shape[1]
    block_r = max(16, triton.next_power_of_2(r_max))
    splits = triton.cdiv(d_in, BLOCK_K)
    part = torch.empty(splits, n, block_r, device=x.device, dtype=torch.float32)
    fp32 = x.dtype == torch.float32
    _shrink_kernel[(n, splits)](
        part, x, A, runs.order, runs.slots, runs.ends, n, d_in, r_max, *x.stride(),
        *A.stride(), BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, BLOCK_R=block_r, FP32=fp32)
    _expand_kernel[(n, triton.cdiv(d_out, BLOCK_O))](
        y, part, B, scale, runs.order, runs.slots, runs.ends, n, d_out, r_max, splits,
        *y.stride(), *B.stride(), BLOCK_T=BLOCK_T, BLOCK_O=BLOCK_O, BLOCK_R=block_r,
        FP32=fp32)
