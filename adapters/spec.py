"""Value types shared by every adapter kind: what the base model accepts (and
``model_spec``, which reads it off a transformers model), and the materialized low-rank
factors that every kind turns into."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import (
    IncompatibleAdapterError,
    InvalidAdapterError,
    ModelLoadError,
)

# Registration refuses an adapter unless, for every (layer, module), the cheap upper bounds
# of its factors' entries (|A|, |B|, |scale|) and of its delta's entries
# (|scale| * r * max|A| * max|B| >= max|delta W|) are all <= MAGNITUDE_BOUND: float16's
# largest finite value, so every bounded value is finite in every serving dtype, and far
# above any trained adapter (docs/adapter-format.md, "Magnitude bounds"). Checked at
# registration only: a file the registry holds is read as it was accepted.
MAGNITUDE_BOUND = 65504.0


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
    fingerprint: str = ""  # of the architecture and weight shapes; scopes the registry
    aliases: tuple[str, ...] = ()  # other names of the same model (path, hub id, GGUF stem)

    def check_base_model(self, recorded: str) -> None:
        """Raise ``IncompatibleAdapterError`` when an adapter's recorded ``base_model``
        names another model. Names compare by ``model_key``
        (``HuggingFaceTB/SmolLM2-135M-Instruct`` = ``smollm2-135m-instruct.q4_1.gguf``); the
        fingerprint matches itself. An empty name on either side matches anything."""
        names = {model_key(n) for n in (self.name, *self.aliases) if n}
        if not recorded or not names or recorded == self.fingerprint:
            return
        if model_key(recorded) not in names:
            raise IncompatibleAdapterError(
                f"the adapter was made for base model {recorded!r} but this server serves "
                f"{self.name!r} (fingerprint {self.fingerprint or 'n/a'}); register it on a "
                f"server of that model, or rebuild it for this one (import-peft --base-model "
                f"sets the name a PEFT adapter records)")

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
        """A basis over ``max_num_basis`` does not fit this server, as a rank over
        ``max_rank`` (FAILED_PRECONDITION: RESOURCE_EXHAUSTED, HTTP 429, would be retried)."""
        if n > self.max_num_basis:
            raise IncompatibleAdapterError(
                f"{what} = {n} exceeds the server's max_num_basis {self.max_num_basis}"
            )


def model_key(name: str) -> str:
    """The comparable form of a model name: its last path component, lower case, without
    ``.gguf``, a GGUF quantization suffix or the converted copy's cache suffix:
    ``"./models/Foo.Q4_K_M.gguf"`` and ``"~/.cache/nolaserve/models/Foo.Q4_K_M-0123456789ab"``
    are ``"foo"``."""
    key = name.strip().rstrip("/").rsplit("/", 1)[-1].lower().removesuffix(".gguf")
    key = re.sub(r"-[0-9a-f]{12}$", "", key)
    return re.sub(r"[.-](i?q\d\w*|f16|f32|bf16)$", "", key)


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
    A missing key means no delta for that linear. ``version``: a token unique to this
    materialization (the prefix cache keys KV by it: equal tokens, equal weights)."""

    modules: dict[tuple[int, str], ModuleFactors] = field(default_factory=dict)
    version: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)

    @property
    def rank(self) -> int:
        return max((f.rank for f in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(f.A.nbytes + f.B.nbytes for f in self.modules.values())


SlotViews = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # -> (A [r, in], B [out, r])


@dataclass(frozen=True)
class DirectFactors:
    """An adapter that writes its factors straight into a slot's views (a NOLA adapter
    regenerating on the device, in the slot's dtype) instead of being copied in:
    ``write(views)`` fills ``views[(layer, module)]`` for every key of ``ranks``."""

    ranks: dict[tuple[int, str], int]  # the (layer, module)s it adapts -> rank
    scale: float
    write: Callable[[SlotViews], None]
    version: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers (``model.model.layers`` for Llama-style models)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and (n is None or len(layers) == n):
        return layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ModelLoadError(f"cannot find the decoder layers of {type(model).__name__}")


def model_spec(model: nn.Module, target_modules: list[str] | tuple[str, ...] | None = None,
               max_rank: int = 64, max_num_basis: int = 4096, name: str = "",
               fingerprint: str = "", aliases: tuple[str, ...] = ()) -> BaseModelSpec:
    """The adaptable linears of ``model``: names relative to a decoder layer
    (``"self_attn.q_proj"``) with their ``(in, out)`` read from layer 0. By default every
    ``nn.Linear`` inside a decoder layer."""
    layers = decoder_layers(model)
    layer0 = layers[0]
    linears = {n: m for n, m in layer0.named_modules() if isinstance(m, nn.Linear)}
    names = list(linears) if target_modules is None else list(target_modules)
    if not names:
        raise ModelLoadError(f"{type(model).__name__} has no nn.Linear in its decoder layers")
    for n in names:
        if n not in linears:
            raise ModelLoadError(
                f"target module {n!r} is not an nn.Linear of a decoder layer; "
                f"choose from {sorted(linears)}")
    shapes = {n: (linears[n].in_features, linears[n].out_features) for n in names}
    return BaseModelSpec(num_layers=len(layers), module_shapes=shapes, max_rank=max_rank,
                         max_num_basis=max_num_basis, name=name, fingerprint=fingerprint,
                         aliases=aliases)


@dataclass(frozen=True)
class ModuleBound:
    """Upper bounds of one (layer, module)'s materialized entries: ``a`` >= max|A|,
    ``b`` >= max|B|, ``scale`` = |scale|; ``delta`` >= max|scale * B @ A|."""

    layer: int
    module: str
    rank: int
    a: float
    b: float
    scale: float

    @property
    def delta(self) -> float:
        return self.scale * self.rank * self.a * self.b


def check_bounds(bounds: list[ModuleBound], what: str,
                 limit: float = MAGNITUDE_BOUND) -> None:
    """``InvalidAdapterError`` naming the first (layer, module) whose factor or delta bound
    exceeds ``limit`` (or is not finite)."""
    for m in bounds:
        for name, value in (("|A|", m.a), ("|B|", m.b), ("|scale|", m.scale),
                            ("|delta W| = |scale| * r * max|A| * max|B|", m.delta)):
            if not value <= limit:  # also catches NaN and inf
                raise InvalidAdapterError(
                    f"{what}: layer {m.layer} module {m.module!r}: {name} may reach "
                    f"{_above(value, limit)}, above the bound {limit:g}; the adapter would "
                    "overflow the serving dtype (see docs/adapter-format.md, magnitude bounds)")


def _above(value: float, limit: float) -> str:
    """``value`` in 6 digits, or in full (``repr``) where 6 would round it to ``limit``."""
    text = f"{value:.6g}"
    return text if float(text) > limit else repr(value)
