"""The graph-decode LoRA ops on CPU (``gather_rows``): ``slot_runs`` on the device,
``add_lora_multi_rows`` equal to looping ``add_lora_rows``, and no host data read (a traced
call replays on other slots equal to eager, as a CUDA graph would)."""

from __future__ import annotations

import pytest
import torch
from test_add_lora import token_slots
from torch.fx.experimental.proxy_tensor import make_fx

from nolaserve.adapters.ops import (
    LoraBatch,
    add_lora_multi_rows,
    add_lora_rows,
    reference,
    slot_runs,
)

OUTS = (48, 16, 16)
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=8e-2, rtol=5e-2)}


def qkv(n: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    As = [(torch.randn(6, 8, 32, generator=gen) / 32**0.5).to(dtype) for _ in OUTS]
    Bs = [torch.randn(6, o, 8, generator=gen).to(dtype) for o in OUTS]
    scales = [torch.rand(6, generator=gen) + m for m in range(len(OUTS))]
    ys = [torch.randn(n, o, generator=gen).to(dtype) for o in OUTS]
    return ys, torch.randn(n, 32, generator=gen).to(dtype), As, Bs, scales, gen


def test_slot_runs_group_tokens_by_slot_stably():
    runs = slot_runs(torch.tensor([3, -1, 3, 0, 3, -1]))
    assert runs.slots.tolist() == [-1, -1, 0, 3, 3, 3]
    assert runs.order.tolist() == [1, 5, 3, 0, 2, 4]
    assert runs.ends.tolist() == [2, 2, 3, 6, 6, 6]


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("spread", ("none", "identical", "distinct", "mixed"))
@pytest.mark.parametrize("n", (1, 16, 17))
def test_multi_equals_looped_rows_and_reference(n, spread, dtype):
    ys, x, As, Bs, scales, gen = qkv(n, dtype, seed=n)
    slots = token_slots(spread, n, gen)
    looped = [add_lora_rows(y.clone(), x, A, B, s, slots) for y, A, B, s in
              zip(ys, As, Bs, scales)]
    batch = LoraBatch.from_token_slot(slots)
    expected = [reference(y.clone(), x, A, B, s, batch) for y, A, B, s in zip(ys, As, Bs, scales)]
    out = add_lora_multi_rows(ys, x, As, Bs, scales, slots, slot_runs(slots))
    assert out is ys
    for got, loop, want in zip(out, looped, expected):
        assert torch.equal(got, loop)
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_traced_call_replays_on_other_slots():
    """``make_fx`` bakes in whatever Python read from the tensors; replaying the trace with
    the slot tensor refilled in place must equal eager on the new slots."""
    ys, x, As, Bs, scales, _ = qkv(16)
    slots = torch.tensor([0, 1, -1, 2] * 4)

    def step() -> list[torch.Tensor]:
        outs = [y.clone() for y in ys]
        return list(add_lora_multi_rows(outs, x, As, Bs, scales, slots, slot_runs(slots)))

    traced = make_fx(step)()
    slots.copy_(torch.tensor([5, 5, 4, -1, 3, 0, 0, -1] * 2))
    for got, want in zip(traced(), step()):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
