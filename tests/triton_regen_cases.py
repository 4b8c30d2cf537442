"""``nola_triton.regenerate`` (every module of a NOLA adapter in one launch, written into the
given tensors) held to ``NolaAdapter.materialize("cpu")``, the C Philox loop; run by
``test_triton_kernels.py`` in a child process, like ``triton_cases.py``."""

from __future__ import annotations

import os

import pytest
import torch

from nolaserve.adapters import nola_triton
from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.spec import BaseModelSpec

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
# (in, out): 8 x r and 7 x r give A/B streams of 4-aligned and odd lengths
SPEC = BaseModelSpec(num_layers=2, module_shapes={"q": (8, 6), "v": (7, 3), "o": (5, 9)},
                     max_rank=64)


def slot_views(adapter, dtype: torch.dtype, r_max: int = 64):
    """Per (layer, target): a slot pool's ``A [S, r_max, in]``/``B [S, out, r_max]`` filled
    with a sentinel, and the views ``A[1, :r]``, ``B[1, :, :r]`` that the kernel writes."""
    pools, outs = [], []
    for _ in range(adapter.num_layers):
        for name in adapter.target_modules:
            n_in, n_out = adapter.module_shapes[name]
            a = torch.full((3, r_max, n_in), 7.0, dtype=dtype, device=DEVICE)
            b = torch.full((3, n_out, r_max), 7.0, dtype=dtype, device=DEVICE)
            pools.append((a, b))
            outs.append((a[1, :adapter.rank], b[1, :, :adapter.rank]))
    return pools, outs


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    want = want.to(got.dtype)
    if got.dtype == torch.bfloat16 and INTERPRETED:  # the interpreter truncates to bf16
        torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2**-7)
    else:  # fp32 and fp16 (and bf16 on CUDA): the CPU path's bits
        assert torch.equal(got.view(torch.int16 if got.element_size() == 2 else torch.int32),
                           want.view(torch.int16 if got.element_size() == 2 else torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("rank", "k", "seed"), [
    (1, 5, 3), (8, 16, (1 << 40) + 11), (16, 7, (1 << 63) - 1), (64, 3, 1 << 33)])
def test_one_launch_writes_the_cpu_factors_into_the_slot(rank, k, seed, dtype):
    adapter = random_nola(SPEC, seed=seed, rank=rank, num_basis=k)
    cpu = adapter.materialize("cpu")
    pools, outs = slot_views(adapter, dtype)
    nola_triton.regenerate(adapter.seed, adapter.alpha.to(DEVICE), adapter.beta.to(DEVICE),
                           outs)
    keys = [(i, n) for i in range(adapter.num_layers) for n in adapter.target_modules]
    for key, (a, b), (pool_a, pool_b) in zip(keys, outs, pools, strict=True):
        assert_matches(a.cpu(), cpu.modules[key].A)
        assert_matches(b.cpu(), cpu.modules[key].B)
        outside_a = torch.ones_like(pool_a, dtype=torch.bool)
        outside_a[1, :rank] = False
        outside_b = torch.ones_like(pool_b, dtype=torch.bool)
        outside_b[1, :, :rank] = False
        assert (pool_a[outside_a] == 7.0).all() and (pool_b[outside_b] == 7.0).all()


def test_distinct_streams_for_a_and_b_and_the_number_of_basis_rows():
    """k != l: A reads alpha's k coefficients, B beta's l (swapping them breaks bits)."""
    adapter = random_nola(SPEC, seed=5, rank=2, num_basis=4)
    adapter.beta = torch.randn(adapter.num_layers, len(adapter.target_modules), 9)
    cpu = adapter.materialize("cpu")
    _, outs = slot_views(adapter, torch.float32, r_max=2)
    nola_triton.regenerate(adapter.seed, adapter.alpha.to(DEVICE), adapter.beta.to(DEVICE),
                           outs)
    assert_matches(outs[-1][1].cpu(), cpu.modules[1, adapter.target_modules[-1]].B)
    assert_matches(outs[0][0].cpu(), cpu.modules[0, adapter.target_modules[0]].A)


def test_bad_outputs_are_refused_with_what_to_fix():
    adapter = random_nola(SPEC, seed=1, rank=2, num_basis=4)
    alpha, beta = adapter.alpha.to(DEVICE), adapter.beta.to(DEVICE)
    _, outs = slot_views(adapter, torch.float32)
    with pytest.raises(ValueError, match="one \\(A, B\\) pair per"):
        nola_triton.regenerate(1, alpha, beta, outs[:-1])
    mixed = [*outs[:-1], (outs[-1][0].half(), outs[-1][1])]
    with pytest.raises(ValueError, match="one dtype"):
        nola_triton.regenerate(1, alpha, beta, mixed)
