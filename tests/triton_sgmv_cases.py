"""``triton_sgmv`` and ``triton_sgmv_multi`` (split-K shrink, tiled expand, grids from
shapes only) held to ``reference`` across adapter spreads, ranks 1-64, dtypes and bucket
edges; run by ``test_triton_kernels.py`` in a child process, like ``triton_cases.py``."""

from __future__ import annotations

import os

import pytest
import torch
from test_add_lora import token_slots
from torch.utils._python_dispatch import TorchDispatchMode
from triton_cases import looped_reference, multi_case

from nolaserve.adapters.ops import (
    Factors,
    LoraBatch,
    SlotRuns,
    add_lora,
    add_lora_multi,
    reference,
    triton_sgmv,
)
from nolaserve.adapters.ops.triton_common import MAX_FUSED_RANK
from nolaserve.adapters.ops.triton_sgmv import (
    BLOCK_K,
    BLOCK_T,
    sgmv_factors,
    sgmv_factors_rows,
    sgmv_rows,
    sgmv_split,
    sgmv_split_launch,
)
from nolaserve.adapters.ops.triton_sgmv_multi import sgmv_multi_split, sgmv_multi_split_launch

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
        y_rows = sgmv_rows(y.clone(), x, A, B, scale, slots)  # large ranks: gather_rows
        add_lora(y, x, A, B, scale, slots, backend=sgmv_split)
        torch.testing.assert_close(y.cpu(), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y_rows.cpu(), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        sgmv_split(y.double(), x.double(), A.double(), B.double(), scale,
                   LoraBatch.from_token_slot(slots))


class CountOps(TorchDispatchMode):
    """Counts the aten ops run under it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_an_eager_step_groups_its_runs_once_for_every_launch():
    """The launchers of every layer of a packed step share the batch's ``runs``: one
    ``searchsorted`` per step, not one per launch; the results are still exact."""
    A, B, scale, x, y, slots = case(11, 8, torch.float32, "mixed", seed=5)
    expected = reference(y.clone(), x, A, B, scale, LoraBatch.from_token_slot(slots))
    A, B, scale, x, slots = (t.to(DEVICE) for t in (A, B, scale, x, slots))
    batch = LoraBatch.from_token_slot(slots)
    outs = [y.clone().to(DEVICE) for _ in range(3)]
    with CountOps() as ops:
        for _ in range(2):  # two layers: a lone linear, then a q/k-like pair
            sgmv_split_launch(outs[0], x, A, B, scale, batch)
            sgmv_multi_split_launch(outs[1:], x, [A, A], [B, B], [scale, scale], batch)
    expected = reference(expected, x.cpu(), A.cpu(), B.cpu(), scale.cpu(),
                         LoraBatch.from_token_slot(slots.cpu()))  # the second layer's delta
    assert ops.counts.get("searchsorted") == 1, ops.counts
    for got in outs:
        torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_bound_factors_prepare_their_launches_once(monkeypatch):
    """The engine's form: a ``Factors`` bound once prepares its launch arguments on the
    first call only; later calls (every layer of every step) reuse them, still exact."""
    A, B, scale, x, y, slots = case(11, 8, torch.float32, "mixed", seed=7)
    batch = LoraBatch.from_token_slot(slots)
    expected = reference(reference(y.clone(), x, A, B, scale, batch), x, A, B, scale, batch)
    A, B, scale, x, y, slots = (t.to(DEVICE) for t in (A, B, scale, x, y, slots))
    built = []
    real = triton_sgmv.SgmvLaunch.__init__
    monkeypatch.setattr(triton_sgmv.SgmvLaunch, "__init__",
                        lambda self, *a: (built.append(a[0]), real(self, *a))[1])
    factors = Factors.of([A], [B], [scale])
    sgmv_factors((y,), x, factors, LoraBatch.from_token_slot(slots))
    sgmv_factors_rows((y,), x, factors, slots)
    assert built == [(0,)]
    torch.testing.assert_close(y.cpu(), expected, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("n", (1, 17, 33))
@pytest.mark.parametrize("spread", ("distinct", "mixed", "identical"))
@pytest.mark.parametrize("modules", (1, 2, 3))
def test_multi_matches_looped_reference(modules, spread, n, dtype):
    """q/k/v-like groups: outputs 70, 24 and 130 wide, ranks 8, 5 (strided views) and 20."""
    ys, x, As, Bs, scales, gen = multi_case(modules, n, dtype, seed=n)
    slots = token_slots(spread, n, gen)
    expected = looped_reference(ys, x, As, Bs, scales, slots)
    ys, As, Bs, scales = ([t.to(DEVICE) for t in ts] for ts in (ys, As, Bs, scales))
    out = add_lora_multi(ys, x.to(DEVICE), As, Bs, scales, slots.to(DEVICE),
                         backend=sgmv_multi_split)
    assert out is ys
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got.cpu(), want, **TOLERANCE[dtype])


def test_multi_fused_slices_minus_one_rows_and_large_ranks():
    """Four modules as column slices of one output (two launch pairs), one of rank 72
    (torch); -1 rows and the columns past the slices bit for bit unchanged."""
    n, outs, ranks = 7, (16, 8, 8, 12), (8, 4, MAX_FUSED_RANK + 8, 1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, D_IN, generator=gen)
    As = [torch.randn(6, r, D_IN, generator=gen) / 12 for r in ranks]
    Bs = [torch.randn(6, o, r, generator=gen) for o, r in zip(outs, ranks)]
    scales = [torch.rand(6, generator=gen) + 0.5 for _ in outs]
    slots = torch.tensor([-1, 2, -1, 5, 0, 2, 5])
    none = slots < 0
    fused = torch.randn(n, sum(outs) + 3, generator=gen)
    x[none] = float("nan")
    edges = [0, *torch.tensor(outs).cumsum(0).tolist()]
    expected = looped_reference([fused[:, a:b] for a, b in zip(edges, edges[1:])], x, As, Bs,
                                scales, slots)
    before = fused.clone()
    fused = fused.to(DEVICE)
    sgmv_multi_split([fused[:, a:b] for a, b in zip(edges, edges[1:])], x.to(DEVICE),
                     [t.to(DEVICE) for t in As], [t.to(DEVICE) for t in Bs],
                     [t.to(DEVICE) for t in scales],
                     LoraBatch.from_token_slot(slots.to(DEVICE)))
    fused = fused.cpu()
    assert torch.equal(fused[none], before[none]) and torch.equal(fused[:, -3:], before[:, -3:])
    for (a, b), want in zip(zip(edges, edges[1:]), expected, strict=True):
        torch.testing.assert_close(fused[:, a:b], want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="must not overlap"):
        sgmv_multi_split([fused[:, :16]] * 2, x, As[:1] * 2, Bs[:1] * 2, scales[:1] * 2,
                         LoraBatch.from_token_slot(slots))
