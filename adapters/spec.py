"""Value types shared by every adapter kind: what the base model accepts, and the
materialized low-rank factors that every kind turns into."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import IncompatibleAdapterError, LimitExceededError


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the base model's adaptable linears and the server limits.

    ``module_shapes`` maps a module name relative to a decoder layer
    (``"self_attn.q_proj"``) to ``(in_features, out_features)``.
    """

    num_layers: int
    module_shapes: dict[str, tuple[int, int]]
    max_rank: int = 64
    max_num_basis: int = 4096  # NOLA k and l, RMM K
    name: str = ""

    def check_targets(self, num_layers: int, shapes: dict[str, tuple[int, int]], rank: int) -> None:
        """Raise ``IncompatibleAdapterError`` unless layers, module shapes and rank fit."""
        if num_layers > self.num_layers:
            raise IncompatibleAdapterError(
                f"adapter has {num_layers} layers but the base model has {self.num_layers}"
            )
        for name, shape in shapes.items():
            if name not in self.module_shapes:
                raise IncompatibleAdapterError(
                    f"target module {name!r} is not an adaptable linear of the base model; "
                    f"choose from {sorted(self.module_shapes)}"
                )
            if tuple(shape) != tuple(self.module_shapes[name]):
                raise IncompatibleAdapterError(
                    f"module {name!r} has shape [in, out] = {list(shape)} in the adapter but "
                    f"{list(self.module_shapes[name])} in the base model"
                )
        if rank > self.max_rank:
            raise IncompatibleAdapterError(
                f"adapter rank {rank} exceeds the server's max_rank {self.max_rank}"
            )

    def check_num_basis(self, what: str, n: int) -> None:
        if n > self.max_num_basis:
            raise LimitExceededError(
                f"{what} = {n} exceeds the configured limit max_num_basis = {self.max_num_basis}"
            )


@dataclass
class ModuleFactors:
    """One adapted linear: ``delta W = scale * B @ A`` (PEFT orientation)."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:  # [out, in]
        return self.scale * (self.B.double() @ self.A.double())


@dataclass
class AdapterFactors:
    """The materialized form every adapter kind turns into: ``(layer, module) -> factors``.
    A missing key means no delta for that linear."""

    modules: dict[tuple[int, str], ModuleFactors] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((f.rank for f in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(f.A.nbytes + f.B.nbytes for f in self.modules.values())
