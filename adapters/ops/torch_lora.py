"""Pure-torch backends of ``add_lora``; all share the signature
``(y, x, A, B, scale, batch) -> y`` and receive inputs that ``add_lora`` validated.

Each updates ``y`` in place and never touches a row whose slot is ``-1`` (not even by
adding zero, which would turn ``-0.0`` into ``0.0`` and ``NaN`` inputs into outputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .batch import LoraBatch


def reference(
    y: torch.Tensor,  # [T, out]
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [S, r_max, in]
    B: torch.Tensor,  # [S, out, r_max]
    scale: torch.Tensor,  # [S]
    batch: LoraBatch,
) -> torch.Tensor:
    """Ground truth: a per-token loop in fp32, rounded once into ``y``'s dtype.

    Every backend (``segment`` and ``gather_bmm`` below, ``triton_lora.sgmv``) takes these
    arguments with these shapes and gives these values."""
    for t, s in enumerate(batch.token_slot.tolist()):
        if s < 0:
            continue
        v = A[s].float() @ x[t].float()  # [r_max]
        delta = scale[s].float() * (B[s].float() @ v)  # [out]
        y[t] = (y[t].float() + delta).to(y.dtype)
    return y


def segment(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor, batch: LoraBatch) -> Tensor:
    """Tokens grouped by slot (``batch`` sorted them once), then two matmuls per distinct
    slot over that slot's tokens and one scatter back. The Python loop costs a fixed
    ~20 us per distinct slot on CPU; the matmuls use every token of a slot at once.
    Computes in ``x``'s dtype."""
    starts, slots = batch.seg_starts, batch.seg_slots
    # One host copy of the per-segment scales: addmm's alpha saves an op per segment.
    alphas = scale.index_select(0, batch.seg_slot_index).tolist()
    At, Bt = A.mT, B.mT  # [S, in, r_max], [S, r_max, out] views
    if batch.identity_order:
        # Tokens already grouped by slot in order, all with a slot: work on row views.
        for i, s in enumerate(slots):
            a, b = starts[i], starts[i + 1]
            y[a:b].addmm_(torch.mm(x[a:b], At[s]), Bt[s], alpha=alphas[i])
        return y
    rows = batch.sorted_tokens
    xs = x.index_select(0, rows)  # [T_a, in], grouped by slot
    delta = y.new_empty(rows.shape[0], y.shape[1])  # [T_a, out]
    for i, s in enumerate(slots):
        a, b = starts[i], starts[i + 1]
        d = delta[a:b]  # [n, out]
        torch.addmm(d, torch.mm(xs[a:b], At[s]), Bt[s], beta=0, alpha=alphas[i], out=d)
    return y.index_add_(0, rows, delta)


def gather_bmm(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
               batch: LoraBatch) -> Tensor:
    """Gather each token's factors and run two batched matvecs; no Python loop, but it
    copies ``T_a * r_max * (in + out)`` weights. Computes in ``x``'s dtype.

    Only tokens with a slot are gathered (instead of clamping ``-1`` to slot 0 and
    zeroing its scale), so ``-1`` rows are left bit-for-bit unchanged.
    """
    rows, slots = batch.sorted_tokens, batch.sorted_slots
    xs = x if batch.identity_order else x.index_select(0, rows)  # [T_a, in]
    # index_select, not A[slots]: several times faster on CPU. Row-vector bmm
    # ([n, 1, k] @ [n, k, m]) is several times faster than matrix-vector on CPU.
    if batch.consecutive_from >= 0:  # one token per slot, consecutive slots: views
        sl = slice(batch.consecutive_from, batch.consecutive_from + len(slots))
        a, b, s = A[sl], B[sl], scale[sl]
    else:
        a, b, s = A.index_select(0, slots), B.index_select(0, slots), scale.index_select(0, slots)
    v = torch.bmm(xs.unsqueeze(1), a.mT)  # [T_a, 1, r_max]
    v = v * s.to(x.dtype).view(-1, 1, 1)
    delta = torch.bmm(v, b.mT).squeeze(1)  # [T_a, out]
    if batch.identity_order:
        return y.add_(delta)
    return y.index_add_(0, rows, delta)


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
