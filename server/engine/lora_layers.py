"""Adapter-aware linears: the base projection plus each token's batched low-rank delta.

``wrap_model`` swaps every target ``nn.Linear`` of every decoder layer for a ``LoraLinear``
that holds the base linear, its slot-pool buffers and the runner's ``StepBuffers``; the
model's own modeling code is unchanged and calls the wrapper like the linear it replaced.

A decode step (``step.shape`` set: what a CUDA graph replays) adds every row's delta from
the step's token -> slot tensor alone (``add_factors_rows``); a packed step through the
backend chosen for its ``LoraBatch`` (``step.lora_backend``). Linears of one layer that
read the same input (``q/k/v_proj``, ``gate/up_proj``) form a ``SharedInput`` group: the
first of them called in a step computes every member's base output and adds all their
deltas with one call (one launch pair on CUDA); the others return their output from
``step.shared``. A member called with another tensor than the group leader (``x is``
test) computes its own, so a model that feeds them different inputs stays exact.

Each linear, and each group for each set of members a step adapts, binds its slot buffers
once in a ``Factors``, so what depends on them alone (the kernels' launch arguments) is
prepared once, not per layer per step.
"""

from __future__ import annotations

import torch
from torch import nn

from nolaserve.adapters.ops import Factors, add_factors_rows
from nolaserve.adapters.slots import SlotPool
from nolaserve.adapters.spec import BaseModelSpec, decoder_layers

from .step_buffers import StepBuffers

# leaf names of linears that transformers' decoder layers call on one shared input
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class LoraLinear(nn.Module):
    """``y = base(x)``, then adds ``scale[s] * B[s] @ A[s] @ x`` for each token whose
    adapter slot ``s`` (``step.token_slot``) is ``>= 0``, when the step names this module in
    ``step.lora_modules``.

    ``A [S, r_max, in]``, ``B [S, out, r_max]`` and ``scale [S]`` are the slot pool's
    buffers for this layer and module, held by reference: loading an adapter into a slot
    updates them in place. ``step`` is the runner's ``StepBuffers``, also held by
    reference. Shapes and dtypes are checked here, once; the slots once per step by the
    runner.
    """

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                 step: StepBuffers, name: str = "") -> None:
        super().__init__()
        if tuple(A.shape[2:]) != (base.in_features,) or B.shape[1] != base.out_features:
            raise ValueError(
                f"slot buffers A {list(A.shape)}, B {list(B.shape)} do not fit a linear "
                f"{base.in_features} -> {base.out_features}")
        if tuple(B.shape) != (A.shape[0], base.out_features, A.shape[1]) or \
                tuple(scale.shape) != (A.shape[0],):
            raise ValueError(f"slot buffers A {list(A.shape)}, B {list(B.shape)}, scale "
                             f"{list(scale.shape)} disagree on slots or rank")
        if A.dtype != base.weight.dtype or B.dtype != A.dtype:
            raise ValueError(f"slot buffers are {A.dtype} but the model is {base.weight.dtype}")
        if len({A.device, B.device, scale.device, base.weight.device}) != 1:
            raise ValueError("slot buffers and the model must be on one device")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.A, self.B, self.scale = A, B, scale  # plain attributes: not model parameters
        self.step, self.name = step, name  # name relative to the decoder layer
        self.group: SharedInput | None = None
        self.factors = Factors.of((A,), (B,), (scale,))

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that inspects ``proj.weight`` (dtype, device)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if self.name not in self.step.lora_modules:
            return self.base(x)
        if self.group is not None:
            return self.group.output(self, x)
        y = self.base(x)
        add_deltas(self.step, (y.view(-1, self.out_features),), x.reshape(-1, self.in_features),
                   self.factors)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={self.A.shape[0]}"


def add_deltas(step: StepBuffers, ys: tuple[torch.Tensor, ...], x: torch.Tensor,
               factors: Factors) -> None:
    """``ys[j] += delta_j(x)`` in place for the modules of ``factors``, which share the 2-D
    input ``x``: a decode step by its token -> slot tensor alone, a packed one by the
    backend chosen for its ``LoraBatch``."""
    if step.shape is not None:
        add_factors_rows(ys, x, factors, step.token_slot, step.runs)
    else:
        step.lora_backend(ys, x, factors, step.lora)


class SharedInput:
    """Wrapped linears of one layer that read one input; see the module docstring."""

    def __init__(self, members: list[LoraLinear]) -> None:
        self.members = members
        # by a step's ``lora_modules``: the members it adapts and their bound buffers
        self._active: dict[frozenset[str], tuple[tuple[LoraLinear, ...], Factors]] = {}
        for m in members:
            m.group = self

    def output(self, member: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        step = member.step
        x_done, outputs = step.shared.get(self, (None, {}))
        if x_done is x and member in outputs:
            return outputs.pop(member)
        active, factors = self._bound(step.lora_modules)
        ys = {m: m.base(x) for m in active}
        add_deltas(step, tuple(ys[m].view(-1, m.out_features) for m in active),
                   x.reshape(-1, member.in_features), factors)
        y = ys.pop(member)
        step.shared[self] = (x, ys)
        return y

    def _bound(self, modules: frozenset[str]) -> tuple[tuple[LoraLinear, ...], Factors]:
        """The members named in ``modules`` and their ``Factors``, bound on first use."""
        if (bound := self._active.get(modules)) is None:
            active = tuple(m for m in self.members if m.name in modules)
            bound = self._active[modules] = (active, Factors.of(
                [m.A for m in active], [m.B for m in active], [m.scale for m in active]))
        return bound


def wrap_model(model: nn.Module, spec: BaseModelSpec, pool: SlotPool,
               step: StepBuffers) -> list[LoraLinear]:
    """Replace each ``spec`` module of each decoder layer with a ``LoraLinear`` (in place)
    and group the ones that share an input. Returns the wrappers. Raises ``ValueError``
    if the model does not match ``spec``."""
    layers = decoder_layers(model)
    if len(layers) != spec.num_layers:
        raise ValueError(f"spec has {spec.num_layers} layers but the model has {len(layers)}")
    wrapped = []
    for i, layer in enumerate(layers):
        mine = {}
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
            lora = LoraLinear(base, *pool.buffers(i, name), step, name)
            setattr(parent, attr, lora)
            wrapped.append(lora)
            mine[name] = lora
        _group(mine)
    return wrapped


def _group(wrapped: dict[str, LoraLinear]) -> None:
    """Form ``SharedInput`` groups of two or more wrapped siblings with one input width."""
    by_parent: dict[tuple[str, int], list[LoraLinear]] = {}
    for name, lora in wrapped.items():
        parent, _, leaf = name.rpartition(".")
        for g, leaves in enumerate(SHARED_INPUT_GROUPS):
            if leaf in leaves:
                by_parent.setdefault((parent, g), []).append(lora)
    for members in by_parent.values():
        if len(members) > 1 and len({m.in_features for m in members}) == 1:
            SharedInput(members)
