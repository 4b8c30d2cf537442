"""The graph-decode LoRA ops' Triton path (``sgmv_rows`` and ``sgmv_multi_rows``, what
``add_lora_rows`` / ``add_lora_multi_rows`` run on CUDA) over a step's shared ``slot_runs``,
held to ``reference`` across spreads, ranks 1-64, dtypes and bucket edges (1, 16, 17); run
by ``test_triton_kernels.py`` in a child process, like ``triton_sgmv_cases.py``."""

from __future__ import annotations

import pytest
import torch
from test_add_lora import token_slots
from triton_sgmv_cases import DEVICE, DTYPES, TOLERANCE

from nolaserve.adapters.ops import LoraBatch, reference, slot_runs
from nolaserve.adapters.ops.triton_sgmv import sgmv_rows
from nolaserve.adapters.ops.triton_sgmv_multi import sgmv_multi_rows

D_IN, OUTS = 135, (70, 24, 24)  # q, k, v: three shrink splits, partial expand tiles


def qkv_case(n: int, rank: int, dtype: torch.dtype, spread: str):
    gen = torch.Generator().manual_seed(n * 100 + rank)
    As = [torch.randn(6, rank, D_IN, generator=gen) / D_IN**0.5 for _ in OUTS]
    Bs = [torch.randn(6, o, rank, generator=gen) for o in OUTS]
    scales = [torch.rand(6, generator=gen) + 0.5 + m for m in range(len(OUTS))]
    ys = [torch.randn(n, o, generator=gen).to(dtype) for o in OUTS]
    x = torch.randn(n, D_IN, generator=gen).to(dtype)
    return ys, x, [a.to(dtype) for a in As], [b.to(dtype) for b in Bs], scales, \
        token_slots(spread, n, gen)


def check(n: int, rank: int, dtype: torch.dtype, spread: str) -> None:
    ys, x, As, Bs, scales, slots = qkv_case(n, rank, dtype, spread)
    batch = LoraBatch.from_token_slot(slots)
    expected = [reference(y.clone(), x, A, B, s, batch) for y, A, B, s in zip(ys, As, Bs, scales)]
    dev = [[t.to(DEVICE) for t in group] for group in (ys, As, Bs, scales)]
    x, slots = x.to(DEVICE), slots.to(DEVICE)
    runs = slot_runs(slots)  # once per step, shared by every call
    looped = [y.clone() for y in dev[0]]
    for y, A, B, s in zip(looped, *dev[1:]):
        assert sgmv_rows(y, x, A, B, s, slots, runs) is y
    out = sgmv_multi_rows(dev[0], x, *dev[1:], slots, runs)
    for got, loop, want in zip(out, looped, expected):
        torch.testing.assert_close(got.cpu(), want, **TOLERANCE[dtype])
        assert torch.equal(got, loop)  # the fused group is the loop, bit for bit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", (1, 8, 16, 64))
@pytest.mark.parametrize("n", (1, 16, 17))
def test_ranks_dtypes_and_bucket_edges(n, rank, dtype):
    check(n, rank, dtype, "mixed")


@pytest.mark.parametrize("spread", ("none", "identical", "distinct", "mixed"))
def test_spreads(spread):
    check(17, 8, torch.float32, spread)
