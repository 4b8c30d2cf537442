"""``SlotPool``'s direct path on CPU, with ``DirectFactors`` that write given values (the
regeneration itself is held to the copy path in ``triton_slot_direct_cases.py``): padding
and absent modules zeroed, scales set after the check, typed errors for bad factors."""

from __future__ import annotations

import pytest

from nolaserve.adapters.errors import IncompatibleAdapterError, InvalidAdapterError
from nolaserve.adapters.slots import SlotPool
from nolaserve.adapters.spec import BaseModelSpec, DirectFactors

SPEC = BaseModelSpec(num_layers=2, module_shapes={"q": (6, 4), "v": (6, 2)}, max_rank=4)


def filler(value: float, ranks: dict, scale: float = 0.5) -> DirectFactors:
    def write(views):
        assert set(views) == set(ranks)
        for a, b in views.values():
            a.fill_(value), b.fill_(value)
    return DirectFactors(ranks, scale, write)


def pool(direct: dict) -> SlotPool:
    def no_copy(adapter_id):
        raise AssertionError(f"{adapter_id} took the copy path")
    p = SlotPool(SPEC, 2, no_copy, direct=direct.get)
    for a, b, s in p._buffers.values():
        a.fill_(9.0), b.fill_(9.0), s.fill_(9.0)
    return p


def test_direct_write_zeroes_padding_and_absent_modules():
    p = pool({"x": filler(1.0, {(0, "q"): 2, (1, "v"): 4})})
    slot = p.acquire("x")
    for (layer, name), (a, b, s) in p._buffers.items():
        r = {(0, "q"): 2, (1, "v"): 4}.get((layer, name), 0)
        assert (a[slot, :r] == 1).all() and not a[slot, r:].any() and not b[slot, :, r:].any()
        assert s[slot] == (0.5 if r else 0.0)
        assert (a[1 - slot] == 9).all()  # the other slot untouched
    assert p.modules_of({slot}) == {"q", "v"}


@pytest.mark.parametrize(("value", "scale"), ((float("nan"), 0.5), (float("inf"), 0.5),
                                             (1.0, 1e6)))  # 1e6: Inf in fp16
def test_non_finite_values_abort_the_slot(value, scale):
    p = pool({"x": filler(value, {(1, "q"): 2}, scale)})
    p._buffers = {k: tuple(t.half() for t in v) for k, v in p._buffers.items()}
    with pytest.raises(InvalidAdapterError, match="layer 1 module 'q' hold NaN or Inf"):
        p.acquire("x")
    assert not p.snapshot().ready and p.stats.slots_used == 0
    assert all(not a[0].any() and not s[0] for a, _, s in p._buffers.values())


def test_ranks_and_modules_the_pool_cannot_hold_are_refused():
    p = pool({"big": filler(1.0, {(0, "q"): 5}), "odd": filler(1.0, {(0, "k"): 2})})
    too_big = "rank 5 at layer 0 .q. is outside the server.s 1..max_rank 4"
    with pytest.raises(IncompatibleAdapterError, match=too_big):
        p.acquire("big")
    with pytest.raises(IncompatibleAdapterError, match="module 'k', which the base model"):
        p.acquire("odd")
    assert p.stats.slots_used == 0
