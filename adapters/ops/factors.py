"""``Factors``: the slot buffers of the modules that one call adapts, bound once.

Every step, every layer's wrapped linear (or group of siblings that read one ``x``: q/k/v,
gate/up) adds its deltas with the same slot-pool buffers; only the step's tokens change.
``Factors`` holds those buffers for the pool's life, and what depends on them alone (the
Triton launches' ranks, strides, tile counts and block sizes) is computed once, on the
first CUDA call, instead of on every call of every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

Tensors = Sequence[Tensor]


@dataclass(frozen=True, eq=False)
class Factors:
    """Per module ``m`` (one ``x`` for all): ``As[m] [S_m, r_m, in]``,
    ``Bs[m] [S_m, out_m, r_m]``, ``scales[m] [S_m]``, held by reference (loading an adapter
    into a slot updates them in place). ``derived`` holds what a backend computed from them
    once, by the backend's plan type (``triton_sgmv.SgmvPlan``)."""

    As: tuple[Tensor, ...]
    Bs: tuple[Tensor, ...]
    scales: tuple[Tensor, ...]
    derived: dict[type, object] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, As: Tensors, Bs: Tensors, scales: Tensors) -> Factors:
        return cls(tuple(As), tuple(Bs), tuple(scales))
