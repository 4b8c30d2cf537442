"""``add_lora_rows`` and ``add_lora_multi_rows``: ``add_lora`` and ``add_lora_multi`` from a
token -> slot tensor alone, for a step whose shape is fixed ahead (a CUDA-graph decode
bucket). No host data decides anything: no segments, no tuples, no Python branch on the
batch; grids are functions of the shapes only and a ``-1`` row is never loaded nor stored
(Triton) or is left unchanged by a select (torch). ``add_lora_rows`` equals::

    for i in range(T):
        if token_slot[i] >= 0:
            s = token_slot[i]
            y[i] += ((x[i] @ A[s].T) * scale[s]) @ B[s].T

and ``add_lora_multi_rows`` equals ``add_lora_rows`` looped over modules sharing ``x``.
Shapes as in ``add_lora``: ``y [T, out]``, ``x [T, in]``, ``A [S, r_max, in]``,
``B [S, out, r_max]``, ``scale [S]``, ``token_slot [T]`` int64 in ``[-1, S)``. The caller
checked the shapes once (the engine, when it wrapped the model). ``runs`` is
``slot_runs(token_slot)``, computed once per step and shared by every layer's call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from torch import Tensor

from .batch import SlotRuns
from .torch_lora import gather_rows


def add_lora_rows(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
                  token_slot: Tensor, runs: SlotRuns | None = None) -> Tensor:
    """``y`` with each row's delta added in place (the module docstring). CUDA tensors: the
    split-K SGMV over ``runs`` (each used slot's factors read once); else ``gather_rows``."""
    if y.is_cuda and (kernels := triton_kernels()):
        return kernels[0](y, x, A, B, scale, token_slot, runs)
    return gather_rows(y, x, A, B, scale, token_slot)


def add_lora_multi_rows(ys: Sequence[Tensor], x: Tensor, As: Sequence[Tensor],
                        Bs: Sequence[Tensor], scales: Sequence[Tensor], token_slot: Tensor,
                        runs: SlotRuns | None = None) -> Sequence[Tensor]:
    """``add_lora_rows`` over modules sharing ``x`` (q, k, v; gate, up); CUDA tensors: one
    launch pair per three modules over ``runs``; else ``gather_rows`` per module. Returns
    ``ys``."""
    if ys and ys[0].is_cuda and (kernels := triton_kernels()):
        return kernels[1](ys, x, As, Bs, scales, token_slot, runs)
    for y, A, B, scale in zip(ys, As, Bs, scales, strict=True):
        gather_rows(y, x, A, B, scale, token_slot)
    return ys


@functools.cache
def triton_kernels() -> tuple[Callable, Callable] | None:
    """``(triton_sgmv.sgmv_rows, triton_sgmv_multi.sgmv_multi_rows)``, or None when triton
    does not import (imported on first use, so CPU-only processes never import triton)."""
    try:
        from .triton_sgmv import sgmv_rows
        from .triton_sgmv_multi import sgmv_multi_rows
    except ImportError:
        return None
    return sgmv_rows, sgmv_multi_rows
