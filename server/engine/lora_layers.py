"""Adapter-aware linears: the base projection plus each token's batched low-rank delta.

``wrap_model`` swaps every target ``nn.Linear`` of every decoder layer for a ``LoraLinear``
that holds the base linear, its slot-pool buffers and the runner's step context; the
model's own modeling code is unchanged and calls the wrapper like the linear it replaced.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from nolaserve.adapters.ops import LoraBatch, add_lora
from nolaserve.adapters.slots import SlotPool
from nolaserve.adapters.spec import BaseModelSpec, decoder_layers


class LoraContext(Protocol):
    """What a ``LoraLinear`` reads each step: the token -> slot batch, or ``None`` when no
    token of the step has an adapter."""

    lora_batch: LoraBatch | None
    active_modules: frozenset[str]


class LoraLinear(nn.Module):
    """``y = base(x)``, then ``add_lora`` adds ``scale[s] * B[s] @ A[s] @ x`` for each token
    whose slot ``s`` (from ``ctx.lora_batch``) is ``>= 0``.

    ``A [S, r_max, in]``, ``B [S, out, r_max]`` and ``scale [S]`` are the slot pool's
    buffers for this layer and module, held by reference: loading an adapter into a slot
    updates them in place. ``ctx`` is the runner's step context, also held by reference.
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                 ctx: LoraContext, name: str = "") -> None:
        super().__init__()
        if tuple(A.shape[2:]) != (base.in_features,) or B.shape[1] != base.out_features:
            raise ValueError(
                f"slot buffers A {list(A.shape)}, B {list(B.shape)} do not fit a linear "
                f"{base.in_features} -> {base.out_features}")
        if A.dtype != base.weight.dtype:
            raise ValueError(f"slot buffers are {A.dtype} but the model is {base.weight.dtype}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.A, self.B, self.scale = A, B, scale  # plain attributes: not model parameters
        self.ctx, self.name = ctx, name  # name relative to the decoder layer

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that inspects ``proj.weight`` (dtype, device)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        y = self.base(x)
        batch = self.ctx.lora_batch
        if batch is None or self.name not in self.ctx.active_modules:
            return y
        # y is fresh from the linear, so the 2-D view aliases it and add_lora updates it.
        add_lora(y.view(-1, self.out_features), x.reshape(-1, self.in_features),
                 self.A, self.B, self.scale, batch)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={self.A.shape[0]}"


def wrap_model(model: nn.Module, spec: BaseModelSpec, pool: SlotPool,
               ctx: LoraContext) -> list[LoraLinear]:
    """Replace each ``spec`` module of each decoder layer with a ``LoraLinear`` (in place).
    Returns the wrappers. Raises ``ValueError`` if the model does not match ``spec``."""
    layers = decoder_layers(model)
    if len(layers) != spec.num_layers:
        raise ValueError(f"spec has {spec.num_layers} layers but the model has {len(layers)}")
    wrapped = []
    for i, layer in enumerate(layers):
        for name in spec.module_shapes:
            parent_name, _, attr = name.rpartition(".")
            try:
                parent = layer.get_submodule(parent_name) if parent_name else layer
            except AttributeError:
                raise ValueError(f"layer {i} has no module {name!r}") from None
            base = getattr(parent, attr, None)
            if isinstance(base, LoraLinear):
                raise ValueError(f"layer {i} {name!r} is already wrapped")
            if not isinstance(base, nn.Linear):
                raise ValueError(f"layer {i} {name!r} is {type(base).__name__}, not nn.Linear")
            lora = LoraLinear(base, *pool.buffers(i, name), ctx, name)
            setattr(parent, attr, lora)
            wrapped.append(lora)
    return wrapped
