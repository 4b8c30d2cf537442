"""Batched low-rank ops.

``add_lora(y, x, A, B, scale, token_slot)`` adds, for every token ``i`` with
``token_slot[i] >= 0``, ``(x[i] @ A[s].T) @ B[s].T * scale[s]`` (``s = token_slot[i]``)
to ``y[i]`` in place; ``-1`` adds nothing. ``add_lora_multi(ys, x, As, Bs, scales,
token_slot)`` is ``add_lora`` looped over modules that share ``x`` (q, k, v), in one
launch on CUDA. See ``add_lora`` for shapes and ``LoraBatch`` for the per-step batch
description that every layer's call shares. ``add_lora_rows`` is ``add_lora`` from the
token -> slot tensor alone, for steps captured in a CUDA graph, and ``add_lora_multi_rows``
its shared-input group form; both take the step's ``slot_runs(token_slot)``. The engine
binds each wrapped linear's (or group's) buffers once in a ``Factors`` and calls
``add_factors_rows`` (a decode step) or its step's ``FactorsBackend`` (``step_backend``).
"""

from .batch import LoraBatch, SegmentPlan, SlotRuns, slot_runs
from .dispatch import (
    BACKENDS,
    Backend,
    FactorsBackend,
    MultiBackend,
    add_lora,
    add_lora_multi,
    choose_backend,
    choose_multi_backend,
    loop_factors,
    loop_modules,
    step_backend,
)
from .factors import Factors
from .rows import add_factors_rows, add_lora_multi_rows, add_lora_rows
from .torch_lora import gather_bmm, gather_rows, reference, segment

__all__ = [
    "BACKENDS",
    "Backend",
    "Factors",
    "FactorsBackend",
    "LoraBatch",
    "MultiBackend",
    "SegmentPlan",
    "SlotRuns",
    "add_factors_rows",
    "add_lora",
    "add_lora_multi",
    "add_lora_multi_rows",
    "add_lora_rows",
    "choose_backend",
    "choose_multi_backend",
    "gather_bmm",
    "gather_rows",
    "loop_factors",
    "loop_modules",
    "reference",
    "segment",
    "slot_runs",
    "step_backend",
]
