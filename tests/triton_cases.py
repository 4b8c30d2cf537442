"""Triton kernels held to the CPU references; run by ``test_triton_kernels.py`` in a child
process, under ``TRITON_INTERPRET=1`` on CPU tensors or natively on CUDA.

Not collected on its own (the name does not start with ``test_``): the interpreter must be
switched on before triton is imported, which only a fresh process can guarantee.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_add_lora import make_case, token_slots

from nolaserve.adapters import nola_triton, philox
from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.ops import (
    LoraBatch,
    add_lora,
    add_lora_multi,
    choose_backend,
    choose_multi_backend,
    reference,
)
from nolaserve.adapters.ops.triton_common import MAX_FUSED_RANK
from nolaserve.adapters.ops.triton_lora import sgmv
from nolaserve.adapters.ops.triton_multi import sgmv_multi
from nolaserve.adapters.ops.triton_rows import bgmv
from nolaserve.adapters.ops.triton_sgmv import sgmv_split
from nolaserve.adapters.ops.triton_sgmv_multi import sgmv_multi_split
from nolaserve.adapters.spec import BaseModelSpec

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"

SPREADS = ("distinct", "uniform", "zipf", "identical", "skewed", "mixed", "sorted_mixed",
           "consecutive", "none")
NUM_TOKENS = (1, 3, 7, 33)
# the interpreter's bf16 tl.dot is broken (it reads bf16 bits as garbage): fp16 stands in
DTYPES = (torch.float32, torch.float16) if INTERPRETED else (
    torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5),
             torch.float16: dict(atol=2e-2, rtol=2e-2),
             torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", NUM_TOKENS)
@pytest.mark.parametrize("spread", SPREADS)
def test_sgmv_matches_reference(spread, n, dtype):
    """Small odd shapes: in = 40 spans a partial BLOCK_K, out = 70 a partial BLOCK_O."""
    A, B, _, scale, x, y, gen = make_case(n, 40, 70, dtype, seed=n)
    slots = token_slots(spread, n, gen)
    expected = reference(y.clone(), x, A, B, scale, LoraBatch.from_token_slot(slots))
    A, B, scale, x, y, slots = on_device(A, B, scale, x, y, slots)
    out = add_lora(y, x, A, B, scale, slots, backend=sgmv)
    assert out is y and out.dtype == dtype
    torch.testing.assert_close(out.cpu(), expected, **TOLERANCE[dtype])


def test_minus_one_rows_untouched_bit_for_bit():
    A, B, _, scale, x, y, _ = make_case(7, 32, 48, torch.float32)
    slots = torch.tensor([-1, 2, -1, -1, 0, 2, -1])
    none = slots < 0
    y[none] = torch.tensor([-0.0, float("nan"), float("inf"), -0.0]).repeat(48).view(4, 48)
    x[none] = float("nan")
    before = y.clone()
    A, B, scale, x, y, slots = on_device(A, B, scale, x, y, slots)
    y = add_lora(y, x, A, B, scale, slots, backend=sgmv).cpu()
    assert torch.equal(y[none].view(torch.int32), before[none].view(torch.int32))
    assert torch.isfinite(y[~none]).all() and not torch.equal(y[~none], before[~none])


def test_strided_views_and_many_tokens_per_slot():
    """y a column slice of a fused output, x a transposed view; 100 tokens in 3 slots
    (several BLOCK_T tiles per segment)."""
    n = 100
    A, B, _, scale, x, y, gen = make_case(n, 32, 16, torch.float32)
    slots = torch.randint(-1, 3, (n,), generator=gen)
    expected = reference(y.clone(), x, A, B, scale, LoraBatch.from_token_slot(slots))
    fused = torch.randn(n, 48, generator=gen)
    fused[:, 16:32] = y
    A, B, scale, slots, fused = on_device(A, B, scale, slots, fused)
    x_view = x.T.contiguous().to(DEVICE).T  # [n, 32], strides (1, n)
    add_lora(fused[:, 16:32], x_view, A, B, scale, slots, backend=sgmv)
    torch.testing.assert_close(fused[:, 16:32].cpu(), expected, atol=1e-5, rtol=1e-5)


def test_large_rank_falls_back_and_agrees():
    r, n = MAX_FUSED_RANK + 8, 5
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, r, 24, generator=gen), torch.randn(2, 20, r, generator=gen)
    x, y, scale = torch.randn(n, 24, generator=gen), torch.randn(n, 20), torch.ones(2)
    slots = torch.tensor([1, -1, 0, 1, 1])
    expected = reference(y.clone(), x, A, B, scale, LoraBatch.from_token_slot(slots))
    A, B, scale, x, y, slots = on_device(A, B, scale, x, y, slots)
    out = sgmv(y, x, A, B, scale, LoraBatch.from_token_slot(slots))
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)


def test_launcher_rejects_bad_inputs():
    A, B, _, scale, x, y, _ = make_case(3, 32, 48, torch.float32)
    A, B, scale, x, y = on_device(A, B, scale, x, y)
    batch = LoraBatch.from_token_slot(torch.tensor([0, 1, -1], device=DEVICE))
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        sgmv(y.double(), x.double(), A.double(), B.double(), scale, batch)
    with pytest.raises(ValueError, match="must be"):
        sgmv(y, x, A[:, :4], B, scale, batch)


def test_auto_choice_on_cuda_is_triton():
    x = torch.zeros(2, 4, device=DEVICE)
    batch = LoraBatch.from_token_slot(torch.tensor([0, 1], device=DEVICE))
    assert (choose_backend(x, batch) is sgmv_split) == (DEVICE == "cuda")


MULTI_OUTS = (70, 24, 130)  # per module: a partial BLOCK_O, one tile, three tiles


def multi_case(modules: int, n: int, dtype: torch.dtype, seed: int = 0):
    """``modules`` (y, A, B, scale) sharing one x (in = 40): module 0 has r_max 8, module 1
    r_max 5 as strided views of padded weights, module 2 r_max 20, all dense."""
    ys, As, Bs, scales = [], [], [], []
    for m in range(modules):
        A, B, _, scale, x, y, gen = make_case(n, 40, MULTI_OUTS[m], dtype, seed=seed)
        if m == 1:
            A, B = A[:, :5], B[:, :, :5]  # B's rows strided by 8
        if m == 2:
            A = torch.randn(A.shape[0], 20, 40, generator=gen).div(40**0.5).to(dtype)
            B = torch.randn(B.shape[0], MULTI_OUTS[m], 20, generator=gen).to(dtype)
        ys.append(torch.randn(n, MULTI_OUTS[m], generator=gen).to(dtype))
        As.append(A), Bs.append(B), scales.append(scale + m)
    return ys, x, As, Bs, scales, gen


def looped_reference(ys, x, As, Bs, scales, slots) -> list[torch.Tensor]:
    batch = LoraBatch.from_token_slot(slots)
    return [reference(y.clone(), x, A, B, s, batch) for y, A, B, s in zip(ys, As, Bs, scales)]


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("n", (1, 7, 33))
@pytest.mark.parametrize("spread", ("distinct", "uniform", "mixed", "identical"))
@pytest.mark.parametrize("modules", (1, 2, 3))
def test_sgmv_multi_matches_looped_reference(modules, spread, n, dtype):
    ys, x, As, Bs, scales, gen = multi_case(modules, n, dtype, seed=n)
    slots = token_slots(spread, n, gen)
    expected = looped_reference(ys, x, As, Bs, scales, slots)
    ys, As, Bs, scales = (on_device(*t) for t in (ys, As, Bs, scales))
    x, slots = on_device(x, slots)
    out = add_lora_multi(ys, x, As, Bs, scales, slots, backend=sgmv_multi)
    assert out is ys
    for got, want in zip(out, expected, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu(), want, **TOLERANCE[dtype])


def test_sgmv_multi_minus_one_rows_untouched_and_fused_slices():
    """q, k, v as column slices of one fused output; -1 rows bit-for-bit unchanged, even
    -0.0 and NaN, and NaN in their x; more than three modules take two launches."""
    n, outs = 7, (16, 8, 8, 12)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 40, generator=gen)
    As = [torch.randn(6, 8, 40, generator=gen) / 6 for _ in outs]
    Bs = [torch.randn(6, o, 8, generator=gen) for o in outs]
    scales = [torch.rand(6, generator=gen) + 0.5 for _ in outs]
    slots = torch.tensor([-1, 2, -1, -1, 0, 2, 5])
    none = slots < 0
    fused = torch.randn(n, sum(outs) + 3, generator=gen)
    fused[none] = torch.tensor([-0.0, float("nan"), float("inf")]).repeat(20)[:sum(outs) + 3]
    x[none] = float("nan")
    edges = [0, *torch.tensor(outs).cumsum(0).tolist()]
    expected = looped_reference([fused[:, a:b] for a, b in zip(edges, edges[1:])], x, As, Bs,
                                scales, slots)
    before = fused.clone()
    fused, x, slots = on_device(fused, x, slots)
    As, Bs, scales = (on_device(*t) for t in (As, Bs, scales))
    ys = [fused[:, a:b] for a, b in zip(edges, edges[1:])]
    add_lora_multi(ys, x, As, Bs, scales, slots, backend=sgmv_multi)
    fused = fused.cpu()
    assert torch.equal(fused[none].view(torch.int32), before[none].view(torch.int32))
    assert torch.equal(fused[:, -3:].view(torch.int32), before[:, -3:].view(torch.int32))
    for (a, b), want in zip(zip(edges, edges[1:]), expected, strict=True):
        torch.testing.assert_close(fused[:, a:b], want, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_sgmv_multi_large_rank_module_and_bad_inputs():
    ys, x, As, Bs, scales, gen = multi_case(2, 5, torch.float32)
    As[1] = torch.randn(6, MAX_FUSED_RANK + 8, 40, generator=gen) / 8
    Bs[1] = torch.randn(6, ys[1].shape[1], MAX_FUSED_RANK + 8, generator=gen)
    slots = torch.tensor([1, -1, 0, 1, 4])
    expected = looped_reference(ys, x, As, Bs, scales, slots)
    ys, As, Bs, scales = (on_device(*t) for t in (ys, As, Bs, scales))
    x, slots = on_device(x, slots)
    sgmv_multi(ys, x, As, Bs, scales, LoraBatch.from_token_slot(slots))
    for got, want in zip(ys, expected, strict=True):
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    batch = LoraBatch.from_token_slot(slots)
    with pytest.raises(ValueError, match="one entry per module"):
        sgmv_multi(ys, x, As[:1], Bs, scales, batch)
    with pytest.raises(ValueError, match="must not overlap"):
        sgmv_multi([ys[0], ys[0]], x, [As[0]] * 2, [Bs[0]] * 2, [scales[0]] * 2, batch)
    assert (choose_multi_backend(x) is sgmv_multi_split) == (DEVICE == "cuda")


def bits(t: torch.Tensor) -> list[int]:
    return t.cpu().view(torch.int32).tolist()


@pytest.mark.parametrize(("seed", "stream", "start", "count"), [
    (0, 0, 0, 9), (1, 1, 3, 37), (42, 3, 7, 5), ((1 << 32) + 5, 17, 1000003, 40),
    (1099511627853, 17, 1000003, 3), ((1 << 63) - 1, 1, 123456789, 20),
    ((1 << 63) - 1, (1 << 24) - 1, (1 << 42) - 64, 64), (7, 1 << 23, 1 << 33, 11),
])
def test_basis_values_bit_identical(seed, stream, start, count):
    expected = philox.basis_values(seed, stream, start, count)  # C loop (or torch) on CPU
    assert bits(nola_triton.basis_values(seed, stream, start, count, DEVICE)) == bits(expected)


@pytest.mark.parametrize(("seed", "stream", "k", "n_cols"), [
    (0, 0, 5, 24), ((1 << 40) + 3, 9, 7, 13), ((1 << 63) - 1, (1 << 24) - 2, 3, 1),
    (5, 1, 4, 2), ((1 << 32) + 1, 1 << 23, 6, 4100), (3, 2, 1, 1030),
])
def test_contract_matches_cpu(seed, stream, k, n_cols):
    coeffs = torch.randn(k, generator=torch.Generator().manual_seed(stream))
    expected = philox.contract(seed, stream, coeffs, n_cols)
    got = nola_triton.contract(seed, stream, coeffs.to(DEVICE), n_cols)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_contract_with_one_hot_coeffs_is_the_basis_row_bit_for_bit():
    for n_cols in (12, 13):
        coeffs = torch.zeros(3)
        coeffs[2] = 1.0
        row = philox.basis_values(9, 4, 2 * n_cols, n_cols)
        assert bits(nola_triton.contract(9, 4, coeffs.to(DEVICE), n_cols)) == bits(row)


def test_materialize_matches_cpu():
    """On CUDA, ``NolaAdapter.materialize`` goes through the kernel (``philox.contract``'s
    hook); interpreted, the same per-module contraction is written out by hand."""
    spec = BaseModelSpec(num_layers=2, module_shapes={"q": (8, 6), "v": (7, 3)}, max_rank=8)
    adapter = random_nola(spec, seed=(1 << 40) + 11, rank=4, num_basis=16)
    cpu = adapter.materialize("cpu")
    if DEVICE == "cuda":
        assert philox._cuda_contract() is nola_triton.contract
        got = {key: (f.A, f.B) for key, f in adapter.materialize("cuda").modules.items()}
    else:
        got = {}
        for i in range(adapter.num_layers):
            for t, name in enumerate(adapter.target_modules):
                n_in, n_out = adapter.module_shapes[name]
                s, r = adapter.stream(i, t), adapter.rank
                a = nola_triton.contract(adapter.seed, s, adapter.alpha[i, t], r * n_in)
                b = nola_triton.contract(adapter.seed, s + 1, adapter.beta[i, t], n_out * r)
                got[i, name] = (a.view(r, n_in) / 4.0, b.view(n_out, r) / 4.0)  # sqrt(16)
    assert got.keys() == cpu.modules.keys()
    for key, f in cpu.modules.items():
        torch.testing.assert_close(got[key][0].cpu(), f.A, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[key][1].cpu(), f.B, atol=1e-5, rtol=1e-5)


def rows_case(n: int, rank: int, dtype: torch.dtype, spread: str):
    """``make_case``'s weights, re-padded to ``rank`` (1, 8, 16, 64: one tile of BLOCK_R
    and beyond), with ``spread``'s slots."""
    gen = torch.Generator().manual_seed(n * 100 + rank)
    A = torch.randn(6, rank, 40, generator=gen) / 40**0.5
    B = torch.randn(6, 70, rank, generator=gen)
    scale, x, y = torch.rand(6, generator=gen) + 0.5, torch.randn(n, 40, generator=gen), \
        torch.randn(n, 70, generator=gen)
    return A.to(dtype), B.to(dtype), scale, x.to(dtype), y.to(dtype), token_slots(spread, n, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", (1, 8, 16, 64))
@pytest.mark.parametrize("n", (1, 2, 3, 16, 17))  # bucket edges: 1, 2 and 16, then + 1
@pytest.mark.parametrize("spread", ("distinct", "mixed", "identical", "none", "zipf"))
def test_rows_kernel_matches_reference(spread, n, rank, dtype):
    """``add_lora_rows``'s Triton kernel (a CUDA-graph decode step's LoRA) against the
    reference, over spreads, ranks and bucket edges; ``-1`` rows bit for bit."""
    A, B, scale, x, y, slots = rows_case(n, rank, dtype, spread)
    expected = reference(y.clone(), x, A, B, scale, LoraBatch.from_token_slot(slots))
    A, B, scale, x, y, slots = on_device(A, B, scale, x, y, slots)
    before = y.clone()
    out = bgmv(y, x, A, B, scale, slots)
    assert out is y
    torch.testing.assert_close(out.cpu(), expected, **TOLERANCE[dtype])
    none = (slots < 0).cpu()
    assert torch.equal(out.cpu()[none], before.cpu()[none])
