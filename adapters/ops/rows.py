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
from .factors import Factors
from .torch_lora import gather_rows


def add_lora_rows(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
                  token_slot: Tensor, runs: SlotRuns | None = None) -> Tensor:
    """``y`` with each row's delta added in place (the module docstring)."""
    add_factors_rows((y,), x, Factors.of((A,), (B,), (scale,)), token_slot, runs)
    return y


def add_lora_multi_rows(ys: Sequence[Tensor], x: Tensor, As: Sequence[Tensor],
                        Bs: Sequence[Tensor], scales: Sequence[Tensor], token_slot: Tensor,
                        runs: SlotRuns | None = None) -> Sequence[Tensor]:
    """``add_lora_rows`` over modules sharing ``x`` (q, k, v; gate, up). Returns ``ys``."""
    return add_factors_rows(ys, x, Factors.of(As, Bs, scales), token_slot, runs)


def add_factors_rows(ys: Sequence[Tensor], x: Tensor, factors: Factors, token_slot: Tensor,
                     runs: SlotRuns | None = None) -> Sequence[Tensor]:
    """``add_lora_multi_rows`` with the modules' buffers bound once in ``factors`` (the
    engine's form). CUDA tensors: the split-K SGMV over ``runs``, one launch pair per three
    modules, each used slot's factors read once; else ``gather_rows`` per module."""
    if ys and ys[0].is_cuda and (rows := triton_rows()) is not None:
        return rows(ys, x, factors, token_slot, runs)
    for y, A, B, scale in zip(ys, factors.As, factors.Bs, factors.scales, strict=True):
        gather_rows(y, x, A, B, scale, token_slot)
    return ys


@functools.cache
def triton_rows() -> Callable | None:
    """``triton_sgmv.sgmv_factors_rows``, or None when triton does not import (imported on
    first use, so CPU-only processes never import triton)."""
    try:
        from .triton_sgmv import sgmv_factors_rows
    except ImportError:
        return None
    return sgmv_factors_rows
