"""What a slot accepts: factors that fit the base model's adapted linears and the server's
``max_rank``, with no NaN or Inf in the slot pool's dtype. Checked before a single value
is written into a slot."""

from __future__ import annotations

import torch

from .errors import IncompatibleAdapterError, InvalidAdapterError, short
from .spec import AdapterFactors, BaseModelSpec


def check_factors(factors: AdapterFactors, spec: BaseModelSpec, dtype: torch.dtype) -> None:
    """``IncompatibleAdapterError`` unless every (layer, module) is an adapted linear of
    ``spec`` with ``A [r, in]`` and ``B [out, r]``, r <= ``max_rank``;
    ``InvalidAdapterError`` if a value is not finite in ``dtype``."""
    for (layer, name), f in factors.modules.items():
        if not (0 <= layer < spec.num_layers and name in spec.module_shapes):
            raise IncompatibleAdapterError(
                f"adapter targets layer {layer} module {short(name)}, which the base model "
                f"does not adapt (layers 0..{spec.num_layers - 1}, modules "
                f"{sorted(spec.module_shapes)})"
            )
        d_in, d_out = spec.module_shapes[name]
        if f.rank > spec.max_rank:
            raise IncompatibleAdapterError(
                f"adapter rank {f.rank} at layer {layer} {short(name)} exceeds the server's "
                f"max_rank {spec.max_rank}"
            )
        if tuple(f.A.shape) != (f.rank, d_in) or tuple(f.B.shape) != (d_out, f.rank):
            raise IncompatibleAdapterError(
                f"layer {layer} {short(name)}: A {list(f.A.shape)} and B {list(f.B.shape)} do "
                f"not form a [out, r] @ [r, in] pair for [in, out] = {[d_in, d_out]}"
            )
    check_finite(factors, dtype)


def check_finite(factors: AdapterFactors, dtype: torch.dtype) -> None:
    """No NaN or Inf enters a slot, in the pool's ``dtype`` (one host sync per adapter).
    Per tensor, its largest magnitude cast to that dtype: NaN if any value is NaN, Inf
    if any is Inf or overflows the dtype (the cast is monotonic). One ``_foreach`` op
    for all of them: a per-tensor ``isfinite`` took 7 ms of a 15 ms SmolLM2 q+v load."""
    if not factors.modules:
        return
    tensors = [t if t.numel() else t.new_zeros(1)  # rank 0: nothing to check
               for f in factors.modules.values() for t in (f.A, f.B)]
    largest = torch.stack(torch._foreach_max(torch._foreach_abs(tensors)))
    ok = largest.to(dtype).isfinite().view(-1, 2).all(1).cpu()
    scales = torch.tensor([float(f.scale) for f in factors.modules.values()])
    ok = ok & scales.to(dtype).isfinite()
    if not bool(ok.all()):
        layer, name = list(factors.modules)[int((~ok).nonzero()[0])]
        raise InvalidAdapterError(
            f"adapter factors at layer {layer} module {short(name)} hold NaN or Inf in "
            f"{dtype}; the adapter cannot be served (re-register a bounded version)")
