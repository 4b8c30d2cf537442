"""A direct load into a slot: ``DirectFactors`` write themselves into the slot's views (a
NOLA adapter regenerating on the device in the slot's dtype), instead of fp32 factors
copied and rounded in. Rank padding and modules the adapter does not adapt are zeroed,
the written values checked finite (one host sync, on the loading thread), and only then
are the scales set; a failed check zeroes the slot again."""

from __future__ import annotations

import math

import torch

from .errors import IncompatibleAdapterError, InvalidAdapterError, short
from .spec import BaseModelSpec, DirectFactors, SlotViews

Buffers = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def write_direct(buffers: Buffers, slot: int, direct: DirectFactors,
                 spec: BaseModelSpec) -> None:
    """Fill ``slot`` of ``buffers`` (``SlotPool``'s ``(A, B, scale)`` per module) from
    ``direct``. ``IncompatibleAdapterError`` for a module or rank the pool cannot hold,
    ``InvalidAdapterError`` for a value not finite in the slot's dtype."""
    check_ranks(direct, spec)
    views: SlotViews = {}
    with torch.no_grad():
        for key, (a, b, scale) in buffers.items():
            a[slot].zero_()
            b[slot].zero_()
            scale[slot] = 0.0
            if (r := direct.ranks.get(key)) is not None:
                views[key] = (a[slot, :r], b[slot, :, :r])
        if not views:
            return
        direct.write(views)
        check_views(views, direct.scale, buffers, slot)
        for key in views:
            buffers[key][2][slot] = direct.scale


def check_ranks(direct: DirectFactors, spec: BaseModelSpec) -> None:
    for (layer, name), r in direct.ranks.items():
        if not (0 <= layer < spec.num_layers and name in spec.module_shapes):
            raise IncompatibleAdapterError(
                f"adapter targets layer {layer} module {short(name)}, which the base model "
                f"does not adapt (modules {sorted(spec.module_shapes)})")
        if not 0 < r <= spec.max_rank:
            raise IncompatibleAdapterError(
                f"adapter rank {r} at layer {layer} {short(name)} is outside the server's "
                f"1..max_rank {spec.max_rank}")


def check_views(views: SlotViews, scale: float, buffers: Buffers, slot: int) -> None:
    """``InvalidAdapterError`` (the slot zeroed again) unless every written value and the
    scale are finite in the slot's dtype: one ``_foreach`` op, one host sync."""
    tensors = [t for pair in views.values() for t in pair]
    largest = torch.stack(torch._foreach_max(torch._foreach_abs(tensors)))
    ok = largest.isfinite().view(-1, 2).all(1).cpu()
    dtype = tensors[0].dtype
    if bool(ok.all()) and math.isfinite(float(torch.tensor(scale, dtype=dtype))):
        return
    for a, b, _ in buffers.values():
        a[slot].zero_()
        b[slot].zero_()
    bad = [key for key, good in zip(views, ok.tolist()) if not good] or list(views)
    layer, name = bad[0]
    raise InvalidAdapterError(
        f"adapter factors at layer {layer} module {short(name)} hold NaN or Inf in {dtype}; "
        f"the adapter cannot be served (re-register a bounded version)")
