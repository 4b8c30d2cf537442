"""Split-K ``add_lora_multi``: modules that share ``x`` (q, k, v; gate, up), one launch pair
per three of them (``triton_sgmv``), with the meaning of looping
``triton_sgmv.sgmv_split`` over them::

    for y, A, B, scale in zip(ys, As, Bs, scales):
        for i in range(T):
            if idx[i] >= 0:  # -1: the row is never loaded nor stored
                y[i] += ((x[i] @ A[idx[i]].T) * scale[idx[i]]) @ B[idx[i]].T

These take the modules' buffers as lists and so prepare their launches on every call; the
engine binds them once in a ``Factors`` and calls ``triton_sgmv.sgmv_factors`` (eager) and
``sgmv_factors_rows`` (a graph bucket) instead.
"""

from __future__ import annotations

from torch import Tensor

from .batch import LoraBatch, SlotRuns
from .factors import Factors, Tensors
from .triton_multi import check_multi
from .triton_sgmv import sgmv_factors, sgmv_factors_rows


def sgmv_multi_split(ys: Tensors, x: Tensor, As: Tensors, Bs: Tensors, scales: Tensors,
                     batch: LoraBatch) -> Tensors:
    """``add_lora_multi`` on CUDA (the module docstring), with ``triton_multi``'s checks:
    shapes, dtypes, devices, and outputs that must not share storage. Returns ``ys``."""
    check_multi(ys, x, As, Bs, scales, batch)
    return sgmv_multi_split_launch(ys, x, As, Bs, scales, batch)


def sgmv_multi_split_launch(ys: Tensors, x: Tensor, As: Tensors, Bs: Tensors,
                            scales: Tensors, batch: LoraBatch) -> Tensors:
    """``sgmv_multi_split`` without its checks."""
    return sgmv_factors(ys, x, Factors.of(As, Bs, scales), batch)


def sgmv_multi_rows(ys: Tensors, x: Tensor, As: Tensors, Bs: Tensors, scales: Tensors,
                    token_slot: Tensor, runs: SlotRuns | None = None) -> Tensors:
    """``add_lora_multi_rows`` on CUDA (a graph bucket): ``sgmv_factors_rows``."""
    return sgmv_factors_rows(ys, x, Factors.of(As, Bs, scales), token_slot, runs)
