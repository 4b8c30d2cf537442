"""Make a transformers causal LM NOLA-trainable, and export what it learned as format v1.

``make_trainable`` freezes the model and swaps each target ``nn.Linear`` of each decoder
layer for a ``NolaTrainLinear`` whose only parameters are the coefficients ``alpha [k]``
and ``beta [l]`` of that (layer, module). Its random basis is the one of the portable
format (``philox.py``, streams as in docs/adapter-format.md): regenerated from the seed
in every forward and backward, never stored, so memory holds no whole basis at any time.
``export`` reads the coefficients back as a ``NolaAdapter`` that the server regenerates
to exactly the factors the model trained with. Works with a plain torch loop and with the
transformers ``Trainer`` (the wrapped model is still the same ``PreTrainedModel``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import philox
from .nola import MAX_SEED, NolaAdapter
from .spec import decoder_layers, model_spec

DEFAULT_TARGETS = ("self_attn.q_proj", "self_attn.v_proj")


class _BasisContract(torch.autograd.Function):
    """``coeffs @ basis`` for the ``[k, n_cols]`` basis of ``(seed, stream)``; the basis is
    streamed in forward (``philox.contract``) and again in backward, never saved."""

    @staticmethod
    def forward(ctx, coeffs: torch.Tensor, seed: int, stream: int,
                n_cols: int) -> torch.Tensor:
        ctx.save_for_backward(coeffs)
        ctx.basis = (seed, stream, n_cols)
        return philox.contract(seed, stream, coeffs.detach(), n_cols)  # [n_cols]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (coeffs,) = ctx.saved_tensors
        seed, stream, n_cols = ctx.basis
        return basis_matvec(seed, stream, grad, coeffs.shape[0], n_cols), None, None, None


def basis_matvec(seed: int, stream: int, vec: torch.Tensor, k: int, n_cols: int
                 ) -> torch.Tensor:
    """``basis @ vec`` (float32 ``[k]``) for the ``[k, n_cols]`` basis of ``(seed, stream)``:
    the transpose of ``philox.contract``, holding at most ``philox.CHUNK`` basis values."""
    vec = vec.to(torch.float32).reshape(n_cols)
    out = torch.zeros(k, dtype=torch.float32, device=vec.device)
    rows = max(1, philox.CHUNK // n_cols)
    for j0 in range(0, k, rows):
        j1 = min(k, j0 + rows)
        if n_cols <= philox.CHUNK:
            vals = philox.basis_values(seed, stream, j0 * n_cols, (j1 - j0) * n_cols,
                                       vec.device)
            out[j0:j1] = vals.view(j1 - j0, n_cols) @ vec
            continue
        for n0 in range(0, n_cols, philox.CHUNK):  # one row at a time, in column chunks
            n1 = min(n_cols, n0 + philox.CHUNK)
            vals = philox.basis_values(seed, stream, j0 * n_cols + n0, n1 - n0, vec.device)
            out[j0] += vals @ vec[n0:n1]
    return out


class NolaTrainLinear(nn.Module):
    """``y = base(x) + scale * (x @ A.T) @ B.T`` with ``A = alpha @ A_basis / sqrt(k)``
    ``[r, in]`` and ``B = beta @ B_basis / sqrt(l)`` ``[out, r]``; only ``alpha [k]`` and
    ``beta [l]`` are parameters, the base linear is frozen.

    ``layer`` and ``target`` (the index in the adapter's target list) fix the Philox
    streams of the basis: ``2 * (layer * num_targets + target)`` for A, the next for B.
    """

    def __init__(self, base: nn.Linear, *, seed: int, layer: int, target: int,
                 num_targets: int, name: str, rank: int, num_basis_a: int, num_basis_b: int,
                 lora_alpha: float, generator: torch.Generator,
                 init_std: float | None = None) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.seed, self.layer, self.target, self.name = seed, layer, target, name
        self.stream = 2 * (layer * num_targets + target)
        self.rank, self.lora_alpha = rank, lora_alpha
        # A's entries have variance init_std^2 / 3 (uniform basis): default 1 / in, as
        # LoRA's kaiming init of A. B starts at zero, so delta W starts at zero.
        std = math.sqrt(3.0 / self.in_features) if init_std is None else init_std
        alpha = torch.randn(num_basis_a, generator=generator) * std
        device = base.weight.device
        self.alpha = nn.Parameter(alpha.to(device))
        self.beta = nn.Parameter(torch.zeros(num_basis_b, device=device))

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that inspects ``proj.weight`` (dtype, device)."""
        return self.base.weight

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A [r, in]`` and ``B [out, r]`` (float32, differentiable in alpha and beta)."""
        k, l_ = self.alpha.shape[0], self.beta.shape[0]
        n_a, n_b = self.rank * self.in_features, self.out_features * self.rank
        a = _BasisContract.apply(self.alpha, self.seed, self.stream, n_a) / math.sqrt(k)
        b = _BasisContract.apply(self.beta, self.seed, self.stream + 1, n_b) / math.sqrt(l_)
        return a.view(self.rank, self.in_features), b.view(self.out_features, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        a, b = self.factors()
        a, b = a.to(x.dtype), b.to(x.dtype)
        return self.base(x) + ((x @ a.T) @ b.T) * self.scale

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"k={self.alpha.shape[0]}, l={self.beta.shape[0]}, stream={self.stream}")


def make_trainable(model: nn.Module, *, seed: int, targets: list[str] | tuple[str, ...]
                   = DEFAULT_TARGETS, rank: int = 8, num_basis: int = 256,
                   num_basis_b: int | None = None, lora_alpha: float = 16.0,
                   init_std: float | None = None) -> list[NolaTrainLinear]:
    """Freeze ``model`` and replace each ``targets`` linear (names relative to a decoder
    layer) of each decoder layer with a ``NolaTrainLinear``, in place; returns them in
    (layer, target) order. ``alpha`` is drawn from ``torch.Generator().manual_seed(seed)``
    in that order, so the same arguments give the same start. Raises ``ValueError`` on a
    bad argument or a model that is already wrapped."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2^63 - 1], got {seed}")
    num_basis_b = num_basis if num_basis_b is None else num_basis_b
    if min(rank, num_basis, num_basis_b) < 1:
        raise ValueError("rank and num_basis must be positive")
    if not targets or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct module names, got {list(targets)}")
    if trainable_modules(model):
        raise ValueError("the model is already NOLA-trainable")
    model_spec(model, list(targets))  # every target is an nn.Linear of the decoder layers
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    wrapped = []
    for i, layer in enumerate(decoder_layers(model)):
        for t, name in enumerate(targets):
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            base = getattr(parent, attr)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"layer {i} {name!r} is {type(base).__name__}, not nn.Linear")
            module = NolaTrainLinear(
                base, seed=seed, layer=i, target=t, num_targets=len(targets), name=name,
                rank=rank, num_basis_a=num_basis, num_basis_b=num_basis_b,
                lora_alpha=lora_alpha, generator=gen, init_std=init_std)
            setattr(parent, attr, module)
            wrapped.append(module)
    return wrapped


def trainable_modules(model: nn.Module) -> list[NolaTrainLinear]:
    """The model's ``NolaTrainLinear`` modules in (layer, target) order."""
    found = [m for m in model.modules() if isinstance(m, NolaTrainLinear)]
    return sorted(found, key=lambda m: (m.layer, m.target))


def export(model: nn.Module, *, base_model: str = "", description: str = "") -> NolaAdapter:
    """The trained coefficients of a ``make_trainable`` model as a format v1 adapter:
    ``alpha [L, T, k]``, ``beta [L, T, l]`` float32 copies, with its seed, rank, lora_alpha,
    targets and module shapes. Raises ``ValueError`` if the model is not NOLA-trainable."""
    modules = trainable_modules(model)
    if not modules:
        raise ValueError("the model has no NolaTrainLinear: call make_trainable first")
    first = modules[0]
    targets = [m.name for m in modules if m.layer == first.layer]
    n_layers = len(modules) // len(targets)
    if [(m.layer, m.name) for m in modules] != [(i, t) for i in range(n_layers)
                                                 for t in targets]:
        raise ValueError("the NolaTrainLinear modules do not cover every (layer, target)")
    with torch.no_grad():
        alpha = torch.stack([m.alpha.detach().float().cpu() for m in modules])
        beta = torch.stack([m.beta.detach().float().cpu() for m in modules])
    return NolaAdapter(
        seed=first.seed, rank=first.rank, lora_alpha=first.lora_alpha,
        target_modules=targets,
        module_shapes={m.name: (m.in_features, m.out_features) for m in modules[:len(targets)]},
        alpha=alpha.view(n_layers, len(targets), -1).clone(),
        beta=beta.view(n_layers, len(targets), -1).clone(),
        base_model=base_model, description=description)
