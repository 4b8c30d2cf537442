"""A NOLA load written straight into a slot (``SlotPool`` with ``direct``: the adapter
regenerates in the slot's dtype through ``nola_triton.regenerate``) held to the copy path
(the C Philox loop's fp32 factors copied in); run by ``test_triton_kernels.py`` in a child
process, like ``triton_regen_cases.py``."""

from __future__ import annotations

import pytest
import torch
from triton_regen_cases import DEVICE, INTERPRETED

from nolaserve.adapters.errors import InvalidAdapterError
from nolaserve.adapters.nola import random_nola
from nolaserve.adapters.slots import SlotPool
from nolaserve.adapters.spec import BaseModelSpec

SPEC = BaseModelSpec(num_layers=2, module_shapes={"q": (8, 6), "v": (7, 3), "o": (5, 9)},
                     max_rank=16)
# the interpreter's bf16 stores are unreliable (as for tl.dot): fp16 stands in
DTYPES = (torch.float32, torch.float16) if INTERPRETED else (
    torch.float32, torch.float16, torch.bfloat16)


def pools(adapters: dict, dtype: torch.dtype) -> tuple[SlotPool, SlotPool]:
    """A direct pool and a copy pool over ``adapters``, their buffers full of a sentinel."""
    def copy(i):
        return adapters[i].materialize("cpu")

    direct = SlotPool(SPEC, 3, copy, DEVICE, dtype, direct=lambda i: adapters[i].direct())
    copied = SlotPool(SPEC, 3, copy, DEVICE, dtype)
    for pool in (direct, copied):
        for a, b, s in pool._buffers.values():
            a.fill_(7.0), b.fill_(7.0), s.fill_(7.0)
    return direct, copied


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", (1, 8, 16))
def test_direct_load_equals_the_copy_path(rank, dtype):
    """fp32: bit for bit; fp16/bf16: the fp32 factors rounded once. Rank padding and the
    module the adapter leaves out ("o") are zero, its scale 0."""
    adapters = {"n": random_nola(SPEC, 5, targets=["q", "v"], rank=rank, num_basis=16)}
    direct, copied = pools(adapters, dtype)
    assert direct.acquire("n") == copied.acquire("n") == 0
    for key, (a, b, s) in direct._buffers.items():
        a2, b2, s2 = copied._buffers[key]
        assert torch.equal(a[0], a2[0]) and torch.equal(b[0], b2[0]) and torch.equal(s, s2)
        r = rank if key[1] != "o" else 0
        assert not a[0, r:].any() and not b[0, :, r:].any()
        assert (a[1:] == 7).all()  # other slots untouched
    assert direct.version_of(0) and direct.modules_of({0}) == {"q", "v"}


def test_a_nan_adapter_aborts_its_slot_and_leaves_others_intact():
    good = random_nola(SPEC, 1, targets=["q"], rank=4, num_basis=16)
    bad = random_nola(SPEC, 2, targets=["q", "v"], rank=4, num_basis=16)
    bad.beta[1, 1, 3] = float("nan")
    direct, _ = pools({"good": good, "bad": bad}, torch.float32)
    slot = direct.acquire("good")
    before = {k: (a[slot].clone(), b[slot].clone(), s[slot].clone())
              for k, (a, b, s) in direct._buffers.items()}
    with pytest.raises(InvalidAdapterError, match="layer 1 module 'v' hold NaN"):
        direct.acquire("bad")
    assert direct.snapshot().ready == {"good"} and direct.stats.slots_used == 1
    for k, (a, b, s) in direct._buffers.items():
        assert all(torch.equal(x, y) for x, y in zip((a[slot], b[slot], s[slot]), before[k]))
        assert not s[1 - slot].any()  # the failed slot adds nothing
