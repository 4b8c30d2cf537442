"""``add_lora_rows``: ``add_lora`` from a token -> slot tensor alone, for a step whose shape
is fixed ahead (a CUDA-graph decode bucket). No host data decides anything: no segments,
no tuples, no Python branch on the batch; every row is launched and a ``-1`` row exits
early (Triton) or is left unchanged by a select (torch). Equal to::

    for i in range(T):
        if token_slot[i] >= 0:
            s = token_slot[i]
            y[i] += ((x[i] @ A[s].T) * scale[s]) @ B[s].T

Shapes as in ``add_lora``: ``y [T, out]``, ``x [T, in]``, ``A [S, r_max, in]``,
``B [S, out, r_max]``, ``scale [S]``, ``token_slot [T]`` int64 in ``[-1, S)``. The caller
checked the shapes once (the engine, when it wrapped the model).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def add_lora_rows(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
                  token_slot: Tensor) -> Tensor:
    """``y`` with each row's delta added in place (the module docstring); the Triton kernel
    for CUDA tensors, else ``gather_rows``."""
    if y.is_cuda and (kernel := triton_rows()) is not None:
        return kernel(y, x, A, B, scale, token_slot)
    return gather_rows(y, x, A, B, scale, token_slot)


def gather_rows(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
                token_slot: Tensor) -> Tensor:
    """The torch backend: every row's factors gathered (a ``-1`` row reads slot 0), two
    batched matvecs, then a select keeps ``-1`` rows bit for bit. Computes in ``x``'s
    dtype, in ``gather_bmm``'s order."""
    slots = token_slot.clamp(min=0)
    a, b = A.index_select(0, slots), B.index_select(0, slots)  # [T, r, in], [T, out, r]
    v = torch.bmm(x.unsqueeze(1), a.mT)  # [T, 1, r]
    v = v * scale.index_select(0, slots).to(x.dtype).view(-1, 1, 1)
    delta = torch.bmm(v, b.mT).squeeze(1)  # [T, out]
    return y.copy_(torch.where((token_slot >= 0).unsqueeze(1), y + delta, y))


@functools.cache
def triton_rows():
    """``triton_rows.bgmv`` or None when triton does not import (imported on first use, so
    CPU-only processes never import triton)."""
    try:
        from .triton_rows import bgmv
    except ImportError:
        return None
    return bgmv
