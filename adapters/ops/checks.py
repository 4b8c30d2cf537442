"""Argument checks shared by the public ops (``dispatch``) and the backends that may be
called without them (``triton_lora``, ``triton_multi``): a leaf module, so no backend
imports the dispatcher that imports it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch import LoraBatch


def check_module_lists(ys: Sequence, As: Sequence, Bs: Sequence, scales: Sequence) -> None:
    """``add_lora_multi``'s lists must have one entry per module."""
    if not len(ys) == len(As) == len(Bs) == len(scales):
        raise ValueError(
            f"ys, As, Bs, scales must have one entry per module; got {len(ys)}, {len(As)}, "
            f"{len(Bs)}, {len(scales)}"
        )


def check_lora_args(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    batch: LoraBatch,
) -> None:
    """``add_lora``'s cheap per-call checks, shared by every backend's launcher: shapes,
    dtypes, devices and ``max_slot < S``. Raises ``ValueError`` with what to fix."""
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"x and y must be 2-D: x [T, in], y [T, out]; got x {list(x.shape)}, "
            f"y {list(y.shape)}"
        )
    if A.dim() != 3 or B.dim() != 3 or scale.dim() != 1:
        raise ValueError(
            f"A must be [S, r_max, in], B [S, out, r_max], scale [S]; got A {list(A.shape)}, "
            f"B {list(B.shape)}, scale {list(scale.shape)}"
        )
    (T, d_in), d_out, (S, r) = x.shape, y.shape[1], A.shape[:2]
    if y.shape[0] != T:
        raise ValueError(f"x has {T} tokens but y has {y.shape[0]}")
    if batch.num_tokens != T:
        raise ValueError(f"token_slot has {batch.num_tokens} entries but x has {T} tokens")
    if A.shape[2] != d_in:
        raise ValueError(f"A is {list(A.shape)} but x has in = {d_in}; expected [S, r_max, {d_in}]")
    if tuple(B.shape) != (S, d_out, r):
        raise ValueError(
            f"B is {list(B.shape)}; with A {list(A.shape)} and y {list(y.shape)} it must be "
            f"[{S}, {d_out}, {r}]"
        )
    if scale.shape[0] != S:
        raise ValueError(f"scale has {scale.shape[0]} entries but A has S = {S} slots")
    if not (x.dtype == y.dtype == A.dtype == B.dtype) or not x.dtype.is_floating_point:
        raise ValueError(
            f"x, y, A, B must share one floating dtype; got {x.dtype}, {y.dtype}, "
            f"{A.dtype}, {B.dtype}"
        )
    if not scale.dtype.is_floating_point:
        raise ValueError(f"scale must be floating point, got {scale.dtype}")
    devices = {t.device for t in (y, x, A, B, scale, batch.token_slot)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if batch.max_slot >= S:
        raise ValueError(
            f"token_slot holds slot {batch.max_slot} but there are only S = {S} slots "
            f"(valid: -1 for none, or 0..{S - 1})"
        )
