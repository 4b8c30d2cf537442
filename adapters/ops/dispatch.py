"""The public batched low-rank ops ``add_lora`` and ``add_lora_multi`` and their
backend choice."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from .batch import LoraBatch
from .checks import check_lora_args, check_module_lists
from .factors import Factors
from .torch_lora import gather_bmm, reference, segment

Backend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoraBatch],
    torch.Tensor,
]

# Every backend, for tests and benchmarks to iterate; all must agree with ``reference``.
BACKENDS: tuple[Backend, ...] = (reference, segment, gather_bmm)

Tensors = Sequence[torch.Tensor]
MultiBackend = Callable[[Tensors, torch.Tensor, Tensors, Tensors, Tensors, LoraBatch], Tensors]
# what an engine step calls: ``MultiBackend`` with the modules' buffers bound in ``Factors``
FactorsBackend = Callable[[Tensors, torch.Tensor, Factors, LoraBatch], Tensors]

# ``gather_bmm`` beats ``segment`` on CPU below about this many tokens per distinct slot
# (measured on SmolLM2's q_proj, 576 -> 576, r = 8; see ``choose_backend``).
GATHER_MAX_TOKENS_PER_SLOT = 4


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    token_slot: LoraBatch | torch.Tensor,
    *,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Add each token's adapter delta to ``y`` in place and return ``y``.

    Semantics, with ``idx = token_slot`` (or ``batch.token_slot``)::

        for i in range(T):
            if idx[i] >= 0:  # -1: no adapter, y[i] is not touched
                y[i] += (x[i] @ A[idx[i]].T) @ B[idx[i]].T * scale[idx[i]]

    Shapes::

        y:          [T, out]         updated in place
        x:          [T, in]
        A:          [S, r_max, in]   ranks below r_max zero-padded by the caller
        B:          [S, out, r_max]
        scale:      [S]
        token_slot: [T] integer in [-1, S), or a ``LoraBatch`` built once per step

    ``x``, ``y``, ``A`` and ``B`` share one floating dtype; the fast backends compute
    in it, ``reference`` in fp32. ``backend`` is one of ``BACKENDS``; ``None`` picks
    one with ``choose_backend``. Raises ``ValueError`` on inconsistent shapes, dtypes
    or devices and on slots outside ``[-1, S)``.
    """
    batch = token_slot if isinstance(token_slot, LoraBatch) else LoraBatch.from_token_slot(
        token_slot
    )
    check_lora_args(y, x, A, B, scale, batch)
    if not batch.has_adapters:
        return y
    if backend is None:
        backend = choose_backend(x, batch)
    return backend(y, x, A, B, scale, batch)


def choose_backend(x: torch.Tensor, batch: LoraBatch) -> Backend:
    """The backend ``add_lora`` uses when none is given.

    Device-specific kernels (a Triton SGMV for CUDA) take precedence here, ahead of
    the torch heuristic below.

    CPU heuristic, from timings of both backends (one thread, 576 -> 576, r = 8):
    ``segment`` pays ~20 us of fixed cost per distinct slot, ``gather_bmm`` ~35 us once
    plus ~6 us per token (it copies each token's factors). So ``gather_bmm`` when the
    batch spans several slots with fewer than ``GATHER_MAX_TOKENS_PER_SLOT`` tokens each
    on average (decode over many adapters), otherwise ``segment`` (one adapter, prefill).
    """
    if x.is_cuda and (sgmv := cuda_backend()) is not None:
        return sgmv
    num_segments = batch.num_segments
    if num_segments > 1 and batch.num_active < GATHER_MAX_TOKENS_PER_SLOT * num_segments:
        return gather_bmm
    return segment


@functools.cache
def cuda_backend() -> Backend | None:
    """The Triton SGMV backend (``triton_sgmv.sgmv_split``, split-K), or None when triton
    does not import. Imported on first use, so CPU-only processes never import triton."""
    try:
        from .triton_sgmv import sgmv_split
    except ImportError:
        return None
    return sgmv_split


def step_backend(batch: LoraBatch, device: torch.device) -> FactorsBackend:
    """The LoRA op of one engine step, chosen once per step (the batch decides) and then
    called by every wrapped linear or shared-input group with its ``Factors``, without
    checks: the caller validated shapes and dtypes when it wrapped the model and the slots
    when it built ``batch``. On CUDA: ``triton_sgmv.sgmv_factors``; else ``loop_factors``
    bound to ``choose_backend``'s pick."""
    if device.type == "cuda" and (sgmv := cuda_factors_backend()) is not None:
        return sgmv
    return functools.partial(loop_factors, backend=choose_backend(batch.token_slot, batch))


@functools.cache
def cuda_factors_backend() -> FactorsBackend | None:
    """``triton_sgmv.sgmv_factors``, or None when triton does not import (lazy)."""
    try:
        from .triton_sgmv import sgmv_factors
    except ImportError:
        return None
    return sgmv_factors


def loop_factors(ys: Tensors, x: torch.Tensor, factors: Factors, batch: LoraBatch,
                 backend: Backend) -> Tensors:
    """The torch ``FactorsBackend``: ``loop_modules`` over ``factors``' modules."""
    return loop_modules(ys, x, factors.As, factors.Bs, factors.scales, batch, backend)


def add_lora_multi(
    ys: Tensors,
    x: torch.Tensor,
    As: Tensors,
    Bs: Tensors,
    scales: Tensors,
    token_slot: LoraBatch | torch.Tensor,
    *,
    backend: MultiBackend | None = None,
) -> Tensors:
    """``add_lora`` for several modules that read the same ``x`` (q, k, v); returns ``ys``.

    Exactly equal to::

        for y, A, B, scale in zip(ys, As, Bs, scales):
            add_lora(y, x, A, B, scale, token_slot)

    Shapes, per module ``m`` (each its own ``out_m``, ``r_m`` and slot count ``S_m``;
    one ``x``, one ``token_slot``, one dtype)::

        ys[m]:      [T, out_m]         updated in place; must not overlap one another
                                       (column slices of one fused qkv output are fine)
        x:          [T, in]
        As[m]:      [S_m, r_m, in]
        Bs[m]:      [S_m, out_m, r_m]
        scales[m]:  [S_m]
        token_slot: [T] integer in [-1, min S_m), or a ``LoraBatch``

    ``backend`` is ``loop_modules`` (the torch loop above) or, on CUDA,
    ``triton_sgmv_multi.sgmv_multi_split`` (split-K, two launches per three modules,
    each tile of ``x`` loaded once for all three); ``None`` picks with
    ``choose_multi_backend``. Raises ``ValueError`` like ``add_lora``, and when the lists
    differ in length.
    """
    batch = token_slot if isinstance(token_slot, LoraBatch) else LoraBatch.from_token_slot(
        token_slot
    )
    check_module_lists(ys, As, Bs, scales)
    for y, A, B, scale in zip(ys, As, Bs, scales):
        check_lora_args(y, x, A, B, scale, batch)
    if not batch.has_adapters:
        return ys
    if backend is None:
        backend = choose_multi_backend(x)
    return backend(ys, x, As, Bs, scales, batch)


def loop_modules(
    ys: Tensors, x: torch.Tensor, As: Tensors, Bs: Tensors, scales: Tensors, batch: LoraBatch,
    backend: Backend | None = None,
) -> Tensors:
    """The torch backend of ``add_lora_multi``: its definition, one ``add_lora`` backend
    call per module (``backend``, or ``choose_backend``'s pick, made once)."""
    if backend is None:
        backend = choose_backend(x, batch)
    for y, A, B, scale in zip(ys, As, Bs, scales):
        backend(y, x, A, B, scale, batch)
    return ys


def choose_multi_backend(x: torch.Tensor) -> MultiBackend:
    """``triton_sgmv_multi.sgmv_multi_split`` for CUDA tensors when triton imports, else
    ``loop_modules``."""
    if x.is_cuda and (multi := cuda_multi_backend()) is not None:
        return multi
    return loop_modules


@functools.cache
def cuda_multi_backend() -> MultiBackend | None:
    """``triton_sgmv_multi.sgmv_multi_split``, or None when triton does not import (lazy,
    like ``cuda_backend``)."""
    try:
        from .triton_sgmv_multi import sgmv_multi_split
    except ImportError:
        return None
    return sgmv_multi_split
