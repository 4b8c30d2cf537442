"""Split-K SGMV: ``add_lora`` for up to three modules that read one ``x`` (q, k, v; gate,
up) in two launches whose grids depend on the tensors' shapes only (``T``, ``in``, ``out``),
never on which slots the tokens use, so one CUDA graph per batch bucket serves any
adapters. Same meaning as looping ``triton_lora.sgmv`` over the modules::

    for y, A, B, scale in zip(ys, As, Bs, scales):
        for i in range(T):
            if idx[i] >= 0:  # -1: the row is never loaded nor stored
                s = idx[i]
                y[i] += ((x[i] @ A[s].T) * scale[s]) @ B[s].T

The tokens are grouped by slot on the device (``SlotRuns``: a stable sort of ``token_slot``
and the end of each run; the eager ``Backend`` form reuses the ``LoraBatch``'s sorted
tokens, and its grids then follow the tokens with a slot), and only the first position of
a run does work, for the whole run, so each used slot's factors are read once per launch:

- shrink, program ``(i, kc)``: the run starting at sorted position ``i`` times input
  columns ``kc * BLOCK_K ..`` of each module's ``A[s]`` (loaded once, kept in registers for
  every token tile of the run; each tile of ``x`` loaded once for every module) -> fp32
  partials ``part_m[kc, i ..]`` of shape ``[r_m]`` per token;
- expand, program ``(i, oc)``: ``oc`` runs over module 0's output tiles, then module 1's,
  then module 2's; the run's partials summed over ``kc`` in order (no atomics: one fixed
  order), times ``scale[s]``, rounded to ``x``'s dtype for fp16/bf16 (tensor cores), times
  output columns ``BLOCK_O`` wide of ``B[s]`` (loaded once), added to ``y`` in place.

What depends on the modules' slot buffers alone (ranks, strides, tile counts, block
sizes) is computed once per ``Factors`` (``SgmvPlan``), not on every call: a call adds only
``x``, the outputs, the runs and one workspace.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_common as tc
from .batch import LoraBatch, SlotRuns
from .factors import Factors, Tensors
from .torch_lora import gather_rows
from .triton_lora import sgmv

BLOCK_T = 16  # tokens per tile (the smallest M of tl.dot)
BLOCK_K = 64  # input columns per shrink program
BLOCK_O = 64  # output columns per expand program
MAX_MODULES = 3  # per launch pair; more are launched in groups of three


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
def _shrink_kernel(
    x, order, slots, ends, part, T, sx0, sx1, off1, off2,
    d_in, A0, r0, sa00, sa01, sa02, A1, r1, sa10, sa11, sa12, A2, r2, sa20, sa21, sa22,
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
            put_part(part, xt, at0, rows, end, kc, T, BR0, FP32)
            if M > 1:
                put_part(part + off1, xt, at1, rows, end, kc, T, BR1, FP32)
            if M > 2:
                put_part(part + off2, xt, at2, rows, end, kc, T, BR2, FP32)


@triton.jit
def _expand_kernel(
    order, slots, ends, part, T, off1, off2, y0, sy00, sy01, y1, sy10, sy11, y2, sy20, sy21,
    splits, n0, n1, B0, sc0, d0, r0, sb00, sb01, sb02, B1, sc1, d1, r1, sb10, sb11, sb12,
    B2, sc2, d2, r2, sb20, sb21, sb22,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
    BR0: tl.constexpr, BR1: tl.constexpr, BR2: tl.constexpr, FP32: tl.constexpr,
):
    i = tl.program_id(0)
    oc = tl.program_id(1)  # module 0's n0 tiles, then module 1's n1, then module 2's
    slot, end, lead = run_of(slots, ends, i)
    if lead:
        if oc < n0:
            expand_run(y0, part, B0, sc0, order, slot, i, end, oc, T, d0, r0, splits,
                       sy00, sy01, sb00, sb01, sb02, BLOCK_T, BLOCK_O, BR0, FP32)
        elif oc < n0 + n1:
            expand_run(y1, part + off1, B1, sc1, order, slot, i, end, oc - n0, T, d1, r1,
                       splits, sy10, sy11, sb10, sb11, sb12, BLOCK_T, BLOCK_O, BR1, FP32)
        else:
            expand_run(y2, part + off2, B2, sc2, order, slot, i, end, oc - n0 - n1, T, d2,
                       r2, splits, sy20, sy21, sb20, sb21, sb22, BLOCK_T, BLOCK_O, BR2, FP32)


class SgmvLaunch:
    """The launch pair of up to three modules ``ys[m] for m in modules``, with every
    argument that depends on their slot buffers alone fixed here, once: a call adds ``x``,
    the outputs, the runs and one fp32 workspace for all the modules' partials. Unused
    module positions repeat module 0's arguments (never read)."""

    def __init__(self, modules: tuple[int, ...], As: Tensors, Bs: Tensors,
                 scales: Tensors) -> None:
        pick = [modules[p] if p < len(modules) else modules[0] for p in range(MAX_MODULES)]
        widths = [max(16, triton.next_power_of_2(As[m].shape[1])) for m in pick]
        tiles = [triton.cdiv(Bs[m].shape[1], BLOCK_O) for m in modules]
        d_in = As[modules[0]].shape[2]
        self.pick, self.splits = pick, triton.cdiv(d_in, BLOCK_K)
        self.offsets = (self.splits * widths[0], self.splits * (widths[0] + widths[1]))
        self.part_per_token = self.splits * sum(widths[: len(modules)])
        self.tiles = sum(tiles)
        consts = dict(BLOCK_T=BLOCK_T, BR0=widths[0], BR1=widths[1], BR2=widths[2],
                      FP32=As[pick[0]].dtype == torch.float32)
        self.shrink_consts = dict(consts, M=len(modules), BLOCK_K=BLOCK_K)
        self.expand_consts = dict(consts, BLOCK_O=BLOCK_O)
        self.shrink = (d_in, *(a for m in pick for a in (As[m], As[m].shape[1], *As[m].stride())))
        self.expand = (self.splits, *(tiles + [0])[:2], *(
            a for m in pick for a in (Bs[m], scales[m], Bs[m].shape[1], As[m].shape[1],
                                      *Bs[m].stride())))

    def __call__(self, ys: Tensors, x: Tensor, runs: SlotRuns) -> None:
        order, slots, ends = runs.order, runs.slots, runs.ends
        n = order.shape[0]
        part = torch.empty(n * self.part_per_token, device=x.device, dtype=torch.float32)
        off1, off2 = n * self.offsets[0], n * self.offsets[1]
        y0, y1, y2 = (ys[m] for m in self.pick)
        _shrink_kernel[(n, self.splits)](x, order, slots, ends, part, n, *x.stride(), off1,
                                         off2, *self.shrink, **self.shrink_consts)
        _expand_kernel[(n, self.tiles)](
            order, slots, ends, part, n, off1, off2, y0, *y0.stride(), y1, *y1.stride(), y2,
            *y2.stride(), *self.expand, **self.expand_consts)


class SgmvPlan:
    """A ``Factors``' launches: its modules of rank up to ``MAX_FUSED_RANK`` in groups of
    ``MAX_MODULES`` (``launches``), and the others (``unfused``), which the callers run in torch."""

    @classmethod
    def of(cls, factors: Factors) -> SgmvPlan:
        """``factors``' plan, built on its first call and kept in ``factors.derived``."""
        if (plan := factors.derived.get(cls)) is None:
            plan = factors.derived[cls] = cls(factors)
        return plan

    def __init__(self, factors: Factors) -> None:
        fused = tuple(m for m, A in enumerate(factors.As) if A.shape[1] <= tc.MAX_FUSED_RANK)
        self.unfused = tuple(m for m in range(len(factors.As)) if m not in fused)
        self.launches = tuple(SgmvLaunch(fused[g : g + MAX_MODULES], factors.As, factors.Bs,
                                         factors.scales)
                              for g in range(0, len(fused), MAX_MODULES))


def sgmv_factors_rows(ys: Tensors, x: Tensor, factors: Factors, token_slot: Tensor,
                      runs: SlotRuns | None = None) -> Tensors:
    """``add_factors_rows`` on CUDA (a graph bucket): one launch pair per three modules over
    ``runs`` (``SlotRuns.of(token_slot)`` when None), grids from shapes only; unfused ranks
    go to ``gather_rows``. Returns ``ys``."""
    if not ys[0].shape[0]:
        return ys
    plan = SgmvPlan.of(factors)
    for m in plan.unfused:
        gather_rows(ys[m], x, factors.As[m], factors.Bs[m], factors.scales[m], token_slot)
    runs = runs or SlotRuns.of(token_slot)
    for launch in plan.launches:
        launch(ys, x, runs)
    return ys


def sgmv_factors(ys: Tensors, x: Tensor, factors: Factors, batch: LoraBatch) -> Tensors:
    """The engine's eager LoRA step on CUDA (a ``FactorsBackend``): the launches over the
    batch's own ``runs`` (no sort, one ``searchsorted`` per step; ``T_a`` positions, the
    tokens with a slot); unfused ranks go to ``triton_lora.sgmv`` (torch ``segment``)."""
    if not batch.has_adapters:
        return ys
    plan = SgmvPlan.of(factors)
    for m in plan.unfused:
        sgmv(ys[m], x, factors.As[m], factors.Bs[m], factors.scales[m], batch)
    for launch in plan.launches:
        launch(ys, x, batch.runs)
    return ys


def sgmv_rows(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
              token_slot: Tensor, runs: SlotRuns | None = None) -> Tensor:
    """``add_lora_rows`` on CUDA: ``sgmv_factors_rows`` for one module."""
    sgmv_factors_rows((y,), x, Factors.of((A,), (B,), (scale,)), token_slot, runs)
    return y


def sgmv_split(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
               batch: LoraBatch) -> Tensor:
    """``add_lora``'s ``Backend`` on CUDA, with the Triton launchers' checks."""
    tc.check_triton_args(y, x, A, B, scale, batch)
    return sgmv_split_launch(y, x, A, B, scale, batch)


def sgmv_split_launch(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
                      batch: LoraBatch) -> Tensor:
    """``sgmv_split`` without its checks: ``sgmv_factors`` for one module."""
    sgmv_factors((y,), x, Factors.of((A,), (B,), (scale,)), batch)
    return y
