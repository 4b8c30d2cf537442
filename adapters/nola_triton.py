"""NOLA basis regeneration on the GPU: Philox in registers, contracted as it is generated.

The basis value ``e`` of stream ``s`` is ``2*u - 1`` with ``u`` lane ``e % 4`` of
``_rand4x(seed, c)``, ``c = s*2^40 + e//4`` (docs/adapter-format.md), so these kernels
give the same float32 bits as ``philox.basis_values``. ``_rand4x`` calls ``tl.philox``
with 32-bit words, counter ``(c lo, c hi, 0, 0)`` and key ``(seed lo, seed hi)``: the
counters here are uint64, the seed is passed as a Python int (< 2^63, typed int64 by
Triton when it does not fit int32).

``regenerate`` runs a whole adapter (every layer and module, A and B) in one launch and
writes each factor, divided by ``sqrt(k)`` and rounded to its dtype, straight into the
tensors it is given (views into a slot's storage, or fresh ones).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .gpu import sm_count
from .philox_layout import counter_base

PROGRAMS_PER_SM = 2  # programs the grid aims at per SM of the device
# Compiled Triton contracts `acc += a * v` into one FMA by default (enable_fp_fusion=True,
# ptxas --fmad=true): one rounding where the CPU path (_philox.c, -ffp-contract=off) and the
# interpreter round twice, so the factors would differ from the CPU's in the last bit.
NO_FMA = {"enable_fp_fusion": False}


@triton.jit
def _rand4x(seed, c):
    """The four ``u`` of uint64 counter ``c``: Philox4x32-10 of ``(c lo, c hi, 0, 0)`` under
    key ``(seed lo, seed hi)``, each word through ``tl.uint_to_uniform_float``. Written
    with 32-bit words because ``tl.rand4x(seed, c)`` computes this only in Triton releases
    with triton-lang/triton#6832 (May 2025); before it, a 64-bit ``c`` switched it to
    64-bit Philox words, a different generator."""
    lo = c.to(tl.uint32)
    zero = lo * 0
    w0, w1, w2, w3 = tl.philox(seed, lo, (c >> 32).to(tl.uint32), zero, zero)
    return (tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1),
            tl.uint_to_uniform_float(w2), tl.uint_to_uniform_float(w3))


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
            u0, u1, u2, u3 = _rand4x(seed, c)
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
    u0, u1, u2, u3 = _rand4x(seed, c_base + (e >> 2))
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
                                                     BLOCK=block, **NO_FMA)
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
        out, coeffs, seed, c_base, coeffs.shape[0], n_cols, BLOCK=block, ALIGNED=aligned,
        **NO_FMA)
    return out


@triton.jit(do_not_specialize=["seed"])
def _regen_kernel(jobs, coeffs, divisors, seed, BLOCK: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Program ``(j, tile)``: columns ``n`` of tile ``tile`` of job ``j``'s stream::

        acc[n] = sum(coeffs[off + i] * basis[i, n] for i in range(k))   # as ``contract``
        out[n // cols, n % cols] = (acc[n] / divisors[j]).to(out.dtype)  # IEEE division

    A job row is 8 int64: coeff offset, k, counter base (``s << 40``, bits of a uint64),
    n_cols, the pointer of ``out`` (2-D), its columns and its two strides.
    Counters of 4 adjacent columns give one Philox call when ``n_cols % 4 == 0``.
    """
    row = jobs + tl.program_id(0).to(tl.int64) * 8
    off, k, c_base = tl.load(row), tl.load(row + 1), tl.load(row + 2).to(tl.uint64, bitcast=True)
    n_cols, cols, s0, s1 = tl.load(row + 3), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7)
    out = tl.load(row + 4).to(tl.pointer_type(OUT_DTYPE))
    div = tl.load(divisors + tl.program_id(0))
    if n_cols % 4 == 0:
        q = tl.program_id(1).to(tl.uint64) * BLOCK + tl.arange(0, BLOCK).to(tl.uint64)
        n_quads = (n_cols // 4).to(tl.uint64)
        if tl.program_id(1) * BLOCK < n_cols // 4:
            ok = q < n_quads
            c = c_base + q
            acc0 = tl.zeros([BLOCK], dtype=tl.float32)
            acc1 = tl.zeros([BLOCK], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK], dtype=tl.float32)
            acc3 = tl.zeros([BLOCK], dtype=tl.float32)
            for i in range(k):
                a = tl.load(coeffs + off + i)
                u0, u1, u2, u3 = _rand4x(seed, c)
                acc0 += a * _sym(u0)
                acc1 += a * _sym(u1)
                acc2 += a * _sym(u2)
                acc3 += a * _sym(u3)
                c += n_quads
            n = (q * 4).to(tl.int64)
            _put(out, n, acc0, div, ok, cols, s0, s1)
            _put(out, n + 1, acc1, div, ok, cols, s0, s1)
            _put(out, n + 2, acc2, div, ok, cols, s0, s1)
            _put(out, n + 3, acc3, div, ok, cols, s0, s1)
    elif tl.program_id(1) * BLOCK * 4 < n_cols:  # a program covers 4 * BLOCK columns
        for part in range(4):
            e = (tl.program_id(1).to(tl.uint64) * 4 + part) * BLOCK + \
                tl.arange(0, BLOCK).to(tl.uint64)
            ok = e < n_cols.to(tl.uint64)
            n = e
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for i in range(k):
                acc += tl.load(coeffs + off + i) * _sym(_lane(seed, c_base, e))
                e += n_cols.to(tl.uint64)
            _put(out, n.to(tl.int64), acc, div, ok, cols, s0, s1)


@triton.jit
def _put(out, n, acc, div, ok, cols, s0, s1):
    v = tl.math.div_rn(acc, div)  # correctly rounded, as torch's fp32 division
    tl.store(out + (n // cols) * s0 + (n % cols) * s1, v.to(out.dtype.element_ty), mask=ok)


_OUT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16,
               torch.bfloat16: tl.bfloat16}


def regenerate(seed: int, alpha: torch.Tensor, beta: torch.Tensor,
               outs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Every factor of a NOLA adapter in one launch, written into ``outs``.

    ``alpha [L, T, k]``, ``beta [L, T, l]`` (fp32, on the device); ``outs[i * T + t]`` is
    ``(A [r, in], B [out, r])`` of layer ``i``, target ``t`` (any strides, one dtype among
    fp32, fp16, bf16, e.g. ``slot_A[s, :r]`` and ``slot_B[s, :, :r]``). Equal to::

        s = 2 * (i * T + t)                                # NolaAdapter.stream(i, t)
        A[:] = (contract(seed, s, alpha[i, t], A.numel()).view(A.shape) / sqrt(k)).to(A.dtype)
        B[:] = (contract(seed, s + 1, beta[i, t], B.numel()).view(B.shape) / sqrt(l)).to(B.dtype)

    Raises ``ValueError`` when ``outs`` does not match ``alpha`` or mixes dtypes/devices.
    """
    L, T, k = alpha.shape
    dests = [t for pair in outs for t in pair]
    if beta.shape[:2] != (L, T) or len(outs) != L * T:
        raise ValueError(f"outs must hold one (A, B) pair per (layer, target) of alpha "
                         f"{list(alpha.shape)} and beta {list(beta.shape)}; got {len(outs)}")
    if {(t.dtype, t.device, t.dim()) for t in dests} != {(dests[0].dtype, alpha.device, 2)} \
            or dests[0].dtype not in _OUT_DTYPES:
        raise ValueError("outs must be 2-D fp32/fp16/bf16 tensors of one dtype on alpha's device")
    coeffs = torch.cat([alpha.reshape(-1), beta.reshape(-1)]).to(torch.float32)
    rows, divisors = _job_rows(seed, k, beta.shape[2], L * T, dests)
    jobs = torch.tensor(rows, dtype=torch.int64).to(alpha.device)
    divisors = torch.tensor(divisors, dtype=torch.float32).to(alpha.device)
    block = 128
    tiles = max(triton.cdiv(t.numel(), 4 * block) for t in dests)
    _regen_kernel[(len(dests), tiles)](jobs, coeffs, divisors, seed, BLOCK=block,
                                       OUT_DTYPE=_OUT_DTYPES[dests[0].dtype], **NO_FMA)


def _job_rows(seed: int, k: int, l_: int, modules: int, dests: list[torch.Tensor]
              ) -> tuple[list[list[int]], list[float]]:
    """The job table of ``regenerate``: A of module ``j`` is job ``2j`` (stream ``2j``), its
    B job ``2j + 1``; counter bases as int64 bit patterns (they may pass 2^63)."""
    rows, divisors = [], []
    for job, out in enumerate(dests):
        j, is_b = divmod(job, 2)
        base = counter_base(seed, job)
        off = modules * k + j * l_ if is_b else j * k
        rows.append([off, l_ if is_b else k, base - (1 << 64) if base >= 1 << 63 else base,
                     out.numel(), out.data_ptr(), out.shape[1], *out.stride()])
        divisors.append(math.sqrt(l_ if is_b else k))
    return rows, divisors
