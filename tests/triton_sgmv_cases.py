"""``triton_sgmv`` (split-K shrink, tiled expand, grids from shapes only) held to
``reference`` across adapter spreads, ranks 1-64, dtypes and bucket edges; run by
``test_triton_sgmv.py`` in a child process, like ``triton_cases.py``."""

from __future__ import annotations

import os

import pytest
import torch
from test_add_lora import token_slots

from nolaserve.adapters.ops import LoraBatch, add_lora, reference
from nolaserve.adapters.ops.triton_common import MAX_FUSED_RANK
from nolaserve.adapters.ops.triton_sgmv import BLOCK_K, BLOCK_T, SlotRuns, sgmv_rows, sgmv_split

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
# the interpreter's bf16 tl.dot is broken (it reads bf16 bits as garbage): fp16 stands in
DTYPES = (torch.float32, torch.float16) if INTERPRETED else (
    torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5),
             torch.float16: dict(atol=2e-2, rtol=2e-2),
             torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
D_IN = 2 * BLOCK_K + 7  # three shrink splits, the last one partial
D_OUT = 70  # a full and a partial expand tile


def case(n: int, rank: int, dtype: torch.dtype, spread: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed * 1000 + n * 100 + rank)
    A = torch.randn(6, rank, D_IN, generator=gen) / D_IN**0.5
    B = torch.randn(6, D_OUT, rank, generator=gen)
    scale = torch.rand(6, generator=gen) + 0.5
    x, y = torch.randn(n, D_IN, generator=gen), torch.randn(n, D_OUT, generator=gen)
    return A.to(dtype), B.to(dtype), scale, x.to(dtype), y.to(dtype), token_slots(spread, n, gen)


def check(n, rank, dtype, spread, seed: int = 0):
    A, B, scale, x, y, slots = case(n, rank, dtype, spread, seed)
    expected = reference(y.clone(), x, A, B, scale, LoraBatch.from_token_slot(slots))
    A, B, scale, x, y, slots = (t.to(DEVICE) for t in (A, B, scale, x, y, slots))
    before = y.clone()
    out = sgmv_rows(y, x, A, B, scale, slots)
    assert out is y and out.dtype == dtype
    torch.testing.assert_close(out.cpu(), expected, **TOLERANCE[dtype])
    none = (slots < 0).cpu()  # -1 rows: bit for bit
    assert torch.equal(out.cpu()[none].view(-1).view(torch.uint8),
                       before.cpu()[none].view(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", (1, 8, 16, 64))
@pytest.mark.parametrize("n", (1, 2, 16, 17))  # bucket edges: 1, 2 and 16, then + 1
def test_ranks_and_bucket_edges_match_reference(n, rank, dtype):
    check(n, rank, dtype, "mixed")


@pytest.mark.parametrize("spread", ("distinct", "uniform", "zipf", "identical", "skewed",
                                    "sorted_mixed", "consecutive", "none"))
@pytest.mark.parametrize("n", (3, 33))
def test_spreads_match_reference(spread, n):
    """33 tokens: a slot's run spans several token tiles of one program."""
    check(n, 8, torch.float32, spread, seed=1)


def test_a_long_run_of_one_slot_reads_its_factors_in_one_program():
    """40 tokens of one slot after -1s (three token tiles), fp16."""
    n = 2 * BLOCK_T + 8
    check(n, 16, torch.float16, "identical")
    runs = SlotRuns.of(torch.tensor([3, -1, 3, 0, 3, -1]))
    assert runs.slots.tolist() == [-1, -1, 0, 3, 3, 3]
    assert runs.order.tolist() == [1, 5, 3, 0, 2, 4]
    assert runs.ends.tolist() == [2, 2, 3, 6, 6, 6]


def test_backend_form_through_add_lora_and_fallback_for_large_ranks():
    for rank in (8, MAX_FUSED_RANK + 8):
        A, B, scale, x, y, slots = case(7, rank, torch.float32, "mixed", seed=2)
        expected = reference(y.clone(), x, A, B, scale, LoraBatch.from_token_slot(slots))
        A, B, scale, x, y, slots = (t.to(DEVICE) for t in (A, B, scale, x, y, slots))
        add_lora(y, x, A, B, scale, slots, backend=sgmv_split)
        torch.testing.assert_close(y.cpu(), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="ranks up to"):
        sgmv_rows(y, x, A, B, scale, slots)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        sgmv_split(y.double(), x.double(), A.double(), B.double(), scale,
                   LoraBatch.from_token_slot(slots))


def test_strided_output_slice_and_transposed_input():
    """``y`` a column slice of a fused qkv output, ``x`` a transposed view."""
    A, B, scale, x, y, slots = case(9, 8, torch.float32, "uniform", seed=3)
    expected = reference(y.clone(), x, A, B, scale, LoraBatch.from_token_slot(slots))
    fused = torch.randn(9, D_OUT + 20)
    fused[:, 10:10 + D_OUT] = y
    A, B, scale, slots, fused = (t.to(DEVICE) for t in (A, B, scale, slots, fused))
    x_view = x.T.contiguous().to(DEVICE).T
    sgmv_rows(fused[:, 10:10 + D_OUT], x_view, A, B, scale, slots)
    torch.testing.assert_close(fused[:, 10:10 + D_OUT].cpu(), expected, atol=1e-5, rtol=1e-5)
