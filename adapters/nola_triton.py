"""NOLA basis regeneration on the GPU: Philox in registers, contracted as it is generated.

The basis value ``e`` of stream ``s`` is ``2*u - 1`` with ``u`` lane ``e % 4`` of
``tl.rand4x(seed, c)``, ``c = s*2^40 + e//4`` (docs/adapter-format.md), so these kernels
give the same float32 bits as ``philox.basis_values``. ``tl.rand4x`` takes the seed as a
64-bit integer (key = its lo and hi words) and splits a 64-bit counter into (lo, hi)
words: the counters here are uint64, the seed is passed as a Python int (< 2^63, typed
int64 by Triton when it does not fit int32).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gpu import sm_count
from .philox_layout import counter_base

PROGRAMS_PER_SM = 2  # programs the grid aims at per SM of the device


@triton.jit
def _sym(u):
    return 2.0 * u - 1.0  # exact doubling: an FMA here rounds exactly like mul then sub


@triton.jit(do_not_specialize=["seed", "c_base", "k", "n_cols"])
def _contract_kernel(out, coeffs, seed, c_base, k, n_cols,
                     BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Columns ``n`` of this program's tile of::

        basis = basis_values(seed, s, 0, k * n_cols).view(k, n_cols)   # never stored
        out[n] = sum(coeffs[j] * basis[j, n] for j in range(k))        # fp32, j ascending

    with ``c_base = s << 40``. ``ALIGNED`` (``n_cols % 4 == 0``): each counter gives 4
    adjacent columns (one Philox per 4 values); otherwise each column draws its own
    counter and keeps lane ``e % 4``.
    """
    pid = tl.program_id(0).to(tl.uint64)
    acc_base = c_base.to(tl.uint64)
    if ALIGNED:
        n_quads = (n_cols // 4).to(tl.uint64)
        q = pid * BLOCK + tl.arange(0, BLOCK).to(tl.uint64)  # [BLOCK] counters of row 0
        ok = q < n_quads
        c = acc_base + q
        acc0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(k):
            a = tl.load(coeffs + j)
            u0, u1, u2, u3 = tl.rand4x(seed, c)
            acc0 += a * _sym(u0)
            acc1 += a * _sym(u1)
            acc2 += a * _sym(u2)
            acc3 += a * _sym(u3)
            c += n_quads  # next basis row: n_cols / 4 counters further
        n = (q * 4).to(tl.int64)
        tl.store(out + n, acc0, mask=ok)
        tl.store(out + n + 1, acc1, mask=ok)
        tl.store(out + n + 2, acc2, mask=ok)
        tl.store(out + n + 3, acc3, mask=ok)
    else:
        n = pid * BLOCK + tl.arange(0, BLOCK).to(tl.uint64)  # [BLOCK] columns
        ok = n < n_cols.to(tl.uint64)
        e = n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(k):
            a = tl.load(coeffs + j)
            acc += a * _sym(_lane(seed, acc_base, e))
            e += n_cols.to(tl.uint64)
        tl.store(out + n.to(tl.int64), acc, mask=ok)


@triton.jit
def _lane(seed, c_base, e):
    """``u`` of element ``e`` (uint64 block): lane ``e % 4`` of counter ``c_base + e // 4``."""
    u0, u1, u2, u3 = tl.rand4x(seed, c_base + (e >> 2))
    lane = e & 3
    return tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))


@triton.jit(do_not_specialize=["seed", "c_base", "start", "count"])
def _values_kernel(out, seed, c_base, start, count, BLOCK: tl.constexpr):
    """``out[i] = basis_values(seed, s, start, count)[i]`` with ``c_base = s << 40``."""
    i = tl.program_id(0).to(tl.uint64) * BLOCK + tl.arange(0, BLOCK).to(tl.uint64)
    e = start.to(tl.uint64) + i
    tl.store(out + i.to(tl.int64), _sym(_lane(seed, c_base.to(tl.uint64), e)),
             mask=i < count.to(tl.uint64))


def basis_values(seed: int, stream: int, start: int, count: int,
                 device: torch.device | str = "cuda") -> torch.Tensor:
    """Same values and bits as ``philox.basis_values``: float32 [count]."""
    c_base = counter_base(seed, stream)
    out = torch.empty(count, dtype=torch.float32, device=device)
    if count:
        block = 256
        _values_kernel[(triton.cdiv(count, block),)](out, seed, c_base, start, count,
                                                     BLOCK=block)
    return out


def contract(seed: int, stream: int, coeffs: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``coeffs @ basis_values(seed, stream, 0, k * n_cols).view(k, n_cols)`` as float32
    [n_cols] on ``coeffs``' device, without ever storing the basis (``philox.contract``
    on the GPU)."""
    c_base = counter_base(seed, stream)
    if coeffs.dim() != 1 or n_cols < 1:
        raise ValueError(f"coeffs must be [k] and n_cols >= 1, got {list(coeffs.shape)}, "
                         f"{n_cols}")
    coeffs = coeffs.to(torch.float32).contiguous()
    out = torch.empty(n_cols, dtype=torch.float32, device=coeffs.device)
    aligned = n_cols % 4 == 0
    lanes = n_cols // 4 if aligned else n_cols  # counters (aligned) or columns per row
    target = PROGRAMS_PER_SM * sm_count(coeffs.device)
    block = min(256, max(16, triton.next_power_of_2(triton.cdiv(lanes, target))))
    _contract_kernel[(triton.cdiv(lanes, block),)](
        out, coeffs, seed, c_base, coeffs.shape[0], n_cols, BLOCK=block, ALIGNED=aligned)
    return out
